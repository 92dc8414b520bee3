"""Reverse-mode differentiation over ONNX graphs, written as plain ONNX ops.

`GraphBuilder` appends nodes to a graph under construction; `append_backward` walks a node list in reverse
topological order, sums the cotangents that reach each tensor and asks the rule table (`rules.RULES`) for each op's
vector-Jacobian product. A tensor carries a gradient when it depends on the differentiated tensor and has a
floating-point type, so shape arithmetic (Shape, Gather on shapes, Equal...) needs no rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from igcam_engine.errors import UserError

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@dataclass
class Node:
    """An ONNX node with its attributes decoded to Python values."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)

    @classmethod
    def from_proto(cls, proto: onnx.NodeProto) -> "Node":
        attrs = {}
        for attribute in proto.attribute:
            value = helper.get_attribute_value(attribute)
            attrs[attribute.name] = value.decode() if isinstance(value, bytes) else value
        return cls(proto.op_type, proto.name, list(proto.input), list(proto.output), attrs)


class GraphBuilder:
    """Collects new nodes and constants next to an existing, shape-inferred model.

    `b.Mul(x, y)` appends a Mul node and returns its output name; `b.op("MaxPool", [x], outputs=2, ...)` is the
    general form. Shapes and constant values of the model's tensors are looked up with `shape` and `constant`.
    """

    def __init__(self, model: onnx.ModelProto, prefix: str = "igcam"):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._shapes: dict[str, tuple] = {}
        self._types: dict[str, int] = {}
        self._constants: dict[str, np.ndarray] = {}
        self._initializers: dict[str, onnx.TensorProto] = {}  # decoded lazily: weights are rarely needed
        self._names: set[str] = set()
        self._counter = 0
        self.differentiable: set[str] = set()  # tensors the running backward pass carries gradients for
        self.add_model(model)

    def add_model(self, model: onnx.ModelProto) -> None:
        """Registers the tensors of a (shape-inferred) model so that rules can query them."""
        graph = model.graph
        for info in list(graph.input) + list(graph.value_info) + list(graph.output):
            tensor_type = info.type.tensor_type
            self._types[info.name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                self._shapes[info.name] = tuple(
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
                )
        for init in graph.initializer:
            self._initializers[init.name] = init
            self._shapes[init.name] = tuple(init.dims)
            self._types[init.name] = init.data_type
        for node in graph.node:
            self._names.update(node.output)
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                tensor = node.attribute[0].t
                self._register_constant(node.output[0], numpy_helper.to_array(tensor), tensor.data_type)
        self._names.update(self._shapes)

    def _register_constant(self, name: str, value: np.ndarray, data_type: int) -> None:
        self._constants[name] = value
        self._shapes[name] = tuple(value.shape)
        self._types[name] = data_type
        self._names.add(name)

    def fresh(self, hint: str) -> str:
        while True:
            self._counter += 1
            name = f"{self.prefix}/{hint}_{self._counter}"
            if name not in self._names:
                self._names.add(name)
                return name

    def op(self, op_type: str, inputs, outputs: int = 1, **attrs):
        """Appends one node; inputs may be tensor names or array-likes (turned into constants)."""
        names = [x if isinstance(x, str) else self.const(x) for x in inputs]
        out = [self.fresh(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, names, out, name=self.fresh(op_type), **attrs))
        return out[0] if outputs == 1 else out

    def __getattr__(self, op_type: str):
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, inputs, **attrs)

    def const(self, value) -> str:
        """A constant tensor; Python ints become int64, floats float32, arrays keep their dtype."""
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        elif array.dtype.kind in "iu":
            array = array.astype(np.int64)
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(array, name))
        self._register_constant(name, array, helper.np_dtype_to_tensor_dtype(array.dtype))
        return name

    def shape(self, name: str) -> tuple:
        """Dims of a tensor: ints where static, the symbol or None where not."""
        if name not in self._shapes:
            raise UserError(f"shape inference found no shape for tensor '{name}'; the model needs static ranks")
        return self._shapes[name]

    def static_shape(self, name: str, dims: slice = slice(None)) -> list[int]:
        """Static dims of a tensor (a slice of them); errors if any of those dims is not fixed at export time."""
        selected = self.shape(name)[dims]
        if not all(isinstance(d, int) and d > 0 for d in selected):
            raise UserError(f"tensor '{name}' needs fixed dims {dims.start or 0}.. at export time, has {self.shape(name)}")
        return list(selected)

    def constant(self, name: str):
        """The value of a tensor known at export time (initializer or Constant output), else None."""
        if name in self._initializers and name not in self._constants:
            self._constants[name] = numpy_helper.to_array(self._initializers[name])
        return self._constants.get(name) if name else None

    def is_float(self, name: str) -> bool:
        return self._types.get(name) in FLOAT_TYPES


def append_backward(builder: GraphBuilder, nodes: list[onnx.NodeProto], wrt: str, output: str, seed: str) -> str:
    """Appends to `builder` the nodes computing d<seed . output>/d<wrt> through `nodes` (topologically sorted).

    Returns the name of the gradient tensor, shaped like `wrt`.
    """
    from .rules import RULES

    views = [Node.from_proto(n) for n in nodes]
    depends = {wrt}
    for node in views:
        if any(i in depends for i in node.inputs):
            depends.update(o for o in node.outputs if builder.is_float(o))
    builder.differentiable = depends
    if output not in depends:
        raise UserError(f"output '{output}' does not depend on tensor '{wrt}'")

    on_path = [n for n in views if any(i in depends for i in n.inputs)]
    missing = sorted({f"{n.op_type} (node '{n.name}')" for n in on_path if n.op_type not in RULES})
    if missing:
        raise UserError(
            "no gradient rule for op(s) on the path from the target layer to the logits: "
            + ", ".join(missing)
            + ". Supported ops: "
            + ", ".join(sorted(RULES))
        )

    cotangents: dict[str, list[str]] = {output: [seed]}
    for node in reversed(on_path):
        grads_out = [_total(builder, cotangents.get(o)) for o in node.outputs]
        if all(g is None for g in grads_out):
            continue
        grads_in = RULES[node.op_type](builder, node, grads_out)
        for name, grad in zip(node.inputs, grads_in):
            if name not in depends:
                continue
            if grad is None:
                raise UserError(
                    f"{node.op_type} node '{node.name}': the gradient with respect to input '{name}' is not "
                    "supported (only data inputs are differentiated, not weights or shapes computed from the layer)"
                )
            cotangents.setdefault(name, []).append(grad)
    return _total(builder, cotangents[wrt])


def _total(builder: GraphBuilder, parts):
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else builder.Sum(*parts)


def vjp_model(model: onnx.ModelProto, wrt: str, output: str) -> onnx.ModelProto:
    """A copy of `model` with an extra input `cotangent` (shaped like `output`) and an extra output `gradient`:
    the vector-Jacobian product cotangent . d output / d wrt."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    builder = GraphBuilder(model)
    infos = {i.name: i for i in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
    cotangent = onnx.ValueInfoProto(name="cotangent", type=infos[output].type)
    gradient = onnx.ValueInfoProto(name="gradient", type=infos[wrt].type)
    grad = append_backward(builder, list(model.graph.node), wrt, output, "cotangent")
    graph = model.graph
    graph.node.extend(builder.nodes + [helper.make_node("Identity", [grad], ["gradient"])])
    graph.initializer.extend(builder.initializers)
    graph.input.append(cotangent)
    graph.output.append(gradient)
    return model
