"""`igcam bench`: the engine against the recipes people run today, and the quadrature study, on this machine.

Every figure is measured in the same run as its peers: medians (and p90/p95) over timed repeats after warm-up,
ratios between configurations of that run. Needs the export extra (torch) for the PyTorch peers and matplotlib
for the plots; the runtime itself never imports either. One module per study:

- models: the benchmark models (zoo architectures with their target layer and preprocessing);
- recipes: the peers' recipes (the authors' official PyTorch recipe, tuned PyTorch, pytorch-grad-cam);
- measure: timing and peak memory of one configuration, the machine, the report files;
- latency: the floor, ONNX Runtime forward-only, the engine at several m, the PyTorch peers, Grad-CAM, peak
  memory and latency against the number of images;
- quadrature: map error against Gauss-Legendre 256 per rule and number of passes, and steps="auto";
- targets: k classes per image in one call against k calls;
- methods: every CAM method against pytorch-grad-cam, and IG-CAM against pytorch-grad-cam looped over the path
  (needs grad-cam: the corpus tier's virtualenv);
- tasks: a segmenter and a detector against pytorch-grad-cam with the same targets (needs grad-cam and
  ultralytics: the corpus tier's virtualenv);
- evaluation: the metrics of igcam_engine.evaluation for every method on the shipped localization set with the
  pretrained EfficientNet-Lite0/1/2, and the same metrics with PyTorch eager, timed in the same run;
- precision: the OpenVINO backend in float32 and bfloat16 and an int8 forward graph against the float32 engine,
  time and map error on the shipped photos (needs the openvino extra);
- gpu: the GPU latency table (`python -m igcam_engine.benchmarks.gpu`, see gpu_session.sh);
- serve_load: load for `igcam serve` (`python -m igcam_engine.benchmarks.serve_load URL`).
"""
from igcam_engine.benchmarks.methods import METHOD_MODELS
from igcam_engine.benchmarks.models import LATENCY_MODELS
from igcam_engine.benchmarks.precision import PRECISION_MODELS
from igcam_engine.benchmarks.quadrature import QUADRATURE_STEPS
from igcam_engine.benchmarks.tasks import TASK_MODELS

STUDIES = ("latency", "quadrature", "adaptive", "targets")  # `all`: what runs with the bench extra alone
# methods and tasks need grad-cam; evaluation takes 75 min on 2 cores; precision needs the openvino extra
EXTRA_STUDIES = ("methods", "tasks", "evaluation", "precision")

__all__ = ["LATENCY_MODELS", "METHOD_MODELS", "PRECISION_MODELS", "TASK_MODELS", "QUADRATURE_STEPS", "STUDIES",
           "EXTRA_STUDIES", "run"]


def run(kinds, output, *, models=None, steps=(8, 16, 32, 50), peer_steps=32, batches=(1, 2, 4),
        repeats=5, warmup=1, providers=None, small=False, quadrature_steps=QUADRATURE_STEPS, reference_steps=256,
        log=print) -> list[str]:
    """Runs the studies `kinds` (a subset of STUDIES, in order) and writes KIND.json, KIND.md and KIND.png into
    `output`; returns the Markdown tables. models None: each study's own (LATENCY_MODELS, METHOD_MODELS)."""
    from igcam_engine.benchmarks import evaluation, latency, methods, precision, quadrature, targets, tasks
    from igcam_engine.benchmarks.measure import write

    cases, tables = None, []
    for kind in kinds:
        log(f"igcam bench {kind} ...")
        plot = None
        if kind == "latency":
            report = latency.latency(models or LATENCY_MODELS, steps, peer_steps, batches, repeats, warmup, providers,
                                     small, log)
            markdown, plot = latency.markdown(report), latency.plot
        elif kind == "methods":
            report = methods.methods_study(models or METHOD_MODELS, max(steps), repeats, warmup, providers, small, log)
            markdown = methods.markdown(report)
        elif kind == "tasks":
            report = tasks.tasks_study(models or TASK_MODELS, max(steps), repeats, warmup, providers, small, log)
            markdown = tasks.markdown(report)
        elif kind == "evaluation":
            report = evaluation.evaluation_study(small, providers, log)
            markdown = evaluation.markdown(report)
        elif kind == "precision":
            report = precision.precision_study(models or precision.PRECISION_MODELS, peer_steps, repeats, warmup, small, log)
            markdown = precision.markdown(report)
        elif kind == "targets":
            report = targets.targets_study(steps=peer_steps, repeats=repeats, warmup=warmup, small=small, log=log)
            markdown = targets.markdown(report)
        else:
            cases = cases or quadrature.quadrature_cases(small)
            if kind == "quadrature":
                report = quadrature.quadrature_study(quadrature_steps, reference_steps, cases=cases, log=log)
                markdown, plot = quadrature.quadrature_markdown(report), quadrature.plot
            else:
                report = quadrature.adaptive_study(reference_steps=reference_steps, cases=cases, log=log)
                markdown = quadrature.adaptive_markdown(report)
        write(kind, report, markdown, output, plot)
        tables.append(f"### {kind}\n\n{markdown}\n")
        log(markdown + "\n")
    return tables
