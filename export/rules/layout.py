"""Rules of ops that move, select or repeat elements without arithmetic: reshapes, transposes, concatenation and
splitting, slicing and gathering with constant indices, broadcasting and tiling, padding. Selections along an axis
are linear maps; their adjoint is the transposed 0/1 matrix (helpers.adjoint_along)."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from igcam_engine.errors import ModelError

from .helpers import adjoint_along, axes_of, constant_of, selection, unbroadcast
from .table import rule


def _static(b, name: str, axis: int) -> int:
    return b.static_shape(name, slice(axis, axis + 1))[0]


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
    sizes = [_static(b, x, axis) for x in n.inputs]
    parts = b.op("Split", [dy[0], sizes], outputs=len(sizes), axis=axis)
    return parts if len(sizes) > 1 else [parts]


@rule("Split")
def split(b, n, dy):
    # The parts' cotangents side by side again; a part nothing differentiates contributes zeros.
    axis = n.attrs.get("axis", 0)
    parts = [g if g is not None else b.ConstantOfShape(b.Shape(out)) for g, out in zip(dy, n.outputs)]
    return [b.Concat(*parts, axis=axis) if len(parts) > 1 else parts[0]] + [None] * (len(n.inputs) - 1)


@rule("Slice")
def slice_(b, n, dy):
    x = n.inputs[0]
    rank = len(b.shape(x))
    starts, ends = constant_of(b, n, 1, "starts"), constant_of(b, n, 2, "ends")
    axes = constant_of(b, n, 3, "axes")
    steps = constant_of(b, n, 4, "steps")
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    grad = dy[0]
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        size = _static(b, x, axis)
        kept = list(range(size))[slice(int(start), int(end), int(step))]
        if kept == list(range(size)):
            continue
        if step == 1 and kept:  # a contiguous window: pad the cotangent with zeros back to the input's size
            pads = [0] * (2 * rank)
            pads[axis], pads[rank + axis] = kept[0], size - kept[-1] - 1
            grad = b.Pad(grad, pads)
        else:
            grad = adjoint_along(b, grad, axis, rank, selection(kept, size))
    return [grad] + [None] * (len(n.inputs) - 1)


@rule("Gather")
def gather(b, n, dy):
    data, indices = n.inputs
    rank = len(b.shape(data))
    axis = n.attrs.get("axis", 0) % rank
    if b.constant(indices) is None:
        return [_gather_back_by_scatter(b, n, dy[0], axis), None]
    index = b.constant(indices)
    size = _static(b, data, axis)
    flat = np.where(index < 0, index + size, index).ravel()
    grad = dy[0]
    if index.ndim == 0:
        grad = b.Unsqueeze(grad, [axis])
    elif index.ndim > 1:  # the index dims, side by side in the output, become one axis of len(flat)
        grad = b.Reshape(grad, b.Concat(b.Shape(grad, start=0, end=axis), np.array([len(flat)]),
                                        b.Shape(grad, start=axis + index.ndim), axis=0))
    return [adjoint_along(b, grad, axis, rank, selection(flat, size)), None]


def _gather_back_by_scatter(b, n, dy: str, axis: int) -> str:
    """Indices known only at run time (computed from shapes, as torch's as_strided decomposition does): the
    cotangent is scattered back with ScatterND, repeated indices adding up. Along axis 0 only."""
    data, indices = n.inputs
    if axis != 0:
        raise ModelError(f"Gather node '{n.name}': indices computed at run time are differentiated along axis 0 only")
    size = b.Gather(b.Shape(data), np.array(0))
    index = b.Cast(indices, to=TensorProto.INT64)
    index = b.Where(b.Less(index, np.array(0)), b.Add(index, size), index)
    return b.ScatterND(b.ConstantOfShape(b.Shape(data)), b.Unsqueeze(index, [-1]), dy, reduction="add")


@rule("GatherND")
def gather_nd(b, n, dy):
    # With batch_dims 0, indices [..., k] pick along data's first k (fixed) dims: a Gather along those dims
    # flattened into one.
    data, _ = n.inputs
    if n.attrs.get("batch_dims", 0):
        raise ModelError(f"GatherND node '{n.name}': only batch_dims 0 is differentiated")
    index = constant_of(b, n, 1, "indices")
    k = index.shape[-1]
    dims = b.static_shape(data, slice(0, k))
    linear = np.ravel_multi_index(tuple(np.moveaxis(np.where(index < 0, index + dims, index), -1, 0)), dims).ravel()
    rest = len(b.shape(data)) - k
    grad = b.Reshape(dy[0], b.Concat(np.array([len(linear)]), b.Shape(dy[0], start=index.ndim - 1), axis=0))
    grad = adjoint_along(b, grad, 0, 1 + rest, selection(linear, int(np.prod(dims))))
    return [b.Reshape(grad, b.Concat(np.array(dims), b.Shape(grad, start=1), axis=0)), None]


@rule("Expand")
def expand(b, n, dy):
    return [unbroadcast(b, dy[0], n.inputs[0], b.shape(n.outputs[0])), None]


@rule("Tile")
def tile(b, n, dy):
    # Each tiled axis d becomes (repeats, d) and the repeats are summed; untiled axes keep their size.
    x = n.inputs[0]
    repeats = constant_of(b, n, 1, "repeats")
    shape, axes = [], []
    for axis, (dim, count) in enumerate(zip(b.shape(x), repeats)):
        if count == 1:  # a dynamic leading dim: Reshape's 0 copies it (no tiled axis precedes it)
            shape.append(dim if isinstance(dim, int) else 0 if axis == 0 else _static(b, x, axis))
            continue
        axes.append(len(shape))
        shape += [int(count), _static(b, x, axis)]
    if not axes:
        return [dy[0], None]
    return [b.ReduceSum(b.Reshape(dy[0], shape), axes, keepdims=0), None]


PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


@rule("Pad")
def pad(b, n, dy):
    x = n.inputs[0]
    rank = len(b.shape(x))
    pads = [int(p) for p in np.ravel(constant_of(b, n, 1, "pads"))]
    axes = axes_of(b, n, rank, input_index=3) or list(range(rank))
    begin, end = pads[: len(axes)], pads[len(axes):]
    mode = n.attrs.get("mode", "constant")
    if mode not in PAD_MODES:
        raise ModelError(f"Pad node '{n.name}': mode '{mode}' is not differentiated; accepted: {', '.join(PAD_MODES)}")
    rest = [None] * (len(n.inputs) - 1)
    if mode == "constant" and min(pads) >= 0:  # the cotangent of the padded region is dropped
        stops = [-e if e else np.iinfo(np.int64).max for e in end]
        return [b.Slice(dy[0], begin, stops, axes)] + rest
    grad = dy[0]
    for axis, before, after in zip(axes, begin, end):
        if before == 0 and after == 0:
            continue
        size = _static(b, x, axis)
        kept = np.arange(size)[max(-before, 0): size - max(-after, 0)]  # negative pads crop
        padding = (max(before, 0), max(after, 0))
        sources = (np.pad(kept, padding, constant_values=-1) if mode == "constant"
                   else np.pad(kept, padding, mode=PAD_MODES[mode]))
        grad = adjoint_along(b, grad, axis, rank, selection(sources, size))
    return [grad] + rest
