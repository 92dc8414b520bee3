"""The gradient rule table: one vector-Jacobian product per ONNX op, built from standard ONNX ops.

A rule takes the builder, the forward node and the cotangents of the node's outputs (None where no gradient
reaches an output) and returns one entry per node input: the input's cotangent, or None where the input is not
differentiated (weights, shapes, axes). Forward tensors (inputs and outputs of the node) may be reused freely:
they live in the same graph. Tie and boundary conventions follow torch autograd, so that maps agree with it.
Rules read the operators of opset MIN_OPSET and later (see builder.at_min_opset). One module per family of ops;
importing them files their rules in `table.RULES`.
"""
from . import elementwise, layout, normalization, products, reductions, resampling, windows
from .table import RULES

FAMILIES = (windows, normalization, elementwise, reductions, layout, resampling, products)

__all__ = ["RULES", "FAMILIES", "supported_ops"]


def supported_ops() -> str:
    """The Markdown list of the ops that have a rule, by family (the module holding their rules): docs/supported.md
    carries it, and a test checks that it is this list."""
    lines = []
    for family in FAMILIES:
        ops = sorted(op for op, fn in RULES.items() if fn.__module__ == family.__name__)
        name = family.__name__.rsplit(".", 1)[1]
        lines.append(f"- {name} (`export/rules/{name}.py`): {', '.join(ops)}")
    return "\n".join(lines) + "\n"

