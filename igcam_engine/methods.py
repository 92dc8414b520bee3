"""The CAM methods, one row each: what a method needs from the engine and how it reduces the target layer's
activations A [K, h, w] (and their gradients dA) to a map at layer resolution. README "Methods" gives the formulas;
they are pytorch-grad-cam 1.5's (its eps constants included), so that maps compare equal.

Gradient methods reduce (A, dA) of one pass; with `integrate` the same reduction is applied at every node of the
IG-CAM path and the rectified step maps are summed with the quadrature weights ("igcam" is integrated Grad-CAM).
The others need passes of their own: EigenCAM one forward pass, Score-CAM one classifier pass per masked image,
Ablation-CAM one pass of the layers after the target per ablated channel. Every reduction here is numpy on the host;
each gradient method's `kernel` is its form in the fused CUDA kernel (kernels/igcam.cu, FORM_*), which computes the
same reduction on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from igcam_engine.errors import UserError

GRADCAM_PLUSPLUS_EPS = 1e-6
XGRADCAM_EPS = 1e-7
SCORECAM_EPS = 1e-8  # in each mask's min-max scaling
ABLATION_OFFSET = 1e7  # an ablated channel takes min(A) - this, or 0 where min(A) is 0


def _gradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """a, g: [R, K, P] -> [R, P]: channel weights are the spatial means of the gradient."""
    return np.matmul(g.mean(axis=2, dtype=np.float32)[:, None, :], a)[:, 0]


def _gradcam_plusplus(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Grad-CAM++'s closed-form alpha from the second and third powers of the gradient (exponential score)."""
    g2 = g * g
    alpha = g2 / (2 * g2 + a.sum(axis=2, keepdims=True) * (g2 * g) + GRADCAM_PLUSPLUS_EPS)
    weights = (np.maximum(g, 0) * np.where(g != 0, alpha, 0)).sum(axis=2)
    return np.matmul(weights[:, None, :], a)[:, 0]


def _xgradcam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """XGrad-CAM: gradients weighted by the activations, normalised by each channel's activation sum."""
    weights = (g * a).sum(axis=2) / (a.sum(axis=2) + XGRADCAM_EPS)
    return np.matmul(weights[:, None, :], a)[:, 0]


def _hirescam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    return (g * a).sum(axis=1)


def _layercam(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    return (np.maximum(g, 0) * a).sum(axis=1)


def _eigencam(a: np.ndarray, g=None) -> np.ndarray:
    """The first principal component of the channel vectors: the centred [P, K] matrix projected on its first right
    singular vector. Its sign is SVD's arbitrary one; it is chosen so that the larger extreme is positive."""
    maps = np.empty((a.shape[0], a.shape[2]), np.float32)
    for r, channels in enumerate(np.nan_to_num(a.astype(np.float64))):
        centred = channels.T - channels.T.mean(axis=0)
        projection = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
        maps[r] = -projection if abs(projection.min()) > abs(projection.max()) else projection
    return maps


@dataclass(frozen=True)
class Method:
    name: str
    needs: str  # "gradients", "activations", "masked images" (Score-CAM), "ablated activations"
    reduce: Callable | None  # (A [R, K, P], dA [R, K, P] or None) -> maps [R, P], before the ReLU every map gets
    kernel: int | None  # its form in the fused CUDA kernel (kernels/igcam.cu); None: no device reduction

    @property
    def integrable(self) -> bool:
        return self.needs == "gradients"

    @property
    def per_channel(self) -> bool:
        """It makes one pass per channel of the target layer (Score-CAM, Ablation-CAM): `channels` bounds them."""
        return self.needs in ("masked images", "ablated activations")


METHOD_TABLE = {m.name: m for m in (
    Method("gradcam", "gradients", _gradcam, kernel=0),
    Method("gradcam++", "gradients", _gradcam_plusplus, kernel=1),
    Method("xgradcam", "gradients", _xgradcam, kernel=2),
    Method("hirescam", "gradients", _hirescam, kernel=3),
    Method("layercam", "gradients", _layercam, kernel=4),
    Method("eigencam", "activations", _eigencam, kernel=None),
    Method("scorecam", "masked images", None, kernel=None),
    Method("ablationcam", "ablated activations", None, kernel=None),
)}
INTEGRATED_GRADCAM = "igcam"  # integrated Grad-CAM, the paper's method: gradcam with integrate=True
METHODS = (INTEGRATED_GRADCAM, *METHOD_TABLE)


def resolve_method(method, integrate) -> tuple[Method, bool]:
    """(the method's row, whether it runs along the integration path) for explain's `method` and `integrate`."""
    if not isinstance(method, str) or method not in METHODS:
        raise UserError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    if integrate is not None and not (isinstance(integrate, (bool, np.bool_))
                                      or (isinstance(integrate, (int, np.integer)) and integrate in (0, 1))):
        raise UserError(f"integrate must be True or False (or 1/0), got {integrate!r}")
    if method == INTEGRATED_GRADCAM:
        if integrate is not None and not integrate:
            raise UserError("method 'igcam' is integrated Grad-CAM; for one pass use method='gradcam'")
        return METHOD_TABLE["gradcam"], True
    row = METHOD_TABLE[method]
    if integrate and not row.integrable:
        gradient_methods = ", ".join(m.name for m in METHOD_TABLE.values() if m.integrable)
        raise UserError(f"integrate applies to the gradient methods ({gradient_methods}); {method} has no gradient "
                        "to integrate")
    return row, bool(integrate)


def check_channels(channels, method: Method, layer_channels: int):
    """`channels`: Score-CAM's and Ablation-CAM's top-N channels by activation mass (None: all of them)."""
    if channels is None:
        return None
    if not method.per_channel:
        raise UserError(f"channels applies to scorecam and ablationcam (one pass per channel), not {method.name}")
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or not 1 <= channels <= layer_channels:
        raise UserError(f"channels must be an integer in [1, {layer_channels}] (the target layer's channels), "
                        f"got {channels!r}")
    return int(channels)


def accumulate(out: np.ndarray, activations: np.ndarray, grads: np.ndarray, base, weights: np.ndarray,
               method: Method = METHOD_TABLE["gradcam"]) -> None:
    """out[n] += sum_i weights[i] * ReLU(reduce(A_i - base[n], dA_i)) for a gradient method.

    out: [N, h, w]; activations, grads: [N*M, K, h, w] image-major rows; base: [N or 1, K, h, w] or None.
    """
    n, (k, h, w), m = out.shape[0], activations.shape[1:], len(weights)
    acts = activations.reshape(n, m, k, h * w)
    if base is not None:
        acts = acts - base.reshape(-1, 1, k, h * w)
    step_maps = method.reduce(acts.reshape(n * m, k, h * w), grads.reshape(n * m, k, h * w)).reshape(n, m, h * w)
    np.maximum(step_maps, 0, out=step_maps)
    out += np.einsum("nip,i->np", step_maps, weights.astype(np.float32)).reshape(n, h, w)


def channel_mass(activations: np.ndarray) -> np.ndarray:
    """[K]: each channel's activation sum, the order in which `channels=N` keeps channels (largest first)."""
    return activations.reshape(activations.shape[0], -1).sum(axis=1)


def scorecam_weights(scores: np.ndarray) -> np.ndarray:
    """Score-CAM's channel weights from the target's scores of the masked images: softmax over the channels."""
    shifted = scores - scores.max(axis=0, keepdims=True)
    e = np.exp(shifted.astype(np.float64))
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def ablation_value(activations: np.ndarray) -> float:
    """What an ablated channel is set to: 0 where the layer's minimum is 0 (after a ReLU), else far below it."""
    low = float(activations.min())
    return 0.0 if low == 0 else low - ABLATION_OFFSET


def ablation_weights(original: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """Ablation-CAM's channel weights: the relative drop of the target's score when the channel is ablated."""
    return ((original - ablated) / original).astype(np.float32)


def combine(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    """ReLU(sum_k weights[k, t] * A_k) for every target t: weights [K, T], activations [K, h, w] -> [T, h, w]."""
    return np.maximum(np.einsum("kt,khw->thw", weights.astype(np.float32), activations.astype(np.float32)), 0)
