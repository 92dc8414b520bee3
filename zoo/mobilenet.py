"""MobileNetV2 with torchvision's module names (`features.18` is the 1x1 head conv)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ConvNormActivation, init_depthwise_network, make_divisible


class InvertedResidual(nn.Module):
    """torchvision MobileNetV2 ``InvertedResidual``: its layers live in ``.conv``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(inp, hidden_dim, 1, activation=nn.ReLU6))
        layers += [
            ConvNormActivation(
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
        input_channel = make_divisible(32 * width_mult)
        # The head never shrinks below 1280, matching torchvision.
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [
            ConvNormActivation(3, input_channel, 3, 2, activation=nn.ReLU6)
        ]
        for t, c, n, s in self._SETTING:
            output_channel = make_divisible(c * width_mult)
            for i in range(n):
                features.append(
                    InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t)
                )
                input_channel = output_channel
        features.append(
            ConvNormActivation(input_channel, self.last_channel, 1, activation=nn.ReLU6)
        )
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes)
        )

        init_depthwise_network(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
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
