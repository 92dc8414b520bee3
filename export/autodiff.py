"""Reverse-mode differentiation over ONNX graphs, written as plain ONNX ops.

`append_backward` walks a node list in reverse topological order, sums the cotangents that reach each tensor and
asks the rule table (`rules.RULES`) for each op's vector-Jacobian product, appending the nodes with a
`builder.GraphBuilder`. A tensor carries a gradient when it depends on the differentiated tensor and has a
floating-point type, so shape arithmetic (Shape, Gather on shapes, Equal...) needs no rule.
"""
from __future__ import annotations

import onnx
from onnx import helper

from igcam_engine.errors import ModelError

from .builder import SHAPE_READERS, GraphBuilder, Node, ShapeUnknown, at_min_opset
from .rules import RULES


class MissingRules(ModelError):
    """Ops on the differentiated part that have no gradient rule (`missing`: "Op (node 'name')" strings)."""

    def __init__(self, missing: list[str], wrt: str):
        self.missing = missing
        super().__init__(
            f"no gradient rule for op(s) on the differentiated part (from the target '{wrt}' to the outputs): "
            + ", ".join(missing) + ". Ops before the target need none (ONNX Runtime runs them); rules exist for: "
            + ", ".join(sorted(RULES)))


def differentiated(builder: GraphBuilder, nodes: list, wrt: str):
    """(the tensors that carry a gradient, the nodes producing them in order): a tensor carries one when a node
    computes it from such a tensor (wrt first) and it is floating point; Shape and Size pass none on."""
    views = [Node.from_proto(n) for n in nodes]
    depends = {wrt}
    for node in views:
        if node.op_type not in SHAPE_READERS and any(i in depends for i in node.inputs):
            depends.update(o for o in node.outputs if builder.is_float(o))
    return depends, [n for n in views if any(o in depends for o in n.outputs)]


def missing_rules(builder: GraphBuilder, nodes: list, wrt: str) -> list[str]:
    """The nodes on the differentiated part whose op has no rule, as "Op (node 'name')"."""
    return _without_rule(differentiated(builder, nodes, wrt)[1])


def _without_rule(nodes: list) -> list[str]:
    return sorted({f"{n.op_type} (node '{n.name}')" for n in nodes if n.op_type not in RULES})


def append_backward(builder: GraphBuilder, nodes: list[onnx.NodeProto], wrt: str, seeds: dict,
                    about: str | None = None) -> str:
    """Appends to `builder` the nodes computing d<sum of seed . output over `seeds` (output -> its cotangent)>/d<wrt>
    through `nodes` (topologically sorted): the vector-Jacobian product of the outputs at `wrt`.

    Returns the name of the gradient tensor, shaped like `wrt`; messages name `about` (the model's target tensor,
    where `wrt` is a form of it the exporter made) or `wrt`.
    """
    depends, on_path = differentiated(builder, nodes, wrt)
    builder.differentiable = depends
    for output in seeds:
        if output not in depends:
            raise ModelError(f"output '{output}' does not depend on tensor '{about or wrt}'")
    missing = _without_rule(on_path)
    if missing:
        raise MissingRules(missing, about or wrt)

    cotangents: dict[str, list[str]] = {output: [seed] for output, seed in seeds.items()}
    for node in reversed(on_path):
        grads_out = [_total(builder, cotangents.get(o)) for o in node.outputs]
        if all(g is None for g in grads_out):
            continue
        try:
            grads_in = RULES[node.op_type](builder, node, grads_out)
        except ShapeUnknown as e:
            raise ModelError(f"the gradient of {node.op_type} node '{node.name}': {e}") from None
        for name, grad in zip(node.inputs, grads_in):
            if name not in depends:
                continue
            if grad is None:
                raise ModelError(
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
    the vector-Jacobian product cotangent . d output / d wrt. A model older than opset MIN_OPSET is converted
    first (the rules read that opset's operators)."""
    model = onnx.shape_inference.infer_shapes(at_min_opset(model), strict_mode=True, data_prop=True)
    builder = GraphBuilder(model)
    infos = {i.name: i for i in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}
    cotangent = onnx.ValueInfoProto(name="cotangent", type=infos[output].type)
    gradient = onnx.ValueInfoProto(name="gradient", type=infos[wrt].type)
    grad = append_backward(builder, list(model.graph.node), wrt, {output: "cotangent"})
    graph = model.graph
    graph.node.extend(builder.nodes + [helper.make_node("Identity", [grad], ["gradient"])])
    graph.initializer.extend(builder.initializers)
    graph.input.append(cotangent)
    graph.output.append(gradient)
    return model
