"""Runtime stages on their own: quadrature, upsampling, image preprocessing, overlays."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from igcam_engine import UserError, quadrature
from igcam_engine.images import load_image, overlay, overlay_on_photo, to_model_input
from igcam_engine.maps import normalize, upsample
from igcam_engine.preprocess import PRESETS, black_input, resolve_preprocess


@pytest.mark.parametrize("rule", ["left", "right", "midpoint", "trapezoid", "gauss-legendre"])
@pytest.mark.parametrize("steps", [2, 5, 16])
def test_quadrature_nodes_and_weights(rule, steps):
    alphas, weights = quadrature(rule, steps)
    assert len(alphas) == len(weights) == steps
    assert np.isclose(weights.sum(), 1) and (alphas >= 0).all() and (alphas <= 1).all()
    # integrates x exactly (every rule is exact for constants; all but left/right for linear functions)
    if rule not in ("left", "right"):
        assert np.isclose((weights * alphas).sum(), 0.5)


def test_gauss_legendre_is_exact_for_high_degree():
    alphas, weights = quadrature("gauss-legendre", 4)
    assert np.isclose((weights * alphas**7).sum(), 1 / 8)


def test_named_rules_follow_the_contract():
    np.testing.assert_allclose(quadrature("left", 4)[0], [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(quadrature("right", 4)[0], [0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(quadrature("midpoint", 2)[0], [0.25, 0.75])
    np.testing.assert_allclose(quadrature("trapezoid", 3)[1], [0.25, 0.5, 0.25])


@pytest.mark.parametrize("src,dst", [((7, 7), (224, 224)), ((2, 3), (64, 80)), ((5, 4), (5, 4)), ((1, 1), (9, 6)), ((8, 8), (3, 5))])
def test_upsample_matches_torch_bilinear(src, dst):
    maps = np.random.default_rng(0).standard_normal((2, 3, *src)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(maps).double(), size=dst, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(upsample(maps, dst), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_normalize_scales_each_map():
    maps = np.stack([np.arange(12.0).reshape(3, 4), np.full((3, 4), 5.0)])
    out = normalize(maps)
    assert out[0].min() == 0 and out[0].max() == 1 and (out[1] == 0).all()


def test_imagenet_preprocessing_by_hand(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / "p.png"
    Image.fromarray(pixels).save(path)
    spec = resolve_preprocess("imagenet")
    model_input, shown = to_model_input(load_image(path), (3, 20, 30), spec)
    expected = ((pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1)
    np.testing.assert_allclose(model_input, expected, rtol=1e-5, atol=1e-5)
    assert (shown == pixels).all()
    np.testing.assert_allclose(black_input(spec), -np.array([0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    assert black_input(resolve_preprocess("none")) == [0.0, 0.0, 0.0] and PRESETS["none"] is None


def test_crop_policy_takes_the_centre():
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, 16:64] = 255  # white beyond the centre square, so resampling cannot blend black into it
    spec = resolve_preprocess({"resize": "crop", "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]})
    model_input, shown = to_model_input(Image.fromarray(pixels), (3, 20, 20), spec)
    assert shown.shape == (20, 20, 3) and model_input.min() > 0.99


@pytest.mark.parametrize("spec,message", [
    ("vgg", "unknown preprocess preset"),
    ({"resize": "squash"}, "resize 'squash'"),
    ({"mean": [0.5]}, "3 values each"),
    ({"std": [0, 1, 1]}, "positive"),
    ({"gamma": 2}, "unknown preprocess keys"),
])
def test_bad_preprocess_specs(spec, message):
    with pytest.raises(UserError, match=message):
        resolve_preprocess(spec)


def test_unreadable_image_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read image bytes"):
        load_image(b"\x89PNG but not really")
    with pytest.raises(UserError, match="no such image file"):
        load_image(tmp_path / "missing.png")


def test_overlays_are_red_where_the_map_is_high():
    picture = np.full((10, 10, 3), 128, np.uint8)
    heatmap = np.zeros((10, 10))
    heatmap[0, 0] = 1
    blended = np.asarray(overlay(picture, heatmap))
    assert blended[0, 0, 0] > blended[0, 0, 2] and blended[9, 9, 2] > blended[9, 9, 0]
    photo = Image.fromarray(np.full((30, 50, 3), 128, np.uint8))
    assert overlay_on_photo(photo, picture, heatmap, None).size == (50, 30)
