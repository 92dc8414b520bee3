"""Rules of sliding-window ops (convolution, pooling): each window's cotangent scattered back onto the input grid
with a ConvTranspose of the same geometry; a ConvTranspose's cotangent gathered back with the Conv it is the
adjoint of."""
from __future__ import annotations

import math

import numpy as np

from ..builder import GraphBuilder, Node, ShapeUnknown
from .helpers import extremum_mask
from .table import rule


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


@rule("Conv")
def conv(b, n, dy):
    weight = n.inputs[1]
    kernel = n.attrs.get("kernel_shape") or b.static_shape(weight, slice(2, None))
    return [_Window(b, n, kernel).transpose(b, dy[0], weight, n.attrs.get("group", 1)), None, None][: len(n.inputs)]


@rule("ConvTranspose")
def conv_transpose(b, n, dy):
    # ConvTranspose is the adjoint of a Conv with the same weights, strides, dilations and group (cross-correlation,
    # no flip): its adjoint is that Conv. Its output is the full transposed convolution, (in - 1) * s + extent long,
    # with pads cut at the start and pads - output_padding at the end (output_padding may append zeros: their
    # cotangent is dropped).
    x, weight = n.inputs[0], n.inputs[1]
    if n.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or "output_shape" in n.attrs:
        raise ShapeUnknown("a ConvTranspose sized by auto_pad SAME or output_shape; export it with explicit pads")
    kernel = n.attrs.get("kernel_shape") or b.static_shape(weight, slice(2, None))
    r = len(kernel)
    inputs, outputs = b.static_shape(x, slice(2, None)), b.static_shape(n.outputs[0], slice(2, None))
    strides, dilations = list(n.attrs.get("strides", [1] * r)), list(n.attrs.get("dilations", [1] * r))
    begin = [0] * r if n.attrs.get("auto_pad") == "VALID" else list(n.attrs.get("pads", [0] * 2 * r))[:r]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(inputs, strides, kernel, dilations)]
    end = [f - p - o for f, p, o in zip(full, begin, outputs)]  # negative: output_padding's appended zeros
    grad = dy[0]
    if any(e < 0 for e in end):
        grad = b.Slice(grad, [0] * r, [o + min(e, 0) for o, e in zip(outputs, end)], list(range(2, 2 + r)))
    grad = b.Conv(grad, weight, strides=strides, dilations=dilations, pads=begin + [max(e, 0) for e in end],
                  group=n.attrs.get("group", 1), kernel_shape=list(kernel))
    return [grad, None, None][: len(n.inputs)]


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
    return [b.Mul(dy[0], extremum_mask(b, x, n.outputs[0], list(range(2, len(b.shape(x))))))]
