"""Every CAM method against pytorch-grad-cam 1.5, the library whose definitions the engine follows, on torchvision's
ResNet-50 and MobileNetV3 and timm's ConvNeXt and EfficientNet-Lite0 (random weights calibrated on real photos, small
inputs), and the integrated variants against pytorch-grad-cam's own reductions applied along a float64 autograd
path.

The same quantity is compared: pytorch-grad-cam's raw map at layer resolution (what its get_cam_image returns,
captured during its own call), rectified as the engine's maps are (EigenCAM: its sign chosen as the engine
chooses it), upsampled by OpenCV as pytorch-grad-cam upsamples; raw values and normalized maps are both checked.
Its final, min-max normalized output is compared too wherever rectification changes nothing.
"""
import cv2
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
from subjects import _timm, _tv, calibrated, peer_run, photos
from support.comparisons import assert_maps_match, max_normalized_difference
from support.reference import ReferencePath

from igcam_engine import Explainer
from igcam_engine.export import from_torch
from igcam_engine.quadrature import quadrature

PER_CHANNEL = ("scorecam", "ablationcam")
# Raw tolerance for the per-channel methods against a float32 peer: their channel weights come from K float32
# classifier scores, through a softmax (Score-CAM) or as differences of nearly equal scores (Ablation-CAM), so two
# float32 implementations summing in different orders differ by ~1e-4 of the peak (measured up to 1.2e-4 on
# ResNet-50). Measured against float64 torch on the same ResNet-50 Score-CAM cases, the engine is the closer one
# (raw 3.3e-5 with 16 channels, 8.7e-6 with all; float32 torch 8.8e-5 and 1.7e-5); tests/test_methods.py holds the
# engine to 1e-4 of float64 torch. A scale or weighting bug moves maps by far more.
PER_CHANNEL_RAW_TOLERANCE = 3e-4
SUBJECTS = [_tv("resnet50", "layer4"), _tv("mobilenet_v3_large", "features"), _timm("convnext_atto", "stages"),
            _timm("efficientnet_lite0", "bn2")]
PEERS = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "xgradcam": pgc.XGradCAM,
         "hirescam": pgc.HiResCAM, "layercam": pgc.LayerCAM, "eigencam": pgc.EigenCAM, "scorecam": pgc.ScoreCAM,
         "ablationcam": pgc.AblationCAM}


@pytest.fixture(scope="module", params=SUBJECTS, ids=[s.name for s in SUBJECTS])
def subject(request, tmp_path_factory):
    architecture = request.param
    shape = (3, architecture.size, architecture.size)
    torch.manual_seed(0)
    model = calibrated(architecture.build(), shape)
    bundle = from_torch(model, architecture.layer, shape, tmp_path_factory.mktemp("bundle") / "b", preprocess="imagenet")
    images = photos(shape)
    with torch.no_grad():
        targets = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return model, architecture.layer, Explainer(bundle, "cpu"), images, targets


def peer_maps(model, layer, method, images, targets):
    """(pytorch-grad-cam's raw maps [B, h, w] as its get_cam_image computed them, its final output [B, H, W])."""
    module = dict(model.named_modules())[layer]
    options = {}
    if method == "ablationcam" and not _minimum_is_zero(model, module, images):
        # Its AblationLayer reads the minimum of a batch after ablating the rows before (min - 1e7 compounds row by
        # row where the layer's minimum is not 0): one row per batch gives every channel the paper's value.
        options["batch_size"] = 1
    cam = PEERS[method](model=model, target_layers=[module], **options)
    if method == "scorecam":
        cam.batch_size = 64
    return peer_run(cam, images, targets)


def _minimum_is_zero(model, module, images) -> bool:
    captured = []
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model(torch.from_numpy(images))
    handle.remove()
    return all(float(a.min()) == 0 for a in captured[0])


def as_engine_defines(raw: np.ndarray, method: str, size) -> np.ndarray:
    """pytorch-grad-cam's raw maps (EigenCAM's with its sign set as the engine sets it: the larger extreme
    positive), rectified as both libraries do, upsampled by OpenCV's bilinear resize as pytorch-grad-cam does."""
    if method == "eigencam":
        raw = np.stack([-m if abs(m.min()) > abs(m.max()) else m for m in raw])
    return np.stack([cv2.resize(np.maximum(m, 0), (size[1], size[0])) for m in raw])


@pytest.mark.parametrize("method", list(PEERS))
def test_method_matches_pytorch_grad_cam(subject, method):
    model, layer, explainer, images, targets = subject
    if method in PER_CHANNEL:  # one pass per channel in both libraries: one photo
        images, targets = images[:1], targets[:1]
    raw, final = peer_maps(model, layer, method, images, targets)
    ours = explainer.explain(images, targets, method=method)
    assert_maps_match(ours, as_engine_defines(raw, method, images.shape[2:]),
                      raw_tolerance=PER_CHANNEL_RAW_TOLERANCE if method in PER_CHANNEL else 1e-4)
    # pytorch-grad-cam's own output is the engine's map min-max normalized, but for EigenCAM only where SVD's
    # arbitrary sign happened to be the one the engine chooses
    same = [abs(m.max()) >= abs(m.min()) or method != "eigencam" for m in raw]
    assert max_normalized_difference(final[same], ours[same]) <= 1e-3 if any(same) else True


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "xgradcam", "hirescam"])
def test_integrated_method_matches_their_reduction_along_the_path(subject, method):
    """integrate=True: sum_i w_i ReLU(method's reduction of (A_i, dA_i)), A_i and dA_i by float64 autograd at the
    quadrature's nodes, the reduction pytorch-grad-cam's own (its get_cam_image on those arrays)."""
    model, layer, explainer, images, targets = subject
    if method == "gradcam++" and layer == "stages":
        method = "gradcam"  # ConvNeXt's integrated Grad-CAM++ is all zero on these photos: nothing to compare
    alphas, weights = quadrature("left", 4)
    path = ReferencePath(model, layer)
    module = dict(model.named_modules())[layer]
    peer = PEERS[method](model=model, target_layers=[module])
    black = torch.from_numpy(np.broadcast_to(explainer_black(explainer), images.shape[1:]).copy()).double()
    expected = []
    for image, target in zip(torch.from_numpy(images).double(), targets):
        total = 0
        for alpha, weight in zip(alphas, weights):
            a, g = path.point(image, black, alpha, int(target))
            step = peer.get_cam_image(None, module, None, a[None].numpy(), g[None].numpy(), False)[0]
            total = total + weight * np.maximum(step, 0)
        expected.append(cv2.resize(np.asarray(total, np.float32), images.shape[2:][::-1]))
    peer.activations_and_grads.release()
    ours = explainer.explain(images, targets, method=method, integrate=True, steps=4)
    assert_maps_match(ours, np.stack(expected))


def explainer_black(explainer) -> np.ndarray:
    """The black image in the bundle's input space: -mean / std per channel."""
    spec = explainer.preprocess
    return (-np.array(spec["mean"]) / np.array(spec["std"]))[:, None, None]


def test_score_cam_top_channels(subject):
    """channels=N: Score-CAM over the N channels of largest activation mass, the softmax over those alone."""
    model, layer, explainer, images, targets = subject
    images, targets = images[:1], targets[:1]
    captured = []
    module = dict(model.named_modules())[layer]
    handle = module.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    x = torch.from_numpy(images)
    with torch.no_grad():
        model(x)
    handle.remove()
    activations = captured[0].numpy()
    n = 16
    expected = []
    for image, a, target in zip(x, activations, targets):
        kept = np.argsort(-a.reshape(len(a), -1).sum(axis=1), kind="stable")[:n]
        masks = torch.nn.functional.interpolate(torch.from_numpy(a[kept])[None], size=image.shape[1:],
                                                mode="bilinear", align_corners=True)[0]
        low = masks.amin(dim=(1, 2), keepdim=True)
        masks = (masks - low) / (masks.amax(dim=(1, 2), keepdim=True) - low + 1e-8)
        with torch.no_grad():
            scores = model(image[None] * masks[:, None])[:, int(target)]
        weights = torch.softmax(scores, dim=0).numpy()
        cam = np.maximum(np.einsum("k,khw->hw", weights, a[kept]), 0)
        expected.append(cv2.resize(cam, image.shape[1:][::-1]))
    ours = explainer.explain(images, targets, method="scorecam", channels=n)
    assert_maps_match(ours, np.stack(expected), raw_tolerance=PER_CHANNEL_RAW_TOLERANCE)
