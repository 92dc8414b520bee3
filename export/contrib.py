"""ONNX Runtime's fused contrib ops (domain com.microsoft, as its offline optimizer writes them with
`optimized_model_filepath`) rewritten as the standard ops they fuse, before shape inference: onnx knows no
contrib op's shapes, and the gradient rules are written once, for the standard ops. ONNX Runtime fuses them again
when it loads the bundle's graphs. Any other op of another domain is left as it is: in the backbone ONNX Runtime
runs it; on the differentiated part the export refuses it in one line naming it (no rule).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

MICROSOFT = "com.microsoft"


class _Emitter:
    """Appends standard nodes in place of one fused node; names derive from the fused node's."""

    def __init__(self, node: onnx.NodeProto, initializers: list):
        self.node, self.nodes, self.initializers, self.count = node, [], initializers, 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.node.name or self.node.op_type}/unfused/{hint}_{self.count}"

    def const(self, value) -> str:
        name = self.name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op_type: str, inputs, output=None, **attrs) -> str:
        output = output or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=self.name(op_type), **attrs))
        return output


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _activation(e: _Emitter, x: str, name: str, params, output: str) -> str:
    name = name.decode() if isinstance(name, bytes) else name
    if not name:
        return e.op("Identity", [x], output)
    if name in ("Relu", "Tanh", "Sigmoid"):
        return e.op(name, [x], output)
    if name == "LeakyRelu":
        return e.op("LeakyRelu", [x], output, alpha=float(params[0]) if params else 0.01)
    if name == "HardSigmoid":
        return e.op("HardSigmoid", [x], output, alpha=float(params[0]), beta=float(params[1]))
    if name == "Clip":
        return e.op("Clip", [x, e.const(params[0]), e.const(params[1])], output)
    return None


def _fused_conv(e: _Emitter, node, attrs) -> bool:
    conv_attrs = {k: v for k, v in attrs.items() if k not in ("activation", "activation_params")}
    inputs = list(node.input)
    y = e.op("Conv", [x for x in inputs[:3]], **conv_attrs)
    if len(inputs) > 3 and inputs[3]:
        y = e.op("Add", [y, inputs[3]])
    return _activation(e, y, attrs.get("activation", b""), list(attrs.get("activation_params", [])),
                       node.output[0]) is not None


def _fused_matmul(e: _Emitter, node, attrs, ranks: dict) -> bool:
    if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
        return False
    operands = []
    for name, transposed in zip(node.input[:2], (attrs.get("transA", 0), attrs.get("transB", 0))):
        if transposed:
            rank = ranks.get(name)
            if rank is None or rank < 2:
                return False  # left fused: refused on the differentiated part, run by ONNX Runtime elsewhere
            name = e.op("Transpose", [name], perm=[*range(rank - 2), rank - 1, rank - 2])
        operands.append(name)
    e.op("Mul", [e.op("MatMul", operands), e.const(float(attrs.get("alpha", 1.0)))], node.output[0])
    return True


def _gelu(e: _Emitter, x: str, output: str) -> None:
    erf = e.op("Erf", [e.op("Mul", [x, e.const(1 / math.sqrt(2))])])
    e.op("Mul", [e.op("Mul", [x, e.const(0.5)]), e.op("Add", [erf, e.const(1.0)])], output)


def _fast_gelu(e: _Emitter, x: str, output: str) -> None:
    cube = e.op("Mul", [e.op("Mul", [x, x]), x])
    inner = e.op("Mul", [e.op("Add", [x, e.op("Mul", [cube, e.const(0.044715)])]), e.const(math.sqrt(2 / math.pi))])
    e.op("Mul", [e.op("Mul", [x, e.const(0.5)]), e.op("Add", [e.op("Tanh", [inner]), e.const(1.0)])], output)


def _with_bias(e: _Emitter, node) -> str:
    return e.op("Add", [node.input[0], node.input[1]]) if len(node.input) > 1 and node.input[1] else node.input[0]


def _skip_layer_norm(e: _Emitter, node, attrs) -> bool:
    outputs = list(node.output) + [""] * 4
    if outputs[1] or outputs[2]:  # the mean and inverse deviation: only training graphs read them
        return False
    inputs = list(node.input) + [""] * 5
    total = e.op("Add", [inputs[0], inputs[1]])
    if inputs[4]:
        total = e.op("Add", [total, inputs[4]])
    if outputs[3]:
        total = e.op("Identity", [total], outputs[3])
    ln_inputs = [total, inputs[2]] + ([inputs[3]] if inputs[3] else [])
    e.op("LayerNormalization", ln_inputs, outputs[0], axis=-1, epsilon=float(attrs.get("epsilon", 1e-12)))
    return True


def _unfuse(e: _Emitter, node, ranks: dict) -> bool:
    attrs, op = _attrs(node), node.op_type
    if op == "FusedConv":
        return _fused_conv(e, node, attrs)
    if op == "FusedMatMul":
        return _fused_matmul(e, node, attrs, ranks)
    if op in ("Gelu", "BiasGelu"):
        _gelu(e, _with_bias(e, node), node.output[0])
        return True
    if op == "FastGelu":
        _fast_gelu(e, _with_bias(e, node), node.output[0])
        return True
    if op == "QuickGelu":
        x = node.input[0]
        e.op("Mul", [x, e.op("Sigmoid", [e.op("Mul", [x, e.const(float(attrs.get("alpha", 1.702)))])])],
             node.output[0])
        return True
    if op == "SkipLayerNormalization":
        return _skip_layer_norm(e, node, attrs)
    return False


def _ranks(model: onnx.ModelProto) -> dict:
    """Ranks of the tensors onnx's shape inference sees (it stops at the contrib ops), for the transposes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # onnx's inference errors have no common base class: no ranks then
        return {}
    graph = inferred.graph
    ranks = {i.name: len(i.dims) for i in graph.initializer}
    for info in list(graph.input) + list(graph.value_info) + list(graph.output):
        if info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    return ranks


def unfused(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model (changed in place) with every com.microsoft op that fuses standard ops written as those ops. A
    transposing FusedMatMul needs its operands' ranks, which shape inference sees only once the fused ops before
    it are unfused: passes repeat while they make progress."""
    while True:
        fused = [node for node in model.graph.node if node.domain == MICROSOFT]
        if not fused:
            return model
        ranks = _ranks(model)
        nodes, initializers, progress = [], [], False
        for node in model.graph.node:
            if node.domain == MICROSOFT:
                emitter = _Emitter(node, initializers)
                if _unfuse(emitter, node, ranks):
                    nodes.extend(emitter.nodes)
                    progress = True
                    continue
            nodes.append(node)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.graph.initializer.extend(initializers)
        if not progress:
            return model
