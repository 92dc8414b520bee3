"""The notebook path: a PyTorch model to maps in one call, its bundle exported once and cached.

    from igcam_engine.notebook import explain_torch, show_cam_on_image
    maps = explain_torch(model, "layer4", images, method="gradcam++")     # [B, H, W]
    show_cam_on_image(photo, maps[0])                                      # uint8 RGB overlay

The bundle is kept under a key made of the model's class, its structure (repr), every parameter and buffer
(bytes, dtype, shape), the layer, its layout, the input shape and the preprocessing: a second call on the same
model loads it (and, in the same process, reuses its sessions); a model whose weights changed is exported again.
The weights are hashed once per model state: torch counts every in-place change of a tensor (its version), and a
model whose tensors and versions are unchanged keeps its key. The bundle lives in the bundle cache
(igcam_engine.bundle_cache: bounded, the least recently used evicted first); the process keeps at most
OPEN_EXPLAINERS explainers.
"""
from __future__ import annotations

import hashlib
import threading
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

from igcam_engine import bundle_cache
from igcam_engine.bundle import FORMAT_VERSION
from igcam_engine.errors import InputError, OptionError
from igcam_engine.explainer import Explainer
from igcam_engine.images import show_cam_on_image
from igcam_engine.inputs import as_array
from igcam_engine.options import ExplainOptions
from igcam_engine.targets import TargetChoice

__all__ = ["explain_torch", "bundle_for", "show_cam_on_image"]

OPEN_EXPLAINERS = 8
_explainers: OrderedDict = OrderedDict()  # (key, providers) -> Explainer, least recently used first
_keys: dict = {}  # id(model) -> (weak reference, state signature, inputs of the key, key)
_lock = threading.Lock()


def model_key(model, layer: str, input_shape, preprocess, layout=None) -> str:
    """A hash of what the bundle depends on: the model's code identity, structure and state, the layer and its
    stated layout, the input shape and the preprocessing."""
    import torch

    digest = hashlib.sha256()
    for part in (f"format {FORMAT_VERSION}", type(model).__module__, type(model).__qualname__, repr(model), layer,
                 repr(tuple(input_shape)), repr(preprocess), repr(layout)):
        digest.update(part.encode() + b"\0")
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}".encode() + b"\0")
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _state(model) -> tuple:
    """What changes when the model's weights do: each tensor's storage and torch's count of its in-place changes."""
    return tuple((name, t.data_ptr(), t._version, tuple(t.shape)) for name, t in model.state_dict(keep_vars=True).items())


def _key(model, layer: str, input_shape, preprocess, layout) -> str:
    """model_key, hashed again only when the model's state or the key's other inputs changed."""
    inputs, state = (layer, tuple(input_shape), repr(preprocess), repr(layout)), _state(model)
    known = _keys.get(id(model))
    if known is not None and known[0]() is model and known[1:3] == (state, inputs):
        return known[3]
    key = model_key(model, layer, input_shape, preprocess, layout)
    _keys[id(model)] = (weakref.ref(model, lambda _, i=id(model): _keys.pop(i, None)), state, inputs, key)
    return key


def bundle_for(model, layer: str, input_shape, *, preprocess=None, cache_dir=None, layout=None, grid=None,
               prefix_tokens=None, outputs=None, task=None, detector=None, output_layout=None) -> Path:
    """The model's bundle in the cache, exported on the first call for this key."""
    stated = {"layout": layout, "grid": grid, "prefix_tokens": prefix_tokens, "outputs": outputs, "task": task,
              "detector": detector, "output_layout": output_layout}
    key = _key(model, layer, input_shape, preprocess, stated)
    return _cached_bundle(model, layer, input_shape, preprocess, cache_dir, key, stated)


def _cached_bundle(model, layer, input_shape, preprocess, cache_dir, key: str, stated: dict) -> Path:
    """The bundle stored under `key` (the model's model_key), exported there when it is missing; the cache is
    bounded after each export."""
    from igcam_engine.export import from_torch

    path = bundle_cache.entry(key, cache_dir)
    if not bundle_cache.present(path):
        from_torch(model, layer, tuple(input_shape), path, preprocess=preprocess, **stated)
        bundle_cache.evict(path.parent, keep=path)
    return path


def explain_torch(model, layer: str, images, targets=None, *, method: str = "igcam", preprocess=None, cache_dir=None,
                  providers="cpu", layout=None, grid=None, prefix_tokens=None, outputs=None, task=None,
                  detector=None, output_layout=None, **options) -> np.ndarray:
    """Maps float32 [B, H, W] ([B, T, H, W] for targets [B, T]) of `model` at module `layer` for images [B, C, H, W]
    or [C, H, W] (a torch tensor or numpy array in model input space). targets: class indices, or targets of
    igcam_engine.targets (SemanticSegmentationTarget, BoxScoreTarget, SimilarityToConceptTarget, ...; as
    Explainer.explain takes them); None: each image's best (its predicted class, its largest predicted class, its
    most confident detection). `options` are Explainer.explain's (steps, integrate, variant, rule, channels,
    normalize, ...; any other name is refused); `preprocess` is the one the images went through (it defines the
    black baseline; see docs/api.md); `layout`, `grid`, `prefix_tokens` state the layer's layout where the graph does
    not tell it (as from_torch's: a vision transformer's tokens need no reshape_transform); a model that returns a
    dict or a list keeps `outputs` (names, default all); `task`, `detector`, `output_layout` as from_torch's."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    array = as_array(images, "images")
    if array.ndim not in (3, 4):
        raise InputError(f"images must be [B, C, H, W] or [C, H, W], got shape {list(array.shape)}")
    input_shape = tuple(array.shape[-3:])
    stated = {"layout": layout, "grid": grid, "prefix_tokens": prefix_tokens, "outputs": outputs, "task": task,
              "detector": detector, "output_layout": output_layout}
    options = ExplainOptions.of(None, method=method, **options)  # an unknown option is refused before any export
    with _lock:
        key = _key(model, layer, input_shape, preprocess, stated)
        explainer = _explainers.get((key, repr(providers)))
        if explainer is None:
            bundle = _cached_bundle(model, layer, input_shape, preprocess, cache_dir, key, stated)
            explainer = _explainers[(key, repr(providers))] = Explainer(bundle, providers=providers)
            while len(_explainers) > OPEN_EXPLAINERS:
                _explainers.popitem(last=False)
        _explainers.move_to_end((key, repr(providers)))
    if targets is None:
        manifest = explainer.manifest
        chosen = TargetChoice().checked(manifest).select(manifest, explainer.model_outputs(array))
        targets = [row[0] for row in chosen]
    return explainer.explain(array, targets, options)
