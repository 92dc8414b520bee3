"""Building blocks shared by the zoo's architectures: torchvision's channel rounding and Conv-BN-activation,
and the fan-in initialization that keeps random-weight depthwise networks input-dependent."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count the way torchvision and TF EfficientNet do."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    # Never round down by more than 10%.
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def init_conv_fan_in(conv: nn.Conv2d) -> None:
    """He init over fan-in, for networks built from depthwise convolutions.

    torchvision initializes these over fan-out, but torch's fan-out ignores
    ``groups``: depthwise weights come out ~sqrt(C) too small, eval-mode batch
    norm does not renormalize, and a randomly initialized network's logits
    barely depend on its input (so random-weight tests would prove nothing).
    Fan-in counts the k*k inputs a depthwise output actually sums.
    """
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def init_depthwise_network(model: nn.Module) -> None:
    """Every conv over fan-in (see init_conv_fan_in), every batch norm the identity; linear layers are left to the
    caller (they come last in these networks, so the random stream is the same either way)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            init_conv_fan_in(m)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvNormActivation(nn.Sequential):
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
