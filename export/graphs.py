"""From a classifier ONNX model to the bundle's graphs.

`prepare` normalizes a model (inlined functions, opset >= 18, symbolic batch, full shape inference);
`split` cuts it at the target tensor into the part before it (the backbone, run once per interpolation point) and
the part after it (the tail, which is differentiated); `build_graphs` assembles forward, gradient, igcam and
explain graphs from those parts (see igcam_engine.bundle for their inputs and outputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper

from igcam_engine.errors import ModelError, OptionError

from .autodiff import append_backward
from .builder import SHAPE_READERS, GraphBuilder, Node, at_min_opset

# Names of the bundle graphs' inputs and outputs; model tensors with these names are renamed out of the way.
IO_NAMES = (
    "images", "baseline", "alphas", "weights", "targets", "subtract_baseline",
    "activations", "activation_grad", "logits", "maps",
)
BATCH = "batch"
# Ops after which a Softmax may still be followed to the output: they only copy, reshape or retype the scores.
COPIES = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Dropout"}


@dataclass
class Prepared:
    """A normalized model, with what `prepare` learnt of the original."""

    model: onnx.ModelProto
    fixed_batch: int | None  # the original input's batch size when it was fixed, else None
    batch_rewrites: list  # Reshape nodes whose shape constant carried that batch size (now 0: copy the batch)


def prepare(model: onnx.ModelProto, input_shape=None) -> Prepared:
    """A shape-inferred copy with one image input [batch, C, H, W], opset >= MIN_OPSET and every node named.

    A batch fixed in the original (input dim 1, as torch's exporters write without dynamic axes) is made dynamic:
    the input's first dim becomes symbolic and Reshape constants that carry the fixed size in their first entry
    copy the batch instead (0). The export then verifies the result against the original at batch 1 and 3."""
    original, model = model, onnx.ModelProto()
    model.CopyFrom(original)  # the caller's model stays as it was (the export verifies against it)
    model = at_min_opset(onnx.inliner.inline_local_functions(model))
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelError(f"the model must have exactly one (image) input, it has {[i.name for i in inputs]}")
    for name in IO_NAMES:
        _rename(model, name, f"model/{name}")
    _name_nodes(model.graph)
    image = [i for i in model.graph.input if i.name not in initializers][0]
    tensor_type = image.type.tensor_type
    if tensor_type.elem_type != TensorProto.FLOAT or len(tensor_type.shape.dim) != 4:
        raise ModelError(f"input '{image.name}' must be a float32 NCHW tensor (rank 4)")
    dims = tensor_type.shape.dim
    if input_shape is not None:  # checked by the exporter's entry points (three positive integers)
        for dim, size in zip(dims[1:], input_shape):
            if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != size:
                raise OptionError(f"input_shape {tuple(input_shape)} contradicts the model's input shape "
                                f"{[d.dim_value or d.dim_param or '?' for d in dims[1:]]}")
            dim.dim_value = int(size)
    if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[1:]):
        raise ModelError(f"input '{image.name}' has dynamic C/H/W "
                        f"{[d.dim_value if d.HasField('dim_value') else d.dim_param or '?' for d in dims[1:]]}: give "
                        "the size to export for with input_shape=(C, H, W) (CLI: --input-shape C,H,W)")
    fixed_batch = dims[0].dim_value if dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    dims[0].dim_param = BATCH
    # Outputs keep only their element type so that inference re-derives them with the symbolic batch.
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    model.ir_version = max(helper.find_min_ir_version_for(list(model.opset_import)), 8)
    rewrites = _free_the_batch(model, fixed_batch) if fixed_batch else []
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ModelError(f"ONNX shape inference failed on the model: {e}") from None
    return Prepared(inferred, fixed_batch, rewrites)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Gives every unnamed node a unique name (exporters and ONNX's version converter leave some empty), so that
    every message can name the node it is about."""
    taken = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _free_the_batch(model: onnx.ModelProto, fixed_batch: int) -> list[str]:
    """Rewrites Reshape nodes whose constant target shape starts with the fixed batch size while their input's first
    dim is the (now symbolic) batch: that entry becomes 0, "copy the input's dim". Returns the nodes rewritten."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as e:
        raise ModelError(f"ONNX shape inference failed on the model: {e}") from None
    first_dims = {info.name: info.type.tensor_type.shape.dim[0].dim_param
                  for info in list(inferred.graph.value_info) + list(inferred.graph.input)
                  if info.type.tensor_type.HasField("shape") and len(info.type.tensor_type.shape.dim)}
    constants = _constants(model.graph)
    rewritten = []
    for node in model.graph.node:
        if node.op_type != "Reshape" or first_dims.get(node.input[0]) != BATCH:
            continue
        target = constants.get(node.input[1])
        if target is None or target.ndim != 1 or not len(target) or target[0] != fixed_batch or 0 in target:
            continue
        # With no 0 in the target shape, allowzero (which torch's exporter sets) changes nothing: drop it, so that
        # the new 0 means "copy".
        for attribute in node.attribute:
            if attribute.name == "allowzero":
                attribute.i = 0
        shape = target.copy()
        shape[0] = 0
        name = f"{node.input[1]}/batch_copied/{node.name}"
        model.graph.initializer.append(onnx.numpy_helper.from_array(shape.astype(np.int64), name))
        node.input[1] = name
        rewritten.append(node.name)
    return rewritten


def _constants(graph: onnx.GraphProto) -> dict:
    """Values of initializers and Constant nodes (value attribute) by tensor name."""
    values = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    graph = model.graph
    for node in graph.node:
        node.input[:] = [new if x == old else x for x in node.input]
        node.output[:] = [new if x == old else x for x in node.output]
    for item in list(graph.input) + list(graph.output) + list(graph.value_info) + list(graph.initializer):
        if item.name == old:
            item.name = new


@dataclass
class Split:
    model: onnx.ModelProto
    image: str  # the model's image input
    target: str  # the activation tensor the maps are computed at
    logits: str  # class scores [batch, classes] (the input of a final Softmax)
    scores_after: str | None  # the op (Softmax, LogSoftmax) between the logits and the model's first output, if any
    head: list  # nodes from the image to the target, in graph order
    tail: list  # nodes from the target to the logits, in graph order (shape reads of head tensors rewritten)
    input_shape: list  # C, H, W
    activation_shape: list  # K, h, w
    num_classes: int


def _producers(graph: onnx.GraphProto) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _ancestors(graph, start: str, stop: str | None = None, *, values_only: bool = True, producers=None):
    """Nodes needed to compute `start`, treating `stop` as given, and the tensors reached. With `values_only`, the
    walk does not go past a Shape or Size node: it reads its input's shape, never its values, so that input is not
    needed (the gradient graph knows every shape but the batch, which it shares with the target)."""
    producers = producers if producers is not None else _producers(graph)
    needed, stack, seen = set(), [start], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name == stop:
            continue
        node = producers.get(name)
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            if not (values_only and node.op_type in SHAPE_READERS):
                stack.extend(x for x in node.input if x)
    return [n for n in graph.node if id(n) in needed], seen


def scores_of(model: onnx.ModelProto):
    """(the class-score tensor, the op between it and the first output or None): the first output, or the input
    of a Softmax/LogSoftmax that produces it through ops that only copy or reshape."""
    output = model.graph.output[0].name
    producers = _producers(model.graph)
    name, node = output, producers.get(output)
    while node is not None and node.op_type in COPIES:
        name = node.input[0]
        node = producers.get(name)
    if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
        return output, None
    # Back through copies that keep the shape (ONNX's version converter wraps an old Softmax in Flatten and
    # Reshape): the scores under the name the original model gives them.
    logits = node.input[0]
    while (producer := producers.get(logits)) is not None and producer.op_type in COPIES \
            and _shape(model, producer.input[0]) == _shape(model, logits):
        logits = producer.input[0]
    return logits, node.op_type


def _shape(model: onnx.ModelProto, name: str):
    for info in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if info.name == name:
            return [d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim]
    return None


def _symbolic_shape(model: onnx.ModelProto, name: str):
    for info in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if info.name == name:
            return [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                    for d in info.type.tensor_type.shape.dim]
    return None


def candidate_layers(model: onnx.ModelProto) -> list[dict]:
    """Every 4-D float activation of a prepared model, in graph order, with whether it separates the image
    input from the logits (only such a tensor can be a target layer)."""
    image = model.graph.input[0].name
    logits, _ = scores_of(model)
    producers = _producers(model.graph)
    rows = []
    for node in model.graph.node:
        for out in node.output:
            shape = _shape(model, out)
            if shape is None or len(shape) != 4:
                continue
            _, reached = _ancestors(model.graph, logits, stop=out, producers=producers)
            rows.append({"tensor": out, "op": node.op_type, "node": node.name, "shape": shape[1:],
                         "cut": image not in reached and out in reached})
    return rows


def default_target(model: onnx.ModelProto) -> str:
    """The last 4-D activation with a spatial size above 1x1 through which every path from the image to the logits
    passes: the output of the last convolutional stage before global pooling and the classifier."""
    rows = [r for r in candidate_layers(model) if r["cut"] and r["shape"][1] * r["shape"][2] > 1]
    if not rows:
        raise ModelError("found no 4-D activation (spatial size > 1x1) that separates the input from the logits")
    return rows[-1]["tensor"]


def later_target_hint(model: onnx.ModelProto, s: "Split", missing: list) -> str:
    """Names the first target after `s.target` whose tail every op of which has a rule, if there is one."""
    from .autodiff import missing_rules

    rows = candidate_layers(model)
    names = [r["tensor"] for r in rows]
    later = rows[names.index(s.target) + 1:] if s.target in names else []
    for row in later:
        if not row["cut"]:
            continue
        tail, _ = _ancestors(model.graph, s.logits, stop=row["tensor"])
        if not missing_rules(GraphBuilder(model), tail, row["tensor"]):
            return (f"a later target avoids them: tensor '{row['tensor']}' {row['shape']} (node '{row['node']}'; "
                    "from_onnx(tensor=...) or --tensor)")
    return "no later 4-D tensor avoids them, so this model cannot be explained at this layer yet"


def split(model: onnx.ModelProto, target: str | None = None) -> Split:
    graph = model.graph
    image = graph.input[0].name
    logits, scores_after = scores_of(model)
    logits_shape = _shape(model, logits)
    if logits_shape is None or len(logits_shape) != 2 or not logits_shape[1]:
        raise ModelError(f"the model's first output must be class scores [batch, classes] (or their Softmax); "
                        f"'{logits}' is {logits_shape}")
    target = target or default_target(model)
    shape = _shape(model, target)
    if target not in _producers(graph):
        raise OptionError(f"'{target}' is not an activation tensor of the model (see `igcam layers`)")
    if shape is None or len(shape) != 4 or None in shape[1:]:
        raise ModelError(f"target tensor '{target}' must be 4-D [batch, K, h, w] with static K, h, w; it is {shape}")
    head, _ = _ancestors(graph, target, values_only=False)
    tail, reached = _ancestors(graph, logits, stop=target)
    if image in reached:
        raise ModelError(
            f"target tensor '{target}' does not separate the input from the logits: some path (a skip connection "
            "around it?) bypasses it. Choose a block output (see `igcam layers`)"
        )
    if target not in reached:
        raise ModelError(f"the logits do not depend on target tensor '{target}'")
    tail = _shape_reads_from_target(model, tail, target)
    return Split(model, image, target, logits, scores_after, head, tail, _shape(model, image)[1:], shape[1:],
                 logits_shape[1])


def _shape_reads_from_target(model: onnx.ModelProto, tail: list, target: str) -> list:
    """The tail with every Shape/Size of a tensor it does not compute (a head tensor, the image) replaced by the
    same value from the tensor's static dims and the batch, which every head tensor shares with the target."""
    computed = {o for n in tail for o in n.output} | {target}
    builder = GraphBuilder(model, prefix="igcam/shapes")
    replaced = []
    for node in tail:
        if node.op_type not in SHAPE_READERS or node.input[0] in computed:
            replaced.append(node)
            continue
        dims = _symbolic_shape(model, node.input[0])
        if not dims or dims[0] != BATCH or not all(isinstance(d, int) for d in dims[1:]):
            raise ModelError(f"the part after the target reads the shape of '{node.input[0]}' (node '{node.name}'), "
                            f"which is {dims}, not [batch, fixed dims...]; choose a target after it")
        view = Node.from_proto(node)
        batch = builder.Shape(target, start=0, end=1)
        if node.op_type == "Size":
            value = builder.Mul(builder.Squeeze(batch, [0]), np.int64(np.prod(dims[1:], dtype=np.int64)))
        else:
            rank = len(dims)
            start, end = view.attrs.get("start", 0), view.attrs.get("end", rank)
            start, end = (min(max(a + rank if a < 0 else a, 0), rank) for a in (start, end))
            static = np.array(dims[max(start, 1):end], np.int64)
            if start > 0 or end == 0:
                value = builder.Identity(static)
            else:
                value = builder.Concat(batch, static, axis=0) if static.size else builder.Identity(batch)
        replaced.extend(builder.nodes)
        replaced.append(helper.make_node("Identity", [value], [node.output[0]], name=node.name))
        builder.nodes.clear()
    extra = list(builder.initializers)
    if extra:
        model.graph.initializer.extend(extra)
    return replaced


# ---------------------------------------------------------------- graph assembly


def _info(name, elem_type, dims):
    return helper.make_tensor_value_info(name, elem_type, dims)


def _interpolate(b: GraphBuilder, s: Split, images: str, baseline: str) -> str:
    """Rows baseline + alpha_i (image_n - baseline), image-major: [N*M, C, H, W]."""
    alphas = b.Reshape("alphas", [1, -1, 1, 1, 1])
    path = b.Add(b.Unsqueeze(baseline, [1]), b.Mul(alphas, b.Unsqueeze(b.Sub(images, baseline), [1])))
    return b.Reshape(path, [-1] + s.input_shape)


def _per_row(b: GraphBuilder, targets: str) -> str:
    """Repeats each image's target for each of its M rows."""
    rows = b.Concat(b.Shape("images", start=0, end=1), b.Shape("alphas"), axis=0)
    return b.Reshape(b.Expand(b.Unsqueeze(targets, [1]), rows), [-1])


def _backward(b: GraphBuilder, s: Split, targets_per_row: str) -> str:
    """d logits[row, target[row]] / d activations: the seed is the one-hot of each row's target."""
    seed = b.Cast(b.Equal(b.Unsqueeze(targets_per_row, [1]), np.arange(s.num_classes)[None]), to=TensorProto.FLOAT)
    return append_backward(b, s.tail, s.target, s.logits, seed)


def _alias(src: str, dst: str):
    return helper.make_node("Identity", [src], [dst], name=f"igcam/{dst}")


def _model(s: Split, name: str, nodes: list, builders: list, inputs: list, outputs: list) -> onnx.ModelProto:
    initializers = [i for i in s.model.graph.initializer] + [i for b in builders for i in b.initializers]
    nodes = _prune(nodes, [o.name for o in outputs])
    used = {x for n in nodes for x in n.input}
    graph = helper.make_graph(nodes, name, inputs, outputs, [i for i in initializers if i.name in used])
    model = helper.make_model(graph, opset_imports=list(s.model.opset_import), producer_name="igcam-engine")
    model.ir_version = s.model.ir_version
    return model


def _prune(nodes: list, outputs: list) -> list:
    """Drops nodes whose results no output needs (e.g. gradients of operands nothing differentiates)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(x for x in node.input if x)
    return kept[::-1]


def _renamed(nodes: list, old: str, new: str) -> list:
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [new if x == old else x for x in copy.input]
        copy.output[:] = [new if x == old else x for x in copy.output]
        copies.append(copy)
    return copies


def build_graphs(s: Split) -> dict:
    """The four bundle graphs, each a self-contained ModelProto (initializers inline)."""
    c, h, w = s.input_shape
    k, ah, aw = s.activation_shape
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    images, baseline = _info("images", f, [BATCH, c, h, w]), _info("baseline", f, ["baseline_batch", c, h, w])
    alphas, targets = _info("alphas", f, ["steps"]), _info("targets", i64, [BATCH])
    activations = _info("activations", f, ["rows", k, ah, aw])
    activation_grad = _info("activation_grad", f, ["rows", k, ah, aw])
    logits = _info("logits", f, ["rows", s.num_classes])

    def builder(prefix):
        return GraphBuilder(s.model, prefix=f"igcam/{prefix}")

    graphs = {}

    b = builder("interpolate")
    rows = _interpolate(b, s, "images", "baseline")
    forward_nodes = b.nodes + [_alias(rows, s.image)] + s.head
    graphs["forward"] = _model(
        s, "forward", forward_nodes + [_alias(s.target, "activations")], [b], [images, baseline, alphas], [activations]
    )

    g = builder("gradient")
    grad = _backward(g, s, "targets")
    graphs["gradient"] = _model(
        s, "gradient",
        [_alias("activations", s.target)] + s.tail + g.nodes + [_alias(grad, "activation_grad"), _alias(s.logits, "logits")],
        [g], [activations, _info("targets", i64, ["rows"])], [activation_grad, logits],
    )

    g = builder("gradient")
    grad = _backward(g, s, _per_row(g, "targets"))
    graphs["igcam"] = _model(
        s, "igcam",
        forward_nodes + s.tail + g.nodes
        + [_alias(s.target, "activations"), _alias(grad, "activation_grad"), _alias(s.logits, "logits")],
        [b, g], [images, baseline, alphas, targets], [activations, activation_grad, logits],
    )

    graphs["explain"] = _explain_graph(s, builder, images, baseline, alphas, targets)
    return graphs


def _explain_graph(s: Split, builder, images, baseline, alphas, targets) -> onnx.ModelProto:
    """Interpolation, backbone (with the baseline rows appended), gradient, reduction and upsampling in one graph."""
    _, h, w = s.input_shape
    k, _, _ = s.activation_shape
    b = builder("interpolate")
    every_row = b.Concat(_interpolate(b, s, "images", "baseline"), "baseline", axis=0)
    all_activations = b.fresh("all_activations")
    head = _renamed(s.head, s.target, all_activations)

    p = builder("split")
    steps = p.Shape("alphas")
    sizes = p.Concat(p.Mul(p.Shape("images", start=0, end=1), steps), p.Shape("baseline", start=0, end=1), axis=0)
    path, base = p.op("Split", [all_activations, sizes], outputs=2)

    g = builder("gradient")
    grad = _backward(g, s, _per_row(g, "targets"))

    r = builder("reduce")
    channel_weights = r.Reshape(r.ReduceMean(grad, [2, 3], keepdims=1), r.Concat([-1], steps, [k, 1, 1], axis=0))
    by_step = r.Reshape(path, r.Concat([-1], steps, s.activation_shape, axis=0))
    relative = r.Sub(by_step, r.Mul(r.Unsqueeze(base, [1]), "subtract_baseline"))
    step_maps = r.Relu(r.ReduceSum(r.Mul(channel_weights, relative), [2], keepdims=0))
    coarse = r.ReduceSum(r.Mul(step_maps, r.Reshape("weights", [1, -1, 1, 1])), [1], keepdims=1)
    sizes = r.Concat(r.Shape(coarse, start=0, end=2), [h, w], axis=0)
    upsampled = r.Resize(coarse, "", "", sizes, mode="linear", coordinate_transformation_mode="half_pixel")
    maps = r.Squeeze(upsampled, [1])

    nodes = (
        b.nodes + [_alias(every_row, s.image)] + head + p.nodes + [_alias(path, s.target)]
        + s.tail + g.nodes + r.nodes + [_alias(maps, "maps")]
    )
    inputs = [
        images, baseline, alphas, _info("weights", TensorProto.FLOAT, ["steps"]), targets,
        _info("subtract_baseline", TensorProto.FLOAT, [1]),
    ]
    return _model(s, "explain", nodes, [b, p, g, r], inputs, [_info("maps", TensorProto.FLOAT, [BATCH, h, w])])
