"""The host implementation of the runtime's stages: ONNX Runtime returns numpy arrays, numpy reduces them.

`Explainer` drives a stages object through one loop; igcam_engine.gpu.DeviceStages implements the same methods
with device buffers (IOBinding) and the fused CUDA kernel.
"""
from __future__ import annotations

import numpy as np

from igcam_engine.maps import accumulate, upsample


class HostStages:
    def __init__(self, forward, gradient):
        self._forward, self._gradient = forward, gradient

    def put(self, array: np.ndarray):
        """Makes an input batch available to the graphs (here: it already is)."""
        return array

    def forward(self, images, first: int, last: int, base, alphas: np.ndarray, keep: bool = False):
        """Activations of the interpolated images of images[first:last] (rows image-major); `keep` marks a result
        that is cached across calls (no buffer reuse may touch it)."""
        feeds = {"images": images[first:last], "baseline": base if len(base) == 1 else base[first:last],
                 "alphas": alphas.astype(np.float32)}
        return self._forward.run(["activations"], feeds)[0]

    def gradient(self, activations, targets: np.ndarray):
        return self._gradient.run(["activation_grad"], {"activations": activations, "targets": targets})[0]

    def logits(self, activations, targets: np.ndarray) -> np.ndarray:
        return self._gradient.run(["logits"], {"activations": activations, "targets": targets})[0]

    def maps(self, images: int, targets: int, size):
        return np.zeros((images, targets, *size), np.float32)

    def accumulate(self, maps, first: int, last: int, target: int, activations, grads, base_activations, weights):
        if base_activations is not None and len(base_activations) > 1:
            base_activations = base_activations[first:last]
        accumulate(maps[first:last, target], activations, grads, base_activations, weights)

    def to_host(self, maps) -> np.ndarray:
        """Maps at layer resolution as a host array."""
        return maps

    def finish(self, maps, size) -> np.ndarray:
        """Maps upsampled to the input size, on the host."""
        return upsample(maps, size)
