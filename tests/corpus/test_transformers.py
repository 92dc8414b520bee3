"""Vision transformers and channels-last stages from timm (random weights, linear layers at He scale, small
inputs), each exported with from_torch at the layer pytorch-grad-cam's tutorials use, and explained on two real
photos: IG-CAM (official preset, m = 4) and Grad-CAM against float64 autograd on the same tensor rearranged to
[K, h, w], and Grad-CAM against pytorch-grad-cam's GradCAM with its reshape_transform (the same quantity: its raw
map at layer resolution, rectified, upsampled by OpenCV as it upsamples; and its min-max normalized output).

Before the layouts were read from the graph, Swin's channels-last stages exported without a word and were read as
K=7, h=7, w=768 (correlation with the right map -0.04): every case here would have failed or been wrong."""
import time
from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import timm
import torch
import transformers
from subjects import calibrated, peer_run, photos
from support.comparisons import assert_maps_match, max_normalized_difference, max_relative_difference, triviality
from support.reference import ReferencePath, top_classes

from igcam_engine import Explainer, UserError
from igcam_engine.export import from_torch
from igcam_engine.quadrature import quadrature


@dataclass
class Transformer:
    name: str
    build: Callable[[], torch.nn.Module]
    layer: str
    size: int
    layout: str  # what the manifest must record
    grid: tuple
    prefix: int = 0
    family: str = "timm"

    def reshape(self, t: torch.Tensor) -> torch.Tensor:
        """pytorch-grad-cam's reshape_transform for this layout: to [B, K, h, w]."""
        if self.layout == "NHWC":
            return t.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            return t[:, self.prefix:].reshape(len(t), *self.grid, t.shape[-1]).permute(0, 3, 1, 2)
        return t


def _timm(name, **options):
    return lambda: timm.create_model(name, pretrained=False, **options)


class _Logits(torch.nn.Module):
    """A HuggingFace classifier as a module of its pixels returning its logits (it returns an output object)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixel_values=pixels).logits


def _huggingface_vit():
    """ViT-Tiny's shape (12 layers of width 192, 3 heads) at 64²."""
    config = transformers.ViTConfig(image_size=64, patch_size=16, hidden_size=192, num_hidden_layers=12,
                                    num_attention_heads=3, intermediate_size=768, num_labels=1000)
    return _Logits(transformers.ViTForImageClassification(config))


CASES = [
    Transformer("vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=64), "blocks.11.norm1", 64, "tokens",
                (4, 4), 1),
    Transformer("deit_tiny_distilled_patch16_224 (distillation token)",
                _timm("deit_tiny_distilled_patch16_224", img_size=64), "blocks.11.norm1", 64, "tokens", (4, 4), 2),
    Transformer("vit_tiny_patch16_224 (4 register tokens)", _timm("vit_tiny_patch16_224", img_size=64, reg_tokens=4),
                "blocks.11.norm1", 64, "tokens", (4, 4), 5),
    Transformer("swin_tiny_patch4_window7_224 (last block's norm2)",
                _timm("swin_tiny_patch4_window7_224", img_size=128, window_size=4), "layers.3.blocks.1.norm2", 128,
                "tokens", (4, 4)),  # the block flattens its grid around norm2: tokens [B, 16, K], no prefix
    Transformer("swin_tiny_patch4_window7_224 (final norm)",
                _timm("swin_tiny_patch4_window7_224", img_size=128, window_size=4), "norm", 128, "NHWC", (4, 4)),
    # layer scale at 1, not timm's 1e-6 initial value: with it a block's branch, and so its norm's map, is ~0
    Transformer("convnext_tiny (last block's channels-last norm)", _timm("convnext_tiny", ls_init_value=1.0),
                "stages.3.blocks.2.norm", 64, "NHWC", (2, 2)),
    Transformer("convnext_nano (last block's norm, LayerNorm2d)", _timm("convnext_nano", ls_init_value=1.0),
                "stages.3.blocks.1.norm", 64, "NCHW", (2, 2)),
    Transformer("ViTForImageClassification from a config (last layer's layernorm_before)", _huggingface_vit,
                "model.vit.layers.11.layernorm_before", 64, "tokens", (4, 4), 1,
                f"HuggingFace transformers {transformers.__version__}"),
    # hybrids: convolution stages, then attention over windows and a dilated grid (MaxViT) or the whole map (CoAtNet)
    Transformer("maxvit_nano_rw_256 (last block's grid-attention norm)", _timm("maxvit_nano_rw_256", img_size=128),
                "stages.3.blocks.0.attn_grid.norm1", 128, "NHWC", (4, 4)),
    Transformer("coatnet_nano_rw_224 (last block's attention norm)", _timm("coatnet_nano_rw_224", img_size=128),
                "stages.3.blocks.1.norm1", 128, "NCHW", (4, 4)),
]
IGCAM = dict(variant="official", steps=4)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transformer_matches_autograd_and_pytorch_grad_cam(case, tmp_path, record):
    shape = (3, case.size, case.size)
    torch.manual_seed(0)
    model = calibrated(case.build(), shape)
    started = time.perf_counter()
    row = {"family": case.family, "model": f"{case.name} ({case.layer}, {case.size}²)", "exported": False}
    try:
        bundle = from_torch(model, case.layer, shape, tmp_path / "bundle", preprocess="imagenet")
    except UserError as e:
        record({**row, "reason": str(e)})
        raise
    explainer = Explainer(bundle)
    layer = explainer.manifest.target_layer
    assert (layer.layout, layer.shape[1:], layer.prefix_tokens) == (case.layout, case.grid, case.prefix)
    images = photos(shape)
    exact = ReferencePath(model, case.layer, reshape=case.reshape)
    single = ReferencePath(model, case.layer, torch.float32, reshape=case.reshape)
    zero = np.zeros((1, *shape))
    targets = _nontrivial_targets(model, images, exact, zero)
    worst = {"normalized": 0.0, "raw": 0.0, "float32": 0.0}
    for options, (alphas, weights) in ((IGCAM, quadrature("left", 4)), (dict(method="gradcam"), (np.ones(1),) * 2)):
        expected = exact.maps(images, targets, alphas, weights, zero, False)
        in_float32 = single.maps(images, targets, alphas, weights, zero, False)
        float32_normalized = max_normalized_difference(in_float32, expected)
        float32_raw = max_relative_difference(in_float32, expected)
        maps = explainer.explain(images, targets, baseline="zeros", **options)
        assert_maps_match(maps, expected, max(1e-3, 4 * float32_normalized), max(1e-4, 4 * float32_raw))
        worst = {"normalized": max(worst["normalized"], max_normalized_difference(maps, expected)),
                 "raw": max(worst["raw"], max_relative_difference(maps, expected)),
                 "float32": max(worst["float32"], float32_normalized)}
    raw, final = _pytorch_grad_cam(model, case, images, targets)
    ours = explainer.explain(images, targets, method="gradcam")
    assert_maps_match(ours, np.stack([cv2.resize(np.maximum(m, 0), shape[1:][::-1]) for m in raw]))
    assert max_normalized_difference(final, ours) <= 1e-3
    record({**row, "exported": True, "seconds": time.perf_counter() - started, **worst})


def _nontrivial_targets(model, images, reference: ReferencePath, baseline) -> np.ndarray:
    """Per image, the highest-scoring of the top hundred classes whose reference maps are non-trivial for both."""
    chosen = []
    for index, candidates in enumerate(top_classes(model, images, k=100)):
        for target in candidates:
            if all(triviality(reference.maps(images[index:index + 1], [target], alphas, weights, baseline,
                                             False)[0]) is None
                   for alphas, weights in (quadrature("left", 4), (np.ones(1), np.ones(1)))):
                chosen.append(target)
                break
        else:
            pytest.fail(f"no class of the top hundred has non-trivial reference maps for image {index}")
    return np.array(chosen)


def _pytorch_grad_cam(model, case, images, targets):
    """pytorch-grad-cam's GradCAM with the case's reshape_transform: (its raw maps at layer resolution, its final
    output)."""
    module = dict(model.named_modules())[case.layer]
    return peer_run(pgc.GradCAM(model=model, target_layers=[module], reshape_transform=case.reshape), images, targets)


def test_pooled_and_unclear_layers_are_refused(tmp_path):
    """ConvNeXt's head norm after global pooling ([1, 1, K] channels-last): a constant map, refused with the reason."""
    shape = (3, 64, 64)
    model = calibrated(timm.create_model("convnext_nano", pretrained=False), shape)
    with pytest.raises(UserError, match="1x1 grid"):
        from_torch(model, "head.norm", shape, tmp_path / "bundle")
