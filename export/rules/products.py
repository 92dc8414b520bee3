"""Rules of matrix products: Gemm, MatMul and Einsum (the adjoint of a product is a product with the other
operand)."""
from __future__ import annotations

import re

import numpy as np

from igcam_engine.errors import ModelError

from .helpers import unbroadcast
from .table import rule


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
        grads.append(unbroadcast(b, b.Mul(dy[0], np.float32(beta)), n.inputs[2], b.shape(n.outputs[0])))
    return grads


@rule("MatMul")
def matmul(b, n, dy):
    x, w = n.inputs
    if len(b.shape(x)) < 2 or len(b.shape(w)) < 2:
        raise ModelError(f"MatMul node '{n.name}': 1-D operands are not differentiated")

    def swap_last(t):
        rank = len(b.shape(t))
        return b.Transpose(t, perm=list(range(rank - 2)) + [rank - 1, rank - 2])

    batch = b.shape(n.outputs[0])[:-2]
    return [
        unbroadcast(b, b.MatMul(dy[0], swap_last(w)), x, batch + b.shape(x)[-2:]),
        unbroadcast(b, b.MatMul(swap_last(x), dy[0]), w, batch + b.shape(w)[-2:]),
    ]


@rule("Einsum")
def einsum(b, n, dy):
    # For each operand: the einsum of the output's cotangent with the other operands onto the operand's indices;
    # indices the operand sums on its own are broadcast back. Repeated indices (traces, diagonals) are refused.
    terms, output = _einsum_terms(n)
    grads = []
    for index, (operand, term) in enumerate(zip(n.inputs, terms)):
        if operand not in b.differentiable:
            grads.append(None)
            continue
        letters = term.replace("...", "")
        if len(set(letters)) != len(letters):
            raise ModelError(f"Einsum node '{n.name}': repeated index in '{term}' (a trace or diagonal) is not "
                            "differentiated")
        others = [t for j, t in enumerate(terms) if j != index]
        seen = set(output) | set("".join(others))
        kept = "".join(c for c in re.findall(r"\.\.\.|.", term) if c == "..." or c in seen)
        if "..." in term:
            ellipsis = len(b.shape(operand)) - len(letters)
            if kept != term or b.shape(operand)[:ellipsis] != b.shape(n.outputs[0])[:ellipsis]:
                raise ModelError(f"Einsum node '{n.name}': operand '{term}' is broadcast along its ellipsis or sums "
                                "an index of its own; not differentiated")
        operands = [dy[0]] + [x for j, x in enumerate(n.inputs) if j != index]
        summed = "..." in output and "..." not in term  # the operand broadcasts along the ellipsis: sum it out
        grad = b.Einsum(*operands, equation=",".join([output] + others) + "->" + ("..." if summed else "") + kept)
        if summed:
            grad = b.ReduceSum(grad, list(range(len(b.shape(n.outputs[0])) - len(output.replace("...", "")))),
                               keepdims=0)
        if kept != term:
            missing = [position for position, c in enumerate(re.findall(r"\.\.\.|.", term)) if c not in kept]
            grad = b.Expand(b.Unsqueeze(grad, missing), b.Shape(operand))
        grads.append(grad)
    return grads


def _einsum_terms(n):
    """The operands' index strings and the output's (implicit outputs: the indices used once, sorted)."""
    equation = n.attrs["equation"].replace(" ", "")
    left, arrow, output = equation.partition("->")
    terms = left.split(",")
    if not arrow:
        letters = "".join(terms).replace("...", "")
        output = ("..." if "..." in left else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return terms, output
