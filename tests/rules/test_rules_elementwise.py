"""The rules of export/rules/elementwise.py (activations, arithmetic, Clip, Cast, Where, the variadic Sum/Mean/
Max/Min, Softmax and LogSoftmax) against torch autograd in float64 (tests/support/rule_cases.py)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from support.rule_cases import POSITIVE, WIDE, Case, X, assert_family_covered, one, randn, run

from igcam_engine.export.rules import elementwise

UNARY = [  # each on WIDE
    ("Relu", {}, F.relu),
    ("LeakyRelu", dict(alpha=0.1), lambda x: F.leaky_relu(x, 0.1)),
    ("Sigmoid", {}, torch.sigmoid),
    ("HardSigmoid", dict(alpha=0.2, beta=0.5), lambda x: torch.clamp(0.2 * x + 0.5, 0, 1)),
    ("HardSwish", {}, F.hardswish),
    ("Identity", {}, lambda x: x),
    ("Dropout", {}, lambda x: x),
    ("Softmax", dict(axis=1), lambda x: torch.softmax(x, 1)),
    ("Softmax", {}, lambda x: torch.softmax(x, -1)),  # opset 13+: the default axis is the last
    ("Cast", dict(to=TensorProto.FLOAT), lambda x: x),
    ("Tanh", {}, torch.tanh),
    ("Neg", {}, torch.neg),
    ("Abs", {}, torch.abs),
    ("Erf", {}, torch.erf),
    ("Softplus", {}, F.softplus),
    ("Mish", {}, F.mish),
    ("Softsign", {}, F.softsign),
    ("Elu", dict(alpha=0.7), lambda x: F.elu(x, 0.7)),
    ("Selu", {}, F.selu),
    ("Celu", dict(alpha=1.5), lambda x: F.celu(x, 1.5)),
    ("LogSoftmax", dict(axis=1), lambda x: torch.log_softmax(x, 1)),
]


def unary_cases():
    cases = [one(op, {"x": WIDE}, lambda x, fn=fn: fn(x), attrs) for op, attrs, fn in UNARY]
    # Exp of WIDE / 4: keeps exp in range
    cases.append(Case("Exp", [helper.make_node("Div", ["x", "four"], ["q"]), helper.make_node("Exp", ["q"], ["Y"])],
                      {"x": WIDE}, lambda x, four: torch.exp(x / four), {"four": np.float32(4)}))
    cases += [one(op, {"x": POSITIVE}, fn) for op, fn in (("Log", torch.log), ("Sqrt", torch.sqrt),
                                                          ("Reciprocal", torch.reciprocal))]
    cases += [one("Pow", {"x": POSITIVE}, lambda x, e: x ** e, consts={"e": np.float32(2.5)}, name="Pow 2.5"),
              one("Pow", {"x": X}, lambda x, e: x ** e, consts={"e": np.float32(2)}, name="Pow 2 of any sign")]
    cases += [one("Gelu", {"x": WIDE}, lambda x, a=a: F.gelu(x, approximate=a), dict(approximate=a), opset=20,
                  name=f"Gelu approximate={a} (opset 20)") for a in ("none", "tanh")]
    cases.append(one("PRelu", {"x": WIDE}, lambda x, s: F.prelu(x, s.reshape(-1)),
                     consts={"s": randn(4, 1, 1, seed=9) * 0.3}))
    return cases


def clip_case(low, high):
    consts = {k: np.float32(v) for k, v in (("lo", low), ("hi", high)) if v is not None}
    order = ["x", "lo" if low is not None else "", "hi" if high is not None else ""]
    while order[-1] == "":
        order.pop()
    return one("Clip", {"x": WIDE}, lambda x, **_: x if low is None and high is None else torch.clamp(x, low, high),
               consts=consts, order=order,
               name=f"Clip[{low},{high}]")


def binary_cases(op_type, fn):
    other = np.abs(randn(1, 4, 1, 1, seed=5)) + 0.5  # positive, so Div stays well conditioned
    return [one(op_type, {"x": X, "y": other}, lambda x, y: fn(x, y), name=f"{op_type} broadcast"),
            one(op_type, {"y": other[0], "x": X}, lambda y, x: fn(y, x), name=f"{op_type} rank-3 first")]


def old_opset_cases():
    """Models from before opset 18 (attributes where inputs are now, other defaults) are converted first."""
    return [
        one("Clip", {"x": WIDE}, lambda x: torch.clamp(x, -1.0, 2.5), dict(min=-1.0, max=2.5), opset=10,
            name="Clip attribute bounds (opset 10)"),
        one("Softmax", {"x": X}, lambda x: torch.softmax(x.flatten(1), 1).reshape(x.shape), {}, opset=11,
            name="Softmax opset 11: default axis 1 over the flattened trailing axes"),
        one("Softmax", {"x": X}, lambda x: torch.softmax(x.flatten(2), 2).reshape(x.shape), dict(axis=2), opset=12,
            name="Softmax opset 12, axis 2"),
    ]


def cast_cases():
    shape_scaled = Case(  # x / (h * w) with h * w from the tensor's own shape, cast from int64 (as exporters do)
        "Cast from int64 shape arithmetic",
        [helper.make_node("Shape", ["x"], ["shape"], start=2),
         helper.make_node("ReduceProd", ["shape"], ["area"], keepdims=0),
         helper.make_node("Cast", ["area"], ["area_f"], to=TensorProto.FLOAT),
         helper.make_node("Div", ["x", "area_f"], ["Y"])],
        {"x": X}, lambda x: x / (x.shape[2] * x.shape[3]))
    from_double = one("Cast", {"x64": X.astype(np.float64)}, lambda x64: x64, dict(to=TensorProto.FLOAT),
                      name="Cast from float64")
    return [shape_scaled, from_double]


def variadic_cases():
    a, b, c = np.round(X * 2), np.round(randn(1, 4, 1, 11, seed=2) * 2), np.round(randn(9, 11, seed=3) * 2)
    return [
        one("Sum", {"a": X, "b": b, "c": c}, lambda a, b, c: a + b + c),
        one("Mean", {"a": X, "b": b, "c": c}, lambda a, b, c: (a + b + c) / 3),
        one("Max", {"a": a, "b": b, "c": c}, lambda a, b, c: torch.stack(torch.broadcast_tensors(a, b, c)).amax(0),
            name="Max, three inputs with ties (split evenly)"),
        one("Min", {"a": a, "b": b}, lambda a, b: torch.minimum(a, b), name="Min, two inputs with ties"),
        one("Max", {"a": X}, lambda a: a, name="Max of one input"),
    ]


def where_case():
    condition = randn(1, 4, 9, 1, seed=4) > 0
    return one("Where", {"x": X, "y": randn(2, 1, 9, 11, seed=5)}, lambda x, y, c: torch.where(c, x, y),
               consts={"c": condition}, order=["c", "x", "y"])


CASES = (
    unary_cases()
    + [clip_case(low, high) for low, high in ((0.0, 6.0), (0.0, None), (None, 1.0), (None, None))]
    + [case for op, fn in (("Add", torch.add), ("Sub", torch.sub), ("Mul", torch.mul), ("Div", torch.div))
       for case in binary_cases(op, fn)]
    + [one("Div", {"x": X}, lambda x, c: x / c, consts={"c": np.float32(3.0)}, name="Div by a constant")]
    + old_opset_cases()
    + cast_cases()
    + variadic_cases()
    + [where_case()]
)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case):
    run(case)


def test_every_rule_of_the_family_is_exercised():
    """Adding a rule to elementwise.py means adding a case here whose graph puts its op on a differentiated path."""
    assert_family_covered(elementwise, CASES)
