"""The host implementation of the stages (see igcam_engine.stages): ONNX Runtime returns numpy arrays, numpy
reduces them (igcam_engine.methods, igcam_engine.maps)."""
from __future__ import annotations

import numpy as np

from igcam_engine.maps import upsample
from igcam_engine.methods import accumulate
from igcam_engine.stages import Stages


class HostStages(Stages):
    def __init__(self, forward, gradient):
        self._forward, self._gradient = forward, gradient

    def put(self, array: np.ndarray):
        return array

    def forward(self, images, first: int, last: int, base, alphas: np.ndarray, keep: bool = False):
        feeds = {"images": images[first:last], "baseline": base if len(base) == 1 else base[first:last],
                 "alphas": alphas.astype(np.float32)}
        return self._forward.run(["activations"], feeds)[0]

    def gradient(self, activations, targets: np.ndarray):
        return self._gradient.run(["activation_grad"], {"activations": activations, "targets": targets})[0]

    def logits(self, activations, targets: np.ndarray) -> np.ndarray:
        return self._gradient.run(["logits"], {"activations": activations, "targets": targets})[0]

    def maps(self, images: int, targets: int, size):
        return np.zeros((images, targets, *size), np.float32)

    def accumulate(self, maps, first: int, last: int, target: int, activations, grads, base_activations, weights,
                   start: int, stop: int, method):
        if base_activations is not None and len(base_activations) > 1:
            base_activations = base_activations[first:last]
        accumulate(maps[first:last, target], activations, grads, base_activations, weights[start:stop], method)

    def to_host(self, array) -> np.ndarray:
        return array

    def finish(self, maps, size) -> np.ndarray:
        return upsample(maps, size)
