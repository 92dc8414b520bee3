"""Every CAM method: the engine against pytorch-grad-cam on the same model and photo (one image, its predicted
class), timed in the same run, with the normalized map difference; and the engine's IG-CAM against pytorch-grad-cam's
GradCAM looped over the m interpolated images, as a pytorch-grad-cam user would compute it. Needs grad-cam (and
so torchvision): run it in the corpus tier's virtualenv (see benchmarks/RESULTS.md)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.benchmarks.measure import against_peer, machine, ms
from igcam_engine.benchmarks.models import SHAPE, build_model
from igcam_engine.benchmarks.recipes import pytorch_grad_cam_path
from igcam_engine.methods import METHOD_TABLE

METHOD_MODELS = ("efficientnet_lite0", "mobilenet_v2")
PEER_CLASSES = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
                "layercam": "LayerCAM", "eigencam": "EigenCAM", "scorecam": "ScoreCAM", "ablationcam": "AblationCAM"}


def methods_study(models=METHOD_MODELS, steps=50, repeats=3, warmup=1, providers=None, small=False, log=print) -> dict:
    try:
        import pytorch_grad_cam  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the methods study compares with pytorch-grad-cam, which does not import here ({e}); "
                           "run it in the corpus tier's virtualenv: .venv-models/bin/igcam bench methods") from None
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            results.append(_model_methods(name, Path(workdir), steps, repeats, warmup, providers, small, log))
    return {"machine": machine(), "steps": steps, "results": results}


def _model_methods(name, workdir, steps, repeats, warmup, providers, small, log) -> dict:
    import pytorch_grad_cam
    import torch
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from igcam_engine.data import sample_images
    from igcam_engine.export import from_torch
    from igcam_engine.images import load_image, to_model_input

    model, layer, preprocess = build_model(name, small)
    explainer = Explainer(from_torch(model, layer, SHAPE, workdir / name, preprocess=preprocess), providers=providers)
    image = to_model_input(load_image(sample_images()[0]), SHAPE, explainer.preprocess)[0][None]
    target = int(np.argmax(explainer.predict(image)))
    image_t, module = torch.from_numpy(image), dict(model.named_modules())[layer]
    targets = [ClassifierOutputTarget(target)]
    rows = []

    def timed(label, engine, peer):
        against_peer(rows, name, label, engine, peer, warmup, repeats, log)

    for method, class_name in PEER_CLASSES.items():
        peer = getattr(pytorch_grad_cam, class_name)(model=model, target_layers=[module])
        if method == "scorecam":
            peer.batch_size = 64
        timed(method, lambda m=method: explainer.explain(image, target, method=m),
              lambda p=peer: p(input_tensor=image_t, targets=targets))
        peer.activations_and_grads.release()

    grad_cam = pytorch_grad_cam.GradCAM(model=model, target_layers=[module])
    timed(f"igcam (m={steps})", lambda: explainer.explain(image, target, steps=steps),
          pytorch_grad_cam_path(grad_cam, image, explainer.preprocess, targets, steps))
    grad_cam.activations_and_grads.release()
    return {"model": name, "layer": layer, "target": target, "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"One {SHAPE[1]}×{SHAPE[2]} photo (chelsea.png), its predicted class; medians of timed runs in the same "
             "process. Δ: max |difference| of the min-max normalized maps (EigenCAM: pytorch-grad-cam keeps SVD's "
             "arbitrary sign, see docs/method.md).", "",
             "| model | method | engine | pytorch-grad-cam | engine speed-up | max normalized Δ |", "|---|---|---|---|---|---|"]
    for entry in report["results"]:
        for row in entry["rows"]:
            lines.append(f"| {entry['model']} ({entry['layer']}) | {row['method']} | {ms(row['engine']['median_s'])} | "
                         f"{ms(row['peer']['median_s'])} | ×{row['ratio']:.1f} | {row['normalized_error']:.1e} |")
    kernel = ", ".join(name for name, method in METHOD_TABLE.items() if method.kernel is not None)
    lines += ["", f"On a GPU the fused kernel reduces {kernel} (and their integrated forms) on the device; see docs/method.md."]
    return "\n".join(lines)
