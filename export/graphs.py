"""From a classifier ONNX model to the bundle's graphs.

`prepare` normalizes a model (inlined functions, opset >= 18, symbolic batch, full shape inference);
`split` cuts it at the target tensor into the part before it (the backbone, run once per interpolation point) and
the part after it (the tail, which is differentiated); `build_graphs` assembles forward, gradient, igcam and
explain graphs from those parts (see igcam_engine.bundle for their inputs and outputs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper

from igcam_engine.bundle import MAX_OUTPUTS  # model outputs a bundle keeps (output_0 ..., their seeds seed_0 ...)
from igcam_engine.errors import ModelError, OptionError, UserError
from igcam_engine.validators import number, shown

from . import layouts
from .autodiff import append_backward
from .builder import FLOAT_TYPES, SHAPE_READERS, GraphBuilder, Node, at_min_opset
from .contrib import unfused
from .layouts import Layout, LayoutChoice

MAX_HELD = 32  # tensors held constant besides the target (graph inputs held_0 ...)
# Names of the bundle graphs' inputs and outputs; model tensors with these names are renamed out of the way.
IO_NAMES = (
    "images", "baseline", "alphas", "weights", "seed_index", "subtract_baseline",
    "activations", "activation_grad", "maps",
) + tuple(f"held_{i}" for i in range(MAX_HELD)) + tuple(f"{kind}_{i}" for kind in ("output", "seed")
                                                            for i in range(MAX_OUTPUTS))
BATCH = "batch"
# what a fixed input may be (`fixed_inputs`): element type -> the numpy type its constant is made of
FIXED_DTYPES = {t: np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in (
    TensorProto.BOOL, TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8,
    TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.FLOAT16, TensorProto.FLOAT,
    TensorProto.DOUBLE)}
FIXED_INPUT_ELEMENTS = 1 << 24  # per image: a model file's declared dims must not decide how much is allocated
# Ops after which a Softmax may still be followed to the output: they only copy, reshape or retype the scores.
COPIES = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Dropout"}
# A model's last op that turns scores into probabilities: the scores before it are differentiated (as
# pytorch-grad-cam's targets read a classifier's logits), and the manifest says which op it was.
TRAILING = ("Softmax", "LogSoftmax", "Sigmoid")
# Ops that select detections inside a graph: no gradient passes them, so a model is explained up to its raw head.
SELECTING = {"NonMaxSuppression", "Loop"}  # refused after the target


@dataclass
class Prepared:
    """A normalized model, with what `prepare` learnt of the original."""

    model: onnx.ModelProto
    fixed_batch: int | None  # the original input's batch size when it was fixed, else None
    batch_rewrites: list  # Reshape nodes whose shape constant carried that batch size (now 0: copy the batch)
    input_layout: str = "NCHW"  # the model's image input: "NCHW" or "NHWC"; the bundle's graphs take NCHW
    renamed: dict = field(default_factory=dict)  # a model tensor named like a bundle graph's input or output -> its new name

    @property
    def model_names(self) -> dict:
        """A renamed tensor's new name -> the model's own (what messages and the manifest show)."""
        return {new: old for old, new in self.renamed.items()}


def prepare(model: onnx.ModelProto, input_shape=None, input_layout=None, fixed_inputs=None) -> Prepared:
    """A shape-inferred copy with one image input [batch, C, H, W] or [batch, H, W, C] (`input_layout`, None: read
    from the graph, see `_input_layout`), opset >= MIN_OPSET and every node named. `fixed_inputs` (checked by
    `fixed_inputs`) maps the model's other inputs to the value each is filled with (see `_fix_inputs`).

    A batch fixed in the original (input dim 1, as torch's exporters write without dynamic axes) is made dynamic:
    the input's first dim becomes symbolic and Reshape constants that carry the fixed size in their first entry
    copy the batch instead (0). The export then verifies the result against the original at batch 1 and 3."""
    original, model = model, onnx.ModelProto()
    model.CopyFrom(original)  # the caller's model stays as it was (the export verifies against it)
    model = unfused(at_min_opset(onnx.inliner.inline_local_functions(model)))
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    _fix_inputs(model, inputs, fixed_inputs or {})
    inputs = [i for i in inputs if i.name not in (fixed_inputs or {})]
    if not inputs:
        raise ModelError("the model has no input left to explain: it needs one float32 image input besides its "
                         "initializers and fixed inputs")
    if len(inputs) != 1:
        image = next((i for i in inputs if _is_image(i)), inputs[0])
        others = [i.name for i in inputs if i is not image]
        raise ModelError(f"the model has inputs {[i.name for i in inputs]}; one image input is explained and the "
                         f"others are filled with constants at export (an attention mask of ones, a flag): "
                         f"fixed_inputs={{{', '.join(f'{n!r}: value' for n in others)}}} (CLI "
                         f"{' '.join(f'--fix-input {n}=VALUE' for n in others)})")
    present = {x for n in model.graph.node for x in [*n.input, *n.output]} | {
        i.name for i in [*model.graph.input, *model.graph.output, *model.graph.initializer]}
    renamed = {name: f"model/{name}" for name in present.intersection(IO_NAMES)}
    for name, new in renamed.items():
        _rename(model, name, new)
    _name_nodes(model.graph)
    image = [i for i in model.graph.input if i.name not in initializers][0]
    tensor_type = image.type.tensor_type
    if tensor_type.elem_type != TensorProto.FLOAT or len(tensor_type.shape.dim) != 4:
        raise ModelError(f"input '{image.name}' must be a float32 image [batch, C, H, W] or [batch, H, W, C]")
    dims = tensor_type.shape.dim
    input_layout = input_layout or _input_layout(model.graph, image)
    order = [1, 2, 3] if input_layout == "NCHW" else [3, 1, 2]  # the model's dims of C, H, W
    if input_shape is not None:  # checked by the exporter's entry points (three positive integers)
        for dim, size in zip([dims[i] for i in order], input_shape):
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
    model.ir_version = _ir_version(model)
    rewrites = _free_the_batch(model, fixed_batch) if fixed_batch else []
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as e:
        raise ModelError(f"ONNX shape inference failed on the model: {e}") from None
    _name_the_batch(inferred)
    return Prepared(inferred, fixed_batch, rewrites, input_layout, renamed)


def _is_image(info: onnx.ValueInfoProto) -> bool:
    tensor_type = info.type.tensor_type
    return tensor_type.elem_type == TensorProto.FLOAT and len(tensor_type.shape.dim) == 4


def fixed_inputs(value) -> dict:
    """`fixed_inputs` as given ({input name: a finite number}) checked; {} for None."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise OptionError(f"fixed_inputs must map input names to numbers, e.g. {{'attention_mask': 1}}; got "
                          f"{shown(value)}")
    return {name: number(v, f"fixed_inputs[{name!r}]") for name, v in value.items()}


def _fix_inputs(model: onnx.ModelProto, inputs: list, fixed: dict) -> None:
    """Replaces each input named in `fixed` by a constant filled with its value: an initializer where its dims are
    all known, else (first dim the image's batch) an Expand of one row to the image's batch. Each must be an input
    besides the image, of a type in FIXED_DTYPES (floats round, integers and bools hold the value exactly), with
    no other unknown dim."""
    by_name = {i.name: i for i in inputs}
    images = [i for i in inputs if i.name not in fixed and _is_image(i)]
    for name, value in fixed.items():
        info = by_name.get(name)
        if info is None or not images:
            raise OptionError(f"fixed_inputs names {name!r}, which is not an input of the model besides its image; "
                              f"its inputs: {[i.name for i in inputs]}")
        tensor_type = info.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise ModelError(f"input {name!r} declares no shape: a fixed input's shape must be in the model")
        dtype = FIXED_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise OptionError(f"input {name!r} is of element type {tensor_type.elem_type}: a fixed input is a bool, "
                              f"integer or float16/32/64 tensor")
        with np.errstate(invalid="ignore", over="ignore"):  # the checks below say what went wrong, in one line
            held = np.asarray(value).astype(dtype)
        # floats round to the nearest value the type holds; integers and bools hold the value exactly or are refused
        if not np.isfinite(held.astype(np.float64)) or (dtype.kind in "iub" and held.astype(np.float64) != value):
            raise OptionError(f"input {name!r} is {dtype.name}: it cannot hold {value:g}")
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in tensor_type.shape.dim]
        batch = images[0].type.tensor_type.shape.dim[0]
        batch = batch.dim_value if batch.HasField("dim_value") else batch.dim_param or None
        by_batch = bool(dims) and not isinstance(dims[0], int) and dims[0] == batch
        rest = dims[1:] if by_batch else dims
        if not all(isinstance(d, int) and d > 0 for d in rest):
            raise ModelError(f"input {name!r} is {dims}: a fixed input's dims must be known, except a first dim that "
                             f"is the image's batch ({batch!r})")
        if math.prod(rest) > FIXED_INPUT_ELEMENTS:
            raise ModelError(f"input {name!r} is {dims}: a fixed input holds at most {FIXED_INPUT_ELEMENTS} elements "
                             f"per image")
        graph = model.graph
        graph.input.remove(info)
        row = np.full([1, *rest] if by_batch else rest, value, dtype)
        if not by_batch:
            graph.initializer.append(onnx.numpy_helper.from_array(row, name))
            continue
        prefix = f"igcam/fixed/{name}"
        graph.initializer.extend([onnx.numpy_helper.from_array(row, f"{prefix}/row"),
                                  onnx.numpy_helper.from_array(np.array(rest, np.int64), f"{prefix}/dims")])
        nodes = [helper.make_node("Shape", [images[0].name], [f"{prefix}/batch"], name=f"{prefix}/batch", start=0, end=1),
                 helper.make_node("Concat", [f"{prefix}/batch", f"{prefix}/dims"], [f"{prefix}/shape"],
                                  name=f"{prefix}/shape", axis=0),
                 helper.make_node("Expand", [f"{prefix}/row", f"{prefix}/shape"], [name], name=prefix)]
        for node in reversed(nodes):
            graph.node.insert(0, node)


def fixed_feed(model: onnx.ModelProto, fixed: dict, rows: int) -> dict:
    """The feed of the original model's fixed inputs for `rows` images (what `_fix_inputs` makes of them)."""
    feed = {}
    for info in model.graph.input:
        if info.name in fixed:
            tensor_type = info.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else rows for d in tensor_type.shape.dim]
            feed[info.name] = np.full(dims, fixed[info.name], FIXED_DTYPES[tensor_type.elem_type])
    return feed


# Ops a model may apply to its input before the first layer that tells its layout (in-graph normalization).
_BEFORE_THE_FIRST_LAYER = {"Sub", "Div", "Mul", "Add", "Cast", "Identity"}


def _input_layout(graph: onnx.GraphProto, image) -> str:
    """'NCHW' or 'NHWC' for the image input: a convolution reading it (after in-graph normalization) says NCHW, a
    Transpose [0, 3, 1, 2] reading it says NHWC (tf2onnx's exports, torch models that permute first); where no op
    tells, the dims do when only one of dims 1 and 3 can be colour channels (1, 3 or 4). Else the export refuses."""
    consumers = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    votes, frontier = set(), [image.name]
    for _ in range(8):
        following = []
        for name in frontier:
            for node in consumers.get(name, []):
                if node.op_type in layouts.CHANNELS_FIRST_OPS and node.input[0] == name:
                    votes.add("NCHW")
                elif node.op_type == "Transpose":
                    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
                    votes.add({(0, 3, 1, 2): "NHWC", (0, 2, 3, 1): "NCHW"}.get(tuple(perm or ()), "?"))
                elif node.op_type in _BEFORE_THE_FIRST_LAYER:
                    following.extend(node.output)
        frontier = following
    if len(votes) == 1 and "?" not in votes:
        return votes.pop()
    dims = [d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim]
    channels = {1, 3, 4}
    if not votes and (dims[1] in channels) != (dims[3] in channels):
        return "NCHW" if dims[1] in channels else "NHWC"
    raise ModelError(f"cannot tell whether input '{image.name}' {dims[1:]} is NCHW or NHWC; state it: "
                     "input_layout='NCHW' or 'NHWC' (CLI --input-layout)")


PROBE_BATCHES = (1, 3)


def _name_the_batch(model: onnx.ModelProto) -> None:
    """Completes what shape inference left open, by measuring: the dims of a tensor that inference left
    unknown or gave a fresh symbol (a Reshape to -1, an Expand or a Resize sized from computed shapes, a legacy
    export's shape arithmetic; a detection head's anchors), and the whole shape of a tensor it could not see
    (after an op of another domain, which onnx has no schema for). The model runs at batches 1 and 3 with those
    tensors as outputs; a tensor is [batch, ...] when its first dim follows the batch and its other dims stay as
    they are. A model ONNX Runtime cannot run is refused here when inference is incomplete, naming the op it could
    not see through."""
    infos = {info.name: info for info in model.graph.value_info}
    for output in model.graph.output:
        if output.type.tensor_type.HasField("shape"):
            infos.setdefault(output.name, output)
    unsure = [name for name, info in infos.items() if info.type.tensor_type.elem_type != TensorProto.STRING
              and info.type.tensor_type.HasField("shape") and len(info.type.tensor_type.shape.dim)
              and (info.type.tensor_type.shape.dim[0].dim_param != BATCH
                   or not all(d.HasField("dim_value") for d in info.type.tensor_type.shape.dim[1:]))]
    unseen = [o for n in model.graph.node for o in n.output if o and o not in infos
              and not (n.op_type == "Constant")]
    if not unsure and not unseen:
        return
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend([infos[name] for name in unsure] + [onnx.ValueInfoProto(name=name) for name in unseen])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    image = model.graph.input[0]
    dims = [d.dim_value for d in image.type.tensor_type.shape.dim[1:]]
    names = unsure + unseen
    runs = []
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for n in PROBE_BATCHES:
            runs.append(session.run(names, {image.name: np.random.default_rng(0).standard_normal((n, *dims),
                                                                                                 np.float32)}))
    except Exception as e:  # onnxruntime's errors have no common base class
        if unseen and not runs:
            node = next(n for n in model.graph.node if any(o in unseen for o in n.output))
            raise ModelError(f"onnx's shape inference cannot see through op '{node.op_type}' (domain "
                             f"'{node.domain or 'ai.onnx'}', node '{node.name}') and ONNX Runtime cannot run the model "
                             f"to measure it: {str(e).splitlines()[0][:200]}") from None
        if not runs:
            return  # shapes are complete up to the batch's name: the export's verification says what fails
        _measured_at_one(model, infos, names, runs[0])  # a batch still fixed somewhere: verification says so
        return
    for index, name in enumerate(names):
        shapes = [np.shape(run[index]) for run in runs]
        batch_first = [shape[:1] for shape in shapes] == [(n,) for n in PROBE_BATCHES] and len({s[1:] for s in shapes}) == 1
        if name in infos:
            inferred = infos[name].type.tensor_type.shape.dim
            if not batch_first or len(inferred) != len(shapes[0]) or any(
                    d.HasField("dim_value") and d.dim_value != size for d, size in zip(inferred[1:], shapes[0][1:])):
                continue
            inferred[0].dim_param = BATCH
            for dim, size in zip(inferred[1:], shapes[0][1:]):
                if not dim.HasField("dim_value"):
                    dim.dim_value = size
        elif batch_first or len(set(shapes)) == 1:
            elem_type = helper.np_dtype_to_tensor_dtype(runs[0][index].dtype)
            shape = [BATCH, *shapes[0][1:]] if batch_first else list(shapes[0])
            model.graph.value_info.append(helper.make_tensor_value_info(name, elem_type, shape))


def _measured_at_one(model: onnx.ModelProto, infos: dict, names: list, run: list) -> None:
    """The dims after the first that inference left open, from a run at batch 1 alone (a model whose batch some op
    still fixes runs at no other): the first dim stays as inference left it."""
    for name, value in zip(names, run):
        if name in infos and len(infos[name].type.tensor_type.shape.dim) == np.ndim(value):
            for dim, size in zip(infos[name].type.tensor_type.shape.dim[1:], np.shape(value)[1:]):
                if not dim.HasField("dim_value"):
                    dim.dim_value = size


def _ir_version(model: onnx.ModelProto) -> int:
    """The IR version the default-domain opset needs (at least 8); other domains (com.microsoft's contrib ops in
    the files ONNX Runtime's optimizer writes, custom domains) are ONNX Runtime's business, not onnx's."""
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    try:
        return max(helper.find_min_ir_version_for(default), 8)
    except ValueError:
        raise ModelError(f"the model's opset {default[0].version} is newer than the installed onnx "
                         f"{onnx.__version__} knows; upgrade onnx (pip install -U onnx)") from None


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
        # a first dim that inference names after the batch, or a fresh symbol it made of it on the way (a Resize or
        # a Split sized from computed shapes); the export's verification at two batches checks the rewrite
        if node.op_type != "Reshape" or not first_dims.get(node.input[0]):
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
    layout: Layout  # the target's layout; the graphs hand the runtime its canonical form [K, h, w]
    outputs: list  # Output: what the gradient graph differentiates, in the bundle's order
    head: list  # nodes from the image to the target and the held tensors, in graph order
    tail: list  # nodes from the target to the outputs, in graph order (shape reads of head tensors rewritten)
    held: list  # Held: what the tail takes besides the target, computed by the forward graph and held constant
    input_shape: list  # C, H, W
    input_layout: str  # the model's own image input: "NCHW" or "NHWC" (the bundle's graphs take NCHW)
    target_shape: list  # the target's dims after the batch, in its own layout
    tail_copies: dict  # tensor the tail computes apart from the head -> the head's tensor (see _apart_from)

    @property
    def activation_shape(self) -> list:
        return self.layout.canonical_shape


@dataclass(frozen=True)
class Held:
    """A tensor the part after the target takes besides it: `tensor` (a model tensor that bypasses the target, or
    None for the target's prefix tokens), passed between the graphs as input/output `name`, [rows, *shape]."""

    name: str
    tensor: str | None
    shape: list
    elem_type: int = TensorProto.FLOAT

    def record(self) -> dict:
        return {"name": self.name, "tensor": self.tensor, "shape": list(self.shape)}


def _producers(graph: onnx.GraphProto) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _ancestors(graph, start, stop=(), *, values_only: bool = True, producers=None):
    """Nodes needed to compute `start` (a name or a list of names), treating the tensors `stop` (a name or a
    collection) as given, and the tensors reached. With `values_only`, the walk does not go past a Shape or Size
    node: it reads its input's shape, never its values, so that input is not needed (the gradient graph knows every
    shape but the batch, which it shares with the target)."""
    producers = producers if producers is not None else _producers(graph)
    stop = {stop} if isinstance(stop, str) else set(stop)
    needed, stack, seen = set(), [start] if isinstance(start, str) else list(start), set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in stop:
            continue
        node = producers.get(name)
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            if not (values_only and node.op_type in SHAPE_READERS):
                stack.extend(reads(node))
    return [n for n in graph.node if id(n) in needed], seen


@dataclass(frozen=True)
class Output:
    """A model output the bundle keeps: `name` its graphs' output (output_<i>; its cotangent is seed_<i>), `source`
    the model's tensor as the user names it, `tensor` the differentiated tensor (`source`, or the input of the
    Softmax, LogSoftmax or Sigmoid `before` that produces it through ops that only copy or reshape), `shape` the
    differentiated tensor's dims after the batch."""

    name: str
    source: str
    tensor: str
    before: str | None
    shape: list
    axis: int = -1  # the Softmax's or LogSoftmax's axis

    @property
    def seed(self) -> str:
        """Its cotangent's name in the graphs."""
        return self.name.replace("output_", "seed_")

    def record(self, shown: dict, layout: str | None) -> dict:
        """The manifest's entry; `shown` maps tensors `prepare` renamed back to the model's names."""
        return {"name": self.name, "source": shown.get(self.source, self.source),
                "tensor": shown.get(self.tensor, self.tensor), "before": self.before, "shape": list(self.shape),
                "layout": layout}


def scores_before(model: onnx.ModelProto, output: str, producers=None):
    """(the differentiated tensor, the op between it and `output` or None, that op's axis): `output`, or the input
    of a Softmax, LogSoftmax or Sigmoid that produces it through ops that only copy or reshape."""
    producers = producers if producers is not None else _producers(model.graph)
    name, node = output, producers.get(output)
    while node is not None and node.op_type in COPIES:
        name = node.input[0]
        node = producers.get(name)
    if node is None or node.op_type not in TRAILING:
        return output, None, -1
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    # Back through copies that keep the shape (ONNX's version converter wraps an old Softmax in Flatten and
    # Reshape): the scores under the name the original model gives them.
    scores = node.input[0]
    while (producer := producers.get(scores)) is not None and producer.op_type in COPIES \
            and _shape(model, producer.input[0]) == _shape(model, scores):
        scores = producer.input[0]
    return scores, node.op_type, axis


def model_outputs(model: onnx.ModelProto, names=None, scores_first: bool = False) -> list[Output]:
    """The outputs a bundle keeps: `names` (the model's outputs or any of its tensors, in that order, e.g. a
    detector's raw head before its in-graph selection), or every output of the model; each [batch, fixed dims].
    With `scores_first` (a classifier's or a segmenter's class scores), the first is differentiated before a final
    Softmax, LogSoftmax or Sigmoid (scores_before); every other output as the model gives it (a detector's boxes
    may well end in a Sigmoid)."""
    producers = _producers(model.graph)
    available = [o.name for o in model.graph.output]
    names = list(available if names is None else names)
    if not names or len(names) > MAX_OUTPUTS or len(set(names)) != len(names):
        raise OptionError(f"outputs must name 1 to {MAX_OUTPUTS} distinct tensors of the model; got {names}")
    outputs = []
    for index, name in enumerate(names):
        if name not in available and name not in producers:
            raise OptionError(f"'{name}' is neither an output nor a tensor of the model; its outputs: {available}")
        _selected_before(model, name, producers)
        tensor, before, axis = scores_before(model, name, producers) if scores_first and index == 0 else (name, None, -1)
        dims = _symbolic_shape(model, tensor)
        # a first dim that is not the batch (a batch the model fixes) is left to the export's verification to name
        if _elem_type(model, tensor) not in FLOAT_TYPES or not dims \
                or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
            raise ModelError(f"output '{name}' is {dims}, not a float tensor [batch, fixed dims...]; keep only the "
                             f"outputs to explain (outputs=[...], CLI --outputs)")
        outputs.append(Output(f"output_{index}", name, tensor, before, dims[1:], axis))
    return outputs


def _selected_before(model: onnx.ModelProto, output: str, producers: dict) -> None:
    """Refuses an output computed from a non-maximum suppression's selection (a detector exported with its
    post-processing): no gradient passes a selection, so the model is explained up to its raw head."""
    nodes, _ = _ancestors(model.graph, output, producers=producers)
    selection = next((n for n in nodes if n.op_type == "NonMaxSuppression"), None)
    if selection is not None:
        raw = [x for x in selection.input[:2] if x]
        raise ModelError(f"output '{output}' comes from a selection inside the graph (NonMaxSuppression node "
                         f"'{selection.name}'), which no gradient passes: explain the raw head, the tensors before "
                         f"it, e.g. outputs={raw} (CLI --outputs {','.join(raw)}; see `igcam layers`)")


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


def candidate_layers(model: onnx.ModelProto, outputs=None) -> list[dict]:
    """Every float activation [batch, ...] of rank 3 or 4 with fixed dims of a prepared model, in graph order: its
    shape (after the batch), layout, grid and prefix tokens as `layouts.infer` reads them, `cut` (no path from the
    image to the outputs bypasses it) and `usable` ("yes", or "no (the reason)"). `outputs`: as model_outputs'."""
    image = model.graph.input[0].name
    logits = [o.tensor for o in model_outputs(model, outputs)]
    producers = _producers(model.graph)
    float_types = {i.name for i in model.graph.value_info if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    index = layouts.TensorIndex.of(model)
    rows = []
    for node in model.graph.node:
        for out in node.output:
            shape = _symbolic_shape(model, out)
            if out not in float_types or shape is None or len(shape) not in (3, 4) or shape[0] != BATCH \
                    or not all(isinstance(d, int) for d in shape[1:]):
                continue
            _, reached = _ancestors(model.graph, logits, stop=out, producers=producers)
            row = {"tensor": out, "op": node.op_type, "node": node.name, "shape": shape[1:], "layout": None,
                   "grid": None, "prefix_tokens": None, "cut": image not in reached and out in reached}
            try:
                layout = layouts.infer(index, out, shape[1:])
                row.update(layout.record())
                row["usable"] = "yes" if out in reached else "no (the outputs do not depend on it)"
            except UserError as e:
                row["usable"] = f"no ({_reason(e)})"
            rows.append(row)
    return rows


def _reason(error: UserError) -> str:
    if isinstance(error, layouts.Pooled):
        return "1x1 grid: after global pooling, a map of one pixel"
    if isinstance(error, layouts.UnclearLayout):
        return "layout unclear: state --layout"
    return str(error)


def default_target(model: onnx.ModelProto, outputs=None) -> str:
    """The target when none is named, for a model whose outputs are vectors (classifiers, embedding models), by the
    layout of the last usable tensor: for a CNN the last NCHW tensor through which every path from the image to
    the outputs passes (the last convolutional stage's output); for a vision transformer the last block's first
    norm (the last LayerNormalization over tokens before an attention product: a class-token head gives the last
    block's patch tokens no gradient); for channels-last stages the last channels-last tensor. A model with dense
    outputs (a segmenter's score map, a detector's head) has no default: the tensors just before its outputs are
    score maps themselves, and which backbone stage to explain is the user's choice."""
    rows = [r for r in candidate_layers(model, outputs) if r["usable"] == "yes"]
    dense = [o for o in model_outputs(model, outputs) if len(o.shape) != 1]
    if dense:
        cut = [r["tensor"] for r in rows if r["cut"] and r["layout"] == "NCHW"][-4:]
        raise ModelError(f"output '{dense[0].source}' is {dense[0].shape}, not a vector of scores: name the target "
                         "tensor (a backbone stage; tensor=..., CLI --tensor, see `igcam layers`)"
                         + (f"; the last tensors every path passes: {', '.join(cut)}" if cut else ""))
    index = layouts.TensorIndex.of(model)
    if not rows:
        raise ModelError("found no activation with a spatial grid above 1x1 and a layout that can be told (see "
                         "`igcam layers`); name one with tensor=... (CLI --tensor) and --layout")
    kind = rows[-1]["layout"]
    if kind == "tokens":
        norms = [r for r in rows if r["layout"] == "tokens" and r["op"] == "LayerNormalization"
                 and layouts.feeds_attention(index, r["tensor"])]
        if not norms:
            raise ModelError("found no LayerNormalization before an attention product over the tokens to default "
                             "to; name the target with tensor=... (CLI --tensor; see `igcam layers`)")
        return norms[-1]["tensor"]
    if kind == "NCHW":
        rows = [r for r in rows if r["layout"] == "NCHW" and r["cut"]] or rows
    return [r for r in rows if r["layout"] == kind][-1]["tensor"]


def later_target_hint(model: onnx.ModelProto, s: "Split", missing: list) -> str:
    """Names the first target after `s.target` whose tail every op of which has a rule, if there is one."""
    from .autodiff import missing_rules

    rows = candidate_layers(model, [o.source for o in s.outputs])
    names = [r["tensor"] for r in rows]
    later = rows[names.index(s.target) + 1:] if s.target in names else []
    for row in later:
        if row["usable"] != "yes":
            continue
        tail, _ = _ancestors(model.graph, [o.tensor for o in s.outputs], stop=row["tensor"])
        if not missing_rules(GraphBuilder(model), tail, row["tensor"]):
            return (f"a later target avoids them: tensor '{row['tensor']}' {row['shape']} (node '{row['node']}'; "
                    "from_onnx(tensor=...) or --tensor)")
    return "no later tensor avoids them, so this model cannot be explained at this layer yet"


def split(model: onnx.ModelProto, target: str | None = None, stated: LayoutChoice = LayoutChoice(),
          input_layout: str = "NCHW", outputs=None, scores_first: bool = True) -> Split:
    """The model cut at `target` (None: default_target) into head and tail; `outputs` names the outputs kept and
    `scores_first` says whether the first holds class scores (model_outputs)."""
    graph = model.graph
    image = graph.input[0].name
    kept = model_outputs(model, outputs, scores_first)
    target = target or default_target(model, outputs)
    shape = _symbolic_shape(model, target)
    if target not in _producers(graph):
        raise OptionError(f"'{target}' is not an activation tensor of the model (see `igcam layers`)")
    if shape is None or len(shape) < 2 or shape[0] != BATCH or not all(isinstance(d, int) for d in shape[1:]):
        raise ModelError(f"target tensor '{target}' must be [batch, fixed dims...] (K, h, w fixed at export); it is "
                         f"{shape}")
    layout = layouts.infer(layouts.TensorIndex.of(model), target, shape[1:], stated)
    tensors = [o.tensor for o in kept]
    everything, reached = _ancestors(graph, tensors, stop=target)
    if target not in reached:
        raise ModelError(f"the outputs do not depend on target tensor '{target}'")
    depends = _dependents(everything, {target})
    for output in kept:
        if output.tensor not in depends:
            others = [o.source for o in kept if o.tensor in depends]
            raise ModelError(f"output '{output.source}' does not depend on target tensor '{target}'; keep only the "
                             f"outputs to explain: outputs={others} (CLI --outputs {','.join(others)})")
    held = _held(model, everything, target, image)
    tail, _ = _ancestors(graph, tensors, stop={target, *(h.tensor for h in held)})
    selecting = [n for n in tail if n.op_type in SELECTING]
    if selecting:
        node = selecting[0]
        raw = [x for x in node.input if x and _elem_type(model, x) in FLOAT_TYPES]
        raise ModelError(f"the model selects its results inside the graph ({node.op_type} node '{node.name}'), "
                         "which no gradient passes: explain its raw head, the tensors before the selection, "
                         f"e.g. outputs={raw} (CLI --outputs {','.join(raw)}; see `igcam layers`)")
    if layout.prefix:
        held.append(Held(f"held_{len(held)}", None, [layout.prefix, layout.channels]))
    producers = _producers(graph)  # the same node objects throughout: their ids are compared
    order = {id(n): i for i, n in enumerate(producers.values())}
    needed = {}
    for tensor in [target, *(h.tensor for h in held if h.tensor)]:
        for node in _ancestors(graph, tensor, values_only=False, producers=producers)[0]:
            needed.setdefault(id(node), node)
    head = sorted(needed.values(), key=lambda n: order[id(n)])
    tail, copies = _apart_from(head, _shape_reads_from_target(model, tail, target))
    dims = _shape(model, image)[1:]
    input_shape = dims if input_layout == "NCHW" else [dims[2], dims[0], dims[1]]
    return Split(model, image, target, layout, kept, head, tail, held, input_shape, input_layout, shape[1:], copies)


def _dependents(nodes, seeds) -> set:
    """The tensors whose values depend on `seeds` through `nodes` (topologically sorted); a Shape or Size reads no
    values."""
    depends = set(seeds)
    for node in nodes:
        if node.op_type not in SHAPE_READERS and any(x in depends for x in reads(node)):
            depends.update(node.output)
    return depends


def _held(model: onnx.ModelProto, tail: list, target: str, image: str) -> list:
    """The tensors that the target's descendants take from the image by paths that bypass the target (a skip
    connection around a block's norm, a U-Net's encoder features, a detector's other scales): the forward graph
    computes them, the gradient graph takes them as inputs held at their values, as autograd's gradient at the
    target holds every other path."""
    from_image, from_target = _dependents(model.graph.node, {image}), _dependents(tail, {target})
    names = []
    for node in tail:
        if node.op_type in SHAPE_READERS or not any(o in from_target for o in node.output):
            continue
        names.extend(x for x in node.input if x in from_image and x not in from_target and x not in names)
    if len(names) > MAX_HELD:
        raise ModelError(f"{len(names)} tensors bypass target tensor '{target}' (at most {MAX_HELD} can be held); "
                         "choose a tensor nearer the logits (see `igcam layers`)")
    held = []
    for name in names:
        dims = _symbolic_shape(model, name)
        if not dims or dims[0] != BATCH or not all(isinstance(d, int) for d in dims[1:]):
            raise ModelError(f"tensor '{name}' bypasses target tensor '{target}' and is {dims}, not [batch, fixed "
                             "dims...], so it cannot be held per image; choose a tensor after it (see `igcam layers`)")
        elem_type = _elem_type(model, name)
        held.append(Held(f"held_{len(held)}", name, dims[1:], elem_type))
    return held


def _elem_type(model: onnx.ModelProto, name: str) -> int:
    for info in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if info.name == name:
            return info.type.tensor_type.elem_type
    return TensorProto.FLOAT


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


def _apart_from(head: list, tail: list) -> tuple[list, dict]:
    """(the tail with the tensors it computes that the head computes too renamed, copy -> original): the shape
    arithmetic and constants both use, the shapes read above. The one-graph forms hold head and tail together, and
    the tail computes them from its own batch (the explain graph's head runs on more rows than its tail)."""
    both = {o for n in head for o in n.output} & {o for n in tail for o in n.output}
    if not both:
        return tail, {}
    heads = {n.name for n in head}
    names = {name: f"igcam/tail/{name}" for name in both}
    tail = _renamed(tail, names)
    for node in tail:
        if node.name in heads:
            node.name = f"igcam/tail/{node.name}"
    return tail, {copy: original for original, copy in names.items()}


# ---------------------------------------------------------------- graph assembly


def _info(name, elem_type, dims):
    return helper.make_tensor_value_info(name, elem_type, dims)


def _interpolate(b: GraphBuilder, s: Split, images: str, baseline: str) -> str:
    """Rows baseline + alpha_i (image_n - baseline), image-major: [N*M, C, H, W]."""
    alphas = b.Reshape("alphas", [1, -1, 1, 1, 1])
    path = b.Add(b.Unsqueeze(baseline, [1]), b.Mul(alphas, b.Unsqueeze(b.Sub(images, baseline), [1])))
    return b.Reshape(path, [-1] + s.input_shape)


def _per_row(b: GraphBuilder, seed: str, dims: list) -> str:
    """Repeats each image's seed [N, *dims] for each of its M rows (image-major): [N*M, *dims]."""
    rows = b.Concat(b.Shape("images", start=0, end=1), b.Shape("alphas"), np.array(dims, np.int64), axis=0)
    return b.Reshape(b.Expand(b.Unsqueeze(seed, [1]), rows), np.array([-1, *dims], np.int64))


def _backward(b: GraphBuilder, s: Split, nodes: list, activations: str, seeds: dict) -> str:
    """The vector-Jacobian product of the outputs at the canonical `activations` through `nodes` (the target rebuilt
    from them, then the tail): sum over outputs of seeds[output.name] . d output / d activations, per row."""
    cotangents = {}
    for output in s.outputs:
        elem_type = _elem_type(s.model, output.tensor)
        seed = seeds[output.name]
        cotangents[output.tensor] = seed if elem_type == TensorProto.FLOAT else b.Cast(seed, to=elem_type)
    return append_backward(b, nodes, activations, cotangents, about=s.target)


def _output_aliases(s: Split) -> list:
    """Identity nodes naming each kept output's tensor output_<i> (as float32)."""
    return [_alias(o.tensor, o.name) if _elem_type(s.model, o.tensor) == TensorProto.FLOAT else
            helper.make_node("Cast", [o.tensor], [o.name], name=f"igcam/{o.name}", to=TensorProto.FLOAT)
            for o in s.outputs]


def _rebuilt(s: Split, g: GraphBuilder, activations: str, held: dict) -> list:
    """Nodes that give the tail what it reads: the target rebuilt in its layout from the canonical `activations`
    (and the prefix tokens), and the held tensors (`held`: Held.name -> the tensor carrying it here). They are made
    with the gradient's builder `g`, which learns their shapes, and handed back rather than kept in it."""
    prefix = next((held[h.name] for h in s.held if h.tensor is None), None)
    target = layouts.native(g, s.layout, activations, prefix, BATCH)
    nodes = list(g.nodes)
    g.nodes.clear()
    return nodes + [_alias(target, s.target)] + [_alias(held[h.name], h.tensor) for h in s.held
                                                 if h.tensor and held[h.name] != h.tensor]


def _canonical(s: Split, b: GraphBuilder, target: str, held: dict):
    """(the canonical activations, Held.name -> tensor): the target's canonical form, appended to `b`, and the
    held tensors, read from the head's `target` and from `held` (Held.tensor -> the tensor carrying it here)."""
    activations, prefix = layouts.canonical(b, s.layout, target)
    return activations, {h.name: prefix if h.tensor is None else held.get(h.tensor, h.tensor) for h in s.held}


def _image_feed(b: GraphBuilder, s: Split, rows: str) -> list:
    """The node that hands the interpolated rows [R, C, H, W] to the model's image input, transposed to
    [R, H, W, C] first (appended to `b`) for a model that takes NHWC."""
    return [_alias(rows if s.input_layout == "NCHW" else b.Transpose(rows, perm=[0, 2, 3, 1]), s.image)]


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
            needed.update(reads(node))
    return kept[::-1]


def subgraphs(node: onnx.NodeProto) -> list:
    """The graphs a node holds: If's branches, Loop's and Scan's bodies."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def reads(node: onnx.NodeProto) -> list:
    """A node's inputs and the outer tensors its subgraphs read."""
    names = [x for x in node.input if x]
    for graph in subgraphs(node):
        inner = {i.name for i in graph.input} | {i.name for i in graph.initializer}
        for child in graph.node:
            names.extend(x for x in reads(child) if x not in inner)
            inner.update(child.output)
    return names


def _renamed(nodes: list, names: dict) -> list:
    """Copies of `nodes` with the tensors `names` maps renamed, as inputs and outputs, and where the subgraphs of
    If, Loop and Scan read them from the enclosing scope."""
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        _rename_in(copy, names)
        copy.output[:] = [names.get(x, x) for x in copy.output]
        copies.append(copy)
    return copies


def _rename_in(node: onnx.NodeProto, names: dict) -> None:
    """Renames, in place, what `node` and its subgraphs read of the enclosing scope; a name a subgraph defines
    itself (its inputs, initializers, node outputs) shadows the outer one there."""
    node.input[:] = [names.get(x, x) for x in node.input]
    for graph in subgraphs(node):
        inner = {x.name for x in [*graph.input, *graph.initializer]} | {o for n in graph.node for o in n.output}
        visible = {k: v for k, v in names.items() if k not in inner}
        for inner_node in graph.node:
            _rename_in(inner_node, visible)
        for output in graph.output:  # a subgraph may hand an outer tensor straight back
            output.name = visible.get(output.name, output.name)


def build_graphs(s: Split) -> dict:
    """The four bundle graphs, each a self-contained ModelProto (initializers inline)."""
    c, h, w = s.input_shape
    k, ah, aw = s.activation_shape
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    images, baseline = _info("images", f, [BATCH, c, h, w]), _info("baseline", f, ["baseline_batch", c, h, w])
    alphas = _info("alphas", f, ["steps"])
    activations = _info("activations", f, ["rows", k, ah, aw])
    activation_grad = _info("activation_grad", f, ["rows", k, ah, aw])
    outputs = [_info(o.name, f, ["rows", *o.shape]) for o in s.outputs]
    seeds = [_info(o.seed, f, [BATCH, *o.shape]) for o in s.outputs]
    held = [_info(x.name, x.elem_type, ["rows", *x.shape]) for x in s.held]

    def builder(prefix):
        made = GraphBuilder(s.model, prefix=f"igcam/{prefix}")
        made.alias(s.tail_copies)
        return made

    graphs = {}

    b = builder("interpolate")
    rows = _interpolate(b, s, "images", "baseline")
    feed = _image_feed(b, s, rows)
    forward_nodes = b.nodes + feed + s.head
    lay = builder("layout")
    canonical, carriers = _canonical(s, lay, s.target, {})
    graphs["forward"] = _model(
        s, "forward",
        forward_nodes + lay.nodes + [_alias(canonical, "activations")]
        + [_alias(carriers[x.name], x.name) for x in s.held],
        [b, lay], [images, baseline, alphas], [activations, *held],
    )

    # gradient.onnx takes each output's seeds once per image (or per row) and the row -> seed index: a dense seed
    # (a mask over a score map) crosses to the device once, not once per interpolated image.
    g = builder("gradient")
    differentiated = _rebuilt(s, g, "activations", {x.name: x.name for x in s.held}) + s.tail
    row_seeds = {o.name: g.Gather(o.seed, "seed_index", axis=0) for o in s.outputs}
    grad = _backward(g, s, differentiated, "activations", row_seeds)
    graphs["gradient"] = _model(
        s, "gradient", differentiated + g.nodes + [_alias(grad, "activation_grad")] + _output_aliases(s),
        [g], [activations, *held, _info("seed_index", i64, ["rows"]),
              *[_info(o.seed, f, ["seeds", *o.shape]) for o in s.outputs]],
        [activation_grad, *outputs],
    )

    # One graph: the head's target is renamed, so that the tail reads the target rebuilt from the activations.
    head_target = b.fresh("target")
    head = b.nodes + feed + _renamed(s.head, {s.target: head_target})
    lay = builder("layout")
    canonical, carriers = _canonical(s, lay, head_target, {})
    g = builder("gradient")
    differentiated = _rebuilt(s, g, canonical, carriers) + s.tail
    row_seeds = {o.name: _per_row(g, o.seed, o.shape) for o in s.outputs}
    grad = _backward(g, s, differentiated, canonical, row_seeds)
    graphs["igcam"] = _model(
        s, "igcam",
        head + lay.nodes + differentiated + g.nodes
        + [_alias(canonical, "activations"), _alias(grad, "activation_grad")] + _output_aliases(s),
        [b, lay, g], [images, baseline, alphas, *seeds], [activations, activation_grad, *outputs],
    )

    graphs["explain"] = _explain_graph(s, builder, images, baseline, alphas, seeds)
    return graphs


def _explain_graph(s: Split, builder, images, baseline, alphas, seeds) -> onnx.ModelProto:
    """Interpolation, backbone (with the baseline rows appended), gradient, reduction and upsampling in one graph."""
    _, h, w = s.input_shape
    k, _, _ = s.activation_shape
    b = builder("interpolate")
    every_row = b.Concat(_interpolate(b, s, "images", "baseline"), "baseline", axis=0)
    feed = _image_feed(b, s, every_row)
    # The head runs on every row; its target and held tensors are renamed, and split into the path's rows (which
    # the tail reads) and the baseline's.
    all_target = b.fresh("all_target")
    every_held = {x.tensor: b.fresh("all_held") for x in s.held if x.tensor}
    head = _renamed(s.head, {s.target: all_target, **every_held})
    lay = builder("layout")
    all_activations, all_carriers = _canonical(s, lay, all_target, every_held)

    p = builder("split")
    steps = p.Shape("alphas")
    sizes = p.Concat(p.Mul(p.Shape("images", start=0, end=1), steps), p.Shape("baseline", start=0, end=1), axis=0)
    path, base = p.op("Split", [all_activations, sizes], outputs=2)
    carriers = {name: p.op("Split", [carrier, sizes], outputs=2)[0] for name, carrier in all_carriers.items()}

    g = builder("gradient")
    differentiated = _rebuilt(s, g, path, carriers) + s.tail
    row_seeds = {o.name: _per_row(g, o.seed, o.shape) for o in s.outputs}
    grad = _backward(g, s, differentiated, path, row_seeds)

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
        b.nodes + feed + head + lay.nodes + p.nodes + differentiated + g.nodes + r.nodes
        + [_alias(maps, "maps")]
    )
    inputs = [
        images, baseline, alphas, _info("weights", TensorProto.FLOAT, ["steps"]), *seeds,
        _info("subtract_baseline", TensorProto.FLOAT, [1]),
    ]
    return _model(s, "explain", nodes, [b, lay, p, g, r], inputs, [_info("maps", TensorProto.FLOAT, [BATCH, h, w])])
