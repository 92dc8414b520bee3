"""Keras applications with `weights=None` (batch norms calibrated on real photos), exported by tf2onnx as a
TensorFlow user exports them: a channels-last image input [B, H, W, 3], Transposes that tf2onnx's optimizer moves
around, a final Softmax. The reference is TensorFlow itself: GradientTape in float64 on the same weights
(tests/corpus/keras_reference.py, run by the Keras virtualenv's Python that scripts/test.sh makes and names in
IGCAM_KERAS_PYTHON; TensorFlow and torch do not share a virtualenv here). The float32 error allowed is four times the larger of
TensorFlow's own float32 error and that of the file's float32 activations as ONNX Runtime computes them.

Before model inputs were read from the graph, such a file exported with a manifest claiming NCHW [96, 96, 3]."""
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from subjects import calibration_batch
from support.comparisons import assert_maps_match, max_normalized_difference, max_relative_difference, triviality
from support.reference import contract_maps

from igcam_engine import Explainer
from igcam_engine.data import sample_images
from igcam_engine.export import from_onnx
from igcam_engine.images import load_image, to_model_input
from igcam_engine.quadrature import quadrature

HERE = Path(__file__).resolve().parent
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@dataclass
class KerasCase:
    model: str  # keras.applications' name
    layer: str  # the Keras layer explained
    default: str  # the Keras layer whose output the engine's default target must be
    preprocess: dict  # the application's own input scaling (EfficientNet rescales inside the model)
    size: int = 96


CASES = [
    KerasCase("MobileNetV2", "block_15_add", "out_relu",
              {"resize": "stretch", "scale": 1 / 127.5, "mean": [1.0] * 3, "std": [1.0] * 3}),
    # block 6's output: the part differentiated holds block 7's squeeze-and-excitation
    KerasCase("EfficientNetB0", "block6d_add", "top_activation",
              {"resize": "stretch", "scale": 1.0, "mean": [0.0] * 3, "std": [1.0] * 3}),
]
# The paper's preset (right rule, baseline activation subtracted), not the official one: the left rule's first point
# is the zero image, where every pixel of a channel has one value, and MobileNetV2's block 16 expansion has a channel
# within 8e-7 of ReLU6's kink there; float32 rounding (tf2onnx folds the batch norms into the convolutions) flips
# that whole channel's mask, 1.3e-3 from float64 (measured): a property of this random-weight case, not the engine.
METHODS = (("IG-CAM paper, m = 4", dict(variant="paper", steps=4), quadrature("right", 4), True),
           ("Grad-CAM", dict(method="gradcam"), (np.ones(1), np.ones(1)), False))
CANDIDATES = 10  # classes per image the reference differentiates; the first with non-trivial maps is explained


def keras_python() -> str:
    python = os.environ.get("IGCAM_KERAS_PYTHON")
    if not python:
        message = "IGCAM_KERAS_PYTHON is not set: scripts/test.sh makes the Keras virtualenv and sets it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def model_space(case: KerasCase, count=2) -> np.ndarray:
    """The sample photos as the application's input, NCHW (the engine's side)."""
    return np.stack([to_model_input(load_image(p), (3, case.size, case.size), case.preprocess)[0]
                     for p in sample_images()[:count]])


def calibration(case: KerasCase) -> np.ndarray:
    """subjects.calibration_batch (ImageNet-normalized) mapped into the application's input space, NCHW."""
    pixels = calibration_batch((3, case.size, case.size)).numpy() * IMAGENET_STD[:, None, None] \
        + IMAGENET_MEAN[:, None, None]
    spec = case.preprocess
    return ((pixels * 255 * spec["scale"] - np.array(spec["mean"])[:, None, None])
            / np.array(spec["std"])[:, None, None]).astype(np.float32)


def tensorflow_reference(case: KerasCase, folder: Path, images: np.ndarray, alphas) -> tuple[Path, dict, dict]:
    """(the ONNX file tf2onnx wrote, the reference arrays, the versions used)."""
    channels_last = (0, 2, 3, 1)
    np.savez(folder / "inputs.npz", images=images.transpose(channels_last),
             calibration=calibration(case).transpose(channels_last))
    request = {"model": case.model, "size": case.size, "layer": case.layer,
               "alphas": list(alphas), "candidates": CANDIDATES, "inputs": str(folder / "inputs.npz"),
               "onnx": str(folder / "model.onnx"), "out": str(folder / "reference.npz")}
    (folder / "request.json").write_text(json.dumps(request))
    done = subprocess.run([keras_python(), str(HERE / "keras_reference.py"), str(folder / "request.json")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "model.onnx", dict(np.load(folder / "reference.npz")), json.loads(done.stdout.splitlines()[-1])


def file_activations(path: Path, tensor: str, images: np.ndarray, alphas, like: np.ndarray) -> np.ndarray:
    """The target's activations [images, alphas, K, h, w] as ONNX Runtime computes them in float32 from the file
    itself (none of the engine's graphs): tf2onnx folds the batch norms into the convolutions, so the file's float32
    rounding is not TensorFlow's, and the engine computes in float32 on the file's ops."""
    model = onnx.load(path)
    del model.graph.output[:]
    model.graph.output.append(onnx.ValueInfoProto(name=tensor))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = np.array([[session.run(None, {name: (alpha * image).transpose(1, 2, 0)[None].astype(np.float32)})[0][0]
                     for alpha in alphas] for image in images])
    return out if out.shape == like.shape else out.transpose(0, 1, 4, 2, 3)


def point_of(reference: dict, index: int, alphas, activations="activations", gradients="gradients"):
    """contract_maps' `point` for image `index`, read from the reference's arrays (alphas as requested)."""
    classes = list(reference["classes"][index])

    def point(image, base, alpha, target):
        step = min(range(len(alphas)), key=lambda i: abs(alphas[i] - alpha))
        assert abs(alphas[step] - alpha) < 1e-12, f"the reference has no point at alpha {alpha}"
        return (torch.from_numpy(reference[activations][index, step].astype(np.float64)),
                torch.from_numpy(reference[gradients][index, classes.index(target), step]))

    return point


@pytest.mark.parametrize("case", CASES, ids=[c.model for c in CASES])
def test_keras_application_through_tf2onnx_matches_gradient_tape(case, tmp_path, record):
    started = time.perf_counter()
    images = model_space(case)
    alphas = sorted({float(a) for _, _, (steps, _), _ in METHODS for a in steps} | {0.0})
    path, reference, versions = tensorflow_reference(case, tmp_path, images, alphas)
    row = {"family": f"Keras {versions['keras']} + tf2onnx {versions['tf2onnx']}",
           "model": f"{case.model} ({case.layer}, {case.size}², NHWC input)", "exported": False}

    default = json.loads((from_onnx(path, tmp_path / "default", preprocess=case.preprocess) / "manifest.json").read_text())
    assert (default["input"]["model_layout"], default["input"]["shape"]) == ("NHWC", [3, case.size, case.size])
    assert f"/{case.default}_1/" in default["target_layer"]["tensor"], default["target_layer"]

    tensor = str(reference["onnx_tensors"][-1])  # the last op of the layer: its output
    explainer = Explainer(from_onnx(path, tmp_path / "bundle", tensor=tensor, preprocess=case.preprocess))
    zero = np.zeros((1, 3, case.size, case.size))
    targets = []
    for index in range(len(images)):  # the highest-scoring candidate whose reference maps are non-trivial
        for target in reference["classes"][index]:
            if all(triviality(contract_maps(point_of(reference, index, alphas), images[index:index + 1], [target],
                                            steps, weights, zero, subtract)[0]) is None
                   for _, _, (steps, weights), subtract in METHODS):
                targets.append(int(target))
                break
        else:
            pytest.fail(f"no candidate class has non-trivial reference maps for image {index}")
    reference["activations_file"] = file_activations(path, tensor, images, alphas, reference["activations"])
    worst = {"normalized": 0.0, "raw": 0.0, "float32": 0.0}
    for name, options, (steps, weights), subtract in METHODS:
        # float64 TensorFlow; float32 TensorFlow; the file's float32 activations with float64 gradients
        expected, *in_float32 = (np.concatenate([
            contract_maps(point_of(reference, i, alphas, *arrays), images[i:i + 1], targets[i:i + 1], steps, weights,
                          zero, subtract) for i in range(len(images))])
            for arrays in ((), ("activations32", "gradients32"), ("activations_file",)))
        float32_normalized = max(max_normalized_difference(m, expected) for m in in_float32)
        float32_raw = max(max_relative_difference(m, expected) for m in in_float32)
        maps = explainer.explain(images, targets, baseline="zeros", **options)
        assert_maps_match(maps, expected, max(1e-3, 4 * float32_normalized), max(1e-4, 4 * float32_raw))
        worst = {"normalized": max(worst["normalized"], max_normalized_difference(maps, expected)),
                 "raw": max(worst["raw"], max_relative_difference(maps, expected)),
                 "float32": max(worst["float32"], float32_normalized)}
    record({**row, "exported": True, "seconds": time.perf_counter() - started, **worst})
