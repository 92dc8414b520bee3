"""The gradient rule table: one vector-Jacobian product per ONNX op, built from standard ONNX ops.

A rule takes the builder, the forward node and the cotangents of the node's outputs (None where no gradient
reaches an output) and returns one entry per node input: the input's cotangent, or None where the input is not
differentiated (weights, shapes, axes). Forward tensors (inputs and outputs of the node) may be reused freely:
they live in the same graph. Tie and boundary conventions follow torch autograd, so that maps agree with it.
"""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from igcam_engine.errors import UserError

from .builder import GraphBuilder, Node

RULES = {}


def rule(*op_types):
    def register(fn):
        for op_type in op_types:
            RULES[op_type] = fn
        return fn

    return register


# ---------------------------------------------------------------- helpers shared by several rules


def _unbroadcast(b: GraphBuilder, grad: str, operand: str, y_shape: tuple) -> str:
    """Sums `grad` (of the broadcast shape `y_shape`) back to the shape of `operand`.

    Operands that carry no gradient (weights, constants) get None, so no shape reasoning is needed for them.
    """
    if operand not in b.differentiable:
        return None
    x_shape = b.shape(operand)
    lead = len(y_shape) - len(x_shape)
    if lead:
        grad = b.ReduceSum(grad, list(range(lead)), keepdims=0)
    axes = []
    for axis, (dx, dy) in enumerate(zip(x_shape, y_shape[lead:])):
        if dx == 1 and dy != 1:
            axes.append(axis)
        elif dx != dy:
            raise UserError(f"cannot tell how '{operand}' {x_shape} broadcasts to {y_shape}")
    return b.ReduceSum(grad, axes, keepdims=1) if axes else grad


def _axes_of(b: GraphBuilder, node: Node, rank: int, input_index: int = 1):
    """Axes of a Reduce*/Squeeze/Unsqueeze/Pad node from its constant input, made non-negative; None when absent."""
    if len(node.inputs) <= input_index or not node.inputs[input_index]:
        return None
    axes = b.constant(node.inputs[input_index])
    if axes is None:
        raise UserError(f"{node.op_type} node '{node.name}': axes must be a constant")
    if len(axes) == 0:
        return None
    return sorted(int(a) % rank for a in np.ravel(axes))


class _Window:
    """Sliding-window geometry of a Conv or pooling node, with auto_pad resolved to explicit pads."""

    def __init__(self, b: GraphBuilder, node: Node, kernel):
        x = node.inputs[0]
        self.kernel = list(kernel)
        r = len(self.kernel)
        self.inputs = b.static_shape(x, slice(2, None))
        self.outputs = b.static_shape(node.outputs[0], slice(2, None))
        self.strides = list(node.attrs.get("strides", [1] * r))
        self.dilations = list(node.attrs.get("dilations", [1] * r))
        self.extent = [(k - 1) * d + 1 for k, d in zip(self.kernel, self.dilations)]
        pads = list(node.attrs.get("pads", [0] * 2 * r))
        self.begin, self.end = pads[:r], pads[r:]
        auto_pad = node.attrs.get("auto_pad", "NOTSET")
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            totals = [
                max((math.ceil(i / s) - 1) * s + e - i, 0) for i, s, e in zip(self.inputs, self.strides, self.extent)
            ]
            small = [t // 2 for t in totals]
            self.begin = small if auto_pad == "SAME_UPPER" else [t - h for t, h in zip(totals, small)]
            self.end = [t - p for t, p in zip(totals, self.begin)]
        elif auto_pad == "VALID":
            self.begin, self.end = [0] * r, [0] * r

    def transpose(self, b: GraphBuilder, grad: str, weight: str, group: int) -> str:
        """ConvTranspose that scatters window cotangents back onto the input grid (the adjoint of the window op).

        Windows may stop short of the input's end (stride remainder) or overrun it (ceil_mode); output_padding
        and the end pads are chosen so the result has exactly the input's size.
        """
        end, output_padding = [], []
        for size, out, extent, stride, begin in zip(self.inputs, self.outputs, self.extent, self.strides, self.begin):
            covered = (out - 1) * stride + extent - begin
            end.append(max(covered - size, 0))
            output_padding.append(size - covered + end[-1])
        return b.ConvTranspose(
            grad, weight, strides=self.strides, dilations=self.dilations, pads=self.begin + end,
            output_padding=output_padding, group=group,
        )

    def counts(self, include_pad: bool) -> np.ndarray:
        """Number of elements each window averages over, shaped [1, 1, *outputs]."""
        per_axis = []
        for size, out, k, stride, dil, begin, end in zip(
            self.inputs, self.outputs, self.kernel, self.strides, self.dilations, self.begin, self.end
        ):
            positions = np.arange(out)[:, None] * stride - begin + np.arange(k)[None, :] * dil
            low, high = (-begin, size + end) if include_pad else (0, size)
            per_axis.append(((positions >= low) & (positions < high)).sum(axis=1))
        grid = per_axis[0]
        for counts in per_axis[1:]:
            grid = np.multiply.outer(grid, counts)
        return grid.astype(np.float32)[None, None]


def _reduce_back(b: GraphBuilder, dy: str, axes, keepdims: bool) -> str:
    """Puts back the reduced axes of a reduction's cotangent so that it broadcasts against the input."""
    return dy if keepdims else b.Unsqueeze(dy, axes)


def _max_mask(b: GraphBuilder, x: str, y_kept: str, axes) -> str:
    """1/count at the positions equal to the maximum (ties split evenly, as torch's amax), 0 elsewhere."""
    hits = b.Cast(b.Equal(x, y_kept), to=TensorProto.FLOAT)
    return b.Div(hits, b.ReduceSum(hits, axes, keepdims=1))


# ---------------------------------------------------------------- elementwise


@rule("Identity", "Dropout")
def identity(b, n, dy):
    return [dy[0]] + [None] * (len(n.inputs) - 1)


@rule("Cast")
def cast(b, n, dy):
    # Only a floating-point input is differentiated (see autodiff); its cotangent takes the input's type back.
    return [b.Cast(dy[0], to=b.elem_type(n.inputs[0]))]


@rule("Relu")
def relu(b, n, dy):
    return [b.Where(b.Greater(n.inputs[0], np.float32(0)), dy[0], np.float32(0))]


@rule("LeakyRelu")
def leaky_relu(b, n, dy):
    alpha = np.float32(n.attrs.get("alpha", 0.01))
    return [b.Where(b.Greater(n.inputs[0], np.float32(0)), dy[0], b.Mul(dy[0], alpha))]


@rule("Clip")
def clip(b, n, dy):
    # The gradient flows strictly inside (min, max), as torch's hardtanh/relu6 backward; absent bounds are open.
    x = n.inputs[0]
    low = n.inputs[1] if len(n.inputs) > 1 and n.inputs[1] else None
    high = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2] else None
    inside = [b.Greater(x, low)] if low is not None else []
    inside += [b.Less(x, high)] if high is not None else []
    if not inside:
        return [dy[0], None, None]
    mask = inside[0] if len(inside) == 1 else b.And(*inside)
    return [b.Where(mask, dy[0], np.float32(0)), None, None]


@rule("Sigmoid")
def sigmoid(b, n, dy):
    y = n.outputs[0]
    return [b.Mul(dy[0], b.Mul(y, b.Sub(np.float32(1), y)))]


@rule("HardSigmoid")
def hard_sigmoid(b, n, dy):
    alpha, beta = np.float32(n.attrs.get("alpha", 0.2)), np.float32(n.attrs.get("beta", 0.5))
    z = b.Add(b.Mul(n.inputs[0], alpha), beta)
    inside = b.And(b.Greater(z, np.float32(0)), b.Less(z, np.float32(1)))
    return [b.Where(inside, b.Mul(dy[0], alpha), np.float32(0))]


@rule("HardSwish")
def hard_swish(b, n, dy):
    # d/dx x*relu6(x+3)/6 = 0 below -3, x/3 + 1/2 on [-3, 3], 1 above 3 (torch's boundaries).
    x = n.inputs[0]
    slope = b.Add(b.Div(x, np.float32(3)), np.float32(0.5))
    slope = b.Where(b.Less(x, np.float32(-3)), np.float32(0), b.Where(b.Greater(x, np.float32(3)), np.float32(1), slope))
    return [b.Mul(dy[0], slope)]


@rule("Add")
def add(b, n, dy):
    return [_unbroadcast(b, dy[0], x, b.shape(n.outputs[0])) for x in n.inputs]


@rule("Sub")
def sub(b, n, dy):
    y_shape = b.shape(n.outputs[0])
    return [_unbroadcast(b, dy[0], n.inputs[0], y_shape), _unbroadcast(b, b.Neg(dy[0]), n.inputs[1], y_shape)]


@rule("Mul")
def mul(b, n, dy):
    x, y = n.inputs
    y_shape = b.shape(n.outputs[0])
    return [_unbroadcast(b, b.Mul(dy[0], y), x, y_shape), _unbroadcast(b, b.Mul(dy[0], x), y, y_shape)]


@rule("Div")
def div(b, n, dy):
    x, y = n.inputs
    y_shape = b.shape(n.outputs[0])
    dx = _unbroadcast(b, b.Div(dy[0], y), x, y_shape)
    dy_ = _unbroadcast(b, b.Neg(b.Div(b.Mul(dy[0], n.outputs[0]), y)), y, y_shape)
    return [dx, dy_]


@rule("Softmax")
def softmax(b, n, dy):
    y, axis = n.outputs[0], [n.attrs.get("axis", -1)]
    return [b.Mul(y, b.Sub(dy[0], b.ReduceSum(b.Mul(dy[0], y), axis, keepdims=1)))]


# ---------------------------------------------------------------- convolution, normalisation, pooling


@rule("Conv")
def conv(b, n, dy):
    weight = n.inputs[1]
    kernel = n.attrs.get("kernel_shape") or b.static_shape(weight, slice(2, None))
    return [_Window(b, n, kernel).transpose(b, dy[0], weight, n.attrs.get("group", 1)), None, None][: len(n.inputs)]


@rule("BatchNormalization")
def batch_norm(b, n, dy):
    if n.attrs.get("training_mode", 0):
        raise UserError(f"BatchNormalization node '{n.name}' is in training mode; export the model in eval mode")
    x, scale, _, _, var = n.inputs
    factor = b.Div(scale, b.Sqrt(b.Add(var, np.float32(n.attrs.get("epsilon", 1e-5)))))
    factor = b.Unsqueeze(factor, list(range(1, len(b.shape(x)) - 1)))
    return [b.Mul(dy[0], factor), None, None, None, None]


@rule("MaxPool")
def max_pool(b, n, dy):
    # Each window's cotangent goes to its first maximum (torch's tie rule), built without MaxPool's Indices output
    # or ScatterElements, which TensorRT refuses: for every kernel offset, a strided slice of the -inf padded
    # input is compared with the pooled output; the first offset that hits takes the cotangent, and one grouped
    # ConvTranspose with one-hot kernels puts each offset's share back at its input position.
    x, y = n.inputs[0], n.outputs[0]
    window = _Window(b, n, n.attrs["kernel_shape"])
    channels = b.static_shape(x, slice(1, 2))[0]
    spans = [(o - 1) * s + e for o, s, e in zip(window.outputs, window.strides, window.extent)]
    ends = [max(span - size - begin, 0) for span, size, begin in zip(spans, window.inputs, window.begin)]
    padded = b.Pad(x, [0, 0] + window.begin + [0, 0] + ends, np.float32(-np.inf))
    offsets = list(np.ndindex(*window.kernel))
    taken, routed = None, []
    for offset in offsets:
        starts = [i * d for i, d in zip(offset, window.dilations)]
        stops = [start + (o - 1) * s + 1 for start, o, s in zip(starts, window.outputs, window.strides)]
        hit = b.Equal(b.Slice(padded, starts, stops, list(range(2, 2 + len(starts))), window.strides), y)
        first = hit if taken is None else b.And(hit, b.Not(taken))
        taken = hit if taken is None else b.Or(taken, hit)
        routed.append(b.Unsqueeze(b.Where(first, dy[0], np.float32(0)), [2]))
    stacked = b.Reshape(b.Concat(*routed, axis=2), [0, channels * len(offsets)] + window.outputs)
    one_hot = np.zeros([channels, len(offsets), 1] + window.kernel, np.float32)
    for k, offset in enumerate(offsets):
        one_hot[(slice(None), k, 0) + offset] = 1
    return [window.transpose(b, stacked, one_hot.reshape([channels * len(offsets), 1] + window.kernel), channels)]


@rule("AveragePool")
def average_pool(b, n, dy):
    window = _Window(b, n, n.attrs["kernel_shape"])
    channels = b.static_shape(n.inputs[0], slice(1, 2))[0]
    scaled = b.Div(dy[0], window.counts(bool(n.attrs.get("count_include_pad", 0))))
    ones = np.ones([channels, 1] + window.kernel, np.float32)
    return [window.transpose(b, scaled, ones, channels)]


@rule("GlobalAveragePool")
def global_average_pool(b, n, dy):
    x = n.inputs[0]
    size = int(np.prod(b.static_shape(x, slice(2, None))))
    return [b.Expand(b.Div(dy[0], np.float32(size)), b.Shape(x))]


@rule("GlobalMaxPool")
def global_max_pool(b, n, dy):
    x = n.inputs[0]
    return [b.Mul(dy[0], _max_mask(b, x, n.outputs[0], list(range(2, len(b.shape(x))))))]


@rule("Pad")
def pad(b, n, dy):
    mode = n.attrs.get("mode", "constant")
    if mode != "constant":
        raise UserError(f"Pad node '{n.name}': only mode 'constant' is differentiated, not '{mode}'")
    x = n.inputs[0]
    rank = len(b.shape(x))
    pads = b.constant(n.inputs[1])
    if pads is None:
        raise UserError(f"Pad node '{n.name}': pads must be a constant")
    pads = [int(p) for p in np.ravel(pads)]
    axes = _axes_of(b, n, rank, input_index=3) or list(range(rank))
    begin, end = pads[: len(axes)], pads[len(axes) :]
    if min(pads) < 0:
        raise UserError(f"Pad node '{n.name}': negative pads (cropping) are not supported")
    stops = [-e if e else np.iinfo(np.int64).max for e in end]
    return [b.Slice(dy[0], begin, stops, axes)] + [None] * (len(n.inputs) - 1)


# ---------------------------------------------------------------- reductions


@rule("ReduceMean", "ReduceSum", "ReduceMax")
def reduce(b, n, dy):
    x = n.inputs[0]
    rank = len(b.shape(x))
    axes = _axes_of(b, n, rank)
    if axes is None:
        if n.attrs.get("noop_with_empty_axes", 0):
            return [dy[0]] + [None] * (len(n.inputs) - 1)
        axes = list(range(rank))
    keepdims = bool(n.attrs.get("keepdims", 1))
    grad = _reduce_back(b, dy[0], axes, keepdims)
    if n.op_type == "ReduceMean":
        grad = b.Div(grad, np.float32(np.prod([b.static_shape(x, slice(a, a + 1))[0] for a in axes])))
    elif n.op_type == "ReduceMax":
        grad = b.Mul(grad, _max_mask(b, x, _reduce_back(b, n.outputs[0], axes, keepdims), axes))
    return [b.Expand(grad, b.Shape(x))] + [None] * (len(n.inputs) - 1)


# ---------------------------------------------------------------- shape and layout


@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def reshape_back(b, n, dy):
    return [b.Reshape(dy[0], b.Shape(n.inputs[0]))] + [None] * (len(n.inputs) - 1)


@rule("Transpose")
def transpose(b, n, dy):
    perm = n.attrs.get("perm") or list(reversed(range(len(b.shape(n.inputs[0])))))
    return [b.Transpose(dy[0], perm=[int(i) for i in np.argsort(perm)])]


@rule("Concat")
def concat(b, n, dy):
    axis = n.attrs["axis"] % len(b.shape(n.outputs[0]))
    sizes = [b.static_shape(x, slice(axis, axis + 1))[0] for x in n.inputs]
    parts = b.op("Split", [dy[0], sizes], outputs=len(sizes), axis=axis)
    return parts if len(sizes) > 1 else [parts]


# ---------------------------------------------------------------- matrix products


@rule("Gemm")
def gemm(b, n, dy):
    a, w = n.inputs[:2]
    alpha, beta = n.attrs.get("alpha", 1.0), n.attrs.get("beta", 1.0)
    trans_a, trans_b = n.attrs.get("transA", 0), n.attrs.get("transB", 0)
    # Y = alpha op(A) op(B) + beta C, so dop(A) = alpha dY op(B)^T and dop(B) = alpha op(A)^T dY.
    if trans_a:
        da = b.Gemm(w, dy[0], alpha=alpha, transA=trans_b, transB=1)
    else:
        da = b.Gemm(dy[0], w, alpha=alpha, transB=1 - trans_b)
    if trans_b:
        dw = b.Gemm(dy[0], a, alpha=alpha, transA=1, transB=trans_a)
    else:
        dw = b.Gemm(a, dy[0], alpha=alpha, transA=1 - trans_a)
    grads = [da, dw]
    if len(n.inputs) > 2 and n.inputs[2]:
        grads.append(_unbroadcast(b, b.Mul(dy[0], np.float32(beta)), n.inputs[2], b.shape(n.outputs[0])))
    return grads


@rule("MatMul")
def matmul(b, n, dy):
    x, w = n.inputs
    if len(b.shape(x)) < 2 or len(b.shape(w)) < 2:
        raise UserError(f"MatMul node '{n.name}': 1-D operands are not differentiated")

    def swap_last(t):
        rank = len(b.shape(t))
        return b.Transpose(t, perm=list(range(rank - 2)) + [rank - 1, rank - 2])

    batch = b.shape(n.outputs[0])[:-2]
    return [
        _unbroadcast(b, b.MatMul(dy[0], swap_last(w)), x, batch + b.shape(x)[-2:]),
        _unbroadcast(b, b.MatMul(swap_last(x), dy[0]), w, batch + b.shape(w)[-2:]),
    ]
