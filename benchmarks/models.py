"""The benchmark models: zoo architectures with their target layer and preprocessing."""
from __future__ import annotations

SHAPE = (3, 224, 224)
LATENCY_MODELS = ("resnet50", "resnet50-layer3", "vgg16", "mobilenet_v2", "efficientnet_lite0")


def build_model(name: str, small: bool = False):
    """(torch model, target layer, preprocess) for a benchmark model name; `small` narrows the random-weight
    models for a quick check of the set-up (EfficientNet-Lite0, 1 and 2 always have their real ImageNet weights)."""
    import torch

    from igcam_engine import zoo

    torch.manual_seed(0)
    if name in ("resnet50", "resnet50-layer3"):
        model = zoo.resnet50(width=8 if small else 64)
        layer = "layer4" if name == "resnet50" else "layer3"
    elif name == "vgg16":
        model, layer = zoo.vgg16(width=8 if small else 64, hidden=64 if small else 4096), "features.29"
    elif name == "mobilenet_v2":
        model, layer = zoo.mobilenet_v2(width_mult=0.25 if small else 1.0), "features.18"
    elif name.startswith("efficientnet_lite") and name[-1] in "012":
        return zoo.efficientnet_lite(int(name[-1]), pretrained=True).eval(), "_head_act", zoo.EFFICIENTNET_LITE0_PREPROCESS
    else:
        raise ValueError(f"unknown benchmark model '{name}'; choose from {', '.join(LATENCY_MODELS)}, efficientnet_lite1, "
                         "efficientnet_lite2")
    return model.eval(), layer, "imagenet"


def model_shape(name: str) -> tuple:
    """The input shape of a benchmark model: the EfficientNet-Lite models at the resolution they were trained at."""
    from igcam_engine.zoo import LITE_RESOLUTIONS

    if name.startswith("efficientnet_lite"):
        side = LITE_RESOLUTIONS[int(name[-1])]
        return (3, side, side)
    return SHAPE
