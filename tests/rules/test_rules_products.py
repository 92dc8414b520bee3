"""The rules of export/rules/products.py (Gemm, MatMul, Einsum) against torch autograd in float64
(tests/support/rule_cases.py)."""
import pytest
import torch
from support.rule_cases import assert_family_covered, one, randn, run

from igcam_engine.export.rules import products


def gemm_case(trans_a, trans_b):
    a = randn(5, 3) if not trans_a else randn(3, 5)
    w = randn(3, 4, seed=2) if not trans_b else randn(4, 3, seed=2)

    def reference(a, w, c):
        return 0.7 * (a.T if trans_a else a) @ (w.T if trans_b else w) + 1.3 * c

    return one("Gemm", {"a": a, "w": w, "c": randn(4, seed=3)}, reference,
               dict(transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3))


def einsum_cases():
    a, b = randn(2, 3, 5, seed=1), randn(2, 5, 4, seed=2)
    return [
        one("Einsum", {"a": a, "b": b}, lambda a, b: torch.einsum("bij,bjk->bik", a, b), dict(equation="bij,bjk->bik")),
        one("Einsum", {"a": a, "w": randn(5, 4, seed=3)}, lambda a, w: torch.einsum("...ij,jk->...ik", a, w),
            dict(equation="...ij,jk->...ik"), name="Einsum ...ij,jk->...ik"),
        one("Einsum", {"a": a}, lambda a: torch.einsum("bij->jb", a), dict(equation="bij->jb"),
            name="Einsum bij->jb (sums i)"),
    ]


CASES = (
    [gemm_case(a, b) for a in (0, 1) for b in (0, 1)]
    + [one("MatMul", {"x": randn(2, 3, 5), "w": randn(5, 4, seed=2)}, lambda x, w: x @ w)]
    + einsum_cases()
)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case):
    run(case)


def test_every_rule_of_the_family_is_exercised():
    """Adding a rule to products.py means adding a case here whose graph puts its op on a differentiated path."""
    assert_family_covered(products, CASES)
