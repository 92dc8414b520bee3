"""PyTorch frontend: export a module to ONNX with the target layer's output exposed."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch

from igcam_engine.errors import UserError


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
            raise UserError("the target layer must run exactly once per forward pass and return one tensor")
        return logits, captured[0]


def export_with_layer(model: torch.nn.Module, layer: str, input_shape):
    """Returns (onnx model with only the logits output, name of the layer's tensor, (images, torch logits)).

    The model is exported in eval mode and handed back in the mode each of its modules was in."""
    modules = dict(model.named_modules())
    if layer not in modules or not layer:
        sample = ", ".join(list(n for n in modules if n)[-8:])
        raise UserError(f"the model has no module '{layer}'; module paths look like: {sample}")
    if len(input_shape) != 3:
        raise UserError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        images = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        wrapper = _Exposed(model, modules[layer]).eval()
        with torch.no_grad():
            reference = model(images).numpy()
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
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        session.run(None, {session.get_inputs()[0].name: np.zeros((1, *input_shape), np.float32)})
    except Exception:  # onnxruntime's errors have no common base class
        return False
    return True


def _export(wrapper, images, dynamic_batch: bool):
    """torch's ONNX program of the wrapper; None when a dynamic batch was asked for and the model specialises it."""
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}, "target": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(wrapper, (images,), input_names=["input"], output_names=["logits", "target"],
                                     dynamic_axes=axes, opset_version=18, dynamo=True, verbose=False)
        except UserError:
            raise
        except Exception as e:
            if dynamic_batch and _specialises_batch(e):
                return None
            raise UserError(f"torch's ONNX exporter failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}"
                            ) from None


def _specialises_batch(error: Exception) -> bool:
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
