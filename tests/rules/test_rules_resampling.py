"""The rule of export/rules/resampling.py (Resize; an opset-9 Upsample is converted to a Resize first) against
torch autograd in float64 (tests/support/rule_cases.py)."""
import numpy as np
import pytest
import torch.nn.functional as F
from onnx import helper
from support.rule_cases import Case, assert_family_covered, randn, run

from igcam_engine.export.rules import resampling


def resize_cases():
    x = randn(2, 3, 5, 7, seed=8)
    scales = {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 1.5], np.float32)}
    sizes = {"roi": np.zeros(0, np.float32), "sizes": np.array([2, 3, 9, 4], np.int64)}
    cases = [
        ("linear half_pixel, scales 2 x 1.5", dict(mode="linear"), scales,
         lambda x: F.interpolate(x, scale_factor=(2, 1.5), mode="bilinear", align_corners=False)),
        ("linear align_corners, sizes 9 x 4", dict(mode="linear", coordinate_transformation_mode="align_corners"),
         sizes, lambda x: F.interpolate(x, size=(9, 4), mode="bilinear", align_corners=True)),
        ("nearest asymmetric floor, sizes 9 x 4", dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                                       nearest_mode="floor"),
         sizes, lambda x: F.interpolate(x, size=(9, 4), mode="nearest")),
        ("cubic half_pixel a=-0.75, scales 2 x 1.5", dict(mode="cubic", cubic_coeff_a=-0.75), scales,
         lambda x: F.interpolate(x, scale_factor=(2, 1.5), mode="bicubic", align_corners=False)),
    ]
    built = [Case(f"Resize {name}", [helper.make_node("Resize", ["x", "roi", "scales" if "scales" in c else "",
                                                                  "sizes" if "sizes" in c else ""], ["Y"], **a)],
                  {"x": x}, lambda x, fn=fn, **_: fn(x), c) for name, a, c, fn in cases]
    built.append(Case("Upsample (opset 9), nearest x2",
                      [helper.make_node("Upsample", ["x", "scales"], ["Y"], mode="nearest")], {"x": x},
                      lambda x, scales: F.interpolate(x, scale_factor=2, mode="nearest"),
                      {"scales": np.array([1, 1, 2, 2], np.float32)}, opset=9))
    return built


CASES = resize_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_rule(case):
    run(case)


def test_every_rule_of_the_family_is_exercised():
    """Adding a rule to resampling.py means adding a case here whose graph puts its op on a differentiated path."""
    assert_family_covered(resampling, CASES)
