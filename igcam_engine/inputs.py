"""One explain call's inputs, checked before they are placed where the stages work (igcam_engine.stages.Call):
images and baselines in model input space, and the cache of the named baselines' activations (targets:
igcam_engine.targets).

Arrays come from callers: anything array-like is accepted (lists, numpy, a torch tensor, detached here without
importing torch), and each refusal is one line naming what was wrong and what is accepted.
"""
from __future__ import annotations

import threading

import numpy as np

from igcam_engine.errors import InputError, OptionError
from igcam_engine.preprocess import black_input
from igcam_engine.stages import Stages


def as_array(value, what: str, dtype=None) -> np.ndarray:
    """A numpy array of `value`; a torch tensor is detached and copied to the host first (duck-typed: the core
    imports no torch)."""
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=dtype)
    except ValueError:  # a ragged nested list, or text that is no number
        raise InputError(f"{what} must be one rectangular array of numbers") from None
    except TypeError:
        raise InputError(f"{what} must be an array of numbers, got {type(value).__name__}") from None


def check_images(images, input_shape: tuple) -> np.ndarray:
    """Images [B, C, H, W] (or one [C, H, W]) in model input space, as contiguous finite float32."""
    shape = ", ".join(map(str, input_shape))
    array = as_array(images, f"images [B, {shape}]")
    if array.ndim == 0:
        raise InputError(f"images must be an array [B, {shape}] or [{shape}] in model input space, got "
                         f"{type(images).__name__}")
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(input_shape):
        raise InputError(f"images must be [B, {shape}] or [{shape}] in model input space, got shape "
                         f"{list(np.shape(images))}")
    if len(array) == 0:
        raise InputError("no images given: the batch is empty")
    if array.dtype.kind != "f":
        raise InputError(f"images must be floating point (model input space), got {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise InputError("images contain NaN or infinite values (in float32)")
    return array


def baseline_images(baseline, batch: int, input_shape: tuple, preprocess) -> np.ndarray:
    """The baseline [1 or B, C, H, W]: "black" (the black picture after the bundle's preprocessing), "zeros", or
    an array [C, H, W], [1, C, H, W] or [B, C, H, W]."""
    if isinstance(baseline, str):
        value = black_input(preprocess, input_shape[0]) if baseline == "black" else [0.0] * input_shape[0]
        return np.broadcast_to(np.array(value, np.float32)[:, None, None], (1, *input_shape)).copy()
    try:
        array = as_array(baseline, "a baseline", np.float32)
    except InputError:
        raise OptionError(f"a baseline must be 'black', 'zeros' or an array of numbers, got {type(baseline).__name__}"
                          ) from None
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(input_shape) or len(array) not in (1, batch):
        raise InputError(f"a baseline array must be [{', '.join(map(str, input_shape))}], [1, ...] or [B, ...]; got "
                         f"{list(array.shape)}")
    if not np.isfinite(array).all():
        raise InputError("the baseline contains NaN or infinite values (in float32)")
    return np.ascontiguousarray(array)


class BaselineActivations:
    """A(baseline) where the stages keep data: computed once per Explainer for the named baselines, thread-safe."""

    def __init__(self, stages: Stages):
        self._stages, self._named, self._lock = stages, {}, threading.Lock()

    def get(self, baseline, base: np.ndarray):
        if not isinstance(baseline, str):
            return self._stages.activations(self._stages.put(base), keep=True).activations
        with self._lock:
            if baseline not in self._named:
                self._named[baseline] = self._stages.activations(self._stages.put(base), keep=True).activations
            return self._named[baseline]
