"""Maps on the host: bilinear resampling (as torch and OpenCV do it) and min-max normalization, vectorized numpy.
The reductions from activations and gradients to maps are igcam_engine.methods'."""
from __future__ import annotations

import numpy as np


def _bilinear_matrix(src: int, dst: int, align_corners: bool = False) -> np.ndarray:
    """[dst, src] weights of bilinear resampling: half-pixel, edges clamped (torch align_corners=False, cv2), or
    corner-aligned (torch align_corners=True: the first and last pixels map onto each other)."""
    if align_corners:
        position = np.arange(dst) * ((src - 1) / (dst - 1) if dst > 1 else 0.0)
    else:
        position = np.maximum((np.arange(dst) + 0.5) * src / dst - 0.5, 0)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, src - 1)
    frac = position - low
    matrix = np.zeros((dst, src))
    np.add.at(matrix, (np.arange(dst), low), 1 - frac)
    np.add.at(matrix, (np.arange(dst), high), frac)
    return matrix.astype(np.float32)


def upsample(maps: np.ndarray, size, align_corners: bool = False) -> np.ndarray:
    """Resizes the last two axes of `maps` to `size` (H, W)."""
    rows = _bilinear_matrix(maps.shape[-2], size[0], align_corners)
    cols = _bilinear_matrix(maps.shape[-1], size[1], align_corners)
    return rows @ maps @ cols.T


def normalize(maps: np.ndarray) -> np.ndarray:
    """Min-max scales each map (last two axes) to [0, 1]; a constant map becomes zeros."""
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return np.where(span > 0, (maps - low) / np.where(span > 0, span, 1), 0).astype(np.float32)
