"""The rules of export/rules/windows.py (Conv, ConvTranspose, MaxPool, AveragePool, GlobalAveragePool,
GlobalMaxPool) against
torch autograd in float64 (tests/support/rule_cases.py)."""
import numpy as np
import pytest
import torch.nn.functional as F
from support.rule_cases import WIDE, X, assert_family_covered, one, randn, run, same_pads, torch_pads

from igcam_engine.export.autodiff import vjp_model
from igcam_engine.export.rules import windows

# ---------------------------------------------------------------- convolution

CONV = [
    dict(strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(strides=[2, 3], pads=[0, 2, 1, 0]),
    dict(dilations=[2, 2], pads=[2, 2, 2, 2]),
    dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(strides=[2, 2], auto_pad="SAME_LOWER"),
    dict(strides=[3, 3], auto_pad="VALID"),
    dict(group=2, pads=[1, 1, 1, 1]),
    dict(group=4, pads=[1, 1, 1, 1], strides=[2, 2]),  # depthwise
    dict(group=4, pads=[1, 1, 1, 1]),  # depthwise, stride 1: the adjoint is a Conv
    dict(pads=[0, 2, 1, 0]),  # stride 1, asymmetric pads
    dict(auto_pad="SAME_LOWER", strides=[1, 1]),
]


def conv_case(attrs):
    group = attrs.get("group", 1)
    out_channels = 4 if group == 4 else 6

    def reference(x, w, b):
        pads = attrs.get("pads", [0, 0, 0, 0])
        if attrs.get("auto_pad", "").startswith("SAME"):
            lower = attrs["auto_pad"] == "SAME_LOWER"
            dilations = attrs.get("dilations", [1, 1])
            ph = same_pads(x.shape[2], 2 * dilations[0] + 1, attrs["strides"][0], lower)
            pw = same_pads(x.shape[3], 2 * dilations[1] + 1, attrs["strides"][1], lower)
            pads = [ph[0], pw[0], ph[1], pw[1]]
        x = F.pad(x, torch_pads(pads))
        return F.conv2d(x, w, b, stride=attrs.get("strides", 1), dilation=attrs.get("dilations", 1), groups=group)

    return one("Conv", {"x": X}, reference, attrs,
               consts={"w": randn(out_channels, 4 // group, 3, 3, seed=2), "b": randn(out_channels, seed=3)})


TRANSPOSED = [
    dict(strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),  # DBNet's upsampling: end zeros appended
    dict(strides=[2, 3], pads=[0, 2, 1, 0], dilations=[1, 2]),
    dict(strides=[2, 2], group=2, output_padding=[1, 0]),
    dict(strides=[3, 3], auto_pad="VALID"),
]


def conv_transpose_case(attrs):
    group = attrs.get("group", 1)

    def reference(x, w, b):
        pads = attrs.get("pads", [0, 0, 0, 0])
        y = F.conv_transpose2d(x, w, b, stride=attrs["strides"], dilation=attrs.get("dilations", 1), groups=group,
                               output_padding=attrs.get("output_padding", 0))
        return y[:, :, pads[0]:y.shape[2] - pads[2], pads[1]:y.shape[3] - pads[3]]  # ONNX crops pads from the result

    return one("ConvTranspose", {"x": X}, reference, attrs,
               consts={"w": randn(4, 6 // group, 3, 3, seed=2), "b": randn(6, seed=3)})


# ---------------------------------------------------------------- pooling

POOL = [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 2], strides=[1, 2], pads=[1, 0, 1, 1]),
]
DILATED = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2])


def torch_pool(x, attrs, pool, **extra):
    if "dilations" in attrs:
        extra["dilation"] = attrs["dilations"]
    pads = attrs.get("pads", [0, 0, 0, 0])
    if pads[0] != pads[2] or pads[1] != pads[3]:
        value = float("-inf") if pool is F.max_pool2d else 0.0
        x = F.pad(x, torch_pads(pads), value=value)
        padding = 0
    else:
        padding = (pads[0], pads[1])
    return pool(x, attrs["kernel_shape"], attrs["strides"], padding, ceil_mode=bool(attrs.get("ceil_mode", 0)), **extra)


def max_pool_case(attrs, ties):
    x = np.round(X * 1.5) if ties else X  # integer values: many exact ties, first maximum wins
    return one("MaxPool", {"x": x}, lambda x: torch_pool(x, attrs, F.max_pool2d), attrs,
               name=f"MaxPool{attrs}{' ties' if ties else ''}")


def average_pool_case(attrs, include_pad):
    return one("AveragePool", {"x": X},
               lambda x: torch_pool(x, attrs, F.avg_pool2d, count_include_pad=bool(include_pad)),
               dict(attrs, count_include_pad=include_pad))


GLOBAL = [
    ("GlobalAveragePool", {}, lambda x: x.mean((2, 3), keepdim=True)),
    ("GlobalMaxPool", {}, lambda x: x.amax((2, 3), keepdim=True)),
]


CASES = (
    [conv_case(attrs) for attrs in CONV]
    + [conv_transpose_case(attrs) for attrs in TRANSPOSED]
    + [one(op, {"x": WIDE}, lambda x, fn=fn: fn(x), attrs) for op, attrs, fn in GLOBAL]
    + [max_pool_case(attrs, ties) for attrs in POOL for ties in (False, True)]
    + [max_pool_case(DILATED, True)]
    + [average_pool_case(attrs, include) for attrs in (POOL[0], POOL[2]) for include in (0, 1)]
)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case):
    run(case)


def test_every_rule_of_the_family_is_exercised():
    """Adding a rule to windows.py means adding a case here whose graph puts its op on a differentiated path."""
    assert_family_covered(windows, CASES)


def test_max_pool_uses_no_op_tensorrt_refuses():
    grad = vjp_model(max_pool_case(DILATED, True).model(), "x", "Y")
    ops = [n.op_type for n in grad.graph.node]
    # TensorRT refuses MaxPool's Indices output and scatter-with-reduction: the rule must use neither
    assert "ScatterElements" not in ops and "ScatterND" not in ops and ops.count("MaxPool") == 1
