"""The notebook path: a PyTorch model to maps in one call, its bundle exported once and cached.

    from igcam_engine.notebook import explain_torch, show_cam_on_image
    maps = explain_torch(model, "layer4", images, method="gradcam++")     # [B, H, W]
    show_cam_on_image(photo, maps[0])                                      # uint8 RGB overlay

The bundle is kept under a key made of the model's class, its structure (repr), every parameter and buffer
(bytes, dtype, shape), the layer, the input shape and the preprocessing: a second call on the same model loads it
(and, in the same process, reuses its sessions); a model whose weights changed is exported again.
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np

from igcam_engine.bundle import FORMAT_VERSION
from igcam_engine.errors import InputError, OptionError
from igcam_engine.explainer import Explainer
from igcam_engine.images import show_cam_on_image
from igcam_engine.inputs import as_array
from igcam_engine.targets import TargetChoice

__all__ = ["explain_torch", "bundle_for", "show_cam_on_image"]

_explainers: dict = {}
_lock = threading.Lock()


def default_cache() -> Path:
    """$IGCAM_CACHE, else $XDG_CACHE_HOME/igcam-engine/bundles, else ~/.cache/igcam-engine/bundles."""
    if os.environ.get("IGCAM_CACHE"):
        return Path(os.environ["IGCAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "igcam-engine" / "bundles"


def model_key(model, layer: str, input_shape, preprocess) -> str:
    """A hash of what the bundle depends on: the model's code identity, structure and state, the layer, the input
    shape and the preprocessing."""
    import torch

    digest = hashlib.sha256()
    for part in (f"format {FORMAT_VERSION}", type(model).__module__, type(model).__qualname__, repr(model), layer,
                 repr(tuple(input_shape)), repr(preprocess)):
        digest.update(part.encode() + b"\0")
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode() + b"\0")
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def bundle_for(model, layer: str, input_shape, *, preprocess=None, cache_dir=None) -> Path:
    """The model's bundle in the cache, exported on the first call for this key."""
    key = model_key(model, layer, input_shape, preprocess)
    return _cached_bundle(model, layer, input_shape, preprocess, cache_dir, key)


def _cached_bundle(model, layer, input_shape, preprocess, cache_dir, key: str) -> Path:
    """The bundle stored under `key` (the model's model_key), exported there when it is missing."""
    from igcam_engine.export import from_torch

    path = Path(cache_dir or default_cache()) / key[:24]
    if not (path / "manifest.json").is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writable = os.access(path.parent, os.W_OK | os.X_OK)
        except OSError as e:
            raise OptionError(f"cannot use the bundle cache '{path.parent}': {e.strerror or e} (set IGCAM_CACHE or "
                              "cache_dir to a writable folder)") from None
        if not writable:
            raise OptionError(f"the bundle cache '{path.parent}' is not writable (set IGCAM_CACHE or cache_dir to a "
                              "writable folder)")
        from_torch(model, layer, tuple(input_shape), path, preprocess=preprocess)
    return path


def explain_torch(model, layer: str, images, targets=None, *, method: str = "igcam", preprocess=None, cache_dir=None,
                  providers="cpu", **options) -> np.ndarray:
    """Maps float32 [B, H, W] ([B, T, H, W] for targets [B, T]) of `model` at module `layer` for images [B, C, H, W]
    or [C, H, W] (a torch tensor or numpy array in model input space). targets None: each image's predicted class.
    `options` are Explainer.explain's (steps, integrate, variant, rule, channels, normalize, ...); `preprocess` is
    the one the images went through (it defines the black baseline; see docs/api.md)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    array = as_array(images, "images")
    if array.ndim not in (3, 4):
        raise InputError(f"images must be [B, C, H, W] or [C, H, W], got shape {list(array.shape)}")
    input_shape = tuple(array.shape[-3:])
    key = model_key(model, layer, input_shape, preprocess)  # hashes every weight: once per call
    with _lock:
        explainer = _explainers.get((key, repr(providers)))
        if explainer is None:
            bundle = _cached_bundle(model, layer, input_shape, preprocess, cache_dir, key)
            explainer = _explainers[(key, repr(providers))] = Explainer(bundle, providers=providers)
    if targets is None:
        targets = TargetChoice().select(explainer.predict(array))[:, 0]
    return explainer.explain(array, targets, method=method, **options)
