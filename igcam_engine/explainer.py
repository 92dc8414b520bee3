"""The runtime: IG-CAM and the CAM family's maps from a bundle with ONNX Runtime, no torch.

One path for a batch of images: interpolate (inside forward.onnx) -> backbone (forward.onnx) -> gradient of the
tail (gradient.onnx) -> reduce -> upsample. The stages (igcam_engine.stages) run on the host (host.HostStages:
numpy) or, with the CUDA or TensorRT provider, on the device (device.DeviceStages: IOBinding and the fused
kernel, no host copies). Methods differ only in the reduction (igcam_engine.methods); the gradient-free ones
replace the gradient by passes of their own (masked images for Score-CAM, ablated channels for Ablation-CAM).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from igcam_engine.bundle import graph_path, load_manifest
from igcam_engine.errors import UserError
from igcam_engine.maps import normalize as normalize_maps
from igcam_engine.maps import upsample
from igcam_engine.methods import (
    SCORECAM_EPS,
    ablation_value,
    ablation_weights,
    channel_mass,
    check_channels,
    combine,
    resolve_method,
    scorecam_weights,
)
from igcam_engine.preprocess import black_input
from igcam_engine.providers import CUDA, TENSORRT, first_provider, on_gpu, resolve_providers
from igcam_engine.quadrature import quadrature

# variant -> (quadrature rule, subtract the baseline's activations)
VARIANTS = {"official": ("left", False), "paper": ("right", True)}
GRAPHS = ("forward", "gradient")
OPENVINO = "openvino"  # the providers value that selects OpenVINO's runtime instead of ONNX Runtime's
DEFAULT_ROWS = 64  # interpolated images per ONNX Runtime call when batch_size is not given
# Bytes one ONNX Runtime call may use: rows per call are capped so that a batch_size of any size stays within it.
DEFAULT_MEMORY_BUDGET = 2 << 30
# A row's memory, in floats, as multiples of its image and of its activation at the target (the backbone's own
# intermediate tensors peak at a few tens of images' worth in common CNNs).
IMAGE_FACTOR, ACTIVATION_FACTOR = 32, 4


class Explainer:
    """Explains a bundle's model. Sessions are created once; `explain` may be called from several threads."""

    def __init__(self, bundle, providers=None, *, precision=None, fp16: bool = False, engine_cache=None,
                 workspace_bytes=None, device_id: int = 0, tf32: bool = False, verify: bool = True,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET):
        """providers: None (best available: TensorRT, CUDA, CPU), "cpu", "cuda", "tensorrt", ONNX Runtime's own
        list of names / (name, options) tuples, or "openvino" (OpenVINO's runtime on the CPU, the openvino extra).
        precision: the OpenVINO backend's, "f32" (the default) or "bf16" (README "Reduced precision on CPU");
        ONNX Runtime computes in float32. fp16, engine_cache (directory) and workspace_bytes configure TensorRT;
        tf32 lets the CUDA provider use TF32 tensor cores (faster, maps within about 1e-2 instead of float32
        precision; see README "GPU"). memory_budget (bytes) caps the rows of one ONNX Runtime call.
        Afterwards `precision` says what the graphs compute in ("f32", "bf16", "tf32" or TensorRT's "fp16") and
        `providers` is ONNX Runtime's provider list (empty with OpenVINO)."""
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) or memory_budget < 1:
            raise UserError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}")
        precision = check_backend(providers, precision, fp16, tf32)
        self.manifest = load_manifest(bundle, verify=verify)
        if providers == OPENVINO:
            from igcam_engine.openvino_backend import sessions

            self.providers = []
            self._sessions = sessions({graph: graph_path(self.manifest, graph) for graph in GRAPHS}, precision,
                                      self.manifest["root"])
            self.precision = self._sessions["forward"].precision
        else:
            self.providers = resolve_providers(providers, fp16=fp16, engine_cache=engine_cache,
                                               workspace_bytes=workspace_bytes, device_id=device_id, tf32=tf32)
            self._sessions = {graph: _session(self.manifest, graph, self.providers) for graph in GRAPHS}
            first = first_provider(self.providers)
            self.precision = "fp16" if fp16 and first == TENSORRT else "tf32" if tf32 and first == CUDA else "f32"
        _check_graphs(self.manifest, self._sessions)
        c, h, w = self.input_shape
        k, ah, aw = self.manifest["target_layer"]["shape"]
        self._max_rows = max(1, int(memory_budget) // (4 * (IMAGE_FACTOR * c * h * w + ACTIVATION_FACTOR * k * ah * aw)))
        if self.providers and on_gpu(self.providers):
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
        if isinstance(target, bool) or not isinstance(target, (int, np.integer)) or not 0 <= target < self.num_classes:
            raise UserError(f"class must be an integer in [0, {self.num_classes - 1}], got {target!r}")
        labels = self.manifest.get("labels")
        return labels[target] if labels else str(target)

    def predict(self, images) -> np.ndarray:
        """Class scores [B, classes] of images in model input space: the logits (README "The method")."""
        images = self._check_images(images)
        scores = []
        for first in range(0, len(images), self._max_rows):
            chunk = self._stages.put(images[first:first + self._max_rows])
            activations = self._stages.forward(chunk, 0, len(chunk), chunk, np.zeros(1))
            scores.append(self._stages.logits(activations, np.zeros(len(chunk), np.int64)))
        return _finite(np.concatenate(scores), "class scores")

    def placement(self) -> dict:
        """Which nodes ran on which provider, per graph: {graph: {provider: {op type: count}}}, from one profiled
        run of a black image (a debugging aid: TensorRT refuses some ops, which then run on CUDA or the CPU).
        The OpenVINO backend reports its compiled layers by the precision they run in instead."""
        if not self.providers:
            return {graph: session.placement() for graph, session in self._sessions.items()}
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
                        for g in GRAPHS}
            feeds = {"images": image, "baseline": image, "alphas": np.array([0.5, 1.0], np.float32)}
            activations = sessions["forward"].run(["activations"], feeds)[0]
            sessions["gradient"].run(None, {"activations": activations, "targets": np.zeros(2, np.int64)})
            for graph, session in sessions.items():
                report[graph] = node_placement(session.end_profiling())
        return report

    def explain(self, images, targets, *, method="igcam", integrate=None, variant="official", steps=50, rule=None,
                baseline="black", subtract_baseline=None, batch_size=None, normalize=False, tolerance=0.01,
                max_steps=129, channels=None) -> np.ndarray:
        """Maps float32 [B, H, W] (or [B, T, H, W] for targets of shape [B, T]) for images [B, C, H, W] or [C, H, W]
        in model input space. See README "The method" and "Methods" for the definition of each option;
        steps="auto" refines until the maps change by less than `tolerance` (see explain_adaptive, which also
        reports the passes)."""
        if steps == "auto":
            return self.explain_adaptive(images, targets, method=method, integrate=integrate, tolerance=tolerance,
                                         max_steps=max_steps, rule=rule, variant=variant, baseline=baseline,
                                         subtract_baseline=subtract_baseline, batch_size=batch_size,
                                         normalize=normalize).maps
        row, alphas, weights, subtract = path_nodes(method, variant, rule, steps, subtract_baseline, integrate)
        normalize = _flag(normalize, "normalize")
        channels = check_channels(channels, row, self.manifest["target_layer"]["shape"][0])
        call = self._call(images, targets, baseline, subtract, batch_size)
        if row.needs == "gradients":
            maps = self._stages.finish(self._integrate(call, alphas, weights, row), self.input_shape[1:])
        else:
            maps = upsample(self._without_gradients(call, row, channels), self.input_shape[1:])
        return call.shape_result(normalize_maps(_finite(maps, "maps")) if normalize else _finite(maps, "maps"))

    def explain_adaptive(self, images, targets, *, tolerance=0.01, max_steps=129, rule=None, variant="official",
                         baseline="black", subtract_baseline=None, batch_size=None, normalize=False,
                         method="igcam", integrate=None, steps="auto") -> "Adaptive":
        """An integrated method with as many passes as the maps need: refines a trapezoid grid by halving its
        spacing (2, 3, 5, 9, ... nodes) or a midpoint grid by thirds (1, 3, 9, 27, ...), each level reusing every
        pass already made, until no map changes by more than `tolerance` (max |change| over the map's range) or the
        next level would exceed `max_steps` passes. The variant decides baseline subtraction; its rule is replaced
        by `rule` ("trapezoid", the default, or "midpoint"). Takes explain's arguments: `method` must be "igcam" or
        a gradient method with integrate=True, and `steps` "auto"."""
        if steps != "auto":
            raise UserError(f"explain_adaptive chooses the steps itself: steps must be 'auto', got {steps!r}")
        row, rule, subtract = adaptive_options(method, variant, rule, tolerance, max_steps, subtract_baseline,
                                               integrate)
        normalize = _flag(normalize, "normalize")
        call = self._call(images, targets, baseline, subtract, batch_size)
        levels = REFINEMENTS[rule]()
        alphas, weights, _ = next(levels)
        coarse = self._stages.to_host(self._integrate(call, alphas, weights, row))
        passes, change = len(alphas), None
        for alphas, weights, keep in levels:
            if passes + len(alphas) > max_steps:
                break
            refined = keep * coarse + self._stages.to_host(self._integrate(call, alphas, weights, row))
            change = _largest_change(coarse, refined)
            coarse, passes = refined, passes + len(alphas)
            if change <= tolerance:
                break
        maps = _finite(upsample(coarse, self.input_shape[1:]), "maps")
        maps = call.shape_result(normalize_maps(maps) if normalize else maps)
        return Adaptive(maps, passes, change is not None and change <= tolerance, change)

    def _call(self, images, targets, baseline, subtract, batch_size) -> "_Call":
        """Checks one call's inputs and puts them where the stages work."""
        images = self._check_images(images)
        targets, multi = self._check_targets(targets, len(images))
        base = self._check_baseline(baseline, len(images))
        rows = DEFAULT_ROWS if batch_size is None else batch_size
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        base_activations = self._base_activations(baseline, base) if subtract else None
        return _Call(self._stages.put(images), images, len(images), targets, multi, self._stages.put(base),
                     base_activations, min(int(rows), self._max_rows))

    def _integrate(self, call: "_Call", alphas, weights, method):
        """sum_i weights[i] * ReLU(method's reduction at alphas[i]) at layer resolution, [B, T, h, w], where the
        stages keep data."""
        _, h, w = self.manifest["target_layer"]["shape"]
        stages = self._stages
        coarse = stages.maps(call.count, call.targets.shape[1], (h, w))
        placed_weights = stages.put(np.asarray(weights, np.float32))
        for first, last, start, stop in _chunks(call.count, len(alphas), call.rows):
            activations = stages.forward(call.images, first, last, call.base, alphas[start:stop])
            for t in range(call.targets.shape[1]):
                grads = stages.gradient(activations, np.repeat(call.targets[first:last, t], stop - start))
                stages.accumulate(coarse, first, last, t, activations, grads, call.base_activations, placed_weights,
                                  start, stop, method)
        return coarse

    def _without_gradients(self, call: "_Call", method, channels) -> np.ndarray:
        """Maps [B, T, h, w] on the host of a method that needs no gradient: it reduces each image's activations
        (EigenCAM), or weighs its channels by the target's scores when each channel masks the image (Score-CAM) or
        is ablated (Ablation-CAM), the chosen `channels` (or all) in chunks of `call.rows` rows per pass."""
        k, h, w = self.manifest["target_layer"]["shape"]
        maps = np.zeros((call.count, call.targets.shape[1], h, w), np.float32)
        for first in range(0, call.count, call.rows):
            last = min(first + call.rows, call.count)
            rows = self._stages.forward(call.images, first, last, call.images, np.ones(1))
            activations = self._stages.to_host(rows).astype(np.float32)
            for n, a in zip(range(first, last), activations):
                if method.needs == "activations":
                    maps[n] = np.maximum(method.reduce(a.reshape(1, k, h * w), None), 0).reshape(1, h, w)
                    continue
                kept = np.arange(k) if channels is None else np.argsort(-channel_mass(a), kind="stable")[:channels]
                targets = call.targets[n]
                if method.needs == "masked images":
                    weights = scorecam_weights(self._masked_scores(call, call.host_images[n], a, kept)[:, targets])
                else:
                    original = self._stages.logits(self._stages.put(a[None]), np.zeros(1, np.int64))[0, targets]
                    weights = ablation_weights(original, self._ablated_scores(call, a, kept)[:, targets])
                maps[n] = combine(weights, a[kept])
        return maps

    def _masked_scores(self, call: "_Call", image: np.ndarray, activations: np.ndarray, kept) -> np.ndarray:
        """Class scores [len(kept), classes] of the image multiplied by each kept channel, upsampled (corners
        aligned) and min-max scaled to [0, 1]: Score-CAM's masks."""
        size, scores = self.input_shape[1:], []
        for start in range(0, len(kept), call.rows):
            masks = upsample(activations[kept[start:start + call.rows]], size, align_corners=True)
            low, high = masks.min(axis=(1, 2), keepdims=True), masks.max(axis=(1, 2), keepdims=True)
            masks = (masks - low) / (high - low + SCORECAM_EPS)
            batch = self._stages.put(np.ascontiguousarray(image[None] * masks[:, None], dtype=np.float32))
            rows = self._stages.forward(batch, 0, len(masks), batch, np.ones(1))
            scores.append(self._stages.logits(rows, np.zeros(len(masks), np.int64)))
        return np.concatenate(scores)

    def _ablated_scores(self, call: "_Call", activations: np.ndarray, kept) -> np.ndarray:
        """Class scores [len(kept), classes] from the layers after the target, each kept channel ablated in turn."""
        value, scores = ablation_value(activations), []
        for start in range(0, len(kept), call.rows):
            chunk = kept[start:start + call.rows]
            batch = np.repeat(activations[None], len(chunk), axis=0)
            batch[np.arange(len(chunk)), chunk] = value
            scores.append(self._stages.logits(self._stages.put(batch), np.zeros(len(chunk), np.int64)))
        return np.concatenate(scores)

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
        try:
            array = np.asarray(images)
        except ValueError:  # a ragged nested list
            raise UserError("images must be one array [B, C, H, W] or [C, H, W], not images of different sizes") from None
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != self.input_shape:
            raise UserError(
                f"images must be [B, {', '.join(map(str, self.input_shape))}] or "
                f"[{', '.join(map(str, self.input_shape))}] in model input space, got shape {list(np.shape(images))}"
            )
        if len(array) == 0:
            raise UserError("no images given: the batch is empty")
        if array.dtype.kind != "f":
            raise UserError(f"images must be floating point (model input space), got {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            raise UserError("images contain NaN or infinite values (in float32)")
        return array

    def _check_targets(self, targets, batch: int):
        try:
            array = np.asarray(targets)
        except ValueError:  # a ragged nested list
            raise UserError("targets of shape [B, T] need the same number of classes T for every image") from None
        if array.dtype.kind not in "iu" or array.ndim > 2:
            raise UserError(f"targets must be an int, one int per image or [B, T] ints, got {targets!r}")
        multi = array.ndim == 2
        if array.ndim == 0:
            array = np.full((batch, 1), array)
        elif len(array) != batch:
            raise UserError(f"got targets for {len(array)} images, but {batch} images")
        array = array.reshape(batch, -1)
        if array.size == 0:
            raise UserError("no targets given: each image needs at least one class")
        wrong = array[(array < 0) | (array >= self.num_classes)]
        if wrong.size:
            raise UserError(f"targets must be class indices in [0, {self.num_classes - 1}], got {int(wrong[0])}")
        return np.ascontiguousarray(array, dtype=np.int64), multi

    def _check_baseline(self, baseline, batch: int) -> np.ndarray:
        shape = self.input_shape
        if isinstance(baseline, str):
            if baseline == "black":
                value = np.array(black_input(self.preprocess, shape[0]), np.float32)
                return np.broadcast_to(value[:, None, None], (1, *shape)).copy()
            if baseline == "zeros":
                return np.zeros((1, *shape), np.float32)
            raise UserError(f"unknown baseline {baseline!r}; accepted: 'black', 'zeros' or an array")
        try:
            array = np.asarray(baseline, dtype=np.float32)
        except (TypeError, ValueError):
            raise UserError(f"a baseline must be 'black', 'zeros' or an array of numbers, got {type(baseline).__name__}"
                            ) from None
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != shape or len(array) not in (1, batch):
            raise UserError(f"a baseline array must be [{', '.join(map(str, shape))}], [1, ...] or [B, ...]; got {list(array.shape)}")
        if not np.isfinite(array).all():
            raise UserError("the baseline contains NaN or infinite values (in float32)")
        return np.ascontiguousarray(array)


def check_backend(providers, precision=None, fp16=False, tf32=False) -> str:
    """The precision asked of the backend `providers` selects ("f32" for None), checked with its GPU options
    before anything is loaded (the applications call it first, so that a bad choice is one error, not one per
    replica)."""
    if providers == OPENVINO:
        from igcam_engine.openvino_backend import check_precision

        if fp16 or tf32:
            raise UserError("fp16 and tf32 are TensorRT's and CUDA's options; the OpenVINO backend takes a precision")
        return check_precision(precision)
    if precision not in (None, "f32"):
        raise UserError(f"precision {precision!r} is the OpenVINO backend's (providers 'openvino'); ONNX Runtime "
                        "computes in f32 (TensorRT: fp16)")
    return "f32"


def class_probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of class scores (`Explainer.predict`'s logits), in float64."""
    scores = np.asarray(scores, np.float64)
    exponentials = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def path_nodes(method="igcam", variant="official", rule=None, steps=50, subtract_baseline=None, integrate=None):
    """(the method's row, alphas, weights, subtract the baseline's activations) for explain's options, each
    checked; a method that is not integrated makes one pass at alpha 1."""
    row, integrated = resolve_method(method, integrate)
    if not integrated:
        return row, np.ones(1), np.ones(1), False
    default_rule, subtract = _variant(variant, subtract_baseline)
    alphas, weights = quadrature(default_rule if rule is None else rule, steps)
    return row, alphas, weights, subtract


def adaptive_options(method="igcam", variant="official", rule=None, tolerance=0.01, max_steps=129,
                     subtract_baseline=None, integrate=None):
    """(the method's row, the refined rule, subtract the baseline's activations) for steps="auto", each checked."""
    row, integrated = resolve_method(method, integrate)
    if not integrated:
        raise UserError(f"steps='auto' refines a path integral: method must be 'igcam' or a gradient method with "
                        f"integrate=True, got {method!r}" + ("" if integrate is None else f", integrate={integrate!r}"))
    rule = "trapezoid" if rule is None else rule
    if rule not in REFINEMENTS:
        raise UserError(f"steps='auto' refines {' or '.join(REFINEMENTS)} grids, not {rule!r}")
    if isinstance(tolerance, bool) or not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise UserError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 2:
        raise UserError(f"max_steps must be an integer >= 2, got {max_steps!r}")
    return row, rule, _variant(variant, subtract_baseline)[1]


def _variant(variant, subtract_baseline):
    if variant not in VARIANTS:
        raise UserError(f"unknown variant {variant!r}; accepted: {', '.join(VARIANTS)}")
    rule, subtract = VARIANTS[variant]
    return rule, subtract if subtract_baseline is None else _flag(subtract_baseline, "subtract_baseline")


def _flag(value, name: str) -> bool:
    """A yes/no option: a bool, or 0 or 1 (a string such as "false" would otherwise read as true)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise UserError(f"{name} must be True or False (or 1/0), got {value!r}")


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    """The engine's results, which must be finite: inputs far outside the model's range overflow float32."""
    if not np.isfinite(values).all():
        raise UserError(f"the model's {what} overflowed float32 (NaN or infinite) for these inputs: images and "
                        "baselines must be in model input space (after the bundle's preprocessing)")
    return values


def _session(manifest: dict, graph: str, providers):
    """An ONNX Runtime session of a bundle graph; a graph ONNX Runtime refuses is a bundle error, in one line."""
    import onnxruntime as ort  # present: resolve_providers said so

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the one-line error below says what went wrong
    try:
        return ort.InferenceSession(graph_path(manifest, graph), options, providers=providers)
    except Exception as e:  # onnxruntime's errors have no common base class
        raise UserError(f"bundle '{manifest['root']}': {graph}.onnx cannot be loaded by ONNX Runtime: "
                        f"{str(e).splitlines()[0][:300]}") from None


def _check_graphs(manifest: dict, sessions: dict) -> None:
    """The graphs' own inputs and outputs must agree with the manifest's shapes and classes."""
    def dims(info):
        return [d if isinstance(d, int) else None for d in info.shape]

    forward, gradient = sessions["forward"], sessions["gradient"]
    found = {
        "input.shape": ({i.name: dims(i) for i in forward.get_inputs()}.get("images", [None] * 4)[1:],
                        manifest["input"]["shape"]),
        "target_layer.shape": ({o.name: dims(o) for o in forward.get_outputs()}.get("activations", [None] * 4)[1:],
                               manifest["target_layer"]["shape"]),
        "num_classes": ({o.name: dims(o) for o in gradient.get_outputs()}.get("logits", [None, None])[1:],
                        [manifest["num_classes"]]),
    }
    for field, (graph, claimed) in found.items():
        if graph != claimed:
            raise UserError(f"bundle '{manifest['root']}': manifest field '{field}' says {claimed}, the graphs "
                            f"have {graph}")


@dataclass
class _Call:
    """One explain call's checked inputs, placed where the stages work."""

    images: object
    host_images: np.ndarray
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
