"""How every map test compares maps with independent ones (numpy only, so the torch-free tests use it too)."""
import numpy as np

# A map whose largest value is below this is "~0": float32 noise could pass a comparison with it.
PEAK_FLOOR = 1e-4


def normalized(maps):
    maps = np.asarray(maps, dtype=np.float64)
    low = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - low
    return (maps - low) / np.where(span > 0, span, 1)


def max_normalized_difference(a, b):
    return float(np.abs(normalized(a) - normalized(b)).max())


def max_relative_difference(got, expected):
    """Largest |got - expected| of each map over that expected map's largest |value|, worst over the maps: the
    raw values, scale included."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    peaks = np.abs(expected).max(axis=(-2, -1))
    return float((np.abs(got - expected).max(axis=(-2, -1)) / np.where(peaks > 0, peaks, 1)).max())


def triviality(m) -> str | None:
    """Why one map (2-D) could be matched by an all-zero or a constant map, or None when it is non-trivial: clearly
    positive pixels, variation, not ~0."""
    m = np.asarray(m, np.float64)
    peak = np.abs(m).max()
    if peak <= PEAK_FLOOR:
        return f"is ~0 (largest |value| {peak:.2e})"
    if (m > 0.05 * peak).mean() < 0.02:
        return "has almost no positive pixels"
    if m.max() - m.min() <= 0.1 * peak:
        return "is nearly constant"
    return None


def assert_nontrivial(maps):
    """Every map (last two axes) is non-trivial (see triviality)."""
    maps = np.asarray(maps, np.float64)
    for index, m in zip(np.ndindex(maps.shape[:-2]), maps.reshape(-1, *maps.shape[-2:])):
        problem = triviality(m)
        assert problem is None, f"map {index} {problem}: choose another case"


def assert_maps_match(got, expected, normalized_tolerance=1e-3, raw_tolerance=1e-4):
    """The engine's maps against independent ones: same shape, the expected maps non-trivial, the normalized maps
    within `normalized_tolerance` and the raw values within `raw_tolerance` of each expected map's peak."""
    got = np.asarray(got)
    assert got.shape == np.shape(expected), f"shape {got.shape}, expected {np.shape(expected)}"
    assert np.isfinite(got).all()
    assert_nontrivial(expected)
    normalized_error = max_normalized_difference(got, expected)
    raw_error = max_relative_difference(got, expected)
    assert normalized_error <= normalized_tolerance and raw_error <= raw_tolerance, (
        f"normalized max |Δ| {normalized_error:.2e} (tolerance {normalized_tolerance:.0e}), raw max |Δ| / peak "
        f"{raw_error:.2e} (tolerance {raw_tolerance:.0e})")


def one_hot(targets, classes: int) -> np.ndarray:
    """The seed of class scores for class indices [N]: float32 [N, classes] (what the graphs take as seed_0)."""
    targets = np.asarray(targets)
    return (targets[:, None] == np.arange(classes)[None]).astype(np.float32)
