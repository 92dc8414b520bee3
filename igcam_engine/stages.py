"""The interface of the runtime's stages: what `Explainer` asks of the place where the data lives.

`Explainer` runs one loop for every method and provider (interpolate and run the backbone, differentiate the
tail, reduce, upsample); the loop calls these methods and never touches the data itself. Two implementations:
`igcam_engine.host.HostStages` (ONNX Runtime returns numpy arrays, numpy reduces them) and
`igcam_engine.device.DeviceStages` (IOBinding on device buffers and the fused CUDA kernel: no host copy of
activations or gradients). "Arrays" below are whatever the implementation keeps: numpy arrays on the host,
device buffers on the GPU.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Stages(ABC):
    @abstractmethod
    def put(self, array: np.ndarray):
        """Makes a host input batch (images, baseline) available to the graphs."""

    @abstractmethod
    def forward(self, images, first: int, last: int, base, alphas: np.ndarray, keep: bool = False):
        """Activations [(last - first) * M, K, h, w] of the interpolated images of images[first:last], rows
        image-major (row n * M + i is base + alphas[i] * (images[n] - base)); `keep` marks a result cached across
        calls, which no buffer reuse may overwrite."""

    @abstractmethod
    def gradient(self, activations, targets: np.ndarray):
        """d logits[r, targets[r]] / d activations[r] for every row r."""

    @abstractmethod
    def logits(self, activations, targets: np.ndarray) -> np.ndarray:
        """Class scores [R, classes] of the rows, as a host array."""

    @abstractmethod
    def maps(self, images: int, targets: int, size):
        """Zeroed maps [images, targets, h, w] to accumulate into."""

    @abstractmethod
    def accumulate(self, maps, first: int, last: int, target: int, activations, grads, base_activations, weights,
                   start: int, stop: int, method) -> None:
        """maps[first:last, target] += sum_i weights[start + i] * ReLU(method.reduce(activations - base, grads)),
        a gradient method's reduction (igcam_engine.methods; Grad-CAM's is README "The method"), for the steps
        start:stop of the quadrature whose float32 weights `put` placed (once per call); base_activations None: no
        subtraction."""

    @abstractmethod
    def to_host(self, array) -> np.ndarray:
        """A result of the stages (maps at layer resolution, activations) as a host array."""

    @abstractmethod
    def finish(self, maps, size) -> np.ndarray:
        """Maps upsampled to the input size (H, W), as a host array."""
