"""Preprocessing specs: how an image (file, bytes) becomes model input. Stored in a bundle's manifest.

A spec is None (no preprocessing recorded: the image is resized and fed as raw 0..255 pixel values, so a black
picture is all zeros) or a dict with `resize` ("stretch": to the input size; "crop": shorter side to the input
size, then a centre crop), `scale` (multiplies pixel values 0..255) and per-channel `mean`/`std`
(input = (pixel * scale - mean) / std).
"""
from __future__ import annotations

from igcam_engine.errors import OptionError
from igcam_engine.validators import number, shown

RESIZE_POLICIES = ("stretch", "crop")

PRESETS = {
    "imagenet": {"resize": "stretch", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "none": None,
}


def resolve_preprocess(spec, channels: int = 3, *, strict: bool = False):
    """Validates a preset name or dict and returns the dict stored in the manifest (or None). `strict` (a manifest
    read back) requires every key; otherwise missing keys take their defaults (scale 1/255, mean 0, std 1)."""
    if spec is None or isinstance(spec, str):
        key = "none" if spec is None else spec
        if key not in PRESETS:
            raise OptionError(f"unknown preprocess preset {shown(spec)}; accepted: {', '.join(PRESETS)} or a dict")
        spec = PRESETS[key]
        if spec is None:
            return None
    if not isinstance(spec, dict):
        raise OptionError(f"preprocess must be a preset name or a dict, got {type(spec).__name__}")
    unknown = set(spec) - {"resize", "scale", "mean", "std"}
    if unknown:
        raise OptionError(f"unknown preprocess keys {sorted(unknown)}; accepted: resize, scale, mean, std")
    missing = {"resize", "scale", "mean", "std"} - set(spec)
    if strict and missing:
        raise OptionError(f"preprocess lacks {sorted(missing)}")
    resize = spec.get("resize", "stretch")
    if resize not in RESIZE_POLICIES:
        raise OptionError(f"preprocess resize {resize!r} is not one of {', '.join(RESIZE_POLICIES)}")
    scale = _number(spec.get("scale", 1 / 255), "scale")
    mean = _numbers(spec.get("mean", [0.0] * channels), "mean", channels)
    std = _numbers(spec.get("std", [1.0] * channels), "std", channels)
    if scale <= 0 or any(s <= 0 for s in std):
        raise OptionError("preprocess scale and std values must be positive")
    return {"resize": resize, "scale": scale, "mean": mean, "std": std}


def _number(value, name: str) -> float:
    return number(value, f"preprocess {name}")


def _numbers(values, name: str, channels: int) -> list:
    if not isinstance(values, (list, tuple)) or len(values) != channels:
        raise OptionError(f"preprocess mean and std need {channels} values each (one per input channel); "
                        f"{name} is {values!r}")
    return [_number(v, name) for v in values]


def black_input(spec, channels: int = 3):
    """Per-channel model-input value of a black pixel under `spec` (zeros when no preprocessing is recorded)."""
    if spec is None:
        return [0.0] * channels
    return [-m / s for m, s in zip(spec["mean"], spec["std"])]
