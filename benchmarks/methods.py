"""Every CAM method: the engine against pytorch-grad-cam on the same model and photo (one image, its predicted
class), timed in the same run, with the normalized map difference; and the engine's IG-CAM against pytorch-grad-cam's
GradCAM looped over the m interpolated images, as a pytorch-grad-cam user would compute it. Needs grad-cam (and
so torchvision): run it in the corpus tier's virtualenv (see benchmarks/RESULTS.md)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.benchmarks.measure import machine, map_errors, measure, ms
from igcam_engine.benchmarks.models import SHAPE, build_model
from igcam_engine.methods import METHOD_TABLE
from igcam_engine.quadrature import quadrature

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
    import cv2
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
        engine_maps, peer_maps = engine(), peer()
        row = {"method": label, "engine": measure(engine, warmup, repeats), "peer": measure(peer, warmup, repeats),
               "normalized_error": map_errors(engine_maps, peer_maps)[0]}
        row["ratio"] = row["peer"]["median_s"] / row["engine"]["median_s"]
        log(f"  {name:20s} {label:22s} engine {ms(row['engine']['median_s']):>9s}  pytorch-grad-cam "
            f"{ms(row['peer']['median_s']):>9s}  x{row['ratio']:.1f}  max normalized Δ {row['normalized_error']:.1e}")
        rows.append(row)

    for method, class_name in PEER_CLASSES.items():
        peer = getattr(pytorch_grad_cam, class_name)(model=model, target_layers=[module])
        if method == "scorecam":
            peer.batch_size = 64
        timed(method, lambda m=method: explainer.explain(image, target, method=m),
              lambda p=peer: p(input_tensor=image_t, targets=targets))
        peer.activations_and_grads.release()

    # IG-CAM: pytorch-grad-cam's GradCAM once per interpolated image; its raw (unnormalized) step maps are captured
    # so that the sum is IG-CAM's map, the same quantity as the engine's.
    alphas, weights = quadrature("left", steps)
    black = torch.from_numpy(np.broadcast_to(_black(explainer.preprocess), image.shape[1:]).astype(np.float32))
    grad_cam = pytorch_grad_cam.GradCAM(model=model, target_layers=[module])
    raw = []
    compute = grad_cam.get_cam_image

    def capture(*args, **kwargs):
        raw.append(compute(*args, **kwargs))
        return raw[-1]

    grad_cam.get_cam_image = capture

    def looped():
        raw.clear()
        for alpha in alphas:
            grad_cam(input_tensor=(black + float(alpha) * (image_t[0] - black))[None], targets=targets)
        coarse = sum(w * np.maximum(r[0], 0) for w, r in zip(weights, raw))
        return cv2.resize(np.float32(coarse), SHAPE[1:][::-1])[None]

    timed(f"igcam (m={steps})", lambda: explainer.explain(image, target, steps=steps), looped)
    grad_cam.activations_and_grads.release()
    return {"model": name, "layer": layer, "target": target, "rows": rows}


def _black(preprocess) -> np.ndarray:
    if not preprocess:
        return np.zeros((SHAPE[0], 1, 1))
    return (-np.array(preprocess["mean"]) / np.array(preprocess["std"]))[:, None, None]


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
