"""Exporters: a PyTorch module or any ONNX classifier -> an igcam bundle (see igcam_engine.bundle).

`from_torch` needs torch; `from_onnx` and `layers` need only onnx and onnxruntime.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from igcam_engine.errors import UserError
from igcam_engine.preprocess import resolve_preprocess

from .builder import default_opset
from .graphs import build_graphs, candidate_layers, prepare, split
from .triton import triton_repository
from .writer import write_bundle

__all__ = ["from_torch", "from_onnx", "layers", "triton_repository"]


def _load(path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except FileNotFoundError:
        raise UserError(f"no such ONNX file: '{path}'") from None
    except Exception as e:
        raise UserError(f"'{path}' is not a readable ONNX model: {e}") from None


def layers(path, input_shape=None) -> list[dict]:
    """The 4-D activations of an ONNX model: tensor name, producing op and node, shape [K, h, w], and `cut`
    (True where every path from the input to the logits passes through it, i.e. it can be a target layer)."""
    return candidate_layers(prepare(_load(path), input_shape))


def from_onnx(path, out, tensor=None, preprocess=None, *, input_shape=None, labels=None) -> Path:
    """Bundle from an ONNX classifier (one float NCHW input, logits or softmax as first output).

    `tensor` names the target activation; None picks the last 4-D activation with spatial size > 1x1 that every
    path from the input to the logits passes through. `input_shape` (C, H, W) fixes dynamic spatial dims.
    """
    return _export(_load(path), out, tensor, preprocess, input_shape, labels, layer=tensor)


def from_torch(model, layer: str, input_shape, out, preprocess=None, *, labels=None) -> Path:
    """Bundle from a torch.nn.Module; `layer` is a module path as in named_modules() ("layer4", "features.29")."""
    from ._torch import export_with_layer

    resolve_preprocess(preprocess, channels=input_shape[0])  # fail before the slow export, not after
    onnx_model, tensor, reference = export_with_layer(model, layer, input_shape)
    return _export(onnx_model, out, tensor, preprocess, input_shape, labels, layer=layer, reference=reference)


def _export(model, out, tensor, preprocess, input_shape, labels, layer, reference=None) -> Path:
    prepared = prepare(model, input_shape)
    s = split(prepared, tensor)
    preprocess = resolve_preprocess(preprocess, channels=s.input_shape[0])
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != s.num_classes:
            raise UserError(f"{len(labels)} labels given for a model with {s.num_classes} classes")
    manifest = {
        "input": {"name": "images", "shape": s.input_shape, "layout": "NCHW", "dtype": "float32"},
        "preprocess": preprocess,
        "target_layer": {"name": layer or s.target, "tensor": s.target, "shape": s.activation_shape},
        "num_classes": s.num_classes,
        "labels": labels,
        "opset": default_opset(prepared),
    }
    write_bundle(out, build_graphs(s), manifest)
    _check_logits(out, prepared, s, reference)
    return Path(out)


def _check_logits(out, prepared, s, reference) -> None:
    """The bundle must reproduce the source model's scores on a batch of two random images: this catches a split
    that changed the function or a model whose batch size is not really dynamic; with `reference` (images and the
    torch module's outputs) it also catches an ONNX export that does not match the module."""
    import onnxruntime as ort

    images = np.random.default_rng(0).standard_normal((2, *s.input_shape)).astype(np.float32)
    if reference is not None:
        images = reference[0]
    source = onnx.ModelProto()
    source.CopyFrom(prepared)
    output = source.graph.output[0].name
    if s.logits != output:
        source.graph.output.add(name=s.logits)
    session = ort.InferenceSession(source.SerializeToString(), providers=["CPUExecutionProvider"])
    results = session.run(None, {s.image: images})
    if reference is not None:
        _compare(results[0], reference[1], "the ONNX export's outputs differ from the torch module's")
    bundle = ort.InferenceSession(str(Path(out) / "igcam.onnx"), providers=["CPUExecutionProvider"])
    try:
        got = bundle.run(["logits"], {
            "images": images, "baseline": np.zeros_like(images), "alphas": np.ones(1, np.float32),
            "targets": np.zeros(len(images), np.int64),
        })[0]
    except Exception as e:
        raise UserError(f"the exported graphs do not run on a batch of 2 (is the batch size dynamic?): {e}") from None
    _compare(got, results[-1], "the bundle's logits differ from the source model's")


def _compare(got, expected, message) -> None:
    error = float(np.abs(got - expected).max()) / max(float(np.abs(expected).max()), 1e-6)
    if got.shape != expected.shape or error > 1e-3:
        raise UserError(f"{message} (relative error {error:.2e})")
