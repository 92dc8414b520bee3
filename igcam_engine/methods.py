"""The CAM methods, one entry of METHOD_TABLE each: what a method needs, the passes it makes through the stages
(igcam_engine.stages) and how it reduces the target layer's activations A [K, h, w] (and their gradients dA) to a
map at layer resolution. docs/method.md gives the formulas; they are pytorch-grad-cam 1.5's (its eps constants
included), so that maps compare equal.

Gradient methods reduce (A, dA) of one pass at alpha 1; integrated (`integrate`, or "igcam", integrated Grad-CAM)
the same reduction is applied at every node of the IG-CAM path and the rectified step maps are summed with the
quadrature weights, on a fixed grid or one refined until the maps settle (steps="auto"). The others make passes of
their own: EigenCAM one forward pass, Score-CAM one classifier pass per masked image, Ablation-CAM one pass of the
layers after the target per ablated channel. Every reduction here is numpy on the host; each gradient method's
`kernel` is its form in the fused CUDA kernel (kernels/igcam.cu, FORM_*), which computes the same reduction on the
device. Adding a method is one reduction (or one passes function) and one entry of METHOD_TABLE.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import numpy as np

from igcam_engine.maps import upsample
from igcam_engine.quadrature import REFINEMENTS, largest_change
from igcam_engine.stages import Call, Chunk, Forward, PlacedPath, chunks

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
    """XGrad-CAM: gradients weighted by the activations, normalized by each channel's activation sum."""
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


class Needs(Enum):
    """What a method's passes need from the engine."""

    GRADIENTS = "activations and their gradients"
    ACTIVATIONS = "activations"
    MASKED_IMAGES = "the target's score of the image masked by each channel"
    ABLATED_ACTIVATIONS = "the target's score with each channel ablated"


@dataclass(frozen=True)
class LayerMaps:
    """A method's maps at layer resolution [B, T, h, w], where the stages keep them, and the passes along the path
    that made them (1 for a method that is not integrated); steps="auto" says whether the refinement met its
    tolerance and its last change."""

    maps: object
    passes: int
    converged: bool = True
    change: float | None = None


@dataclass(frozen=True)
class Method:
    name: str
    needs: Needs
    reduce: Callable | None  # (A [R, K, P], dA [R, K, P] or None) -> maps [R, P], before the ReLU every map gets
    kernel: int | None  # its form in the fused CUDA kernel (kernels/igcam.cu); None: no device reduction
    passes: Callable  # (method, call: igcam_engine.stages.Call) -> LayerMaps

    @property
    def integrable(self) -> bool:
        return self.needs is Needs.GRADIENTS

    @property
    def per_channel(self) -> bool:
        """It makes one pass per channel of the target layer (Score-CAM, Ablation-CAM): `channels` bounds them."""
        return self.needs in (Needs.MASKED_IMAGES, Needs.ABLATED_ACTIVATIONS)


# ---------------------------------------------------------------- the passes


def integrate(method: Method, call: Call, alphas: np.ndarray, weights: np.ndarray):
    """sum_i weights[i] * ReLU(method's reduction at alphas[i]) at layer resolution, [B, T, h, w], where the stages
    keep data: the backbone runs once per chunk of interpolated images, the gradient graph once per target. A
    linear target's seeds (one per image) are placed once per call; a target that is not linear has its seeds
    computed from each row's outputs."""
    stages, manifest = call.stages, call.manifest
    maps = stages.maps(call.count, call.per_image, call.layer_shape[1:])
    path = PlacedPath(stages.put(np.asarray(weights, np.float32)), call.base_activations)
    columns = [[row[t] for row in call.targets] for t in range(call.per_image)]
    linear = [all(target.linear(manifest) for target in column) for column in columns]
    placed = [[stages.put(seed) for seed in seeds_for(manifest, column)] if is_linear else None
              for column, is_linear in zip(columns, linear)]
    for chunk in chunks(call.count, len(alphas), call.rows):
        forward = stages.interpolate(call.images, chunk, call.base, alphas[chunk.start:chunk.stop])
        outputs = None if all(linear) else stages.outputs(forward)
        for t, column in enumerate(columns):
            if linear[t]:
                seeds, index = placed[t], np.repeat(np.arange(chunk.first, chunk.last), chunk.nodes)
            else:
                seeds, index = _row_seeds(call, chunk, column, outputs), np.arange(chunk.rows)
            grads = stages.gradient(forward, seeds, index)
            stages.accumulate(maps, chunk, t, forward.activations, grads, path, method)
    return maps


def seeds_for(manifest, column: list, rows_outputs: list | None = None) -> list:
    """Per kept output, the stacked seeds [S, ...] of targets `column` (one per seed row; `rows_outputs`, one list of
    outputs per seed row, for targets that are not linear)."""
    stacked = [np.zeros((len(column), *o.shape), np.float32) for o in manifest.outputs]
    for row, target in enumerate(column):
        for i, seed in enumerate(target.seeds(manifest, None if rows_outputs is None else rows_outputs[row])):
            if seed is not None:
                stacked[i][row] = seed
    return stacked


def _row_seeds(call: Call, chunk: Chunk, column: list, outputs: list) -> list:
    """Per output, the placed seeds [R, ...] of the chunk's rows for targets that depend on the outputs."""
    targets = [column[n] for n in range(chunk.first, chunk.last) for _ in range(chunk.nodes)]
    rows = [[value[r] for value in outputs] for r in range(chunk.rows)]
    return [call.stages.put(seed) for seed in seeds_for(call.manifest, targets, rows)]


def _along_the_path(method: Method, call: Call) -> LayerMaps:
    """A gradient method on the options' fixed path (one node at alpha 1 when not integrated), or refined."""
    options = call.options
    if not options.adaptive:
        alphas, weights = options.nodes()
        return LayerMaps(integrate(method, call, alphas, weights), len(alphas))
    levels = REFINEMENTS[options.refinement_rule]()
    alphas, weights, _ = next(levels)
    coarse = call.stages.to_host(integrate(method, call, alphas, weights))
    passes, change = len(alphas), None
    for alphas, weights, keep in levels:
        if passes + len(alphas) > options.max_steps:
            break
        refined = keep * coarse + call.stages.to_host(integrate(method, call, alphas, weights))
        change = largest_change(coarse, refined)
        coarse, passes = refined, passes + len(alphas)
        if change <= options.tolerance:
            break
    return LayerMaps(call.stages.put(coarse), passes, change is not None and change <= options.tolerance, change)


def _each_image(call: Call, image_maps: Callable) -> LayerMaps:
    """A gradient-free method's maps: each image's forward pass (one plain pass per chunk of images, brought to
    the host) turned into its targets' maps [T, h, w] by `image_maps(call, n, activations [K, h, w], held)` (`held`:
    the image's held tensors, each [1, ...])."""
    _, h, w = call.layer_shape
    maps = np.zeros((call.count, call.per_image, h, w), np.float32)
    stages = call.stages
    for first in range(0, call.count, call.rows):
        last = min(first + call.rows, call.count)
        forward = stages.activations(stages.put(call.host_images[first:last]))
        activations, held = stages.to_host(forward.activations), [stages.to_host(x) for x in forward.held]
        for i, a in enumerate(activations.astype(np.float32)):
            maps[first + i] = image_maps(call, first + i, a, tuple(x[i:i + 1] for x in held))
    return LayerMaps(stages.put(maps), 1)


def _kept_channels(call: Call, a: np.ndarray) -> np.ndarray:
    """The channels a per-channel method passes over: all, or the `channels` of largest activation mass."""
    if call.options.channels is None:
        return np.arange(len(a))
    return np.argsort(-channel_mass(a), kind="stable")[:call.options.channels]


def _eigencam_passes(method: Method, call: Call) -> LayerMaps:
    def image_maps(call, n, a, held):
        k, h, w = a.shape
        return np.maximum(method.reduce(a.reshape(1, k, h * w), None), 0).reshape(1, h, w)  # the same for every target

    return _each_image(call, image_maps)


def _scores(call: Call, n: int, outputs: list) -> np.ndarray:
    """[R, T]: image n's targets' scores of rows of outputs."""
    return np.stack([target.score(call.manifest, outputs) for target in call.targets[n]], axis=1)


def _scorecam_passes(method: Method, call: Call) -> LayerMaps:
    def image_maps(call, n, a, held):
        kept = _kept_channels(call, a)
        return combine(scorecam_weights(_scores(call, n, _masked_outputs(call, call.host_images[n], a, kept))), a[kept])

    return _each_image(call, image_maps)


def _ablationcam_passes(method: Method, call: Call) -> LayerMaps:
    def image_maps(call, n, a, held):
        kept = _kept_channels(call, a)
        original = _scores(call, n, call.stages.outputs(_placed(call, a[None], held, 1)))[0]
        return combine(ablation_weights(original, _scores(call, n, _ablated_outputs(call, a, held, kept))), a[kept])

    return _each_image(call, image_maps)


def _concatenated(parts: list) -> list:
    """Per output, the rows of several calls' outputs together."""
    return [np.concatenate(values) for values in zip(*parts)]


def _masked_outputs(call: Call, image: np.ndarray, activations: np.ndarray, kept) -> list:
    """The model's outputs (each [len(kept), ...]) for the image multiplied by each kept channel, upsampled
    (corners aligned) and min-max scaled to [0, 1]: Score-CAM's masks."""
    parts = []
    for start in range(0, len(kept), call.rows):
        masks = upsample(activations[kept[start:start + call.rows]], call.input_size, align_corners=True)
        low, high = masks.min(axis=(1, 2), keepdims=True), masks.max(axis=(1, 2), keepdims=True)
        masks = (masks - low) / (high - low + SCORECAM_EPS)
        batch = call.stages.put(np.ascontiguousarray(image[None] * masks[:, None], dtype=np.float32))
        parts.append(call.stages.outputs(call.stages.activations(batch)))
    return _concatenated(parts)


def _ablated_outputs(call: Call, activations: np.ndarray, held: tuple, kept) -> list:
    """The model's outputs (each [len(kept), ...]) from the layers after the target, each kept channel ablated in
    turn (the image's held tensors as they are)."""
    value, parts = ablation_value(activations), []
    for start in range(0, len(kept), call.rows):
        chunk = kept[start:start + call.rows]
        batch = np.repeat(activations[None], len(chunk), axis=0)
        batch[np.arange(len(chunk)), chunk] = value
        parts.append(call.stages.outputs(_placed(call, batch, held, len(chunk))))
    return _concatenated(parts)


def _placed(call: Call, activations: np.ndarray, held: tuple, rows: int) -> Forward:
    """A forward pass made on the host (ablated activations), with one image's held tensors repeated for its rows."""
    return Forward(call.stages.put(activations), tuple(call.stages.put(np.repeat(x, rows, axis=0)) for x in held))


METHOD_TABLE = {m.name: m for m in (
    Method("gradcam", Needs.GRADIENTS, _gradcam, 0, _along_the_path),
    Method("gradcam++", Needs.GRADIENTS, _gradcam_plusplus, 1, _along_the_path),
    Method("xgradcam", Needs.GRADIENTS, _xgradcam, 2, _along_the_path),
    Method("hirescam", Needs.GRADIENTS, _hirescam, 3, _along_the_path),
    Method("layercam", Needs.GRADIENTS, _layercam, 4, _along_the_path),
    Method("eigencam", Needs.ACTIVATIONS, _eigencam, None, _eigencam_passes),
    Method("scorecam", Needs.MASKED_IMAGES, None, None, _scorecam_passes),
    Method("ablationcam", Needs.ABLATED_ACTIVATIONS, None, None, _ablationcam_passes),
)}
INTEGRATED_GRADCAM = "igcam"  # integrated Grad-CAM, the paper's method: gradcam with integrate=True
METHODS = (INTEGRATED_GRADCAM, *METHOD_TABLE)


def accumulate(out: np.ndarray, activations: np.ndarray, grads: np.ndarray, base, weights: np.ndarray,
               method: Method) -> None:
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
    """Score-CAM's channel weights [K, T] from the targets' scores [K, T] of the masked images: softmax over the
    channels."""
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
