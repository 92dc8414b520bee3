"""The rule of Resize (and of Upsample, which the version converter turns into Resize): every mode is linear and
separable, so along each resized axis the output is a matrix times the input. The matrix is read off ONNX's own
reference implementation of the operator, fed the basis vectors, so the adjoint follows the specification for every
mode and coordinate transformation."""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from igcam_engine.errors import ModelError

from .helpers import adjoint_along, constant_of
from .table import rule

# Attributes that describe how one axis is resampled (the rest: which axes, aspect-ratio policy, do not).
PER_AXIS = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside",
            "extrapolation_value", "antialias")


@rule("Resize")
def resize(b, n, dy):
    x, y = n.inputs[0], n.outputs[0]
    rank = len(b.shape(x))
    roi = constant_of(b, n, 1, "roi")
    scales = constant_of(b, n, 2, "scales")
    scales = scales if scales is not None and scales.size else None
    axes = [int(a) % rank for a in n.attrs.get("axes", range(rank))]
    grad = dy[0]
    for position, axis in enumerate(axes):
        before, after = b.shape(x)[axis], b.shape(y)[axis]
        scale = None if scales is None else float(scales[position])
        cropping = n.attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
        if before == after and scale in (None, 1.0) and not cropping:
            continue  # every mode maps a sample onto itself at scale 1 (the batch and channel axes)
        before, after = b.static_shape(x, slice(axis, axis + 1))[0], b.static_shape(y, slice(axis, axis + 1))[0]
        window = None if roi is None or not roi.size else (float(roi[position]), float(roi[len(axes) + position]))
        matrix = resize_matrix(n.attrs, before, after, scale, window)
        grad = adjoint_along(b, grad, axis, rank, matrix)
    return [grad] + [None] * (len(n.inputs) - 1)


def resize_matrix(attrs: dict, size: int, out_size: int, scale, roi) -> np.ndarray:
    """[out_size, size]: how Resize with these attributes maps a signal of `size` samples along one axis."""
    from onnx.reference import ReferenceEvaluator

    node_attrs = {k: v for k, v in attrs.items() if k in PER_AXIS}
    inputs = ["X", "roi", "scales" if scale is not None else "", "" if scale is not None else "sizes"]
    node = helper.make_node("Resize", inputs, ["Y"], **node_attrs)
    feeds = {"roi": np.array([0, roi[0], 1, roi[1]] if roi else [], np.float32)}
    if scale is not None:
        feeds["scales"] = np.array([1, scale], np.float32)
    else:
        feeds["sizes"] = np.array([size, out_size], np.int64)
    graph = helper.make_graph(
        [node], "resize_axis",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [size, size]),
         helper.make_tensor_value_info("roi", TensorProto.FLOAT, None)]
        + ([helper.make_tensor_value_info("scales", TensorProto.FLOAT, [2])] if scale is not None
           else [helper.make_tensor_value_info("sizes", TensorProto.INT64, [2])]),
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    evaluator = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    basis = evaluator.run(None, {"X": np.eye(size, dtype=np.float32), **feeds})[0]
    offset = evaluator.run(None, {"X": np.zeros((size, size), np.float32), **feeds})[0]  # extrapolated constants
    matrix = (basis - offset).T
    if matrix.shape != (out_size, size):
        raise ModelError(f"Resize: the reference implementation gives {matrix.shape[0]} samples for {size}, the "
                        f"model's graph {out_size}")
    return matrix.astype(np.float64)
