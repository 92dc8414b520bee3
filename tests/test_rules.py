"""Each gradient rule against torch autograd in float64, evaluated at the very float32 values ORT sees.

A case is a small ONNX graph computing `Y` (one node, or a few where a rule's branch needs its neighbours); the test
differentiates it with the rule table, runs it in ONNX Runtime, and compares both the forward output and the
vector-Jacobian product with torch. Which rules are exercised is read from the graphs the cases build.
"""
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from igcam_engine.errors import UserError
from igcam_engine.export.autodiff import vjp_model
from igcam_engine.export.builder import FLOAT_TYPES, at_min_opset
from igcam_engine.export.rules import RULES

OPSET = 18


@dataclass
class Case:
    name: str
    nodes: list  # NodeProtos computing "Y" from the inputs and constants
    inputs: dict  # graph inputs: name -> array (float32 unless the array says otherwise)
    reference: Callable  # torch, float64: reference(**inputs, **consts) -> Y
    consts: dict = field(default_factory=dict)  # initializers: name -> array
    opset: int = OPSET
    wrt: tuple = None  # the inputs differentiated (default: every floating-point input)
    output_shape: list = None  # Y's declared float shape, for ops ONNX's shape inference leaves untyped

    def __post_init__(self):
        self.inputs = {k: v.astype(np.float32) if v.dtype == np.float64 and k not in FLOAT64_INPUTS else v
                       for k, v in self.inputs.items()}
        if self.wrt is None:
            self.wrt = tuple(k for k, v in self.inputs.items() if v.dtype.kind == "f")

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, self.name,
            [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for k, v in self.inputs.items()],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT if self.output_shape else TensorProto.UNDEFINED,
                                           self.output_shape)],
            [numpy_helper.from_array(np.asarray(v), k) for k, v in self.consts.items()],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=8)


FLOAT64_INPUTS = {"x64"}  # input names kept in float64 (the Cast-from-double case)


def one(op_type, inputs, reference, attrs=None, consts=None, order=None, opset=OPSET, name=None):
    """A case of one node `op_type` reading `order` (default: the inputs, then the constants; "" = absent)."""
    consts = consts or {}
    order = order if order is not None else list(inputs) + list(consts)
    node = helper.make_node(op_type, order, ["Y"], **(attrs or {}))
    return Case(name or f"{op_type}{attrs or ''}", [node], inputs, reference, consts, opset)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


X = randn(2, 4, 9, 11)
WIDE = X * 4  # spread so that HardSwish/HardSigmoid/Clip see all of their pieces


def run(case: Case, rng=None):
    rng = rng or np.random.default_rng(1)
    model = case.model()
    for name in case.wrt:
        grad_model = vjp_model(model, name, "Y")
        onnx.checker.check_model(grad_model, full_check=True)
        session = ort.InferenceSession(grad_model.SerializeToString(), providers=["CPUExecutionProvider"])
        tensors = {k: torch.tensor(v, dtype=torch.float64 if v.dtype.kind == "f" else None, requires_grad=(k == name))
                   for k, v in case.inputs.items()}
        tensors.update({k: torch.tensor(np.asarray(v), dtype=torch.float64 if np.asarray(v).dtype.kind == "f" else None)
                        for k, v in case.consts.items()})
        y_ref = case.reference(**tensors)
        cot = rng.standard_normal(tuple(y_ref.shape)).astype(np.float32)
        y_ort, grad_ort = session.run(["Y", "gradient"], {**case.inputs, "cotangent": cot})
        (y_ref * torch.tensor(cot, dtype=torch.float64)).sum().backward()
        np.testing.assert_allclose(y_ort, y_ref.detach().numpy(), rtol=1e-4, atol=1e-4, err_msg="forward differs")
        ref = tensors[name].grad.numpy()
        assert grad_ort.shape == ref.shape and grad_ort.dtype == case.inputs[name].dtype
        scale = max(np.abs(ref).max(), 1e-6)
        assert np.abs(ref).max() > 0, "the reference gradient is zero: the case tests nothing"
        np.testing.assert_allclose(grad_ort, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f"d/d{name}")


def torch_pads(pads):
    """ONNX [begin..., end...] (H, W) -> F.pad order (W_begin, W_end, H_begin, H_end)."""
    return (pads[1], pads[3], pads[0], pads[2])


def same_pads(size, kernel, stride, lower):
    """ONNX SAME_* padding, written out from the operator spec."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    small = total // 2
    begin = total - small if lower else small
    return begin, total - begin


# ---------------------------------------------------------------- convolution and normalization

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


def batch_norm_case():
    c = X.shape[1]
    consts = {"s": randn(c, seed=1), "b": randn(c, seed=2), "m": randn(c, seed=3), "v": np.abs(randn(c, seed=4)) + 0.5}
    return one("BatchNormalization", {"x": X},
               lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, training=False, eps=1e-3), dict(epsilon=1e-3), consts)


# ---------------------------------------------------------------- elementwise

UNARY = [
    ("Relu", {}, F.relu),
    ("LeakyRelu", dict(alpha=0.1), lambda x: F.leaky_relu(x, 0.1)),
    ("Sigmoid", {}, torch.sigmoid),
    ("HardSigmoid", dict(alpha=0.2, beta=0.5), lambda x: torch.clamp(0.2 * x + 0.5, 0, 1)),
    ("HardSwish", {}, F.hardswish),
    ("Identity", {}, lambda x: x),
    ("Dropout", {}, lambda x: x),
    ("Softmax", dict(axis=1), lambda x: torch.softmax(x, 1)),
    ("Softmax", {}, lambda x: torch.softmax(x, -1)),  # opset 13+: the default axis is the last
    ("GlobalAveragePool", {}, lambda x: x.mean((2, 3), keepdim=True)),
    ("GlobalMaxPool", {}, lambda x: x.amax((2, 3), keepdim=True)),
    ("Flatten", dict(axis=1), lambda x: x.flatten(1)),
    ("Transpose", dict(perm=[0, 2, 3, 1]), lambda x: x.permute(0, 2, 3, 1)),
    ("Transpose", {}, lambda x: x.permute(3, 2, 1, 0)),  # no perm: the axes reversed
    ("Cast", dict(to=TensorProto.FLOAT), lambda x: x),
]


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


# ---------------------------------------------------------------- pooling

POOL = [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[2, 2], strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    dict(kernel_shape=[3, 2], strides=[1, 2], pads=[1, 0, 1, 1]),
]


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


# ---------------------------------------------------------------- reductions

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
    """Models from before opset 18 (attributes where inputs are now, other defaults) are converted first."""
    x = np.round(X)
    return [
        one("ReduceMean", {"x": X}, lambda x: x.mean((1, 3), keepdim=True), dict(axes=[1, 3]), opset=13,
            name="ReduceMean axes attribute (opset 13)"),
        one("ReduceMax", {"x": x}, lambda x: x.amax(2), dict(axes=[2], keepdims=0), opset=13,
            name="ReduceMax axes attribute (opset 13)"),
        one("Clip", {"x": WIDE}, lambda x: torch.clamp(x, -1.0, 2.5), dict(min=-1.0, max=2.5), opset=10,
            name="Clip attribute bounds (opset 10)"),
        one("Softmax", {"x": X}, lambda x: torch.softmax(x.flatten(1), 1).reshape(x.shape), {}, opset=11,
            name="Softmax opset 11: default axis 1 over the flattened trailing axes"),
        one("Softmax", {"x": X}, lambda x: torch.softmax(x.flatten(2), 2).reshape(x.shape), dict(axis=2), opset=12,
            name="Softmax opset 12, axis 2"),
        one("Pad", {"x": X}, lambda x: F.pad(x, (2, 0, 1, 3)), dict(pads=[0, 0, 1, 2, 0, 0, 3, 0]), opset=10,
            name="Pad attribute pads (opset 10)"),
        one("Unsqueeze", {"x": X}, lambda x: x.unsqueeze(1), dict(axes=[1]), opset=11,
            name="Unsqueeze axes attribute (opset 11)"),
    ]


# ---------------------------------------------------------------- shape and layout


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


# ---------------------------------------------------------------- matrix products


def gemm_case(trans_a, trans_b):
    a = randn(5, 3) if not trans_a else randn(3, 5)
    w = randn(3, 4, seed=2) if not trans_b else randn(4, 3, seed=2)

    def reference(a, w, c):
        return 0.7 * (a.T if trans_a else a) @ (w.T if trans_b else w) + 1.3 * c

    return one("Gemm", {"a": a, "w": w, "c": randn(4, seed=3)}, reference,
               dict(transA=trans_a, transB=trans_b, alpha=0.7, beta=1.3))


POSITIVE = np.abs(X) + 0.5  # for Log, Sqrt, Reciprocal, Pow with a fractional exponent

UNARY += [
    ("Tanh", {}, torch.tanh),
    ("Exp", {}, lambda x: torch.exp(x / 4)),  # on X * 4: keeps exp in range
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
    cases = [one(op, {"x": WIDE}, lambda x, fn=fn: fn(x), attrs) for op, attrs, fn in UNARY if op != "Exp"]
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


def more_reduce_cases():
    axes = {"axes": np.array([1, 3], np.int64)}
    return [
        one("ReduceMin", {"x": np.round(X)}, lambda x, axes: torch.amin(x, (1, 3), keepdim=True), consts=axes),
        one("ReduceL2", {"x": X}, lambda x, axes: torch.linalg.vector_norm(x, 2, (1, 3), keepdim=False),
            dict(keepdims=0), consts=axes),
        one("ReduceL1", {"x": X}, lambda x, axes: x.abs().sum((1, 3), keepdim=True), consts=axes),
        one("ReduceSumSquare", {"x": X}, lambda x, axes: (x * x).sum((1, 3), keepdim=True), consts=axes),
    ]


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


def pad_cases():
    pads = np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)  # H: 1 before, 2 after; W: 2 before, 1 after
    torch_order = (2, 1, 1, 2)
    return [one("Pad", {"x": X}, lambda x, pads, m=torch_mode: F.pad(x, torch_order, mode=m), dict(mode=mode),
                consts={"pads": pads}, opset=19, name=f"Pad {mode}")
            for mode, torch_mode in (("reflect", "reflect"), ("edge", "replicate"), ("wrap", "circular"))]


def resize_cases():
    x = randn(2, 3, 5, 7, seed=8)
    scales = {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 1.5], np.float32)}
    sizes = {"roi": np.zeros(0, np.float32), "sizes": np.array([2, 3, 9, 4], np.int64)}
    cases = [
        ("linear half_pixel, scales 2 x 1.5", dict(mode="linear"), scales,
         lambda x: F.interpolate(x, scale_factor=(2, 1.5), mode="bilinear", align_corners=False)),
        ("linear align_corners, sizes 9 x 4", dict(mode="linear", coordinate_transformation_mode="align_corners"),
         sizes, lambda x: F.interpolate(x, size=(9, 4), mode="bilinear", align_corners=True)),
        ("nearest asymmetric floor, sizes 9 x 4", dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                                       nearest_mode="floor"),
         sizes, lambda x: F.interpolate(x, size=(9, 4), mode="nearest")),
        ("cubic half_pixel a=-0.75, scales 2 x 1.5", dict(mode="cubic", cubic_coeff_a=-0.75), scales,
         lambda x: F.interpolate(x, scale_factor=(2, 1.5), mode="bicubic", align_corners=False)),
    ]
    built = [Case(f"Resize {name}", [helper.make_node("Resize", ["x", "roi", "scales" if "scales" in c else "",
                                                                  "sizes" if "sizes" in c else ""], ["Y"], **a)],
                  {"x": x}, lambda x, fn=fn, **_: fn(x), c) for name, a, c, fn in cases]
    built.append(Case("Upsample (opset 9), nearest x2",
                      [helper.make_node("Upsample", ["x", "scales"], ["Y"], mode="nearest")], {"x": x},
                      lambda x, scales: F.interpolate(x, scale_factor=2, mode="nearest"),
                      {"scales": np.array([1, 1, 2, 2], np.float32)}, opset=9))
    return built


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
    [conv_case(attrs) for attrs in CONV]
    + [batch_norm_case()]
    + unary_cases()
    + [clip_case(low, high) for low, high in ((0.0, 6.0), (0.0, None), (None, 1.0), (None, None))]
    + [case for op, fn in (("Add", torch.add), ("Sub", torch.sub), ("Mul", torch.mul), ("Div", torch.div))
       for case in binary_cases(op, fn)]
    + [one("Div", {"x": X}, lambda x, c: x / c, consts={"c": np.float32(3.0)}, name="Div by a constant")]
    + [max_pool_case(attrs, ties) for attrs in POOL for ties in (False, True)]
    + [max_pool_case(dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2]), True)]
    + [average_pool_case(attrs, include) for attrs in (POOL[0], POOL[2]) for include in (0, 1)]
    + [case for op in REDUCE for case in reduce_cases(op)]
    + old_opset_cases()
    + shape_cases()
    + concat_cases()
    + cast_cases()
    + [gemm_case(a, b) for a in (0, 1) for b in (0, 1)]
    + [one("MatMul", {"x": randn(2, 3, 5), "w": randn(5, 4, seed=2)}, lambda x, w: x @ w)]
    + [one("Pad", {"x": X}, lambda x, pads: F.pad(x, (2, 0, 1, 3)),
           consts={"pads": np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64)})]
    + [one("Pad", {"x": X}, lambda x, pads: x[:, :, 1:8, 2:], consts={"pads": np.array([0, 0, -1, -2, 0, 0, -1, 0],
                                                                                          np.int64)},
           name="Pad negative (crops)")]
    + pad_cases()
    + variadic_cases()
    + [where_case()]
    + normalization_cases()
    + more_reduce_cases()
    + selection_cases()
    + resize_cases()
    + einsum_cases()
)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case):
    run(case)


def ops_on_path(model: onnx.ModelProto, wrt) -> set:
    """Op types of the nodes a gradient flows through: those with a floating-point output computed (transitively)
    from a differentiated input."""
    model = onnx.shape_inference.infer_shapes(at_min_opset(model))
    types = {i.name: i.type.tensor_type.elem_type for i in list(model.graph.input) + list(model.graph.value_info)
             + list(model.graph.output)}
    reached, ops = set(wrt), set()
    for node in model.graph.node:
        outputs = [o for o in node.output if types.get(o) in FLOAT_TYPES]
        if outputs and any(i in reached for i in node.input):
            ops.add(node.op_type)
            reached.update(outputs)
    return ops


def test_every_rule_is_exercised():
    """Adding a rule means adding a case whose graph puts its op on a differentiated path."""
    exercised = set().union(*(ops_on_path(case.model(), case.wrt) for case in CASES))
    assert not set(RULES) - exercised, f"rules no case exercises: {sorted(set(RULES) - exercised)}"


def test_unsupported_op_is_named():
    node = helper.make_node("Hardmax", ["x"], ["Y"], name="my_hardmax")
    case = Case("unsupported", [node], {"x": randn(2, 3)}, None)
    with pytest.raises(UserError, match=r"Hardmax \(node 'my_hardmax'\).*rules exist for: .*Conv"):
        vjp_model(case.model(), "x", "Y")


def test_max_pool_uses_no_op_tensorrt_refuses():
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], dilations=[2, 2])
    grad = vjp_model(max_pool_case(attrs, True).model(), "x", "Y")
    ops = [n.op_type for n in grad.graph.node]
    # TensorRT refuses MaxPool's Indices output and scatter-with-reduction: the rule must use neither
    assert "ScatterElements" not in ops and "ScatterND" not in ops and ops.count("MaxPool") == 1
