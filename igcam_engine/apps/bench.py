"""`igcam bench`: the measurements of igcam_engine.benchmarks from the command line (docs/performance.md)."""
from __future__ import annotations

from pathlib import Path

from igcam_engine.apps.arguments import Command, positive
from igcam_engine.backends import providers_text
from igcam_engine.errors import OptionError, Unavailable, install_hint
from igcam_engine.validators import integer, integer_text


def arguments(parser) -> None:
    from igcam_engine.benchmarks import (
        EXTRA_STUDIES,
        LATENCY_MODELS,
        METHOD_MODELS,
        PRECISION_MODELS,
        QUADRATURE_STEPS,
        STUDIES,
        TASK_MODELS,
    )

    parser.add_argument("kind", choices=[*STUDIES, *EXTRA_STUDIES, "all"],
                        help=f"a study, or all ({', '.join(STUDIES)}; methods and tasks need grad-cam, precision "
                        "openvino)")
    parser.add_argument("--models", help=f"latency, methods, precision, tasks: comma-separated models among "
                        f"{', '.join(dict.fromkeys([*LATENCY_MODELS, *PRECISION_MODELS, *TASK_MODELS]))} (default: all "
                        f"latency models for latency; {', '.join(METHOD_MODELS)} for methods; "
                        f"{', '.join(PRECISION_MODELS)} for precision; {', '.join(TASK_MODELS)} for tasks)")
    parser.add_argument("--steps", default="8,16,32,50", help="latency: engine steps to time (default: 8,16,32,50)")
    parser.add_argument("--peer-steps", default="32", help="latency, precision: m for the peers and ratios (default: 32)")
    parser.add_argument("--batches", default="1,2,4", help="latency: image counts for latency vs images")
    parser.add_argument("--repeats", default="5", help="timed runs per configuration (default: 5)")
    parser.add_argument("--warmup", default="1", help="untimed runs first (default: 1)")
    parser.add_argument("--reference-steps", default="256", help="quadrature: Gauss-Legendre reference nodes")
    parser.add_argument("--quadrature-steps", default=",".join(map(str, QUADRATURE_STEPS)))
    parser.add_argument("--providers", default="auto", metavar="P", help="engine providers, as everywhere (default: auto)")
    parser.add_argument("--small", action="store_true", help="narrow random-weight models: a quick set-up check")
    parser.add_argument("-o", "--output", default="benchmarks/results", metavar="DIR")


def run(args) -> None:
    try:
        from igcam_engine import benchmarks
    except ImportError as e:
        raise Unavailable(f"igcam bench needs torch and matplotlib: {install_hint('export,bench')} ({e})") from None
    models = tuple(args.models.split(",")) if args.models else None
    known = dict.fromkeys([*benchmarks.LATENCY_MODELS, *benchmarks.PRECISION_MODELS, *benchmarks.TASK_MODELS])
    unknown = [m for m in models or () if m not in known]
    if unknown:
        raise OptionError(f"unknown model(s) {unknown}; choose from {', '.join(known)}")
    kinds = benchmarks.STUDIES if args.kind == "all" else (args.kind,)
    output = Path(args.output)
    tables = benchmarks.run(
        kinds, output, models=models, steps=_counts(args.steps, "--steps"),
        peer_steps=positive(args.peer_steps, "--peer-steps"), batches=_counts(args.batches, "--batches"),
        repeats=positive(args.repeats, "--repeats"), warmup=integer(integer_text(args.warmup, "--warmup"), "--warmup", 0),
        providers=providers_text(args.providers), small=args.small,
        quadrature_steps=_counts(args.quadrature_steps, "--quadrature-steps"),
        reference_steps=positive(args.reference_steps, "--reference-steps"))
    if args.kind == "all":
        (output / "tables.md").write_text("\n".join(tables))
    print(f"results in {output}/")


def _counts(text: str, option: str) -> tuple:
    """Comma-separated positive integers."""
    return tuple(positive(part.strip(), option) for part in text.split(","))


COMMANDS = (Command(
    "bench", "measure the engine against PyTorch recipes and ONNX Runtime; the quadrature study", arguments, run,
    description="Measures, in one run on this machine: latency (floor, ONNX Runtime forward-only, the engine at several "
    "m, tuned and official PyTorch, Grad-CAM, peak memory, latency vs images), the quadrature study (error vs passes "
    "per rule against Gauss-Legendre 256), adaptive steps, and several targets per image. Writes KIND.json (every "
    "sample), KIND.md (tables) and KIND.png (plots) into the output directory. `igcam bench all -o "
    "benchmarks/results` reproduces every table of benchmarks/RESULTS.md."),)
