"""The evaluation metrics, each one formula of docs/evaluation.md on numpy arrays (no model inside): saliency maps
[H, W] at model input resolution, ground-truth masks [H, W] bool, class probabilities from the caller's model.

Perturbation metrics are split in two: this module builds the perturbed images (deletion and insertion sequences,
the image multiplied by its map) and turns their probabilities into numbers; the caller runs the model on them in
batches of its own choosing.
"""
from __future__ import annotations

import numpy as np

BLUR_SIZE, BLUR_SIGMA = 11, 5.0  # RISE's insertion substitute: a Gaussian kernel of 11 taps, sigma 5
POINTING_TOLERANCE = 15  # pixels: Zhang et al.'s pointing game counts a hit within 15 px of the object
TOP_FRACTION = 0.2  # mIoU: the map's top 20 % pixels against the mask
BOOTSTRAP_RESAMPLES = 1000


def order(saliency: np.ndarray) -> np.ndarray:
    """Pixel indices (flattened) from the most to the least salient; ties keep raster order."""
    return np.argsort(-saliency.ravel(), kind="stable")


def perturbation_sequence(image: np.ndarray, substitute: np.ndarray, saliency: np.ndarray, steps: int,
                          insertion: bool) -> np.ndarray:
    """[steps + 1, C, H, W]: image k shows the top k/steps of the pixels (by `saliency`) taken from `image` on
    `substitute` (insertion), or from `substitute` on `image` (deletion); k = 0..steps."""
    channels, height, width = image.shape
    pixels = height * width
    start, source = (substitute, image) if insertion else (image, substitute)
    ranked = order(saliency)
    counts = np.round(np.arange(steps + 1) * pixels / steps).astype(np.int64)
    # shown[k, p]: pixel p comes from `source` in image k (its rank is below the k-th count)
    rank = np.empty(pixels, np.int64)
    rank[ranked] = np.arange(pixels)
    shown = rank[None, :] < counts[:, None]
    out = np.where(shown[:, None, :], source.reshape(1, channels, pixels), start.reshape(1, channels, pixels))
    return out.reshape(steps + 1, channels, height, width).astype(np.float32)


def curve_auc(probabilities: np.ndarray) -> float:
    """Area under a deletion or insertion curve sampled at k/steps, k = 0..steps: the trapezoid rule on [0, 1]."""
    p = np.asarray(probabilities, np.float64)
    steps = len(p) - 1
    return float((p.sum() - (p[0] + p[-1]) / 2) / steps)


def masked_by_map(image: np.ndarray, black: np.ndarray, saliency: np.ndarray) -> np.ndarray:
    """The picture multiplied pixel by pixel by the min-max normalized map (Grad-CAM++'s E_c o I), in model input
    space: preprocessing is affine per channel, so pixel * e is black + (image - black) * e there."""
    return (black + (image - black) * normalized(saliency)[None]).astype(np.float32)


def average_drop(full: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """Per image: 100 * max(0, Y - O) / Y (Y: the class probability of the image, O: of the masked image)."""
    full, masked = np.asarray(full, np.float64), np.asarray(masked, np.float64)
    return 100 * np.maximum(full - masked, 0) / full


def increase_in_confidence(full: np.ndarray, masked: np.ndarray) -> np.ndarray:
    """Per image: 100 if O > Y, else 0 (its mean is the share of images whose confidence rose, in %)."""
    return 100.0 * (np.asarray(masked, np.float64) > np.asarray(full, np.float64))


def normalized(saliency: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] in float64; a constant map is all zeros."""
    s = np.asarray(saliency, np.float64)
    span = s.max() - s.min()
    return (s - s.min()) / span if span > 0 else np.zeros_like(s)


def energy_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """EBPG: the share of the normalized map's energy that falls inside the object; 0 for an all-zero map."""
    s = normalized(saliency)
    total = s.sum()
    return float(s[mask].sum() / total) if total > 0 else 0.0


def top_pixels_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Bbox: of the N most salient pixels (N = the object's pixels), the share inside the object."""
    n = int(mask.sum())
    return float(mask.ravel()[order(saliency)[:n]].mean())


def pointing_hit(saliency: np.ndarray, mask: np.ndarray, tolerance: int = POINTING_TOLERANCE) -> float:
    """Pointing game: 1 if the map's maximum (the first in raster order) lies within `tolerance` pixels
    (Euclidean) of the object, else 0."""
    y, x = np.unravel_index(int(order(saliency)[0]), saliency.shape)
    ys, xs = np.nonzero(mask)
    return float(np.min((ys - y) ** 2 + (xs - x) ** 2) <= tolerance ** 2)


def top_fraction_iou(saliency: np.ndarray, mask: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """IoU of the map's top `fraction` of pixels (by rank, ties in raster order) with the object."""
    chosen = np.zeros(saliency.size, bool)
    chosen[order(saliency)[: int(round(fraction * saliency.size))]] = True
    object_pixels = mask.ravel()
    return float((chosen & object_pixels).sum() / (chosen | object_pixels).sum())


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of the flattened values, ties given their average rank."""
    v = np.asarray(values, np.float64).ravel()
    sorted_index = np.argsort(v, kind="stable")
    sorted_values = v[sorted_index]
    first = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(v)]
    average = (starts + ends + 1) / 2  # mean of the ranks start+1 .. end
    out = np.empty(len(v))
    out[sorted_index] = average[group]
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (Pearson's of their average ranks); 0 where either is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def bootstrap_interval(values, resamples: int = BOOTSTRAP_RESAMPLES, level: float = 0.95, seed: int = 0):
    """(mean, low, high): the mean and its percentile bootstrap interval over `resamples` resamples of the values
    (with replacement, a fixed seed so that reports repeat)."""
    v = np.asarray(values, np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    means = v[np.random.default_rng(seed).integers(0, len(v), (resamples, len(v)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(v.mean()), float(low), float(high)


def gaussian_blur(image: np.ndarray, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> np.ndarray:
    """Each channel of [C, H, W] blurred by a separable Gaussian (edges reflected)."""
    offsets = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    half = size // 2
    padded = np.pad(np.asarray(image, np.float64), ((0, 0), (half, half), (half, half)), mode="reflect")
    rows = sum(k * padded[:, i:i + image.shape[1], :] for i, k in enumerate(kernel))
    return sum(k * rows[:, :, i:i + image.shape[2]] for i, k in enumerate(kernel)).astype(np.float32)
