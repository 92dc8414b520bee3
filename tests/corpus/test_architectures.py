"""Every architecture of the corpus (random weights, batch norm calibrated on real photos) exported with from_torch
and explained on two real photos; its maps against the contract computed by torch autograd in float64, for both
presets, Gauss-Legendre and Grad-CAM, raw values and normalized. Where float32 torch itself is further from float64
than the default tolerances (a max-pool tie that flips, the cancellation in A(x) - A(baseline)), the engine must be
within a small multiple of that distance."""
import time

import numpy as np
import pytest
import torch
from subjects import ARCHITECTURES, calibrated, photos
from support.comparisons import assert_maps_match, max_normalized_difference, max_relative_difference, triviality
from support.reference import ReferencePath, top_classes

from igcam_engine import Explainer, UserError
from igcam_engine.export import from_torch
from igcam_engine.quadrature import quadrature

# Where float32 torch is further from float64 than the default tolerances, the engine (float32 too, with other
# kernels and summation orders) must stay within this multiple of that distance.
FLOAT32 = 4
IMAGENET_BLACK = (-np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225]))[None, :, None, None]
# name: (engine options, quadrature rule or None for Grad-CAM, steps, subtract the baseline's activations)
METHODS = {
    "official": (dict(variant="official", steps=4), "left", 4, False),
    "paper": (dict(variant="paper", steps=4), "right", 4, True),
    "gauss-legendre": (dict(rule="gauss-legendre", steps=4), "gauss-legendre", 4, False),
    "grad-cam": (dict(method="gradcam"), None, 1, False),
}


@pytest.mark.parametrize("architecture", ARCHITECTURES, ids=[a.name for a in ARCHITECTURES])
def test_architecture_matches_float64_autograd(architecture, tmp_path, record):
    shape = (3, architecture.size, architecture.size)
    torch.manual_seed(0)
    model = calibrated(architecture.build(), shape)
    row = {"family": architecture.family, "model": f"{architecture.name} ({architecture.layer}, "
           f"{architecture.size}²)", "exported": False}
    started = time.perf_counter()
    try:
        bundle = from_torch(model, architecture.layer, shape, tmp_path / "bundle", preprocess="imagenet")
    except UserError as e:
        record({**row, "reason": str(e)})
        raise
    explainer = Explainer(bundle)
    images = photos(shape)
    exact, single = ReferencePath(model, architecture.layer), ReferencePath(model, architecture.layer, torch.float32)
    black = np.broadcast_to(IMAGENET_BLACK, (1, *shape))
    targets = nontrivial_targets(model, images, exact, black)
    worst = {"normalized": 0.0, "raw": 0.0, "float32": 0.0}
    for name, (options, rule, steps, subtract) in METHODS.items():
        alphas, weights = _nodes(rule, steps)
        expected = exact.maps(images, targets, alphas, weights, black, subtract)
        in_float32 = single.maps(images, targets, alphas, weights, black, subtract)
        float32_normalized = max_normalized_difference(in_float32, expected)
        float32_raw = max_relative_difference(in_float32, expected)
        maps = explainer.explain(images, targets, **options)
        assert_maps_match(maps, expected, max(1e-3, FLOAT32 * float32_normalized), max(1e-4, FLOAT32 * float32_raw))
        worst = {"normalized": max(worst["normalized"], max_normalized_difference(maps, expected)),
                 "raw": max(worst["raw"], max_relative_difference(maps, expected)),
                 "float32": max(worst["float32"], float32_normalized)}
    record({**row, "exported": True, "seconds": time.perf_counter() - started, **worst})


def _nodes(rule, steps):
    return quadrature(rule, steps) if rule else (np.ones(1), np.ones(1))


def nontrivial_targets(model, images, reference: ReferencePath, baseline) -> np.ndarray:
    """Per image, the highest-scoring of the top hundred classes whose reference maps are non-trivial for every
    method: with random weights a class's map is often all zero for one method (with the baseline's activations
    subtracted, every pixel's weighted sum can fall below 0)."""
    chosen = []
    for index, candidates in enumerate(top_classes(model, images, k=100)):
        for target in candidates:
            if all(triviality(reference.maps(images[index:index + 1], [target], *_nodes(rule, steps), baseline,
                                             subtract)[0]) is None
                   for _, rule, steps, subtract in METHODS.values()):
                chosen.append(target)
                break
        else:
            pytest.fail(f"image {index}: the top hundred classes all have a trivial reference map for some method")
    return np.array(chosen)
