"""The runtime's front door: IG-CAM and the CAM family's maps from a bundle, no torch.

One path for a batch of images: interpolate (inside forward.onnx) -> backbone (forward.onnx) -> gradient of the
tail (gradient.onnx) -> reduce -> upsample. `Explainer` only wires the seams together: the options
(igcam_engine.options), the bundle's manifest (igcam_engine.bundle), the backend and its stages
(igcam_engine.backends), the checked inputs (igcam_engine.inputs) and the method's passes (igcam_engine.methods).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from igcam_engine.backends import BackendOptions, open_backend
from igcam_engine.bundle import load_manifest
from igcam_engine.errors import InputError, OptionError
from igcam_engine.inputs import BaselineActivations, baseline_images, check_images
from igcam_engine.maps import normalize as normalize_maps
from igcam_engine.options import DEFAULT_LIMITS, DEFAULT_ROWS, ExplainOptions, Limits
from igcam_engine.stages import Call
from igcam_engine.targets import bound_grid, targets_of
from igcam_engine.validators import class_indices


@dataclass(frozen=True)
class Explanation:
    """An explain call's maps, the passes along the path each map took, and for steps="auto" whether the tolerance
    was met (`change`: the last refinement's largest change, relative to each map's range)."""

    maps: np.ndarray
    passes: int
    converged: bool = True
    change: float | None = None


class Explainer:
    """Explains a bundle's model. The backend is opened once; `explain` may be called from several threads."""

    def __init__(self, bundle, providers=None, *, precision=None, fp16: bool = False, engine_cache=None,
                 workspace_bytes=None, device_id: int = 0, tf32: bool = False, verify: bool = True,
                 memory_budget: int | None = None, limits: Limits | None = None):
        """providers, precision, fp16, tf32, engine_cache, workspace_bytes, device_id: the backend's (see
        igcam_engine.backends.BackendOptions). `limits` bounds every call (igcam_engine.options.Limits: passes per
        map, channels, classes, memory); memory_budget (bytes) replaces its memory bound. Afterwards `precision`
        says what the graphs compute in ("f32", "bf16", "tf32" or TensorRT's "fp16"), `providers` what computes."""
        if limits is not None and not isinstance(limits, Limits):
            raise OptionError(f"limits must be an igcam_engine.options.Limits, got {type(limits).__name__}")
        limits = limits or DEFAULT_LIMITS
        self.limits = (limits if memory_budget is None else replace(limits, memory=memory_budget)).checked()
        backend_options = BackendOptions(providers, precision, fp16, tf32, engine_cache, workspace_bytes,
                                         device_id).checked()  # a bad choice is refused before anything loads
        self.manifest = load_manifest(bundle, verify=verify)
        # a row's outputs and their seeds live in the gradient graph beside its held tensors
        self.max_rows_per_call = self.limits.rows_per_call(self.input_shape, self.manifest.target_layer.shape,
                                                           self.manifest.held_elements
                                                           + 2 * self.manifest.output_elements)
        self.backend = open_backend(self.manifest, backend_options)
        self._baselines = BaselineActivations(self.backend.stages)

    @property
    def input_shape(self) -> tuple:
        return self.manifest.input.shape

    @property
    def num_classes(self) -> int | None:
        """The classes targets choose among (a classifier's, a segmenter's, a detector's); None for embeddings and
        plain outputs."""
        return self.manifest.num_classes

    @property
    def task(self) -> str:
        return self.manifest.task.kind

    @property
    def preprocess(self):
        return self.manifest.preprocess

    @property
    def precision(self) -> str:
        return self.backend.precision

    @property
    def providers(self) -> list:
        return self.backend.providers

    def label(self, target: int) -> str:
        if self.num_classes is None:
            raise OptionError(f"this bundle's task '{self.task}' has no classes to label")
        index = int(class_indices(target, self.num_classes, "class"))
        return self.manifest.labels[index] if self.manifest.labels else str(index)

    def predict(self, images) -> np.ndarray:
        """A classifier's class scores [B, classes] of images in model input space: the logits (docs/method.md).
        Other models' outputs: `outputs`."""
        if self.task != "classification":
            raise OptionError(f"predict gives a classifier's class scores; this bundle's task is '{self.task}': "
                              "Explainer.outputs gives its outputs")
        return self.model_outputs(images)[0]

    def outputs(self, images) -> dict:
        """The model's outputs {name: [B, ...]} of images in model input space, as the bundle keeps them: the scores
        before a final Softmax, LogSoftmax or Sigmoid (docs/targets.md)."""
        values = self.model_outputs(images)
        return {output.source: value for output, value in zip(self.manifest.outputs, values)}

    def model_outputs(self, images) -> list:
        """The outputs of images in model input space, in the bundle's order (manifest.outputs), each [B, ...]."""
        images, stages = check_images(images, self.input_shape), self.backend.stages
        parts = [stages.outputs(stages.activations(stages.put(images[first:first + self.max_rows_per_call])))
                 for first in range(0, len(images), self.max_rows_per_call)]
        return [_finite(np.concatenate(values), "outputs") for values in zip(*parts)]

    def placement(self) -> dict:
        """Which nodes ran where, per graph: {graph: {provider: {op type: count}}} from one profiled run of a black
        image with ONNX Runtime (TensorRT refuses some ops, which then run on CUDA or the CPU); the OpenVINO
        backend's compiled layers by the precision they run in."""
        return self.backend.placement()

    def explain(self, images, targets, options: ExplainOptions | None = None, **overrides) -> np.ndarray:
        """Maps float32 [B, H, W] (or [B, T, H, W] for targets given per image as [B, T]) for images [B, C, H, W] or
        [C, H, W] in model input space. `targets`: class indices (an int, one per image, or [B, T]) of a classifier
        or a segmenter, or targets (igcam_engine.targets: one for every image, one per image, or a list per
        image; docs/targets.md). `options` (an ExplainOptions) and keyword overrides of its fields: docs/api.md."""
        return self.explanation(images, targets, options, **overrides).maps

    def explain_adaptive(self, images, targets, options: ExplainOptions | None = None, **overrides) -> Explanation:
        """An integrated method with as many passes as the maps need (steps="auto", docs/method.md): the maps, the
        passes made and whether the tolerance was met."""
        options = ExplainOptions.of(options, **{"steps": "auto", **overrides})
        if options.steps != "auto":
            raise OptionError(f"explain_adaptive chooses the steps itself: steps must be 'auto', got {options.steps!r}")
        return self.explanation(images, targets, options)

    def explanation(self, images, targets, options: ExplainOptions | None = None, **overrides) -> Explanation:
        """explain's maps with the passes they took (and, for steps="auto", the refinement's outcome)."""
        options = ExplainOptions.of(options, **overrides).checked(self.limits, self.manifest.target_layer.channels)
        call, multi = self._call(images, targets, options)
        method = options.chosen_method
        layer_maps = method.passes(method, call)
        maps = _finite(self.backend.stages.finish(layer_maps.maps, call.input_size), "maps")
        maps = normalize_maps(maps) if options.normalize else maps
        return Explanation(maps if multi else maps[:, 0], layer_maps.passes, layer_maps.converged, layer_maps.change)

    def _call(self, images, targets, options: ExplainOptions):
        """(the call's inputs checked and placed where the stages work, whether targets came as [B, T])."""
        images = check_images(images, self.input_shape)
        grid, multi = targets_of(targets, len(images), self.manifest, self.limits)
        layer_shape, size = self.manifest.target_layer.shape, self.input_shape[1:]
        self.limits.check_maps(len(images), len(grid[0]), size, layer_shape[1:], self.manifest.output_elements)
        grid = bound_grid(grid, self.manifest)
        if any(t.needs_image for row in grid for t in row):  # a predicted mask: the image's own outputs first
            outputs = self.model_outputs(images)
            grid = [[t.resolved(self.manifest, [o[n] for o in outputs]) if t.needs_image else t for t in row]
                    for n, row in enumerate(grid)]
        base = baseline_images(options.baseline, len(images), self.input_shape, self.preprocess)
        stages = self.backend.stages
        base_activations = self._baselines.get(options.baseline, base) if options.subtract else None
        rows = min(options.rows_per_call or DEFAULT_ROWS, self.max_rows_per_call)
        return Call(stages, options, stages.put(images), images, grid, stages.put(base), base_activations, rows,
                    layer_shape, size, self.manifest), multi


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    """The engine's results, which must be finite: inputs far outside the model's range overflow float32."""
    if not np.isfinite(values).all():
        raise InputError(f"the model's {what} overflowed float32 (NaN or infinite) for these inputs: images and "
                         "baselines must be in model input space (after the bundle's preprocessing)")
    return values
