"""The rules of export/rules/normalization.py (BatchNormalization, LayerNormalization, InstanceNormalization,
GroupNormalization) against torch autograd in float64 (tests/support/rule_cases.py); with them the layer norm
torch's legacy exporter writes out of elementwise ops and reductions."""
import numpy as np
import pytest
import torch.nn.functional as F
from onnx import helper
from support.rule_cases import Case, X, assert_family_covered, one, randn, run

from igcam_engine.export.rules import normalization


def batch_norm_case():
    c = X.shape[1]
    consts = {"s": randn(c, seed=1), "b": randn(c, seed=2), "m": randn(c, seed=3), "v": np.abs(randn(c, seed=4)) + 0.5}
    return one("BatchNormalization", {"x": X},
               lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, training=False, eps=1e-3), dict(epsilon=1e-3), consts)


def normalization_cases():
    c = X.shape[1]
    ln_last = one("LayerNormalization", {"x": X}, lambda x, s, b: F.layer_norm(x, (11,), s, b, eps=1e-4),
                  dict(epsilon=1e-4), consts={"s": randn(11, seed=1) + 1, "b": randn(11, seed=2)},
                  name="LayerNormalization last axis")
    ln_three = one("LayerNormalization", {"x": X}, lambda x, s: F.layer_norm(x, (4, 9, 11), s, eps=1e-5),
                   dict(axis=1), consts={"s": randn(4, 9, 11, seed=3) + 1}, name="LayerNormalization axis 1, no B")
    decomposed = Case(  # as torch's legacy exporter writes a layer norm
        "LayerNorm decomposed (ReduceMean, Sub, Pow, Sqrt, Div)",
        [helper.make_node("ReduceMean", ["x", "axes"], ["mean"]), helper.make_node("Sub", ["x", "mean"], ["d"]),
         helper.make_node("Pow", ["d", "two"], ["p"]), helper.make_node("ReduceMean", ["p", "axes"], ["var"]),
         helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
         helper.make_node("Div", ["d", "sd"], ["Y"])],
        {"x": X}, lambda x, axes, two, eps: F.layer_norm(x, (11,), eps=1e-5),
        {"axes": np.array([-1], np.int64), "two": np.float32(2), "eps": np.float32(1e-5)})
    instance = one("InstanceNormalization", {"x": X}, lambda x, s, b: F.instance_norm(x, weight=s, bias=b, eps=1e-4),
                   dict(epsilon=1e-4), consts={"s": randn(c, seed=4) + 1, "b": randn(c, seed=5)})

    group = one("GroupNormalization", {"x": X}, lambda x, s, b: F.group_norm(x, 2, s, b, eps=1e-5),
                dict(num_groups=2), consts={"s": randn(c, seed=6) + 1, "b": randn(c, seed=7)}, opset=21,
                name="GroupNormalization (opset 21)")
    group.output_shape = list(X.shape)  # ONNX's shape inference does not type this op's output
    return [ln_last, ln_three, decomposed, instance, group]


CASES = [batch_norm_case()] + normalization_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case):
    run(case)


def test_every_rule_of_the_family_is_exercised():
    """Adding a rule to normalization.py means adding a case here whose graph puts its op on a differentiated path."""
    assert_family_covered(normalization, CASES)
