"""The machinery of the gradient-rule tests (tests/rules/): a case is a small ONNX graph computing `Y` (one node, or
a few where a rule's branch needs its neighbours); `run` differentiates it with the rule table, runs it in ONNX
Runtime, and compares both the forward output and the vector-Jacobian product with torch autograd in float64,
evaluated at the very float32 values ORT sees. Which rules are exercised is read from the graphs the cases build
(`ops_on_path`); `assert_family_covered` checks that every rule of one family module has a case.
"""
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

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
POSITIVE = np.abs(X) + 0.5  # for Log, Sqrt, Reciprocal, Pow with a fractional exponent


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


def family_ops(module: ModuleType) -> set:
    """The op types whose rule function the rule module `module` defines."""
    return {op for op, fn in RULES.items() if fn.__module__ == module.__name__}


def assert_family_covered(module: ModuleType, cases) -> None:
    """Every op whose rule `module` defines is on a differentiated path of at least one of `cases`: adding a rule
    means adding a case whose graph puts its op on a differentiated path."""
    ops = family_ops(module)
    assert ops, f"{module.__name__} defines no rule"
    exercised = set().union(*(ops_on_path(case.model(), case.wrt) for case in cases))
    missing = sorted(ops - exercised)
    assert not missing, f"rules of {module.__name__} no case exercises: {missing}"
