"""The runtime: IG-CAM and Grad-CAM maps from a bundle with ONNX Runtime, no torch.

One path for a batch of images: interpolate (inside forward.onnx) -> backbone (forward.onnx) -> gradient of the
tail (gradient.onnx) -> reduce (maps.accumulate) -> upsample (maps.upsample).
"""
from __future__ import annotations

import threading

import numpy as np

from igcam_engine.bundle import graph_path, load_manifest
from igcam_engine.errors import UserError
from igcam_engine.maps import accumulate, normalize as normalize_maps, upsample
from igcam_engine.preprocess import black_input
from igcam_engine.quadrature import quadrature

# variant -> (quadrature rule, subtract the baseline's activations)
VARIANTS = {"official": ("left", False), "paper": ("right", True)}
METHODS = ("igcam", "gradcam")
DEFAULT_ROWS = 64  # interpolated images per ONNX Runtime call when batch_size is not given


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'igcam-engine[cpu]' (or [gpu])") from None
    return onnxruntime


def resolve_providers(providers):
    """'cpu' or None -> the CPU provider; otherwise a list of ONNX Runtime provider names or (name, options)."""
    ort = _onnxruntime()
    if providers is None or providers == "cpu":
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    available = ort.get_available_providers()
    for provider in providers:
        name = provider[0] if isinstance(provider, tuple) else provider
        if name not in available:
            raise UserError(f"execution provider '{name}' is not available; this onnxruntime has: {', '.join(available)}")
    return list(providers)


class Explainer:
    """Explains a bundle's model. Sessions are created once; `explain` may be called from several threads."""

    def __init__(self, bundle, providers=None, verify: bool = True):
        self.manifest = load_manifest(bundle, verify=verify)
        ort = _onnxruntime()
        chosen = resolve_providers(providers)
        self._forward = ort.InferenceSession(graph_path(self.manifest, "forward"), providers=chosen)
        self._gradient = ort.InferenceSession(graph_path(self.manifest, "gradient"), providers=chosen)
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
        images = self._check_images(images)
        activations = self._activations(images, images, np.zeros(1, np.float32))
        return self._gradient.run(["logits"], {"activations": activations, "targets": np.zeros(len(images), np.int64)})[0]

    def explain(self, images, targets, *, method="igcam", variant="official", steps=50, rule=None, baseline="black",
                subtract_baseline=None, batch_size=None, normalize=False) -> np.ndarray:
        """Maps float32 [B, H, W] (or [B, T, H, W] for targets of shape [B, T]) for images [B, C, H, W] or [C, H, W]
        in model input space. See README "The method" for the definition of each option."""
        images = self._check_images(images)
        targets, multi = self._check_targets(targets, len(images))
        alphas, weights, subtract = self._schedule(method, variant, steps, rule, subtract_baseline)
        base = self._check_baseline(baseline, len(images))
        base_activations = self._base_activations(baseline, base) if subtract else None
        rows = DEFAULT_ROWS if batch_size is None else batch_size
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")

        k, h, w = self.manifest["target_layer"]["shape"]
        coarse = np.zeros((len(images), targets.shape[1], h, w), np.float32)
        for first, last, start, stop in _chunks(len(images), len(alphas), rows):
            chunk_base = base if len(base) == 1 else base[first:last]
            activations = self._activations(images[first:last], chunk_base, alphas[start:stop])
            chunk_base_activations = None
            if base_activations is not None:
                chunk_base_activations = base_activations if len(base_activations) == 1 else base_activations[first:last]
            for t in range(targets.shape[1]):
                row_targets = np.repeat(targets[first:last, t], stop - start)
                grads = self._gradient.run(["activation_grad"], {"activations": activations, "targets": row_targets})[0]
                accumulate(coarse[first:last, t], activations, grads, chunk_base_activations, weights[start:stop])
        maps = upsample(coarse, self.input_shape[1:])
        if normalize:
            maps = normalize_maps(maps)
        return maps if multi else maps[:, 0]

    # ------------------------------------------------------------ stages and checks

    def _activations(self, images, base, alphas) -> np.ndarray:
        feeds = {"images": images, "baseline": base, "alphas": alphas.astype(np.float32)}
        return self._forward.run(["activations"], feeds)[0]

    def _base_activations(self, baseline, base) -> np.ndarray:
        """A(baseline), computed once per Explainer for the named baselines."""
        if isinstance(baseline, str):
            with self._lock:
                if baseline not in self._baseline_activations:
                    self._baseline_activations[baseline] = self._activations(base, base, np.zeros(1))
                return self._baseline_activations[baseline]
        return self._activations(base, base, np.zeros(1))

    def _schedule(self, method, variant, steps, rule, subtract_baseline):
        if method not in METHODS:
            raise UserError(f"unknown method '{method}'; accepted: {', '.join(METHODS)}")
        if method == "gradcam":
            return np.ones(1), np.ones(1), False
        if variant not in VARIANTS:
            raise UserError(f"unknown variant '{variant}'; accepted: {', '.join(VARIANTS)}")
        default_rule, default_subtract = VARIANTS[variant]
        alphas, weights = quadrature(rule or default_rule, steps)
        return alphas, weights, default_subtract if subtract_baseline is None else bool(subtract_baseline)

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
