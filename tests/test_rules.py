"""Each gradient rule against torch autograd in float64, evaluated at the very float32 values ORT sees.

A case builds a one-node ONNX graph, differentiates it with the rule table, runs it in ONNX Runtime, and compares
both the forward output and the vector-Jacobian product with torch.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from igcam_engine.export.autodiff import vjp_model
from igcam_engine.export.rules import RULES

OPSET = 18


def run_case(op_type, inputs, attrs=None, consts=None, wrt=None, torch_fn=None, rng=None):
    """inputs: ordered dict name -> array (graph inputs); consts: name -> array (initializers, '' = absent)."""
    consts = consts or {}
    rng = rng or np.random.default_rng(1)
    names = list(inputs) + list(consts)
    order = [n for n in (attrs or {}).pop("_order", names)]
    node = helper.make_node(op_type, order, ["Y"], **(attrs or {}))
    graph = helper.make_graph(
        [node], "case",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items() if k],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    feeds = {k: v.astype(np.float32) for k, v in inputs.items()}
    for name in wrt or list(inputs):
        grad_model = vjp_model(model, name, "Y")
        onnx.checker.check_model(grad_model, full_check=True)
        session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
        tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=(k == name)) for k, v in feeds.items()}
        tensors.update({k: torch.tensor(np.asarray(v), dtype=torch.float64) for k, v in consts.items() if k})
        y_ref = torch_fn(**tensors)
        cot = rng.standard_normal(tuple(y_ref.shape)).astype(np.float32)
        y_ort, grad_ort = session.run(["Y", "gradient"], {**feeds, "cotangent": cot})
        (y_ref * torch.tensor(cot, dtype=torch.float64)).sum().backward()
        np.testing.assert_allclose(y_ort, y_ref.detach().numpy(), rtol=1e-4, atol=1e-4, err_msg="forward differs")
        ref = tensors[name].grad.numpy()
        scale = max(np.abs(ref).max(), 1e-6)
        np.testing.assert_allclose(grad_ort, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"d/d{name}")


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


X = randn(2, 4, 9, 11)


def torch_pads(pads):
    """ONNX [begin..., end...] (H, W) -> F.pad order (W_begin, W_end, H_begin, H_end)."""
    return (pads[1], pads[3], pads[0], pads[2])


CONV_CASES = [
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


def same_pads(size, kernel, stride, lower):
    """ONNX SAME_* padding, written out from the operator spec."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    small = total // 2
    begin = total - small if lower else small
    return begin, total - begin


@pytest.mark.parametrize("attrs", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv(attrs):
    group = attrs.get("group", 1)
    out_channels = 4 if group == 4 else 6
    w = randn(out_channels, 4 // group, 3, 3, seed=2)
    bias = randn(out_channels, seed=3)

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

    run_case("Conv", {"x": X}, dict(attrs), consts={"w": w, "b": bias}, torch_fn=reference)


def test_batch_norm():
    c = X.shape[1]
    scale, bias, mean, var = randn(c, seed=1), randn(c, seed=2), randn(c, seed=3), np.abs(randn(c, seed=4)) + 0.5
    run_case(
        "BatchNormalization", {"x": X}, dict(epsilon=1e-3),
        consts={"s": scale, "b": bias, "m": mean, "v": var},
        torch_fn=lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, training=False, eps=1e-3),
    )


ELEMENTWISE = {
    "Relu": (dict(), F.relu),
    "LeakyRelu": (dict(alpha=0.1), lambda x: F.leaky_relu(x, 0.1)),
    "Sigmoid": (dict(), torch.sigmoid),
    "HardSigmoid": (dict(alpha=0.2, beta=0.5), lambda x: torch.clamp(0.2 * x + 0.5, 0, 1)),
    "HardSwish": (dict(), F.hardswish),
    "Identity": (dict(), lambda x: x),
    "Dropout": (dict(), lambda x: x),
    "Softmax": (dict(axis=1), lambda x: torch.softmax(x, 1)),
    "GlobalAveragePool": (dict(), lambda x: x.mean((2, 3), keepdim=True)),
    "GlobalMaxPool": (dict(), lambda x: x.amax((2, 3), keepdim=True)),
    "Flatten": (dict(axis=1), lambda x: x.flatten(1)),
    "Transpose": (dict(perm=[0, 2, 3, 1]), lambda x: x.permute(0, 2, 3, 1)),
    "Cast": (dict(to=TensorProto.FLOAT), lambda x: x),
}


@pytest.mark.parametrize("op_type", sorted(ELEMENTWISE))
def test_unary(op_type):
    attrs, fn = ELEMENTWISE[op_type]
    # 4x spread so that HardSwish/HardSigmoid/Clip see all of their pieces
    run_case(op_type, {"x": X * 4}, dict(attrs), torch_fn=lambda x: fn(x))


@pytest.mark.parametrize("low,high", [(0.0, 6.0), (0.0, ""), ("", 1.0)])
def test_clip(low, high):
    consts = {"lo": np.float32(low) if low != "" else None, "hi": np.float32(high) if high != "" else None}
    order = ["x", "lo" if low != "" else "", "hi" if high != "" else ""]
    lo_t = None if low == "" else low
    hi_t = None if high == "" else high
    run_case(
        "Clip", {"x": X * 4}, dict(_order=order), consts={k: v for k, v in consts.items() if v is not None},
        torch_fn=lambda x, **_: torch.clamp(x, lo_t, hi_t),
    )


@pytest.mark.parametrize("op_type,fn", [("Add", torch.add), ("Sub", torch.sub), ("Mul", torch.mul), ("Div", torch.div)])
def test_binary_broadcast(op_type, fn):
    other = np.abs(randn(1, 4, 1, 1, seed=5)) + 0.5  # positive, so Div stays well conditioned
    run_case(op_type, {"x": X, "y": other}, torch_fn=lambda x, y: fn(x, y))
    run_case(op_type, {"y": other[0], "x": X}, torch_fn=lambda y, x: fn(y, x))  # rank-3 operand first


def test_div_by_constant():
    run_case("Div", {"x": X}, consts={"c": np.float32(3.0)}, torch_fn=lambda x, c: x / c)


POOL_CASES = [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 2], strides=[1, 2], pads=[1, 0, 1, 1]),
]


def torch_pool(x, attrs, pool, **extra):
    pads = attrs.get("pads", [0, 0, 0, 0])
    if pads[0] != pads[2] or pads[1] != pads[3]:
        value = float("-inf") if pool is F.max_pool2d else 0.0
        x = F.pad(x, torch_pads(pads), value=value)
        padding = 0
    else:
        padding = (pads[0], pads[1])
    return pool(x, attrs["kernel_shape"], attrs["strides"], padding, ceil_mode=bool(attrs.get("ceil_mode", 0)), **extra)


@pytest.mark.parametrize("attrs", POOL_CASES, ids=[str(c) for c in POOL_CASES])
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool(attrs, ties):
    x = np.round(X * 1.5) if ties else X  # integer values: many exact ties, first maximum wins
    run_case("MaxPool", {"x": x}, dict(attrs), torch_fn=lambda x: torch_pool(x, attrs, F.max_pool2d))


@pytest.mark.parametrize("attrs", POOL_CASES[:1] + POOL_CASES[2:3], ids=["pad", "ceil"])
@pytest.mark.parametrize("include_pad", [0, 1])
def test_average_pool(attrs, include_pad):
    run_case(
        "AveragePool", {"x": X}, dict(attrs, count_include_pad=include_pad),
        torch_fn=lambda x: torch_pool(x, attrs, F.avg_pool2d, count_include_pad=bool(include_pad)),
    )


@pytest.mark.parametrize("op_type", ["ReduceMean", "ReduceSum", "ReduceMax"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce(op_type, keepdims):
    fn = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax}[op_type]
    x = np.round(X) if op_type == "ReduceMax" else X  # ties split evenly, as torch.amax
    run_case(
        op_type, {"x": x}, dict(keepdims=keepdims), consts={"axes": np.array([2, -1], np.int64)},
        torch_fn=lambda x, axes: fn(x, (2, 3), keepdim=bool(keepdims)),
    )


def test_reshape_squeeze_unsqueeze():
    x = randn(2, 4, 1, 6)
    run_case("Reshape", {"x": x}, consts={"s": np.array([2, -1], np.int64)}, torch_fn=lambda x, s: x.reshape(2, -1))
    run_case("Squeeze", {"x": x}, consts={"a": np.array([2], np.int64)}, torch_fn=lambda x, a: x.squeeze(2))
    run_case("Unsqueeze", {"x": x}, consts={"a": np.array([0], np.int64)}, torch_fn=lambda x, a: x.unsqueeze(0))


def test_concat():
    a, b = randn(2, 3, 5, 5, seed=1), randn(2, 5, 5, 5, seed=2)
    run_case("Concat", {"a": a, "b": b}, dict(axis=1), torch_fn=lambda a, b: torch.cat([a, b], 1))


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_a, trans_b):
    a = randn(5, 3) if not trans_a else randn(3, 5)
    w = randn(3, 4, seed=2) if not trans_b else randn(4, 3, seed=2)
    c = randn(4, seed=3)

    def reference(a, w, c):
        a_ = a.T if trans_a else a
        w_ = w.T if trans_b else w
        return 0.7 * a_ @ w_ + 1.3 * c

    attrs = dict(transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3)
    run_case("Gemm", {"a": a, "w": w, "c": c}, attrs, torch_fn=reference)


def test_matmul():
    run_case("MatMul", {"x": randn(2, 3, 5), "w": randn(5, 4, seed=2)}, torch_fn=lambda x, w: x @ w)


def test_pad():
    pads = np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64)
    run_case(
        "Pad", {"x": X}, consts={"pads": pads},
        torch_fn=lambda x, pads: F.pad(x, (2, 0, 1, 3)),
    )


def test_every_rule_has_a_case():
    """Adding a rule means adding its test: the op must be named in this file."""
    source = open(__file__).read()
    untested = [op for op in RULES if f'"{op}"' not in source]
    assert not untested, f"rules without a test case: {untested}"


def test_unsupported_op_is_named():
    from igcam_engine.errors import UserError

    node = helper.make_node("Erf", ["x"], ["Y"], name="my_erf")
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    with pytest.raises(UserError, match=r"Erf \(node 'my_erf'\).*Supported ops: .*Conv"):
        vjp_model(model, "x", "Y")


def test_max_pool_dilated_and_no_trt_refused_ops():
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2])
    run_case("MaxPool", {"x": np.round(X)}, dict(attrs),
             torch_fn=lambda x: F.max_pool2d(x, 3, 2, 1, dilation=2))
    node = helper.make_node("MaxPool", ["x"], ["Y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X.shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    grad = vjp_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8), "x", "Y")
    ops = [n.op_type for n in grad.graph.node]
    # TensorRT refuses MaxPool's Indices output and scatter-with-reduction: the rule must use neither
    assert "ScatterElements" not in ops and "ScatterND" not in ops and ops.count("MaxPool") == 1
