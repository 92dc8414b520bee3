"""Targets beyond classes: a segmenter (torchvision's DeepLabV3-MobileNetV3, a class's predicted mask) and a
detector (ultralytics' YOLOv8n exported by its own ONNX exporter, its most confident detection's score), the engine
against pytorch-grad-cam on the same model, photo and target, timed in the same run, with the normalized map
difference: Grad-CAM, IG-CAM (pytorch-grad-cam's GradCAM looped over the m interpolated images, as its users would
compute it) and, for the detector, EigenCAM (as pytorch-grad-cam's tutorial explains YOLO). Random weights with
batch norms measured on the sample photos and class scores near 0.5: timings and agreement, not what the models
see. Needs grad-cam, torchvision and ultralytics: run it in the corpus tier's virtualenv
(.venv-models/bin/igcam bench tasks, see benchmarks/RESULTS.md)."""
from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.benchmarks.measure import against_peer, machine, ms
from igcam_engine.benchmarks.recipes import pytorch_grad_cam_path

TASK_MODELS = ("deeplabv3_mobilenet_v3_large", "yolov8n")


def tasks_study(models=TASK_MODELS, steps=50, repeats=3, warmup=1, providers=None, small=False, log=print) -> dict:
    try:
        import pytorch_grad_cam  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"the tasks study compares with pytorch-grad-cam, which does not import here ({e}); run it "
                           "in the corpus tier's virtualenv: .venv-models/bin/igcam bench tasks") from None
    side = 96 if small else 224
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            build = {"deeplabv3_mobilenet_v3_large": _segmenter, "yolov8n": _detector}.get(name)
            if build is None:
                raise ValueError(f"unknown tasks model '{name}'; choose from {', '.join(TASK_MODELS)}")
            results.append(_compare(name, *build(side, Path(workdir)), steps, repeats, warmup, providers, log))
    return {"machine": machine(), "steps": steps, "side": side, "results": results}


@contextlib.contextmanager
def process_state_kept():
    """Importing and using ultralytics sets torch to one thread and OMP_NUM_THREADS=1 for the whole process (its
    training defaults): the peers would then be timed on fewer threads than the engine, and float32 results
    elsewhere change. What it changes is put back on the way out."""
    import torch

    threads, environment = torch.get_num_threads(), dict(os.environ)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environment)


def _photo(shape, preprocess):
    from igcam_engine.data import sample_images
    from igcam_engine.images import load_image, to_model_input

    return to_model_input(load_image(sample_images()[0]), shape, preprocess)[0][None]


def _calibrated(model, shape, preprocess):
    """Batch-norm statistics measured on the sample photos and their mirror images (random weights otherwise)."""
    import torch

    from igcam_engine.data import sample_images
    from igcam_engine.images import load_image, to_model_input
    from igcam_engine.preprocess import resolve_preprocess

    spec = resolve_preprocess(preprocess, channels=shape[0])
    photos = np.stack([to_model_input(load_image(p), shape, spec)[0] for p in sample_images()])
    batch = torch.from_numpy(np.concatenate([photos, photos[:, :, :, ::-1]]).copy())  # and mirrored
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        model(batch)
    return model.eval()


def _segmenter(side, workdir):
    """(model, torch module the peer explains, layer module path, its engine Explainer, the photo, the engine's
    target, the peer's target, target name)."""
    import torch
    import torchvision
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    from igcam_engine.export import from_torch
    from igcam_engine.targets import SemanticSegmentationTarget as Target

    shape = (3, side, side)
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                          num_classes=21)
    model = _calibrated(model, shape, "imagenet")
    layer = "backbone.16"
    explainer = Explainer(from_torch(model, layer, shape, workdir / "deeplab", preprocess="imagenet", outputs=["out"]))
    image = _photo(shape, explainer.preprocess)
    scores = explainer.model_outputs(image)[0][0]
    category = int(np.bincount(scores.argmax(axis=0).ravel()).argmax())
    mask = (scores.argmax(axis=0) == category).astype(np.float32)

    class Out(torch.nn.Module):  # pytorch-grad-cam's segmentation tutorial wraps the dict output the same way
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)["out"]

    return (Out().eval(), dict(model.named_modules())[layer], layer, explainer, image, Target(category, mask),
            SemanticSegmentationTarget(category, mask), f"class {category}'s predicted mask")


def _detector(side, workdir):
    import torch

    from igcam_engine.detections import HEADS, decode
    from igcam_engine.export import from_onnx
    from igcam_engine.targets import BoxScoreTarget

    shape = (3, side, side)
    preprocess = {"resize": "stretch", "scale": 1 / 255, "mean": [0.0] * 3, "std": [1.0] * 3}  # ultralytics'
    model, path = yolov8n(shape, preprocess, workdir)
    explainer = Explainer(from_onnx(path, workdir / "yolo", tensor="/model.9/cv2/act/Mul_output_0", input_shape=shape,
                                    preprocess=preprocess))
    image = _photo(shape, preprocess)
    best = decode(HEADS["yolov8"], explainer.model_outputs(image), shape[1:])[0]

    class Predictions(torch.nn.Module):  # ultralytics' eval output: (predictions, levels)
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)[0]

    def score(out):  # pytorch-grad-cam calls a target with the output of one image
        return out[4 + best.category, best.index]

    return (Predictions().eval(), model.model[9], "model.9", explainer, image, BoxScoreTarget.of(best), score,
            f"detection at {best.index}, class {best.category}")


def yolov8n(shape, preprocess, workdir: Path):
    """(ultralytics' YOLOv8n built from its yaml, random weights with class scores near 0.5 and batch norms measured
    on the sample photos, in eval mode; its ONNX file written by ultralytics' own exporter, dynamic, opset 18),
    the process's threads and environment as they were."""
    import torch

    with process_state_kept():
        os.environ["YOLO_OFFLINE"] = "1"
        from ultralytics import YOLO

        torch.manual_seed(0)
        yolo = YOLO("yolov8n.yaml")
        for branch in yolo.model.model[-1].cv3:  # not ultralytics' training prior of ~1e-4
            torch.nn.init.zeros_(branch[-1].bias)
        _calibrated(yolo.model, shape, preprocess)
        cwd = os.getcwd()
        os.chdir(workdir)  # ultralytics writes next to the model's name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path = workdir / yolo.export(format="onnx", imgsz=shape[1], dynamic=True, simplify=False, opset=18,
                                             verbose=False)
        finally:
            os.chdir(cwd)
    return yolo.model.eval(), path


def _compare(name, peer_model, module, layer, explainer, image, target, peer_target, what, steps, repeats, warmup,
             providers, log) -> dict:
    import pytorch_grad_cam
    import torch

    if providers is not None:
        explainer = Explainer(explainer.manifest, providers=providers)
    image_t, rows = torch.from_numpy(image), []

    def timed(label, engine, peer):
        against_peer(rows, name, label, engine, peer, warmup, repeats, log)

    grad_cam = pytorch_grad_cam.GradCAM(model=peer_model, target_layers=[module])
    timed("gradcam", lambda: explainer.explain(image, target, method="gradcam"),
          lambda: grad_cam(input_tensor=image_t, targets=[peer_target]))
    timed(f"igcam (m={steps})", lambda: explainer.explain(image, target, steps=steps),
          pytorch_grad_cam_path(grad_cam, image, explainer.preprocess, [peer_target], steps))
    grad_cam.activations_and_grads.release()
    if name == "yolov8n":
        eigen = pytorch_grad_cam.EigenCAM(model=peer_model, target_layers=[module])
        timed("eigencam", lambda: explainer.explain(image, target, method="eigencam"),
              lambda: eigen(input_tensor=image_t, targets=[peer_target]))
        eigen.activations_and_grads.release()
    return {"model": name, "layer": layer, "target": what, "rows": rows}


def markdown(report: dict) -> str:
    lines = [f"One {report['side']}×{report['side']} photo (chelsea.png), random weights; medians of timed runs in the "
             "same process. Δ: max |difference| of the min-max normalized maps (EigenCAM: pytorch-grad-cam keeps "
             "SVD's arbitrary sign, see docs/method.md).", "",
             "| model | target | method | engine | pytorch-grad-cam | engine speed-up | max normalized Δ |",
             "|---|---|---|---|---|---|---|"]
    for entry in report["results"]:
        for row in entry["rows"]:
            lines.append(f"| {entry['model']} ({entry['layer']}) | {entry['target']} | {row['method']} | "
                         f"{ms(row['engine']['median_s'])} | {ms(row['peer']['median_s'])} | ×{row['ratio']:.1f} | "
                         f"{row['normalized_error']:.1e} |")
    return "\n".join(lines)
