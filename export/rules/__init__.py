"""The gradient rule table: one vector-Jacobian product per ONNX op, built from standard ONNX ops.

A rule takes the builder, the forward node and the cotangents of the node's outputs (None where no gradient
reaches an output) and returns one entry per node input: the input's cotangent, or None where the input is not
differentiated (weights, shapes, axes). Forward tensors (inputs and outputs of the node) may be reused freely:
they live in the same graph. Tie and boundary conventions follow torch autograd, so that maps agree with it.
Rules read the operators of opset MIN_OPSET and later (see builder.at_min_opset). One module per family of ops;
importing them files their rules in `table.RULES`.
"""
from . import elementwise, layout, normalization, products, reductions, resampling, windows  # noqa: F401
from .table import RULES

__all__ = ["RULES"]
