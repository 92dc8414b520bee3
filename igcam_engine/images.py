"""Images in and out with Pillow: files or bytes -> model input per the bundle's preprocessing; maps -> overlays.

Images come from users: decoding is bounded (MAX_PIXELS, checked from the header before any pixel is decoded),
EXIF orientation is applied (the model sees the photo as it is displayed), and every mode becomes 8-bit RGB with
its values scaled, not clipped (16-bit pictures would otherwise turn white).
"""
from __future__ import annotations

import io
import os
import re

import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from igcam_engine.errors import InputError, LimitError, NotFound, OptionError, Unavailable
from igcam_engine.validators import flag, integer, number

MAX_PIXELS = 40_000_000  # the default bound on an image's width x height
MAX_OVERLAY_SIDE = 2048  # overlays of larger photos are drawn on the photo scaled down to this longest side
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def load_image(source, max_pixels: int = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """An RGB image from a path or encoded bytes (any format Pillow reads: PNG, JPEG, BMP, WebP, TIFF...), turned
    upright per its EXIF orientation; at most `max_pixels` pixels. `name` is what messages call it (default: the
    path, or "image bytes")."""
    encoded = isinstance(source, (bytes, bytearray, memoryview))
    if not encoded and not isinstance(source, (str, os.PathLike)):
        raise OptionError(f"an image is a file's path or its encoded bytes, got {type(source).__name__}")
    name = name or ("image bytes" if encoded else f"'{source}'")
    try:
        image = Image.open(io.BytesIO(bytes(source)) if encoded else source)
        check_pixels(image.width, image.height, max_pixels, name)
        image.load()
        image = ImageOps.exif_transpose(image)
    except LimitError:
        raise
    except FileNotFoundError:
        raise NotFound(f"no such image file: {name}") from None
    except IsADirectoryError:
        raise InputError(f"{name} is a folder, not an image file") from None
    except Image.DecompressionBombError as e:  # Pillow's own, far larger, bound: raised before our check
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise LimitError(f"{name} claims {claimed.group(1) + ' ' if claimed else ''}pixels, more than the limit of "
                        f"{max_pixels} (--max-pixels raises it)") from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read {name} as an image (accepted: PNG, JPEG, BMP, WebP, TIFF, ...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the data", str(e))
        raise InputError(f"cannot read {name} as an image (accepted: PNG, JPEG, BMP, WebP, TIFF, ...): {detail}"
                        ) from None
    return _rgb(image, name)


def check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    """LimitError when a picture of width x height is over the pixel limit (read before its pixels are)."""
    if width * height > max_pixels:
        raise LimitError(f"{name} is {width}x{height} pixels, more than the limit of {max_pixels} "
                         "(--max-pixels raises it)")


def _rgb(image: Image.Image, name: str) -> Image.Image:
    """8-bit RGB: 16- and 32-bit integer pictures scaled from 0..65535, float pictures from 0..1 (values above 1:
    already 0..255), everything else by Pillow's own conversion."""
    if image.mode in SIXTEEN_BIT:
        eight_bit = np.clip(np.asarray(image, np.float64) / 257, 0, 255).round().astype(np.uint8)
        return Image.fromarray(eight_bit, "L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, np.float64)
        values = values * 255 if np.nanmax(values, initial=0) <= 1 else values
        return Image.fromarray(np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8), "L").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise InputError(f"cannot convert {name} (mode {image.mode}) to RGB: {e}") from None


def fit(image: Image.Image, size, policy: str = "stretch", resample=Image.BILINEAR) -> Image.Image:
    """Resizes to size (H, W): "stretch" to exactly that size, "crop" shorter side first, then a centre crop."""
    height, width = size
    if policy == "crop":
        scale = max(height / image.height, width / image.width)
        resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                               resample)
        left, top = (resized.width - width) // 2, (resized.height - height) // 2
        return resized.crop((left, top, left + width, top + height))
    return image.resize((width, height), resample)


def load_mask(source, input_shape, preprocess, max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """A mask float32 [H, W] of the model input (1 where the picture's pixel is not black, else 0) from an image
    file or its bytes drawn over the photo: resized (nearest neighbour) as the photo is for the model."""
    picture = load_image(source, max_pixels, name or ("mask bytes" if not isinstance(source, (str, os.PathLike))
                                                      else f"mask '{source}'"))
    fitted = fit(picture.convert("L"), input_shape[1:], preprocess["resize"] if preprocess else "stretch",
                 Image.NEAREST)
    return (np.asarray(fitted) > 0).astype(np.float32)


def to_model_input(image, input_shape, preprocess):
    """(model input float32 [C, H, W], the RGB uint8 [H, W, 3] picture the model sees) per a manifest's spec.

    `image` is a PIL image or a numpy picture: [H, W] or [H, W, 1] (gray), [H, W, 3] (RGB) or [H, W, 4] (RGBA,
    alpha ignored), uint8 in 0..255 or floating point in 0..1."""
    channels, height, width = input_shape
    if channels != 3:
        raise InputError(f"image files can only feed 3-channel models; this bundle's input has {channels} channels")
    if isinstance(image, np.ndarray):
        image = _from_array(image)
    elif not isinstance(image, Image.Image):
        raise InputError(f"an image must be a PIL image or a numpy array, got {type(image).__name__}")
    else:
        image = _rgb(image, "the image")
    shown = np.asarray(fit(image, (height, width), preprocess["resize"] if preprocess else "stretch"))
    pixels = shown.astype(np.float32)
    if preprocess:
        mean, std = np.array(preprocess["mean"], np.float32), np.array(preprocess["std"], np.float32)
        pixels = (pixels * np.float32(preprocess["scale"]) - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)), shown


def _from_array(array: np.ndarray) -> Image.Image:
    picture = array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array
    if picture.ndim == 3 and picture.shape[2] == 4:
        picture = picture[..., :3]
    if picture.ndim not in (2, 3) or (picture.ndim == 3 and picture.shape[2] != 3) or min(picture.shape[:2]) < 1:
        raise InputError(f"a numpy picture must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {list(array.shape)}")
    if picture.dtype == np.uint8:
        eight_bit = picture
    elif picture.dtype.kind == "f":
        if not np.isfinite(picture).all() or picture.min() < 0 or picture.max() > 1:
            raise InputError("a floating-point numpy picture must hold finite values in [0, 1]")
        eight_bit = (picture * 255).round().astype(np.uint8)
    else:
        raise InputError(f"a numpy picture must be uint8 (0..255) or floating point (0..1), got {picture.dtype}")
    return Image.fromarray(np.ascontiguousarray(eight_bit)).convert("RGB")


def colormap(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map: values in [0, 1] -> uint8 RGB (blue for low, red for high)."""
    v = np.clip(values, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(picture: np.ndarray, heatmap: np.ndarray, opacity: float = 0.5, colors=colormap) -> Image.Image:
    """Blends a map (any range; min-max scaled here) over an RGB uint8 picture of the same H, W; `colors` maps
    [0, 1] to uint8 colours [..., 3]."""
    span = heatmap.max() - heatmap.min()
    scaled = (heatmap - heatmap.min()) / span if span > 0 else np.zeros_like(heatmap)
    blended = (1 - opacity) * picture.astype(np.float32) + opacity * colors(scaled).astype(np.float32)
    return Image.fromarray(blended.round().astype(np.uint8))


JET = 2  # OpenCV's cv2.COLORMAP_JET, pytorch-grad-cam's default colormap


def show_cam_on_image(image, mask: np.ndarray, use_rgb: bool = True, colormap: int = JET,
                      image_weight: float = 0.5) -> np.ndarray:
    """image_weight * image + (1 - image_weight) * colormap(mask), called as pytorch-grad-cam's helper of this name
    (same arguments, same order): `image` a PIL image or a numpy picture (as to_model_input takes: uint8, or float
    in [0, 1]), `mask` [h, w] of any range (min-max scaled; resized bilinearly to the image when its size differs);
    `use_rgb` False: the heatmap's colours in BGR order, for a BGR picture as OpenCV reads it (pytorch-grad-cam's
    default; here the default is RGB, as every picture this engine reads is); `colormap` an OpenCV colormap (JET
    here, any other through OpenCV). Returns uint8 [H, W, 3] (not divided by its maximum, as theirs is)."""
    image_weight = number(image_weight, "image_weight", 0, 1)
    colors = _colors(integer(colormap, "colormap", 0, 255), flag(use_rgb, "use_rgb"))
    picture = _from_array(image) if isinstance(image, np.ndarray) else _rgb(image, "the image")
    heatmap = np.asarray(mask, np.float32)
    if heatmap.ndim != 2 or not np.isfinite(heatmap).all():
        raise InputError(f"a mask must be one finite map [h, w], got shape {list(heatmap.shape)}")
    if heatmap.shape != (picture.height, picture.width):
        heatmap = np.asarray(Image.fromarray(heatmap, mode="F").resize(picture.size, Image.BILINEAR))
    return np.asarray(overlay(np.asarray(picture), heatmap, opacity=1 - image_weight, colors=colors))


def _colors(code: int, rgb: bool):
    """[0, 1] -> uint8 colours of OpenCV's colormap `code` (JET without OpenCV), in RGB or BGR order."""
    if code == JET:
        table = colormap
    else:
        try:
            import cv2
        except ModuleNotFoundError:
            raise Unavailable(f"colormap {code} is OpenCV's; without opencv-python installed only JET ({JET}) is "
                              "drawn") from None

        def table(values):
            bgr = cv2.applyColorMap(np.uint8(np.clip(values, 0, 1) * 255), code)
            return bgr[..., ::-1]
    return table if rgb else (lambda values: table(values)[..., ::-1])


def overlay_on_photo(photo: Image.Image, shown: np.ndarray, heatmap: np.ndarray, preprocess, boxes=()) -> Image.Image:
    """The overlay at the photo's own size (longest side at most MAX_OVERLAY_SIDE) when the model saw the whole photo
    (resize "stretch"); on the centre crop the model saw otherwise. `boxes`: (x1, y1, x2, y2 in model input pixels,
    a caption) drawn on it."""
    if preprocess and preprocess["resize"] == "crop":
        return draw_boxes(overlay(shown, heatmap), boxes, shown.shape[:2])
    if max(photo.size) > MAX_OVERLAY_SIDE:  # bounded: a huge photo would cost gigabytes of float overlays
        scale = MAX_OVERLAY_SIDE / max(photo.size)
        photo = photo.resize((max(1, round(photo.width * scale)), max(1, round(photo.height * scale))), Image.BILINEAR)
    resized = Image.fromarray(heatmap.astype(np.float32), mode="F").resize(photo.size, Image.BILINEAR)
    return draw_boxes(overlay(np.asarray(photo), np.asarray(resized)), boxes, shown.shape[:2])


def draw_boxes(picture: Image.Image, boxes, size) -> Image.Image:
    """`picture` with each (box (x1, y1, x2, y2) in coordinates of an image of `size` (H, W), caption) drawn."""
    draw = ImageDraw.Draw(picture)
    sx, sy = picture.width / size[1], picture.height / size[0]
    for (x1, y1, x2, y2), caption in boxes:
        corners = [x1 * sx, y1 * sy, x2 * sx, y2 * sy]
        draw.rectangle(corners, outline=(255, 255, 255), width=max(1, round(picture.width / 200)))
        draw.text((corners[0] + 2, corners[1] + 1), caption, fill=(255, 255, 255))
    return picture
