"""The rules of export/rules/layout.py (Flatten, Reshape, Squeeze, Unsqueeze, Transpose, Concat, Split, Slice,
Gather, GatherND, Expand, Tile, Pad) against torch autograd in float64 (tests/support/rule_cases.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import helper
from support.rule_cases import WIDE, Case, X, assert_family_covered, one, randn, run

from igcam_engine.export.rules import layout

UNARY = [
    ("Flatten", dict(axis=1), lambda x: x.flatten(1)),
    ("Transpose", dict(perm=[0, 2, 3, 1]), lambda x: x.permute(0, 2, 3, 1)),
    ("Transpose", {}, lambda x: x.permute(3, 2, 1, 0)),  # no perm: the axes reversed
]


def old_opset_cases():
    """Models from before opset 18 (attributes where inputs are now) are converted first."""
    return [
        one("Pad", {"x": X}, lambda x: F.pad(x, (2, 0, 1, 3)), dict(pads=[0, 0, 1, 2, 0, 0, 3, 0]), opset=10,
            name="Pad attribute pads (opset 10)"),
        one("Unsqueeze", {"x": X}, lambda x: x.unsqueeze(1), dict(axes=[1]), opset=11,
            name="Unsqueeze axes attribute (opset 11)"),
    ]


def shape_cases():
    x = randn(2, 4, 1, 6)
    return [
        one("Reshape", {"x": x}, lambda x, s: x.reshape(2, -1), consts={"s": np.array([2, -1], np.int64)}),
        one("Squeeze", {"x": x}, lambda x, a: x.squeeze(2), consts={"a": np.array([2], np.int64)}),
        one("Unsqueeze", {"x": x}, lambda x, a: x.unsqueeze(0), consts={"a": np.array([0], np.int64)}),
    ]


def concat_cases():
    a, b, c = randn(2, 3, 5, 5, seed=1), randn(2, 5, 5, 5, seed=2), randn(2, 1, 5, 5, seed=3)
    return [
        one("Concat", {"a": a, "b": b}, lambda a, b: torch.cat([a, b], 1), dict(axis=1)),
        one("Concat", {"a": a}, lambda a: torch.cat([a], 1), dict(axis=1), name="Concat one input"),
        one("Concat", {"a": a, "b": b, "c": c}, lambda a, b, c: torch.cat([a, b, c], -3), dict(axis=-3),
            name="Concat three inputs, negative axis"),
    ]


def pad_cases():
    pads = np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)  # H: 1 before, 2 after; W: 2 before, 1 after
    torch_order = (2, 1, 1, 2)
    return [one("Pad", {"x": X}, lambda x, pads, m=torch_mode: F.pad(x, torch_order, mode=m), dict(mode=mode),
                consts={"pads": pads}, opset=19, name=f"Pad {mode}")
            for mode, torch_mode in (("reflect", "reflect"), ("edge", "replicate"), ("wrap", "circular"))]


def selection_cases():
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    data = randn(4, 5, 2, 3, seed=6)
    nd_index = np.array([[[0, 1], [3, 4]], [[2, 2], [0, 1]], [[1, 0], [-1, -1]]], np.int64)  # [3, 2, 2]: a repeat
    return [
        one("Slice", {"x": X}, lambda x, **_: x[:, 1:3, -6:-1, 2:], consts={
            "starts": i64(1, -6, 2), "ends": i64(3, -1, 2**62), "axes": i64(1, 2, 3)}, name="Slice windows"),
        one("Slice", {"x": X}, lambda x, **_: x[:, :, 1:8:3, :], consts={
            "starts": i64(1), "ends": i64(8), "axes": i64(2), "steps": i64(3)}, name="Slice step 3"),
        one("Slice", {"x": X}, lambda x, **_: x.flip(3)[:, :, :, 1:], consts={
            "starts": i64(-2), "ends": i64(-(2**62)), "axes": i64(3), "steps": i64(-1)}, name="Slice reversed"),
        one("Gather", {"x": X}, lambda x, i: x[:, 2], dict(axis=1), consts={"i": np.array(2, np.int64)},
            name="Gather scalar index"),
        one("Gather", {"x": X}, lambda x, i: x[..., [3, -1, 3, 0]], dict(axis=-1), consts={"i": i64(3, -1, 3, 0)},
            name="Gather repeated and negative indices"),
        one("Gather", {"x": X}, lambda x, i: x[:, :, torch.tensor([[1, 2], [8, 1]])], dict(axis=2),
            consts={"i": np.array([[1, 2], [8, 1]], np.int64)}, name="Gather 2-D indices"),
        one("GatherND", {"x": data}, lambda x, i: x[i[..., 0], i[..., 1]], consts={"i": nd_index}),
        Case("Gather, indices computed from the shape at run time (torch's as_strided)",
             [helper.make_node("Reshape", ["x", "minus_one"], ["flat"]),
              helper.make_node("Shape", ["flat"], ["length"]),
              helper.make_node("Squeeze", ["length"], ["count"]),
              helper.make_node("Range", ["zero", "count", "one"], ["ascending"]),
              helper.make_node("Sub", ["last", "ascending"], ["descending"]),
              helper.make_node("Sub", ["descending", "count"], ["negative"]),  # negative indices count from the end
              helper.make_node("Gather", ["flat", "negative"], ["Y"], axis=0)],
             {"x": X}, lambda x, **_: x.flatten().flip(0),
             {"minus_one": i64(-1), "zero": np.array(0, np.int64), "one": np.array(1, np.int64),
              "last": np.array(X.size - 1, np.int64)}),
        one("Expand", {"x": randn(1, 4, 1, 11)}, lambda x, s: x.expand(2, 4, 9, 11), consts={"s": i64(2, 4, 9, 11)}),
        one("Tile", {"x": X}, lambda x, r: x.repeat(1, 2, 1, 3), consts={"r": i64(1, 2, 1, 3)}),
        Case("Split, both parts swapped",
             [helper.make_node("Split", ["x", "sizes"], ["a", "b"], axis=1),
              helper.make_node("Concat", ["b", "a"], ["Y"], axis=1)],
             {"x": X}, lambda x, sizes: torch.cat([x[:, 1:], x[:, :1]], 1), {"sizes": i64(1, 3)}),
        Case("Split, one part unused",
             [helper.make_node("Split", ["x"], ["a", "b"], axis=2, num_outputs=2),
              helper.make_node("Identity", ["b"], ["Y"])],
             {"x": X}, lambda x: x[:, :, 5:]),
    ]


CASES = (
    [one(op, {"x": WIDE}, lambda x, fn=fn: fn(x), attrs) for op, attrs, fn in UNARY]
    + old_opset_cases()
    + shape_cases()
    + concat_cases()
    + [one("Pad", {"x": X}, lambda x, pads: F.pad(x, (2, 0, 1, 3)),
           consts={"pads": np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64)})]
    + [one("Pad", {"x": X}, lambda x, pads: x[:, :, 1:8, 2:], consts={"pads": np.array([0, 0, -1, -2, 0, 0, -1, 0],
                                                                                          np.int64)},
           name="Pad negative (crops)")]
    + pad_cases()
    + selection_cases()
)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case):
    run(case)


def test_every_rule_of_the_family_is_exercised():
    """Adding a rule to layout.py means adding a case here whose graph puts its op on a differentiated path."""
    assert_family_covered(layout, CASES)
