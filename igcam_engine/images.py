"""Images in and out with Pillow: files or bytes -> model input per the bundle's preprocessing; maps -> overlays."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from igcam_engine.errors import UserError


def load_image(source) -> Image.Image:
    """An RGB image from a path or encoded bytes (any format Pillow reads: PNG, JPEG, BMP, WebP, ...)."""
    try:
        image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()
    except FileNotFoundError:
        raise UserError(f"no such image file: '{source}'") from None
    except (UnidentifiedImageError, OSError) as e:
        name = "image bytes" if isinstance(source, (bytes, bytearray)) else f"'{source}'"
        raise UserError(f"cannot read {name} as an image (accepted: PNG, JPEG, BMP, WebP, ...): {e}") from None
    return image.convert("RGB")


def fit(image: Image.Image, size, policy: str = "stretch") -> Image.Image:
    """Resizes to size (H, W): "stretch" to exactly that size, "crop" shorter side first, then a centre crop."""
    height, width = size
    if policy == "crop":
        scale = max(height / image.height, width / image.width)
        resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BILINEAR)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        return resized.crop((left, top, left + width, top + height))
    return image.resize((width, height), Image.BILINEAR)


def to_model_input(image: Image.Image, input_shape, preprocess):
    """(model input float32 [C, H, W], the RGB uint8 [H, W, 3] picture the model sees) per a manifest's spec."""
    channels, height, width = input_shape
    if channels != 3:
        raise UserError(f"image files can only feed 3-channel models; this bundle's input has {channels} channels")
    shown = np.asarray(fit(image, (height, width), preprocess["resize"] if preprocess else "stretch"))
    pixels = shown.astype(np.float32)
    if preprocess:
        mean, std = np.array(preprocess["mean"], np.float32), np.array(preprocess["std"], np.float32)
        pixels = (pixels * np.float32(preprocess["scale"]) - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), shown


def colormap(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map: values in [0, 1] -> uint8 RGB (blue for low, red for high)."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(picture: np.ndarray, heatmap: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """Blends a map (any range; min-max scaled here) over an RGB uint8 picture of the same H, W."""
    span = heatmap.max() - heatmap.min()
    scaled = (heatmap - heatmap.min()) / span if span > 0 else np.zeros_like(heatmap)
    blended = (1 - opacity) * picture.astype(np.float32) + opacity * colormap(scaled).astype(np.float32)
    return Image.fromarray(blended.round().astype(np.uint8))


def overlay_on_photo(photo: Image.Image, shown: np.ndarray, heatmap: np.ndarray, preprocess) -> Image.Image:
    """The overlay at the photo's own size when the model saw the whole photo (resize "stretch"); on the centre
    crop the model saw otherwise."""
    if preprocess and preprocess["resize"] == "crop":
        return overlay(shown, heatmap)
    resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize(photo.size, Image.BILINEAR)
    return overlay(np.asarray(photo), np.asarray(resized))


def save_png(image: Image.Image, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
