"""The corpus: each architecture with the layer explained and the input size, how random weights are made
realistic, and the real photos explained."""
from dataclasses import dataclass
from typing import Callable

import numpy as np
import timm
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from igcam_engine.data import sample_images
from igcam_engine.images import load_image, to_model_input
from igcam_engine.preprocess import resolve_preprocess


@dataclass
class Architecture:
    family: str  # "torchvision" or "timm"
    name: str
    build: Callable[[], torch.nn.Module]
    layer: str  # module path of the explained layer: the last stage's output
    size: int  # input height and width: small, the last stage 3x3 for most


def _tv(name, layer, size=96, **options):
    return Architecture("torchvision", name, lambda: getattr(torchvision.models, name)(weights=None, **options), layer,
                        size)


def _timm(name, layer, size=96):
    return Architecture("timm", name, lambda: timm.create_model(name, pretrained=False), layer, size)


ARCHITECTURES = [
    _tv("resnet18", "layer4"), _tv("resnet50", "layer4"), _tv("resnext50_32x4d", "layer4"),
    _tv("wide_resnet50_2", "layer4"),
    _tv("vgg11", "features.19", size=224), _tv("vgg16", "features.29", size=96),  # at 96 the (7, 7) pool upsamples
    _tv("mobilenet_v2", "features"), _tv("mobilenet_v3_small", "features"), _tv("mobilenet_v3_large", "features"),
    _tv("efficientnet_b0", "features"), _tv("efficientnet_v2_s", "features"),
    _tv("regnet_x_400mf", "trunk_output"), _tv("regnet_y_400mf", "trunk_output"),
    _tv("densenet121", "features"),
    _tv("googlenet", "inception5b", aux_logits=False, init_weights=True),
    _tv("inception_v3", "Mixed_7c", size=139, aux_logits=False, init_weights=True),
    _tv("shufflenet_v2_x1_0", "conv5"), _tv("squeezenet1_0", "features"), _tv("mnasnet0_5", "layers"),
    _tv("convnext_tiny", "features"),
    _timm("res2net50_26w_4s", "layer4"), _timm("resnest14d", "layer4"), _timm("skresnet18", "layer4"),
    _timm("ghostnet_100", "blocks"), _timm("rexnet_100", "features"), _timm("dla34", "level5"),
    _timm("cspresnet50", "stages"), _timm("cs3darknet_s", "stages"), _timm("hrnet_w18_small", "final_layer"),
    _timm("repvgg_a0", "stages"), _timm("mixnet_s", "bn2"), _timm("nfnet_l0", "final_act"),
    _timm("ese_vovnet19b_dw", "stages"), _timm("dpn68", "features"), _timm("efficientnet_lite0", "bn2"),
    _timm("mobilenetv4_conv_small", "blocks"), _timm("convnext_atto", "stages"), _timm("poolformer_s12", "stages"),
    _timm("resnetaa50d", "layer4"),  # anti-aliased downsampling: blur pools with reflect padding
    _timm("resnet50_gn", "layer4"),  # group norm
]


def peer_run(cam, images, targets):
    """(a pytorch-grad-cam CAM object's raw maps [B, h, w] as its get_cam_image computed them, its final output
    [B, H, W]) for ClassifierOutputTarget of each target."""
    raw, compute = [], cam.get_cam_image

    def capture(*args, **kwargs):
        raw.append(compute(*args, **kwargs))
        return raw[-1]

    cam.get_cam_image = capture
    final = cam(input_tensor=torch.from_numpy(images), targets=[ClassifierOutputTarget(int(t)) for t in targets])
    cam.activations_and_grads.release()
    return np.asarray(raw[0], np.float32), final


def photos(shape, count=2) -> np.ndarray:
    """The sample photos as ImageNet-normalized model input of `shape`."""
    spec = resolve_preprocess("imagenet")
    return np.stack([to_model_input(load_image(p), shape, spec)[0] for p in sample_images()[:count]])


VARIANCE_FLOOR = 1e-3


def calibrated(model: torch.nn.Module, shape) -> torch.nn.Module:
    """Random weights made realistic: linear layers at He scale (torchvision and timm start classifier heads near 0,
    so logits, and maps, would be ~1e-3), and batch-norm statistics measured on varied real photos (see
    calibration_batch), so that activations are normalized as a trained network's are, not degenerate. Variances
    are kept above VARIANCE_FLOOR: a channel nearly constant on the calibration images would make the network
    ill-conditioned (float32 and float64 torch then differ by percents)."""
    generator = torch.Generator().manual_seed(0)
    for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        with torch.no_grad():
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * (2 / linear.in_features) ** 0.5)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over what is seen
        model.train()
        with torch.no_grad():
            model(calibration_batch(shape))
            for norm in norms:  # a channel nearly constant on the calibration images must not be blown up on others
                norm.running_var.clamp_(min=VARIANCE_FLOOR)
    return model.eval()


def calibration_batch(shape, count=48) -> torch.Tensor:
    """Varied real-photo input: the samples at random scales and positions, flipped, with brightness, contrast and
    noise varied (seeded)."""
    rng = np.random.default_rng(0)
    wide = torch.from_numpy(photos((shape[0], 2 * shape[1], 2 * shape[2]), count=3))
    images = []
    for index in range(count):
        photo = wide[index % len(wide)]
        size = int(rng.integers(shape[1], 2 * shape[1] + 1))
        top, left = rng.integers(0, 2 * shape[1] - size + 1), rng.integers(0, 2 * shape[2] - size + 1)
        crop = photo[:, top:top + size, left:left + size][None]
        crop = torch.nn.functional.interpolate(crop, size=shape[1:], mode="bilinear", align_corners=False)[0]
        if rng.random() < 0.5:
            crop = crop.flip(2)
        crop = crop * float(rng.uniform(0.6, 1.4)) + float(rng.uniform(-0.5, 0.5))
        images.append(crop + 0.1 * torch.from_numpy(rng.standard_normal(crop.shape).astype(np.float32)))
    return torch.stack(images)
