"""Building ONNX graphs next to an existing model: `GraphBuilder` appends nodes and constants and answers what the
gradient rules ask of the model's tensors (shapes, types, constant values); `Node` is a node with its attributes
decoded.

The builder emits, and the rules read, the operators of opset MIN_OPSET (axes, pads and bounds as inputs, Softmax
over one axis): `at_min_opset` brings a model there first, with ONNX's version converter.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.version_converter
from onnx import TensorProto, helper, numpy_helper

from igcam_engine.errors import ModelError

MIN_OPSET = 18
# Ops whose outputs depend on their input's shape, never its values: no gradient flows through them.
SHAPE_READERS = {"Shape", "Size"}
FOLD_NODES = 32  # the most nodes of shape arithmetic `constant` evaluates
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


class ShapeUnknown(ModelError):
    """A rule needs a dim that is not fixed at export time (the walker names the op and node it was for)."""


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
        self._producers: dict[str, onnx.NodeProto] = {}
        self._aliases: dict[str, str] = {}  # tensor -> the model's tensor it is a copy of (see `alias`)
        self._names: set[str] = set()
        self._counter = 0
        self.differentiable: set[str] = set()  # tensors the running backward pass carries gradients for
        self.opset = default_opset(model) or MIN_OPSET  # which version of an op's semantics the rules read
        self.add_model(model)

    def add_model(self, model: onnx.ModelProto) -> None:
        """Registers the tensors of a (shape-inferred) model so that rules can query them. The exporter makes a
        dozen builders of one model: what they read of it is indexed once (see _index)."""
        index = _index(model)
        self._types.update(index.types)
        self._shapes.update(index.shapes)
        self._initializers.update(index.initializers)
        self._producers.update(index.producers)
        self._constants.update(index.constants)
        self._names.update(index.names)
        self._opsets = index.opsets

    def alias(self, copies: dict) -> None:
        """Registers tensors that are copies of the model's (`copies`: copy -> original; the tail's own copies of
        shape arithmetic the head computes too): they have the original's shape, type and constant value."""
        for copy, original in copies.items():
            self._aliases[copy] = original
            self._names.add(copy)
            if original in self._shapes:
                self._shapes[copy] = self._shapes[original]
            if original in self._types:
                self._types[copy] = self._types[original]

    def _register_constant(self, name: str, value: np.ndarray, data_type: int) -> None:
        self._constants[name] = value
        self._shapes[name] = tuple(value.shape)
        self._types[name] = data_type
        self._names.add(name)

    def declare(self, name: str, shape, data_type: int = TensorProto.FLOAT) -> str:
        """Records the shape and type of a tensor this builder made, for the rules that read them; returns it."""
        self._shapes[name] = tuple(shape)
        self._types[name] = data_type
        return name

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
            raise ShapeUnknown(f"shape inference found no shape for tensor '{name}'; the model needs static ranks")
        return self._shapes[name]

    def static_shape(self, name: str, dims: slice = slice(None)) -> list[int]:
        """Static dims of a tensor (a slice of them); errors if any of those dims is not fixed at export time."""
        selected = self.shape(name)[dims]
        if not all(isinstance(d, int) and d > 0 for d in selected):
            raise ShapeUnknown(f"tensor '{name}' needs fixed dims {dims.start or 0}.. at export time, has "
                               f"{self.shape(name)}")
        return list(selected)

    def constant(self, name: str):
        """The value of a tensor known at export time (an initializer, a Constant's output, or shape arithmetic on
        fixed dims, see `_folded`), else None."""
        if not name:
            return None
        name = self._aliases.get(name, name)
        if name in self._initializers and name not in self._constants:
            self._constants[name] = numpy_helper.to_array(self._initializers[name])
        if name not in self._constants and name in self._producers:
            value = self._folded(name)
            if value is not None:
                self._constants[name] = value
        return self._constants.get(name)

    def _folded(self, name: str):
        """The value of `name` where it is computed from constants and the shapes of tensors (Shape, Size) alone
        and does not depend on the batch: legacy exports compute Slice bounds and Reshape sizes that way
        (x.chunk(3, -1), x.shape[-1] // heads). The few nodes involved are evaluated at two batch sizes; the
        value is a constant when both agree."""
        from onnx.reference import ReferenceEvaluator

        nodes, stack, seen, shapes = [], [name], set(), {}
        while stack:
            tensor = stack.pop()
            if tensor in seen or tensor in self._initializers or not tensor:
                continue
            seen.add(tensor)
            node = self._producers.get(tensor)
            if node is None or len(nodes) >= FOLD_NODES or node.op_type in ("RandomNormal", "RandomUniform"):
                return None
            nodes.append(node)
            if node.op_type in SHAPE_READERS:
                shapes[node.input[0]] = self._shapes.get(node.input[0])
                continue
            stack.extend(node.input)
        order = {id(n): i for i, n in enumerate(self._producers.values())}
        nodes = sorted({id(n): n for n in nodes}.values(), key=lambda n: order[id(n)])
        values = []
        for batch in (1, 3):
            feeds = {}
            for tensor, dims in shapes.items():
                if dims is None or not all(isinstance(d, int) or d == "batch" for d in dims):
                    return None
                feeds[tensor] = np.zeros([batch if d == "batch" else d for d in dims], np.float32)
            initializers = [self._initializers[x] for n in nodes for x in n.input if x in self._initializers]
            graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                                                      for t in feeds], [helper.make_value_info(name, onnx.TypeProto())],
                                      list({i.name: i for i in initializers}.values()))
            try:
                values.append(ReferenceEvaluator(helper.make_model(graph, opset_imports=self._opsets)).run(
                    None, feeds)[0])
            except Exception:  # the reference evaluator's errors have no common base class: not foldable
                return None
        if values[0].shape != values[1].shape or not np.array_equal(values[0], values[1]):
            return None
        return values[0]

    def is_float(self, name: str) -> bool:
        """Whether the tensor is floating point; one shape inference gave no type (the outputs of some function
        ops) counts as floating point, so that no gradient is dropped silently."""
        return self._types.get(name, TensorProto.UNDEFINED) in FLOAT_TYPES | {TensorProto.UNDEFINED}

    def elem_type(self, name: str) -> int:
        """The ONNX element type of a tensor (TensorProto.FLOAT, ...)."""
        if name not in self._types:
            raise ModelError(f"shape inference found no type for tensor '{name}'")
        return self._types[name]


@dataclass
class _ModelIndex:
    types: dict
    shapes: dict
    initializers: dict
    producers: dict
    constants: dict
    names: set
    opsets: list


_LAST_INDEX: list = []  # [(model, its sizes, index)]: the model is held, so its id is never another's


def _index(model: onnx.ModelProto) -> _ModelIndex:
    """The tensors of a (shape-inferred) model: types, shapes, initializers, producers and Constant values. The
    last model's index is kept: a model with 200,000 initializers would otherwise be walked by every builder."""
    sizes = (len(model.graph.node), len(model.graph.initializer), len(model.graph.value_info))
    if _LAST_INDEX and _LAST_INDEX[0][0] is model and _LAST_INDEX[0][1] == sizes:
        return _LAST_INDEX[0][2]
    index = _ModelIndex({}, {}, {}, {}, {}, set(), list(model.opset_import))
    graph = model.graph
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = info.type.tensor_type
        index.types[info.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            index.shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
    for init in graph.initializer:
        index.initializers[init.name] = init
        index.shapes[init.name] = tuple(init.dims)
        index.types[init.name] = init.data_type
    for node in graph.node:
        for out in node.output:
            index.producers[out] = node
            index.names.add(out)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensor = node.attribute[0].t
            name = node.output[0]
            index.constants[name] = numpy_helper.to_array(tensor)
            index.shapes[name] = tuple(index.constants[name].shape)
            index.types[name] = tensor.data_type
    index.names.update(index.shapes)
    _LAST_INDEX[:] = [(model, sizes, index)]
    return index


def default_opset(model: onnx.ModelProto):
    """The model's default-domain opset version, or None when it imports none."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def at_min_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model, converted to MIN_OPSET when it imports an older default opset."""
    opset = default_opset(model)
    if opset is None:
        raise ModelError("the model imports no default-domain ONNX opset")
    if opset >= MIN_OPSET:
        return model
    try:
        return onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # the converter raises bare RuntimeErrors for ops it cannot adapt
        raise ModelError(f"cannot convert the model from opset {opset} to {MIN_OPSET}: {e}") from None
