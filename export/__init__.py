"""Exporters: a PyTorch module or any ONNX classifier -> an igcam bundle (see igcam_engine.bundle).

`from_torch` needs torch; `from_onnx` and `layers` need only onnx and onnxruntime.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

try:
    import onnx
except ModuleNotFoundError:
    raise ModuleNotFoundError("igcam_engine.export needs onnx: pip install '.[onnx]' in the igcam-engine checkout (and [export] for "
                              "PyTorch models)", name="onnx") from None

from igcam_engine.errors import InputError, ModelError, NotFound, OptionError, Unavailable, UserError, install_hint
from igcam_engine.preprocess import resolve_preprocess
from igcam_engine.validators import choice, integer

from .autodiff import MissingRules
from .builder import default_opset
from .graphs import build_graphs, candidate_layers, fixed_feed, later_target_hint, model_outputs, prepare, reads, split
from .graphs import fixed_inputs as checked_fixed_inputs
from .layouts import LayoutChoice
from .tasks import metadata, task_of
from .triton import triton_repository
from .writer import staged, write_bundle

__all__ = ["from_torch", "from_onnx", "layers", "outputs_of", "torch_layers", "usability", "triton_repository"]


MAX_MODEL_BYTES = 2 << 30  # protobuf's limit for one message: larger weights live in external data files


def _load(path) -> onnx.ModelProto:
    """The ONNX file at `path`: a regular file of at most MAX_MODEL_BYTES (a device or a pipe would be read
    without end), a valid graph by onnx's checker (SSA, topological order, outputs), an IR and opset onnx knows."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"no such ONNX file: '{path}'") from None
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e.strerror or e}") from None
    if not stat.S_ISREG(status.st_mode):
        raise InputError(f"'{path}' is not a regular file; an ONNX model is a .onnx file")
    if status.st_size > MAX_MODEL_BYTES:
        raise InputError(f"'{path}' is {status.st_size} bytes; an ONNX file is at most {MAX_MODEL_BYTES} (larger "
                         "weights go in external data files beside it)")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's and onnx's errors have no common base class
        raise InputError(f"'{path}' is not a readable ONNX model: {str(e).splitlines()[0][:200]}") from None
    if model.ir_version > onnx.IR_VERSION:
        raise ModelError(f"'{path}' has IR version {model.ir_version}, newer than the installed onnx "
                         f"{onnx.__version__} reads (up to {onnx.IR_VERSION}); upgrade onnx (pip install -U onnx)")
    if not model.graph.output:
        raise ModelError(f"'{path}' has no outputs; a model's outputs are what its explanations differentiate")
    _check_graph(model.graph, path)
    _drop_unused_initializers(model.graph)
    return model


def _drop_unused_initializers(graph) -> None:
    """Removes the initializers no node (nor subgraph) reads and no output names: they change nothing, and ONNX
    Runtime's session set-up is quadratic in them (a file with 200,000 tiny unused ones took minutes to verify)."""
    read = {o.name for o in graph.output} | {x for node in graph.node for x in reads(node)}
    unused = {i.name for i in graph.initializer if i.name not in read}
    if unused:
        kept = [i for i in graph.initializer if i.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        inputs = [i for i in graph.input if i.name not in unused]
        del graph.input[:]
        graph.input.extend(inputs)


def _check_graph(graph, path) -> None:
    """What everything after relies on and a model file may break: every tensor made once (SSA) and by a node
    before the nodes that read it (topological order)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    for node in graph.node:
        missing = [x for x in node.input if x not in available]
        if missing:
            raise ModelError(f"'{path}' is not a valid ONNX graph: node '{node.name}' ({node.op_type}) reads "
                             f"'{missing[0]}' before any node makes it (not topologically sorted)")
        for out in node.output:
            if out and out in available:
                raise ModelError(f"'{path}' is not a valid ONNX graph: tensor '{out}' is made twice (the graph is "
                                 "not in single static assignment form)")
            available.add(out)


def layers(path, input_shape=None, *, fixed_inputs=None, outputs=None) -> list[dict]:
    """The 4-D activations of an ONNX model: tensor name, producing op and node, shape [K, h, w], and `cut`
    (True where every path from the input to the outputs passes through it, i.e. it can be a target layer)."""
    fixed = checked_fixed_inputs(fixed_inputs)
    prepared = prepare(_load(_path(path, "the ONNX file")), None if input_shape is None else _shape(input_shape),
                       fixed_inputs=fixed)
    return candidate_layers(prepared.model, _output_names(outputs, prepared))


def outputs_of(path, input_shape=None, *, fixed_inputs=None) -> list[dict]:
    """The outputs of an ONNX model as a bundle would keep them: name, the differentiated tensor, the op before the
    model's own output (Softmax, LogSoftmax, Sigmoid) and the dims after the batch."""
    prepared = prepare(_load(_path(path, "the ONNX file")), None if input_shape is None else _shape(input_shape),
                       fixed_inputs=checked_fixed_inputs(fixed_inputs))
    shown = prepared.model_names
    return [{"output": shown.get(o.source, o.source), "tensor": shown.get(o.tensor, o.tensor), "before": o.before,
             "shape": o.shape} for o in model_outputs(prepared.model, scores_first=True)]


def _output_names(outputs, prepared) -> list | None:
    """The outputs a user names (None: every output), under the names `prepare` gave them."""
    if outputs is None:
        return None
    if isinstance(outputs, str) or not isinstance(outputs, (list, tuple)) or not all(isinstance(o, str) for o in outputs):
        raise OptionError(f"outputs must be a list of output (or tensor) names, got {outputs!r:.80}")
    return [prepared.renamed.get(name, name) for name in outputs]


def torch_layers(model, input_shape) -> list[dict]:
    """The modules of a torch.nn.Module that produce a 4-D tensor: module path, type, shape [K, h, w] and calls per
    forward pass (a target layer must run once)."""
    try:
        from ._torch import torch_layers as listing
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise Unavailable(f"listing a PyTorch model's layers needs torch: {install_hint('export')}") from None
    return listing(model, tuple(input_shape))


def usability(shape, calls: int = 1) -> str:
    """Whether a PyTorch module (its output's dims after the batch; `calls` per forward pass) can be the target, and
    why not; its layout is read from the exported graph (`layers` of an ONNX file shows it)."""
    if calls != 1:
        return f"no (runs {calls} times per forward pass)"
    if len(shape) not in (2, 3):
        return f"no ({len(shape) + 1}-D: a target is [batch, K, h, w], [batch, h, w, K] or [batch, N, K])"
    if sorted(shape)[-2] == 1:
        return "no (a single position: after global pooling, a map of one pixel)"
    return "yes"


def from_onnx(path, out, tensor=None, preprocess=None, *, input_shape=None, labels=None, layout=None, grid=None,
              prefix_tokens=None, input_layout=None, fixed_inputs=None, outputs=None, task=None, detector=None,
              output_layout=None) -> Path:
    """Bundle from an ONNX model with one float image input (NCHW or NHWC).

    `tensor` names the target activation; None picks one by the model's layout (docs/supported.md). `input_shape`
    (C, H, W) fixes dynamic spatial dims. `input_layout` ("NCHW", "NHWC"; None: read from the graph) is the model
    input's: the bundle takes NCHW images either way. `layout` ("NCHW", "NHWC", "tokens"), `grid` (h, w) and `prefix_tokens`
    state the target's layout where the graph does not tell it. `fixed_inputs` ({name: number}) fills the model's
    other inputs (an attention mask of ones, a flag) with constants: the bundle takes only the image.
    `outputs` names the outputs kept (default: every output; a tensor inside the graph, e.g. a detector's raw head
    before its in-graph selection, may be named); `task` ("classification", "segmentation", "detection",
    "embedding", "outputs"; None: read from the outputs), `detector` (a detection head's format, see
    docs/targets.md) and `output_layout` (a score map's, "NCHW" or "NHWC", where its dims do not tell) say what the
    model is for.
    """
    _path(path, "the ONNX file")
    input_shape = None if input_shape is None else _shape(input_shape)
    if tensor is not None and not isinstance(tensor, str):
        raise OptionError(f"tensor must be the name of an activation tensor (see `igcam layers`), got {tensor!r:.80}")
    stated = LayoutChoice.of(layout, grid, prefix_tokens)
    input_layout = None if input_layout in (None, "auto") else choice(input_layout, "input_layout", ("NCHW", "NHWC"))
    fixed = checked_fixed_inputs(fixed_inputs)
    return _export(_load(path), out, tensor, preprocess, input_shape, labels, stated, layer=tensor,
                   input_layout=input_layout, fixed_inputs=fixed,
                   purpose={"outputs": outputs, "task": task, "detector": detector, "output_layout": output_layout})


def from_torch(model, layer: str, input_shape, out, preprocess=None, *, labels=None, layout=None, grid=None,
               prefix_tokens=None, outputs=None, task=None, detector=None, output_layout=None) -> Path:
    """Bundle from a torch.nn.Module; `layer` is a module path as in named_modules() ("layer4", "features.29",
    "blocks.11.norm1"). The model may return a tensor, a dict of tensors (torchvision's segmenters' "out", a
    HuggingFace model's output) or a list or tuple of them (named output_0, output_1, ...); `outputs` keeps some of
    them by name. `layout`, `grid`, `prefix_tokens`, `task`, `detector`, `output_layout` as in from_onnx."""
    try:
        from ._torch import export_with_layer
    except ModuleNotFoundError as e:
        if e.name != "torch":
            raise
        raise Unavailable(f"from_torch needs torch: {install_hint('export')}") from None

    import torch

    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(layer, str) or not layer:
        raise OptionError(f"layer must be a module path as in named_modules() (e.g. 'layer4'), got {layer!r:.80}")
    input_shape = _shape(input_shape)
    stated = LayoutChoice.of(layout, grid, prefix_tokens)
    resolve_preprocess(preprocess, channels=input_shape[0])  # fail before the slow export, not after
    onnx_model, tensor, reference = export_with_layer(model, layer, input_shape, outputs)
    return _export(onnx_model, out, tensor, preprocess, input_shape, labels, stated, layer=layer,
                   reference=reference, input_layout="NCHW",  # torch's export of an [B, C, H, W] input
                   purpose={"task": task, "detector": detector, "output_layout": output_layout})


def _path(value, what: str):
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise OptionError(f"{what} must be a path (str or os.PathLike), got {value!r:.80}")
    return value


def _shape(value) -> tuple:
    """(C, H, W): three positive integers."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise OptionError(f"input_shape must be (C, H, W), got {value!r:.80}")
    return tuple(integer(v, f"input_shape[{i}]", 1, 1 << 16) for i, v in enumerate(value))


def _export(model, out, tensor, preprocess, input_shape, labels, stated, layer, reference=None,
            input_layout=None, fixed_inputs=None, purpose=None) -> Path:
    """`purpose`: the outputs kept, the task, the detector and the score map's layout (see from_onnx)."""
    _path(out, "out (the bundle folder to write)")
    if labels is not None and (not isinstance(labels, (list, tuple)) or isinstance(labels, str)):
        raise OptionError(f"labels must be a list of class names, got {type(labels).__name__}")
    fixed_inputs, purpose = fixed_inputs or {}, purpose or {}
    prepared = prepare(model, input_shape, input_layout, fixed_inputs)
    names = _output_names(purpose.get("outputs"), prepared)
    meta = metadata(model)
    # what the model is for decides whether its first output's final Softmax or Sigmoid is stepped over
    task, _ = task_of(model_outputs(prepared.model, names), _image_size(prepared), meta, purpose.get("task"),
                      purpose.get("detector"), purpose.get("output_layout"))
    s = split(prepared.model, tensor, stated, prepared.input_layout, names,
              scores_first=task["kind"] in ("classification", "segmentation"))
    preprocess = resolve_preprocess(preprocess, channels=s.input_shape[0])
    task, output_layouts = task_of(s.outputs, s.input_shape[1:], meta, task["kind"], task["detector"],
                                   purpose.get("output_layout"))
    if labels is None and task["classes"] is not None and len(meta.get("labels", [])) == task["classes"]:
        labels = meta["labels"]
    if labels is not None:
        labels = [str(label) for label in labels]
        if task["classes"] is None or len(labels) != task["classes"]:
            raise OptionError(f"{len(labels)} labels given for a model with {task['classes'] or 'no'} classes")
    try:
        graphs = build_graphs(s)
    except MissingRules as e:
        raise ModelError(f"{e}; {later_target_hint(prepared.model, s, e.missing)}") from None
    shown = prepared.model_names
    manifest = {
        "input": {"name": "images", "shape": s.input_shape, "layout": "NCHW", "dtype": "float32",
                  "model_layout": s.input_layout, "fixed_inputs": fixed_inputs},
        "preprocess": preprocess,
        "target_layer": {"name": layer or s.target, "tensor": s.target, "shape": s.activation_shape,
                         "tensor_shape": s.target_shape, **s.layout.record()},
        "held": [h.record() for h in s.held],
        "outputs": [o.record(shown, layout) for o, layout in zip(s.outputs, output_layouts)],
        "task": task,
        "labels": labels,
        "opset": default_opset(prepared.model),
    }
    with staged(out) as staging:
        write_bundle(staging, graphs, manifest)
        _verify(staging, model, prepared, s, preprocess, reference, fixed_inputs)
    return Path(out)


def _image_size(prepared) -> tuple:
    """(H, W) of a prepared model's image input."""
    dims = [d.dim_value for d in prepared.model.graph.input[0].type.tensor_type.shape.dim]
    return tuple(dims[2:4]) if prepared.input_layout == "NCHW" else tuple(dims[1:3])


def _verify(bundle: Path, original: onnx.ModelProto, prepared, s, preprocess, reference, fixed_inputs) -> None:
    """The bundle must reproduce the original model's outputs on real photos, one at a time and three in one batch:
    this catches a split or a conversion that changed the function, and a batch that is not really dynamic; with
    `reference` (images and the torch module's outputs) it also catches an ONNX export that differs from the
    module."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # its warnings would precede the one-line errors below
    images = _sample_inputs(s.input_shape, preprocess)
    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failure is reported in the one-line error below, not on stderr
    shown = prepared.model_names
    names = [shown.get(o.source, o.source) for o in s.outputs]
    source_model = original
    if not set(names) <= {o.name for o in original.graph.output}:  # tensors inside the graph: made outputs
        source_model = onnx.ModelProto()
        source_model.CopyFrom(original)
        source_model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names
                                         if n not in {o.name for o in original.graph.output})
    source = ort.InferenceSession(source_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    source_input = next(i.name for i in source.get_inputs() if i.name not in fixed_inputs)
    if reference is not None:
        (torch_images, torch_outputs) = reference
        for got, expected in zip(source.run(names, {source_input: torch_images}), torch_outputs):
            _compare(got, expected, "the ONNX export's outputs differ from the torch module's")
    batch = prepared.fixed_batch or len(images)
    try:
        source_images = images if s.input_layout == "NCHW" else np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        runs = [_run_padded(source, names, source_input, source_images[i:i + batch], batch,
                            fixed_feed(original, fixed_inputs, batch)) for i in range(0, len(images), batch)]
        expected = [np.concatenate(parts) for parts in zip(*runs)]
    except Exception as e:  # onnxruntime's errors have no common base class
        raise ModelError(f"the original model does not run on a batch of {batch} although its input says it does "
                        f"(ONNX Runtime: {str(e).splitlines()[0]}); re-export it with a dynamic batch") from None
    graph = ort.InferenceSession(str(bundle / "igcam.onnx"), options, providers=["CPUExecutionProvider"])
    for rows in (images[:1], images):
        seeds = {o.seed: np.zeros((len(rows), *o.shape), np.float32) for o in s.outputs}
        try:
            values = graph.run([o.name for o in s.outputs], {"images": rows, "baseline": np.zeros_like(rows[:1]),
                                                              "alphas": np.ones(1, np.float32), **seeds})
        except Exception as e:
            raise ModelError(f"the exported graphs do not run on a batch of {len(rows)}: {_batch_hint(prepared)} "
                            f"(ONNX Runtime: {str(e).splitlines()[0]})") from None
        for output, value, wanted in zip(s.outputs, values, expected):
            got = _scores(value, output.before, output.axis).reshape(wanted[: len(rows)].shape)
            try:
                _compare(got, wanted[: len(rows)], f"the bundle's output '{names[s.outputs.index(output)]}' differs "
                                                   "from the original model's")
            except UserError as e:
                raise ModelError(f"{e} at batch {len(rows)}" + (f": {_batch_hint(prepared)}" if len(rows) > 1 else ""))


def _sample_inputs(input_shape, preprocess) -> np.ndarray:
    """The sample photos as model input (three-channel models), else three seeded random images."""
    from igcam_engine.data import sample_images
    from igcam_engine.images import load_image, to_model_input

    if input_shape[0] == 3:
        return np.stack([to_model_input(load_image(p), input_shape, preprocess)[0] for p in sample_images()[:3]])
    return np.random.default_rng(0).standard_normal((3, *input_shape)).astype(np.float32)


def _run_padded(session, outputs, name, images, batch, fixed: dict) -> list:
    """The `outputs` for `images` on a session whose batch is fixed at `batch` (the last rows repeated), its other
    inputs fed `fixed`."""
    padded = np.concatenate([images, np.repeat(images[-1:], batch - len(images), axis=0)])
    return [value[: len(images)] for value in session.run(outputs, {name: padded, **fixed})]


def _scores(scores: np.ndarray, after, axis: int = -1) -> np.ndarray:
    """A model output from the scores before it: the Softmax, LogSoftmax or Sigmoid the model ends with, if any."""
    if after is None:
        return scores
    if after == "Sigmoid":
        return 1 / (1 + np.exp(-scores.astype(np.float64)))
    shifted = scores - scores.max(axis=axis, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))
    return log_probabilities if after == "LogSoftmax" else np.exp(log_probabilities)


def _batch_hint(prepared) -> str:
    if prepared.fixed_batch is None:
        return "the model's graph does not accept this batch size"
    made = (f"; Reshape node(s) {', '.join(repr(n) for n in prepared.batch_rewrites)} were made to copy the batch"
            if prepared.batch_rewrites else "")
    name = prepared.model.graph.input[0].name
    return (f"the model was exported with its batch fixed at {prepared.fixed_batch}{made}, but other ops still "
            f"carry that size; re-export it with a dynamic batch (torch.onnx.export(..., dynamic_axes={{{name!r}: "
            "{0: 'batch'}}) or dynamo=True with dynamic_shapes)")


def _compare(got, expected, message) -> None:
    # relative to the outputs' peak, and to 1e-3 where they are all ~0 (a text detector's map of a photo without
    # text: float32's last digits of a sigmoid near 0 are no disagreement)
    error = float(np.abs(got - expected).max()) / max(float(np.abs(expected).max()), 1e-3)
    if got.shape != expected.shape or error > 1e-3:
        raise ModelError(f"{message} (relative error {error:.2e})")
