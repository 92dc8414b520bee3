"""The runtime: IG-CAM and Grad-CAM maps from a bundle with ONNX Runtime, no torch.

One path for a batch of images: interpolate (inside forward.onnx) -> backbone (forward.onnx) -> gradient of the
tail (gradient.onnx) -> reduce -> upsample. The stages (igcam_engine.stages) run on the host (host.HostStages:
numpy) or, with the CUDA or TensorRT provider, on the device (device.DeviceStages: IOBinding and the fused
kernel, no host copies).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from igcam_engine.bundle import graph_path, load_manifest
from igcam_engine.errors import UserError
from igcam_engine.maps import normalize as normalize_maps
from igcam_engine.maps import upsample
from igcam_engine.preprocess import black_input
from igcam_engine.providers import on_gpu, resolve_providers
from igcam_engine.quadrature import quadrature

# variant -> (quadrature rule, subtract the baseline's activations)
VARIANTS = {"official": ("left", False), "paper": ("right", True)}
METHODS = ("igcam", "gradcam")
DEFAULT_ROWS = 64  # interpolated images per ONNX Runtime call when batch_size is not given


class Explainer:
    """Explains a bundle's model. Sessions are created once; `explain` may be called from several threads."""

    def __init__(self, bundle, providers=None, *, fp16: bool = False, engine_cache=None, workspace_bytes=None,
                 device_id: int = 0, tf32: bool = False, verify: bool = True):
        """providers: None (best available: TensorRT, CUDA, CPU), "cpu", "cuda", "tensorrt", or ONNX Runtime's own
        list of names / (name, options) tuples. fp16, engine_cache (directory) and workspace_bytes configure
        TensorRT; tf32 lets the CUDA provider use TF32 tensor cores (faster, maps within about 1e-2 instead of
        float32 precision; see README "GPU")."""
        self.manifest = load_manifest(bundle, verify=verify)
        self.providers = resolve_providers(providers, fp16=fp16, engine_cache=engine_cache,
                                           workspace_bytes=workspace_bytes, device_id=device_id, tf32=tf32)
        import onnxruntime as ort  # present: resolve_providers said so

        self._sessions = {
            graph: ort.InferenceSession(graph_path(self.manifest, graph), providers=self.providers)
            for graph in ("forward", "gradient")
        }
        if on_gpu(self.providers):
            from igcam_engine.device import DeviceStages

            self._stages = DeviceStages(self._sessions["forward"], self._sessions["gradient"], device_id)
        else:
            from igcam_engine.host import HostStages

            self._stages = HostStages(self._sessions["forward"], self._sessions["gradient"])
        self._baseline_activations = {}
        self._lock = threading.Lock()

    @property
    def input_shape(self) -> tuple:
        return tuple(self.manifest["input"]["shape"])

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def preprocess(self):
        return self.manifest["preprocess"]

    def label(self, target: int) -> str:
        labels = self.manifest.get("labels")
        return labels[target] if labels else str(target)

    def predict(self, images) -> np.ndarray:
        """Class scores [B, classes] of images in model input space."""
        images = self._stages.put(self._check_images(images))
        activations = self._stages.forward(images, 0, len(images), images, np.zeros(1))
        return self._stages.logits(activations, np.zeros(len(images), np.int64))

    def placement(self) -> dict:
        """Which nodes ran on which provider, per graph: {graph: {provider: {op type: count}}}, from one profiled
        run of a black image (a debugging aid: TensorRT refuses some ops, which then run on CUDA or the CPU)."""
        import tempfile

        import onnxruntime as ort

        from igcam_engine.providers import node_placement

        image = np.zeros((1, *self.input_shape), np.float32)
        report = {}
        with tempfile.TemporaryDirectory() as directory:
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = f"{directory}/igcam"
            sessions = {g: ort.InferenceSession(graph_path(self.manifest, g), options, providers=self.providers)
                        for g in ("forward", "gradient")}
            feeds = {"images": image, "baseline": image, "alphas": np.array([0.5, 1.0], np.float32)}
            activations = sessions["forward"].run(["activations"], feeds)[0]
            sessions["gradient"].run(None, {"activations": activations, "targets": np.zeros(2, np.int64)})
            for graph, session in sessions.items():
                report[graph] = node_placement(session.end_profiling())
        return report

    def explain(self, images, targets, *, method="igcam", variant="official", steps=50, rule=None, baseline="black",
                subtract_baseline=None, batch_size=None, normalize=False, tolerance=0.01, max_steps=129) -> np.ndarray:
        """Maps float32 [B, H, W] (or [B, T, H, W] for targets of shape [B, T]) for images [B, C, H, W] or [C, H, W]
        in model input space. See README "The method" for the definition of each option; steps="auto" refines
        until the maps change by less than `tolerance` (see explain_adaptive, which also reports the passes)."""
        if steps == "auto":
            if method != "igcam":
                raise UserError("steps='auto' refines the IG-CAM path integral; method must be 'igcam'")
            return self.explain_adaptive(images, targets, tolerance=tolerance, max_steps=max_steps, rule=rule,
                                         variant=variant, baseline=baseline, subtract_baseline=subtract_baseline,
                                         batch_size=batch_size, normalize=normalize).maps
        if method not in METHODS:
            raise UserError(f"unknown method '{method}'; accepted: {', '.join(METHODS)}")
        if method == "gradcam":
            alphas, weights, subtract = np.ones(1), np.ones(1), False
        else:
            default_rule, subtract = self._variant(variant, subtract_baseline)
            alphas, weights = quadrature(rule or default_rule, steps)
        call = self._call(images, targets, baseline, subtract, batch_size)
        maps = self._stages.finish(self._integrate(call, alphas, weights), self.input_shape[1:])
        return call.shape_result(normalize_maps(maps) if normalize else maps)

    def explain_adaptive(self, images, targets, *, tolerance=0.01, max_steps=129, rule=None, variant="official",
                         baseline="black", subtract_baseline=None, batch_size=None, normalize=False) -> "Adaptive":
        """IG-CAM with as many passes as the maps need: refines a trapezoid grid by halving its spacing (2, 3, 5, 9,
        ... nodes) or a midpoint grid by thirds (1, 3, 9, 27, ...), each level reusing every pass already made,
        until no map changes by more than `tolerance` (max |change| over the map's range) or the next level would
        exceed `max_steps` passes. The variant decides baseline subtraction; its rule is replaced by `rule`
        ("trapezoid", the default, or "midpoint")."""
        rule = rule or "trapezoid"
        if rule not in REFINEMENTS:
            raise UserError(f"steps='auto' refines {' or '.join(REFINEMENTS)} grids, not '{rule}'")
        if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
            raise UserError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 2:
            raise UserError(f"max_steps must be an integer >= 2, got {max_steps!r}")
        _, subtract = self._variant(variant, subtract_baseline)
        call = self._call(images, targets, baseline, subtract, batch_size)
        levels = REFINEMENTS[rule]()
        alphas, weights, _ = next(levels)
        coarse = self._stages.to_host(self._integrate(call, alphas, weights))
        passes, change = len(alphas), None
        for alphas, weights, keep in levels:
            if passes + len(alphas) > max_steps:
                break
            refined = keep * coarse + self._stages.to_host(self._integrate(call, alphas, weights))
            change = _largest_change(coarse, refined)
            coarse, passes = refined, passes + len(alphas)
            if change <= tolerance:
                break
        maps = upsample(coarse, self.input_shape[1:])
        maps = call.shape_result(normalize_maps(maps) if normalize else maps)
        return Adaptive(maps, passes, change is not None and change <= tolerance, change)

    def _variant(self, variant, subtract_baseline):
        if variant not in VARIANTS:
            raise UserError(f"unknown variant '{variant}'; accepted: {', '.join(VARIANTS)}")
        rule, subtract = VARIANTS[variant]
        return rule, subtract if subtract_baseline is None else bool(subtract_baseline)

    def _call(self, images, targets, baseline, subtract, batch_size) -> "_Call":
        """Checks one call's inputs and puts them where the stages work."""
        images = self._check_images(images)
        targets, multi = self._check_targets(targets, len(images))
        base = self._check_baseline(baseline, len(images))
        rows = DEFAULT_ROWS if batch_size is None else batch_size
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        base_activations = self._base_activations(baseline, base) if subtract else None
        return _Call(self._stages.put(images), len(images), targets, multi, self._stages.put(base),
                     base_activations, int(rows))

    def _integrate(self, call: "_Call", alphas, weights):
        """sum_i weights[i] * S(alphas[i]) at layer resolution, [B, T, h, w], where the stages keep data."""
        _, h, w = self.manifest["target_layer"]["shape"]
        stages = self._stages
        coarse = stages.maps(call.count, call.targets.shape[1], (h, w))
        placed_weights = stages.put(np.asarray(weights, np.float32))
        for first, last, start, stop in _chunks(call.count, len(alphas), call.rows):
            activations = stages.forward(call.images, first, last, call.base, alphas[start:stop])
            for t in range(call.targets.shape[1]):
                grads = stages.gradient(activations, np.repeat(call.targets[first:last, t], stop - start))
                stages.accumulate(coarse, first, last, t, activations, grads, call.base_activations, placed_weights,
                                  start, stop)
        return coarse

    def _base_activations(self, baseline, base):
        """A(baseline), computed once per Explainer for the named baselines (kept where the stages keep data)."""
        def compute():
            on_device = self._stages.put(base)
            return self._stages.forward(on_device, 0, len(base), on_device, np.zeros(1), keep=True)

        if not isinstance(baseline, str):
            return compute()
        with self._lock:
            if baseline not in self._baseline_activations:
                self._baseline_activations[baseline] = compute()
            return self._baseline_activations[baseline]

    def _check_images(self, images) -> np.ndarray:
        array = np.asarray(images)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != self.input_shape:
            raise UserError(
                f"images must be [B, {', '.join(map(str, self.input_shape))}] or "
                f"[{', '.join(map(str, self.input_shape))}] in model input space, got shape {list(np.shape(images))}"
            )
        if array.dtype.kind != "f":
            raise UserError(f"images must be floating point (model input space), got {array.dtype}")
        if not np.isfinite(array).all():
            raise UserError("images contain NaN or infinite values")
        return np.ascontiguousarray(array, dtype=np.float32)

    def _check_targets(self, targets, batch: int):
        array = np.asarray(targets)
        if array.dtype.kind not in "iu" or array.ndim > 2:
            raise UserError(f"targets must be an int, one int per image or [B, T] ints, got {targets!r}")
        multi = array.ndim == 2
        if array.ndim == 0:
            array = np.full((batch, 1), array)
        elif len(array) != batch:
            raise UserError(f"got targets for {len(array)} images, but {batch} images")
        array = array.reshape(batch, -1)
        if array.size and (array.min() < 0 or array.max() >= self.num_classes):
            raise UserError(f"targets must be class indices in [0, {self.num_classes - 1}], got {array.min()}..{array.max()}")
        return np.ascontiguousarray(array, dtype=np.int64), multi

    def _check_baseline(self, baseline, batch: int) -> np.ndarray:
        shape = self.input_shape
        if isinstance(baseline, str):
            if baseline == "black":
                value = np.array(black_input(self.preprocess, shape[0]), np.float32)
                return np.broadcast_to(value[None, :, None, None], (1, *shape)).copy()
            if baseline == "zeros":
                return np.zeros((1, *shape), np.float32)
            raise UserError(f"unknown baseline '{baseline}'; accepted: 'black', 'zeros' or an array")
        array = np.asarray(baseline, dtype=np.float32)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != shape or len(array) not in (1, batch):
            raise UserError(f"a baseline array must be [{', '.join(map(str, shape))}], [1, ...] or [B, ...]; got {list(array.shape)}")
        return np.ascontiguousarray(array)


@dataclass
class _Call:
    """One explain call's checked inputs, placed where the stages work."""

    images: object
    count: int
    targets: np.ndarray  # [B, T]
    multi: bool  # targets were given as [B, T]
    base: object
    base_activations: object
    rows: int

    def shape_result(self, maps: np.ndarray) -> np.ndarray:
        return maps if self.multi else maps[:, 0]


@dataclass
class Adaptive:
    """Result of explain_adaptive: the maps, the interpolation passes made, and whether the tolerance was met
    (`change`: the last refinement's largest change, relative to each map's range)."""

    maps: np.ndarray
    passes: int
    converged: bool
    change: float | None


def _trapezoid_levels():
    """(new nodes, their weights, factor for the previous estimate): 2 nodes, then halving the spacing."""
    yield np.array([0.0, 1.0]), np.array([0.5, 0.5]), 0.0
    intervals = 1
    while True:
        yield (np.arange(intervals) + 0.5) / intervals, np.full(intervals, 0.5 / intervals), 0.5
        intervals *= 2


def _midpoint_levels():
    """One midpoint, then each cell split in three: the old midpoints stay nodes."""
    yield np.array([0.5]), np.array([1.0]), 0.0
    cells = 3
    while True:
        new = np.array([j for j in range(cells) if j % 3 != 1])
        yield (new + 0.5) / cells, np.full(len(new), 1.0 / cells), 1 / 3
        cells *= 3


REFINEMENTS = {"trapezoid": _trapezoid_levels, "midpoint": _midpoint_levels}


def _largest_change(old: np.ndarray, new: np.ndarray) -> float:
    span = new.max(axis=(-2, -1)) - new.min(axis=(-2, -1))
    change = np.abs(new - old).max(axis=(-2, -1))
    return float(np.max(np.where(span > 0, change / np.where(span > 0, span, 1), 0)))


def _chunks(images: int, steps: int, rows: int):
    """(first image, last image, first step, last step) blocks of at most `rows` interpolated images."""
    if rows >= steps:
        per_call = rows // steps
        for first in range(0, images, per_call):
            yield first, min(first + per_call, images), 0, steps
    else:
        for image in range(images):
            for start in range(0, steps, rows):
                yield image, image + 1, start, min(start + rows, steps)
