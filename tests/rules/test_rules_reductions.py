"""The rules of export/rules/reductions.py (ReduceMean, ReduceSum, ReduceMax, ReduceMin, ReduceL2, ReduceL1,
ReduceSumSquare) against torch autograd in float64 (tests/support/rule_cases.py)."""
import numpy as np
import pytest
import torch
from support.rule_cases import X, assert_family_covered, one, run

from igcam_engine.export.rules import reductions

REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax}


def reduce_cases(op_type):
    fn = REDUCE[op_type]
    x = np.round(X) if op_type == "ReduceMax" else X  # ties split evenly, as torch.amax
    cases = [one(op_type, {"x": x}, lambda x, axes, k=k: fn(x, (2, 3), keepdim=bool(k)), dict(keepdims=k),
                 consts={"axes": np.array([2, -1], np.int64)}, name=f"{op_type} axes input keepdims={k}")
             for k in (0, 1)]
    # no axes: every axis, unless noop_with_empty_axes makes the node the identity
    cases.append(one(op_type, {"x": x}, lambda x: fn(x, (0, 1, 2, 3), keepdim=False), dict(keepdims=0),
                     name=f"{op_type} all axes"))
    cases.append(one(op_type, {"x": x}, lambda x: x, dict(noop_with_empty_axes=1), name=f"{op_type} noop"))
    return cases


def old_opset_cases():
    """Models from before opset 18 (axes as attributes) are converted first."""
    x = np.round(X)
    return [
        one("ReduceMean", {"x": X}, lambda x: x.mean((1, 3), keepdim=True), dict(axes=[1, 3]), opset=13,
            name="ReduceMean axes attribute (opset 13)"),
        one("ReduceMax", {"x": x}, lambda x: x.amax(2), dict(axes=[2], keepdims=0), opset=13,
            name="ReduceMax axes attribute (opset 13)"),
    ]


def more_reduce_cases():
    axes = {"axes": np.array([1, 3], np.int64)}
    return [
        one("ReduceMin", {"x": np.round(X)}, lambda x, axes: torch.amin(x, (1, 3), keepdim=True), consts=axes),
        one("ReduceL2", {"x": X}, lambda x, axes: torch.linalg.vector_norm(x, 2, (1, 3), keepdim=False),
            dict(keepdims=0), consts=axes),
        one("ReduceL1", {"x": X}, lambda x, axes: x.abs().sum((1, 3), keepdim=True), consts=axes),
        one("ReduceSumSquare", {"x": X}, lambda x, axes: (x * x).sum((1, 3), keepdim=True), consts=axes),
    ]


CASES = [case for op in REDUCE for case in reduce_cases(op)] + old_opset_cases() + more_reduce_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case):
    run(case)


def test_every_rule_of_the_family_is_exercised():
    """Adding a rule to reductions.py means adding a case here whose graph puts its op on a differentiated path."""
    assert_family_covered(reductions, CASES)
