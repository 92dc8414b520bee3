"""Rules of the reductions: the cotangent of the reduced tensor, put back along the reduced axes and weighted by
each element's share (1, 1/n, the extremum mask, x / norm...)."""
from __future__ import annotations

import numpy as np

from .helpers import axes_of, extremum_mask, reduce_back
from .table import rule

F32 = np.float32


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceSumSquare")
def reduce(b, n, dy):
    x = n.inputs[0]
    rank = len(b.shape(x))
    axes = axes_of(b, n, rank)
    if axes is None:
        if n.attrs.get("noop_with_empty_axes", 0):
            return [dy[0]] + [None] * (len(n.inputs) - 1)
        axes = list(range(rank))
    keepdims = bool(n.attrs.get("keepdims", 1))
    grad = reduce_back(b, dy[0], axes, keepdims)
    if n.op_type == "ReduceMean":
        grad = b.Div(grad, F32(np.prod([b.static_shape(x, slice(a, a + 1))[0] for a in axes])))
    elif n.op_type in ("ReduceMax", "ReduceMin"):
        grad = b.Mul(grad, extremum_mask(b, x, reduce_back(b, n.outputs[0], axes, keepdims), axes))
    elif n.op_type == "ReduceL2":
        norm = reduce_back(b, n.outputs[0], axes, keepdims)
        grad = b.Mul(grad, b.Where(b.Equal(norm, F32(0)), F32(0), b.Div(x, norm)))  # 0 at 0, as torch's norm
    elif n.op_type == "ReduceL1":
        grad = b.Mul(grad, b.Sign(x))
    elif n.op_type == "ReduceSumSquare":
        grad = b.Mul(grad, b.Mul(x, F32(2)))
    return [b.Expand(grad, b.Shape(x))] + [None] * (len(n.inputs) - 1)
