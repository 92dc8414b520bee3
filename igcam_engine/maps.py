"""The reduce and upsample stages on the host: activations and their gradients -> maps, vectorised numpy."""
from __future__ import annotations

import numpy as np


def accumulate(out: np.ndarray, activations: np.ndarray, grads: np.ndarray, base, weights: np.ndarray) -> None:
    """out[n] += sum_i weights[i] * ReLU(sum_k mean_uv(grads[n,i,k]) * (activations[n,i,k] - base[n,k])).

    out: [N, h, w]; activations, grads: [N*M, K, h, w] image-major rows; base: [N or 1, K, h, w] or None.
    """
    n, (k, h, w), m = out.shape[0], activations.shape[1:], len(weights)
    acts = activations.reshape(n, m, k, h * w)
    channel_weights = grads.reshape(n, m, k, h * w).mean(axis=3, dtype=np.float32)
    if base is not None:
        acts = acts - base.reshape(-1, 1, k, h * w)
    step_maps = np.matmul(channel_weights[:, :, None, :], acts)[:, :, 0]
    np.maximum(step_maps, 0, out=step_maps)
    out += np.einsum("nip,i->np", step_maps, weights.astype(np.float32)).reshape(n, h, w)


def _bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of half-pixel bilinear resampling, edges clamped (torch align_corners=False, cv2)."""
    position = np.maximum((np.arange(dst) + 0.5) * src / dst - 0.5, 0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, src - 1)
    frac = position - low
    matrix = np.zeros((dst, src))
    np.add.at(matrix, (np.arange(dst), low), 1 - frac)
    np.add.at(matrix, (np.arange(dst), high), frac)
    return matrix.astype(np.float32)


def upsample(maps: np.ndarray, size) -> np.ndarray:
    """Resizes the last two axes of `maps` to `size` (H, W)."""
    rows = _bilinear_matrix(maps.shape[-2], size[0])
    cols = _bilinear_matrix(maps.shape[-1], size[1])
    return rows @ maps @ cols.T


def normalize(maps: np.ndarray) -> np.ndarray:
    """Min-max scales each map (last two axes) to [0, 1]; a constant map becomes zeros."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0).astype(np.float32)
