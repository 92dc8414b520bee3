"""PyTorch frontend: export a module to ONNX with the target layer's output exposed."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
import torch

from igcam_engine.errors import ModelError, OptionError, UserError


class _Exposed(torch.nn.Module):
    """Returns (logits, the layer's output) so that the ONNX export names the layer's output tensor."""

    def __init__(self, model: torch.nn.Module, layer: torch.nn.Module):
        super().__init__()
        self.model, self.layer = model, layer

    def forward(self, x):
        captured = []
        handle = self.layer.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
            raise ModelError("the target layer must run exactly once per forward pass and return one tensor")
        return logits, captured[0]


def export_with_layer(model: torch.nn.Module, layer: str, input_shape):
    """Returns (onnx model with only the logits output, name of the layer's tensor, (images, torch logits)).

    The model is exported in eval mode and handed back in the mode each of its modules was in."""
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        sample = ", ".join(list(n for n in modules if n)[-8:])
        raise OptionError(f"the model has no module '{layer}'; module paths look like: {sample}")
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        images = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        wrapper = _Exposed(model, modules[layer]).eval()
        reference = _eager_check(wrapper, layer, images)
        program = _export(wrapper, images, dynamic_batch=True)
        if program is None:  # the model fixes its batch somewhere: export as traced, prepare frees the batch
            program = _export(wrapper, images, dynamic_batch=False)
    finally:
        for module, training in modes.items():
            module.training = training
    buffer = io.BytesIO()
    program.save(buffer)
    onnx_model = onnx.load_from_string(buffer.getvalue())
    tensor = _source_of(onnx_model, "target")
    del onnx_model.graph.output[1:]
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


def _eager_check(wrapper: _Exposed, layer: str, images) -> np.ndarray:
    """The model's scores on the export's images, after checking in one eager run what the exporter would report
    in a page of traceback: the model runs on this input, returns one [batch, classes] tensor, and the layer runs
    once with one 4-D tensor out."""
    calls = []
    handle = wrapper.layer.register_forward_hook(lambda module, args, output: calls.append(output))
    try:
        with torch.no_grad():
            scores = wrapper.model(images)
    except Exception as e:  # the user's model: its failure in one line
        raise ModelError(f"the model fails on an input of shape {list(images.shape)}: {type(e).__name__}: "
                        f"{_first_line(e)}") from e
    finally:
        handle.remove()
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        found = type(scores).__name__ if not isinstance(scores, torch.Tensor) else f"a tensor {list(scores.shape)}"
        raise ModelError(f"the model must return one tensor of class scores [batch, classes], it returns {found}")
    if len(calls) != 1:
        raise ModelError(f"layer '{layer}' runs {len(calls)} times per forward pass; the target layer must run exactly "
                        "once (a module reused in several places cannot be told apart: hook one that runs once)")
    if not isinstance(calls[0], torch.Tensor) or calls[0].dim() not in (3, 4):
        found = type(calls[0]).__name__ if not isinstance(calls[0], torch.Tensor) else f"{calls[0].dim()}-D"
        raise ModelError(f"layer '{layer}' must output one tensor [batch, K, h, w], [batch, h, w, K] or tokens "
                         f"[batch, N, K]; it outputs {found}")
    return scores.numpy()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "(no message)"


def _export(wrapper, images, dynamic_batch: bool):
    """torch's ONNX program of the wrapper; None when a dynamic batch was asked for and the model specializes it."""
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}, "target": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(wrapper, (images,), input_names=["input"], output_names=["logits", "target"],
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
