"""PyTorch frontend: export a module to ONNX with the target layer's output exposed."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
import torch

from igcam_engine.bundle import MAX_OUTPUTS
from igcam_engine.errors import ModelError, OptionError, UserError

TARGET = "igcam_target"  # the exposed layer's output in the export (dropped from the model afterwards)


class _Exposed(torch.nn.Module):
    """Returns (the model's kept outputs..., the layer's output) so that the ONNX export names the layer's output
    tensor; `names` are the kept outputs (see `named_outputs`)."""

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module, names: list):
        super().__init__()
        self.model, self.layer, self.names = model, layer, names

    def forward(self, x):
        captured = []
        handle = self.layer.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            outputs = dict(named_outputs(self.model(x)))
        finally:
            handle.remove()
        if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
            raise ModelError("the target layer must run exactly once per forward pass and return one tensor")
        return (*[outputs[name] for name in self.names], captured[0])


def named_outputs(result) -> list:
    """[(name, tensor)] of what a model returns: one tensor ("output"), a dict of tensors (torchvision's
    segmenters, HuggingFace model outputs; entries that are not tensors are left out) or a list or tuple of tensors
    (output_0, output_1, ...). Anything else is refused in one line."""
    if isinstance(result, torch.Tensor):
        return [("output", result)]
    if isinstance(result, dict):
        return [(str(key), value) for key, value in result.items() if isinstance(value, torch.Tensor)]
    if isinstance(result, (list, tuple)) and result and all(isinstance(v, torch.Tensor) for v in result):
        return [(f"output_{i}", value) for i, value in enumerate(result)]
    found = type(result).__name__
    if isinstance(result, (list, tuple)) and result:
        found += f" of {type(result[0]).__name__}"
    raise ModelError(f"the model must return a tensor, a dict of tensors or a list of tensors, it returns {found}"
                     + (" (post-processed detections: export its raw head, e.g. a module returning its class scores "
                        "and boxes per anchor)" if isinstance(result, (list, tuple)) else ""))


def export_with_layer(model: torch.nn.Module, layer: str, input_shape, outputs=None):
    """Returns (onnx model with only the kept outputs, name of the layer's tensor, (images, torch outputs)).
    `outputs` names the model's outputs to keep (see `named_outputs`; None keeps all).

    The model is exported in eval mode and handed back in the mode each of its modules was in."""
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        sample = ", ".join(list(n for n in modules if n)[-8:])
        raise OptionError(f"the model has no module '{layer}'; module paths look like: {sample}")
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        images = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        names, reference = _eager_check(model, modules[layer], layer, images, outputs)
        wrapper = _Exposed(model, modules[layer], names).eval()
        program = _export(wrapper, images, names, dynamic_batch=True)
        if program is None:  # the model fixes its batch somewhere: export as traced, prepare frees the batch
            program = _export(wrapper, images, names, dynamic_batch=False)
    finally:
        for module, training in modes.items():
            module.training = training
    buffer = io.BytesIO()
    program.save(buffer)
    onnx_model = onnx.load_from_string(buffer.getvalue())
    tensor = _source_of(onnx_model, TARGET)
    del onnx_model.graph.output[len(names):]
    if not _runs_one_image(onnx_model, input_shape):
        # torch.export kept the batch symbolic while the code baked the traced size into constants (int(x.shape[0]),
        # ...): the input says so, and prepare frees the batch where it can.
        onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = len(images)
    return onnx_model, tensor, (images.numpy(), reference)


def _runs_one_image(model: onnx.ModelProto, input_shape) -> bool:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: np.zeros((1, *input_shape), np.float32)})
    except Exception:  # onnxruntime's errors have no common base class
        return False
    return True


def _eager_check(model, module, layer: str, images, outputs) -> tuple:
    """(the names of the kept outputs, the model's values of them on the export's images), after checking in one
    eager run what the exporter would report in a page of traceback: the model runs on this input, returns float
    tensors [batch, ...] (those `outputs` names, if given), and the layer runs once with one 3-D or 4-D tensor
    out."""
    calls = []
    handle = module.register_forward_hook(lambda module, args, output: calls.append(output))
    try:
        with torch.no_grad():
            result = model(images)
    except Exception as e:  # the user's model: its failure in one line
        raise ModelError(f"the model fails on an input of shape {list(images.shape)}: {type(e).__name__}: "
                        f"{_first_line(e)}") from e
    finally:
        handle.remove()
    found = dict(named_outputs(result))
    if outputs is not None:
        if isinstance(outputs, str) or not isinstance(outputs, (list, tuple)) or not outputs \
                or not all(isinstance(o, str) for o in outputs) or len(set(outputs)) != len(outputs):
            raise OptionError(f"outputs must be a list of distinct output names, got {outputs!r:.80}")
        unknown = [o for o in outputs if o not in found]
        if unknown:
            raise OptionError(f"the model has no output {unknown[0]!r}; it returns {list(found)}")
        found = {name: found[name] for name in outputs}
    if not found or len(found) > MAX_OUTPUTS:
        raise ModelError(f"the model returns {len(found)} tensors; a bundle keeps 1 to {MAX_OUTPUTS} (outputs=[...])")
    for name, value in found.items():
        if not value.is_floating_point() or value.dim() < 1 or value.shape[0] != len(images):
            raise ModelError(f"output '{name}' is {value.dtype} {list(value.shape)}, not a float tensor [batch, ...] "
                             f"(keep the outputs to explain: outputs=[...])")
    if len(calls) != 1:
        raise ModelError(f"layer '{layer}' runs {len(calls)} times per forward pass; the target layer must run exactly "
                        "once (a module reused in several places cannot be told apart: hook one that runs once)")
    if not isinstance(calls[0], torch.Tensor) or calls[0].dim() not in (3, 4):
        what = type(calls[0]).__name__ if not isinstance(calls[0], torch.Tensor) else f"{calls[0].dim()}-D"
        raise ModelError(f"layer '{layer}' must output one tensor [batch, K, h, w], [batch, h, w, K] or tokens "
                         f"[batch, N, K]; it outputs {what}")
    return list(found), [value.numpy() for value in found.values()]


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _export(wrapper, images, names: list, dynamic_batch: bool):
    """torch's ONNX program of the wrapper; None when a dynamic batch was asked for and the model specializes it."""
    axes = {name: {0: "batch"} for name in ["input", *names, TARGET]} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(wrapper, (images,), input_names=["input"], output_names=[*names, TARGET],
                                     dynamic_axes=axes, opset_version=18, dynamo=True, verbose=False)
        except UserError:
            raise
        except Exception as e:
            if dynamic_batch and _specializes_batch(e):
                return None
            raise ModelError(f"torch's ONNX exporter failed: {type(e).__name__}: {_first_line(e)} (igcam export "
                            "--verbose shows its full report)") from e


def _specializes_batch(error: Exception) -> bool:
    """Whether torch.export refused the dynamic batch because the model's code fixes it."""
    text = f"{type(error).__name__} {error} {error.__cause__}"
    return any(word in text for word in ("Constraints violated", "ConstraintViolation", "specialized",
                                         "inferred a static shape"))


@contextlib.contextmanager
def _quiet_exporter():
    """torch's exporter logs a warning per missing torchvision op and prints its progress; neither concerns us."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _source_of(model: onnx.ModelProto, name: str) -> str:
    """Follows Identity nodes back to the tensor the rest of the graph consumes."""
    producers = {o: n for n in model.graph.node for o in n.output}
    while name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]
    return name


def torch_layers(model: torch.nn.Module, input_shape) -> list[dict]:
    """The modules producing a 3-D or 4-D tensor, once each: {module, type, shape (after the batch), calls per
    forward pass}. The
    model runs in eval mode on zeros and is handed back as it was (modes restored, no hook left)."""
    found, handles = {}, []

    def record(module, args, output, name):
        if isinstance(output, torch.Tensor) and output.dim() in (3, 4):
            entry = found.setdefault(name, {"module": name, "type": type(module).__name__,
                                            "shape": list(output.shape[1:]), "calls": 0})
            entry["calls"] += 1

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(
                lambda module, args, output, name=name: record(module, args, output, name)))
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as e:  # the user's model: its failure in one line
        raise ModelError(f"the model fails on an input of shape [1, {', '.join(map(str, input_shape))}]: "
                         f"{type(e).__name__}: {_first_line(e)}") from None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return list(found.values())
