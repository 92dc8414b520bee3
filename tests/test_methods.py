"""The CAM family (README "Methods") against float64 torch: each method's definition written here in torch, on the
activations and gradients torch autograd computes, upsampled by torch; raw values and normalized maps compared.
pytorch-grad-cam itself is the reference in the corpus tier (tests/corpus/test_methods.py)."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.comparisons import assert_maps_match
from support.reference import randomized, top_classes

from igcam_engine import Explainer, UserError, zoo
from igcam_engine.export import from_torch
from igcam_engine.quadrature import quadrature

SHAPE = (3, 64, 80)
IMAGENET_BLACK = -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    torch.manual_seed(0)
    model = randomized(zoo.resnet50(num_classes=10, width=8))
    bundle = from_torch(model, "layer3", SHAPE, tmp_path_factory.mktemp("methods") / "b", preprocess="imagenet")
    images = np.random.default_rng(0).standard_normal((2, *SHAPE)).astype(np.float32)
    targets = top_classes(model, images)[:, 0]
    return model.double().eval(), Explainer(bundle, "cpu"), images, targets


def layer_pass(model, x, target=None, replace=None):
    """(activation, its gradient of the target's score or None, scores) of layer3 at x, in float64; `replace`
    substitutes the layer's output."""
    captured = []

    def hook(module, args, output):
        output = replace if replace is not None else output
        if target is not None:
            output = output.detach().requires_grad_(True)
        captured.append(output)
        return output

    handle = dict(model.named_modules())["layer3"].register_forward_hook(hook)
    try:
        with torch.set_grad_enabled(target is not None):
            scores = model(x)
            grad = torch.autograd.grad(scores[:, target].sum(), captured[0])[0] if target is not None else None
    finally:
        handle.remove()
    return captured[0].detach(), grad, scores.detach()


def gradient_map(method, a, g):
    """The map before the ReLU, a and g [K, h, w] float64 (pytorch-grad-cam 1.5's formulas)."""
    spatial = (1, 2)
    if method == "gradcam":
        return (g.mean(dim=spatial)[:, None, None] * a).sum(0)
    if method == "gradcam++":
        alpha = g ** 2 / (2 * g ** 2 + a.sum(dim=spatial, keepdim=True) * g ** 3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        return ((torch.relu(g) * alpha).sum(dim=spatial)[:, None, None] * a).sum(0)
    if method == "xgradcam":
        weights = (g * a).sum(dim=spatial) / (a.sum(dim=spatial) + 1e-7)
        return (weights[:, None, None] * a).sum(0)
    if method == "hirescam":
        return (g * a).sum(0)
    if method == "layercam":
        return (torch.relu(g) * a).sum(0)
    raise ValueError(method)


def upsampled(coarse):
    return F.interpolate(torch.stack(coarse)[:, None], size=SHAPE[1:], mode="bilinear", align_corners=False)[:, 0].numpy()


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"])
def test_gradient_methods_match_float64_torch(subject, method):
    model, explainer, images, targets = subject
    coarse = []
    for image, target in zip(torch.from_numpy(images).double(), targets):
        a, g, _ = layer_pass(model, image[None], int(target))
        coarse.append(torch.relu(gradient_map(method, a[0], g[0])))
    assert_maps_match(explainer.explain(images, targets, method=method), upsampled(coarse))


@pytest.mark.parametrize("method,variant", [("gradcam++", "official"), ("layercam", "paper"), ("xgradcam", "official")])
def test_integrated_methods_match_float64_torch(subject, method, variant):
    """sum_i w_i ReLU(reduction(A(x_i) - A0, G(x_i))) along the path from the black picture."""
    model, explainer, images, targets = subject
    rule, subtract = ("left", False) if variant == "official" else ("right", True)
    alphas, weights = quadrature(rule, 5)
    black = torch.from_numpy(np.broadcast_to(IMAGENET_BLACK[:, None, None], SHAPE).copy())
    base = layer_pass(model, black[None])[0][0] if subtract else 0
    coarse = []
    for image, target in zip(torch.from_numpy(images).double(), targets):
        total = 0
        for alpha, weight in zip(alphas, weights):
            a, g, _ = layer_pass(model, (black + alpha * (image - black))[None], int(target))
            total = total + weight * torch.relu(gradient_map(method, a[0] - base, g[0]))
        coarse.append(total)
    got = explainer.explain(images, targets, method=method, integrate=True, steps=5, variant=variant)
    assert_maps_match(got, upsampled(coarse))


def test_igcam_is_integrated_gradcam(subject):
    _, explainer, images, targets = subject
    np.testing.assert_array_equal(explainer.explain(images, targets, steps=6),
                                  explainer.explain(images, targets, method="gradcam", integrate=True, steps=6))


def test_eigencam_matches_float64_svd(subject):
    model, explainer, images, targets = subject
    coarse = []
    for image in torch.from_numpy(images).double():
        a = layer_pass(model, image[None])[0][0]
        centred = a.reshape(len(a), -1).T - a.reshape(len(a), -1).T.mean(dim=0)
        projection = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[0]
        if projection.min().abs() > projection.max().abs():
            projection = -projection
        coarse.append(torch.relu(projection.reshape(a.shape[1:])))
    assert_maps_match(explainer.explain(images, targets, method="eigencam"), upsampled(coarse))


@pytest.mark.parametrize("channels", [None, 20])
def test_scorecam_matches_float64_torch(subject, channels):
    model, explainer, images, targets = subject
    coarse = []
    for image, target in zip(torch.from_numpy(images).double(), targets):
        a = layer_pass(model, image[None])[0][0]
        kept = torch.argsort(-a.sum(dim=(1, 2)), stable=True)[:channels]
        masks = F.interpolate(a[kept][None], size=SHAPE[1:], mode="bilinear", align_corners=True)[0]
        low, high = masks.amin(dim=(1, 2), keepdim=True), masks.amax(dim=(1, 2), keepdim=True)
        masks = (masks - low) / (high - low + 1e-8)
        with torch.no_grad():
            scores = model(image[None] * masks[:, None])[:, int(target)]
        coarse.append(torch.relu((torch.softmax(scores, dim=0)[:, None, None] * a[kept]).sum(0)))
    got = explainer.explain(images, targets, method="scorecam", channels=channels, batch_size=48)
    assert_maps_match(got, upsampled(coarse))


def test_ablationcam_matches_float64_torch(subject):
    model, explainer, images, targets = subject
    coarse = []
    for image, target in zip(torch.from_numpy(images).double(), targets):
        a, _, scores = layer_pass(model, image[None])
        value = 0.0 if a.min() == 0 else float(a.min()) - 1e7
        original = scores[0, int(target)]
        weights = []
        for k in range(a.shape[1]):
            ablated = a.clone()
            ablated[0, k] = value
            weights.append((original - layer_pass(model, image[None], replace=ablated)[2][0, int(target)]) / original)
        coarse.append(torch.relu((torch.stack(weights)[:, None, None] * a[0]).sum(0)))
    assert_maps_match(explainer.explain(images, targets, method="ablationcam"), upsampled(coarse))


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "eigencam", "gradcam++"])
def test_several_targets_per_image_equal_separate_calls(subject, method):
    _, explainer, images, _ = subject
    both = explainer.explain(images, np.array([[1, 7], [3, 1]]), method=method, batch_size=40)
    for column in range(2):
        alone = explainer.explain(images, np.array([[1, 7], [3, 1]])[:, column], method=method)
        np.testing.assert_allclose(both[:, column], alone, rtol=1e-5, atol=1e-6 * float(np.abs(alone).max()))


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="gradcam-plus"), "unknown method 'gradcam-plus'; accepted: igcam, gradcam, gradcam++"),
    (dict(method="eigencam", integrate=True), "eigencam has no gradient to integrate"),
    (dict(method="igcam", integrate=False), "for one pass use method='gradcam'"),
    (dict(method="layercam", integrate="yes"), "integrate must be true or false"),
    (dict(method="gradcam", channels=4), "channels applies to scorecam and ablationcam"),
    (dict(method="scorecam", channels=0), r"channels \(the target layer's channels\) must be an integer in \[1, 128\]"),
    (dict(method="scorecam", channels=129), r"channels \(the target layer's channels\) must be an integer in \[1, 128\]"),
    (dict(method="gradcam++", steps="auto"), "method must be 'igcam' or a gradient method with integrate=True"),
])
def test_method_options_are_checked(subject, kwargs, message):
    _, explainer, images, targets = subject
    with pytest.raises(UserError, match=message):
        explainer.explain(images, targets, **kwargs)


def test_integrated_method_refines_automatically(subject):
    _, explainer, images, targets = subject
    result = explainer.explain_adaptive(images, targets, method="layercam", integrate=True, tolerance=1e-3)
    fine = explainer.explain(images, targets, method="layercam", integrate=True, rule="trapezoid", steps=result.passes)
    assert result.converged and result.passes > 2
    assert_maps_match(result.maps, fine)


@pytest.mark.slow
def test_explain_torch_matches_float64_torch_and_exports_once_per_model(tmp_path, monkeypatch):
    """The notebook path: maps of the predicted classes equal float64 torch's; the second call (and a new process's
    first: the explainers dropped) loads the cached bundle; changed weights export a new one."""
    import copy

    import igcam_engine.export
    from igcam_engine import notebook

    exports = []
    original = igcam_engine.export.from_torch
    monkeypatch.setattr(igcam_engine.export, "from_torch", lambda *a, **k: exports.append(a[1]) or original(*a, **k))
    torch.manual_seed(1)
    model = randomized(zoo.resnet50(num_classes=10, width=8)).eval()
    images = torch.from_numpy(np.random.default_rng(3).standard_normal((2, *SHAPE)).astype(np.float32))
    options = dict(method="gradcam++", preprocess="imagenet", cache_dir=tmp_path)
    maps = notebook.explain_torch(model, "layer3", images, **options)

    reference = copy.deepcopy(model).double()
    targets = top_classes(model, images.numpy())[:, 0]
    coarse = []
    for image, target in zip(images.double(), targets):
        a, g, _ = layer_pass(reference, image[None], int(target))
        coarse.append(torch.relu(gradient_map("gradcam++", a[0], g[0])))
    assert_maps_match(maps, upsampled(coarse))
    assert exports == ["layer3"] and len(list(tmp_path.iterdir())) == 1

    np.testing.assert_array_equal(notebook.explain_torch(model, "layer3", images, **options), maps)
    monkeypatch.setattr(notebook, "_explainers", OrderedDict())  # as in a new process: the bundle is read from the cache
    np.testing.assert_array_equal(notebook.explain_torch(model, "layer3", images.numpy(), **options), maps)
    assert exports == ["layer3"]

    with torch.no_grad():
        model.fc.weight.mul_(-1)
    changed = notebook.explain_torch(model, "layer3", images, targets=torch.from_numpy(targets), **options)
    assert exports == ["layer3", "layer3"] and len(list(tmp_path.iterdir())) == 2
    assert not np.allclose(changed, maps)
    with pytest.raises(UserError, match=r"images must be \[B, C, H, W\] or \[C, H, W\], got shape \[64, 80\]"):
        notebook.explain_torch(model, "layer3", images[0, 0], **options)


def test_show_cam_on_image_blends_the_jet_colour_map_over_the_photo():
    """image_weight is the photo's share; the map, min-max scaled and resized to the photo, is coloured by the jet
    colour map (matplotlib's, to within the engine's piecewise-linear approximation of it)."""
    from matplotlib import colormaps
    from PIL import Image

    from igcam_engine.notebook import show_cam_on_image

    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    ramp = np.tile(np.linspace(-3.0, 5.0, 30, dtype=np.float32), (20, 1))  # any range; half the photo's size
    np.testing.assert_array_equal(show_cam_on_image(photo, ramp, image_weight=1.0), photo)
    np.testing.assert_array_equal(show_cam_on_image(Image.fromarray(photo), ramp, image_weight=1.0), photo)
    coloured = show_cam_on_image(photo / 255.0, ramp, image_weight=0.0).astype(float)
    resized = np.asarray(Image.fromarray(ramp, mode="F").resize((60, 40), Image.BILINEAR))
    jet = colormaps["jet"]((resized - resized.min()) / (resized.max() - resized.min()))[..., :3] * 255
    assert coloured.shape == (40, 60, 3) and np.abs(coloured - jet).max() <= 40  # measured 33
    assert coloured[:, 0, 2].min() > 120 and coloured[:, -1, 0].min() > 120  # blue for low, red for high
    half = show_cam_on_image(photo, ramp, image_weight=0.25).astype(float)
    assert np.abs(half - (0.25 * photo + 0.75 * coloured)).max() <= 1
    with pytest.raises(UserError, match=r"image_weight must be a number in \[0, 1\]"):
        show_cam_on_image(photo, ramp, image_weight=1.5)
    with pytest.raises(UserError, match="a mask must be one finite map"):
        show_cam_on_image(photo, np.full((4, 4), np.nan))
