"""Helpers shared by several rules: broadcasting, axes, reductions' masks, and linear maps along one axis."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from igcam_engine.errors import ModelError

from ..builder import GraphBuilder, Node


def unbroadcast(b: GraphBuilder, grad: str, operand: str, y_shape: tuple) -> str:
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
            raise ModelError(f"cannot tell how '{operand}' {x_shape} broadcasts to {y_shape}")
    return b.ReduceSum(grad, axes, keepdims=1) if axes else grad


def axes_of(b: GraphBuilder, node: Node, rank: int, input_index: int = 1):
    """Axes of a Reduce*/Squeeze/Unsqueeze/Pad node from its constant input, made non-negative; None when absent."""
    axes = constant_of(b, node, input_index, "axes")
    if axes is None or len(axes) == 0:
        return None
    return sorted(int(a) % rank for a in np.ravel(axes))


def reduce_back(b: GraphBuilder, dy: str, axes, keepdims: bool) -> str:
    """Puts back the reduced axes of a reduction's cotangent so that it broadcasts against the input."""
    return dy if keepdims else b.Unsqueeze(dy, axes)


def extremum_mask(b: GraphBuilder, x: str, y_kept: str, axes) -> str:
    """1/count at the positions equal to the reduced maximum or minimum (ties split evenly, as torch's amax and
    amin), 0 elsewhere."""
    hits = b.Cast(b.Equal(x, y_kept), to=TensorProto.FLOAT)
    return b.Div(hits, b.ReduceSum(hits, axes, keepdims=1))


def adjoint_along(b: GraphBuilder, dy: str, axis: int, rank: int, matrix: np.ndarray) -> str:
    """The cotangent of x for y = matrix @ x along `axis` (matrix [out, in]): matrix^T applied to dy there."""
    matrix = np.asarray(matrix, np.float32)
    if axis == rank - 1:
        return b.MatMul(dy, matrix)
    if axis == rank - 2:
        return b.MatMul(np.ascontiguousarray(matrix.T), dy)
    perm = list(range(rank))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return b.Transpose(b.MatMul(b.Transpose(dy, perm=perm), matrix), perm=perm)


def selection(sources, size: int) -> np.ndarray:
    """[len(sources), size] 0/1 matrix whose row o picks input sources[o] (a negative source: a zero row)."""
    matrix = np.zeros((len(sources), size), np.float32)
    for row, source in enumerate(sources):
        if source >= 0:
            matrix[row, source] = 1
    return matrix


def constant_of(b: GraphBuilder, node: Node, index: int, what: str):
    """The value of the node's input `index` (None when absent), which must be known at export time."""
    if len(node.inputs) <= index or not node.inputs[index]:
        return None
    value = b.constant(node.inputs[index])
    if value is None:
        raise ModelError(f"{node.op_type} node '{node.name}': {what} must be a constant")
    return value
