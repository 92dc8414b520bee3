"""Rules of the normalizations: batch norm (inference: a per-channel scale), and layer, instance and group norm,
which normalize with statistics of the input itself."""
from __future__ import annotations

import numpy as np

from igcam_engine.errors import ModelError

from .table import rule

F32 = np.float32


@rule("BatchNormalization")
def batch_norm(b, n, dy):
    if n.attrs.get("training_mode", 0):
        raise ModelError(f"BatchNormalization node '{n.name}' is in training mode; export the model in eval mode")
    x, scale, _, _, var = n.inputs
    factor = b.Div(scale, b.Sqrt(b.Add(var, F32(n.attrs.get("epsilon", 1e-5)))))
    factor = b.Unsqueeze(factor, list(range(1, len(b.shape(x)) - 1)))
    return [b.Mul(dy[0], factor), None, None, None, None]


def _normalized_backward(b, x: str, g: str, axes, epsilon) -> str:
    """d/dx of y = (x - mean) / sqrt(var + eps) over `axes`, given g = dL/dy (the affine scale already applied):
    (g - mean(g) - y * mean(g * y)) / sqrt(var + eps)."""
    centered = b.Sub(x, b.ReduceMean(x, axes, keepdims=1))
    inverse = b.Reciprocal(b.Sqrt(b.Add(b.ReduceMean(b.Mul(centered, centered), axes, keepdims=1), F32(epsilon))))
    normalized = b.Mul(centered, inverse)
    spread = b.Add(b.ReduceMean(g, axes, keepdims=1), b.Mul(normalized, b.ReduceMean(b.Mul(g, normalized), axes,
                                                                                        keepdims=1)))
    return b.Mul(inverse, b.Sub(g, spread))


def _only_first_output(n, dy):
    if any(g is not None for g in dy[1:]):
        raise ModelError(f"{n.op_type} node '{n.name}': its mean/variance outputs are used after the target; "
                        "only the normalized output is differentiated")


@rule("LayerNormalization")
def layer_norm(b, n, dy):
    _only_first_output(n, dy)
    x, scale = n.inputs[:2]
    rank = len(b.shape(x))
    axes = list(range(n.attrs.get("axis", -1) % rank, rank))
    grad = _normalized_backward(b, x, b.Mul(dy[0], scale), axes, n.attrs.get("epsilon", 1e-5))
    return [grad] + [None] * (len(n.inputs) - 1)


@rule("InstanceNormalization")
def instance_norm(b, n, dy):
    x, scale, _ = n.inputs
    rank = len(b.shape(x))
    per_channel = b.Unsqueeze(scale, list(range(1, rank - 1)))
    return [_normalized_backward(b, x, b.Mul(dy[0], per_channel), list(range(2, rank)),
                                 n.attrs.get("epsilon", 1e-5)), None, None]


@rule("GroupNormalization")
def group_norm(b, n, dy):
    # Statistics over each group's channels and pixels, scale and bias per channel (opset 21; the opset-18 form,
    # with one scale per group, is deprecated in ONNX and refused by its checker).
    _only_first_output(n, dy)
    if b.opset < 21:
        raise ModelError(f"GroupNormalization node '{n.name}': the opset-18 form is deprecated; re-export at opset 21")
    x, scale = n.inputs[:2]
    groups = n.attrs["num_groups"]
    channels = b.static_shape(x, slice(1, 2))[0]
    g = b.Reshape(b.Mul(b.Reshape(dy[0], [0, channels, -1]), b.Reshape(scale, [1, channels, 1])), [0, groups, -1])
    grad = _normalized_backward(b, b.Reshape(x, [0, groups, -1]), g, [2], n.attrs.get("epsilon", 1e-5))
    return [b.Reshape(grad, b.Shape(x))] + [None] * (len(n.inputs) - 1)
