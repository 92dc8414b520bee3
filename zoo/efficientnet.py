"""EfficientNet-B0 with torchvision's module names (stages `features.1`..`features.7`, head `features.8`)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .blocks import ConvNormActivation, init_depthwise_network, make_divisible


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
        expanded = make_divisible(input_channels * expand_ratio)
        layers: list[nn.Module] = []
        if expanded != input_channels:
            layers.append(ConvNormActivation(input_channels, expanded, 1, activation=nn.SiLU))
        layers += [
            ConvNormActivation(
                expanded, expanded, kernel, stride, groups=expanded, activation=nn.SiLU
            ),
            SqueezeExcitation(expanded, max(1, input_channels // 4)),
            ConvNormActivation(expanded, out_channels, 1, activation=None),
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
                make_divisible(cin * width_mult),
                make_divisible(cout * width_mult),
                int(math.ceil(n * depth_mult)),
            )
            for e, k, s, cin, cout, n in self._B0_SETTING
        ]
        stem_channels = setting[0][3]
        features: list[nn.Module] = [
            ConvNormActivation(3, stem_channels, 3, 2, activation=nn.SiLU)
        ]
        for expand, kernel, stride, cin, cout, n in setting:
            stage = [
                MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand)
                for i in range(n)
            ]
            features.append(nn.Sequential(*stage))
        last_in = setting[-1][4]
        last_out = 4 * last_in
        features.append(ConvNormActivation(last_in, last_out, 1, activation=nn.SiLU))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last_out, num_classes))

        init_depthwise_network(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
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
