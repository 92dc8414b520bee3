"""VGG-16 (no batch norm) with torchvision's module indices (`features.29` is the last conv's ReLU)."""
from __future__ import annotations

import torch
from torch import nn

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
