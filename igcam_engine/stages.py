"""The interface of the runtime's stages: what the methods ask of the place where the data lives.

The methods (igcam_engine.methods) run their passes through these operations and never touch the data
themselves. Two implementations: `igcam_engine.host.HostStages` (the graphs return numpy arrays, numpy reduces
them) and `igcam_engine.device.DeviceStages` (IOBinding on device buffers and the fused CUDA kernel: no host copy of
activations or gradients). "Arrays" below are whatever the implementation keeps: numpy arrays on the host, device
buffers on the GPU. A "row" is one interpolated image (or one image, for a plain pass).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Chunk:
    """One engine call's share of the work: the images [first, last) at the path's nodes [start, stop); its rows
    are image-major (row n * (stop - start) + i is image first + n at node start + i)."""

    first: int
    last: int
    start: int = 0
    stop: int = 1

    @property
    def images(self) -> int:
        return self.last - self.first

    @property
    def nodes(self) -> int:
        return self.stop - self.start

    @property
    def rows(self) -> int:
        return self.images * self.nodes


def chunks(images: int, nodes: int, rows: int):
    """Chunks of at most `rows` rows covering every image at every node: whole images when a path fits, else
    each image's path in pieces."""
    if rows >= nodes:
        per_call = rows // nodes
        for first in range(0, images, per_call):
            yield Chunk(first, min(first + per_call, images), 0, nodes)
    else:
        for image in range(images):
            for start in range(0, nodes, rows):
                yield Chunk(image, image + 1, start, min(start + rows, nodes))


@dataclass(frozen=True)
class Forward:
    """A forward pass's results for some rows, where the stages keep them: the target layer's activations
    [R, K, h, w] and the held tensors (the bundle's `held`: what the layers after the target take besides it --
    a skip connection around it, a transformer's class token -- held at their values), in the bundle's order."""

    activations: object
    held: tuple = ()


@dataclass(frozen=True)
class PlacedPath:
    """What every step map of a call is weighed by and measured from, placed where the stages work: the float32
    quadrature weights of all the path's nodes, and the baseline's activations [1 or B, K, h, w] (None: no
    subtraction)."""

    weights: object
    base_activations: object = None


@dataclass(frozen=True)
class Call:
    """What a method's passes (igcam_engine.methods) work on: the checked inputs of one call, placed."""

    stages: Stages
    options: object  # igcam_engine.options.ExplainOptions, checked
    images: object  # placed [B, C, H, W]
    host_images: np.ndarray
    targets: list  # [B][T] igcam_engine.targets targets, bound to the bundle and resolved for each image
    base: object  # placed [1 or B, C, H, W]
    base_activations: object  # placed, or None (no subtraction)
    rows: int  # interpolated images per engine call
    layer_shape: tuple  # K, h, w
    input_size: tuple  # H, W
    manifest: object = None  # igcam_engine.bundle.Manifest: what the targets read of the outputs

    @property
    def count(self) -> int:
        return len(self.host_images)

    @property
    def per_image(self) -> int:
        """Targets per image (T)."""
        return len(self.targets[0])


class Stages(ABC):
    @abstractmethod
    def put(self, array: np.ndarray):
        """Makes a host array (images, a baseline, weights, maps) available to the stages."""

    @abstractmethod
    def interpolate(self, images, chunk: Chunk, base, alphas: np.ndarray, keep: bool = False) -> Forward:
        """The forward pass (activations [chunk.rows, K, h, w], held tensors) of the interpolated images
        base + alphas[i] * (images[n] - base) of the chunk's images (`base`: one baseline or one per image;
        `alphas`: the chunk's nodes); `keep` marks a result cached across calls, which no buffer reuse may
        overwrite."""

    @abstractmethod
    def activations(self, images, keep: bool = False) -> Forward:
        """The forward pass of the images themselves (activations [N, K, h, w], held tensors)."""

    @abstractmethod
    def gradient(self, forward: Forward, seeds: list, index: np.ndarray):
        """The vector-Jacobian product of the outputs at the activations for every row r, the held tensors held:
        sum over outputs i of seeds[i][index[r]] . d output_i[r] / d activations[r]. `seeds`: per output, placed
        [S, ...] (put); `index`: [R] int64."""

    @abstractmethod
    def outputs(self, forward: Forward) -> list:
        """The model's outputs (the bundle's, in graph order, each [R, ...]) computed by the layers after the
        target from a forward pass's activations (and held tensors), as host arrays."""

    @abstractmethod
    def maps(self, images: int, targets: int, size):
        """Zeroed maps [images, targets, h, w] to accumulate into."""

    @abstractmethod
    def accumulate(self, maps, chunk: Chunk, target: int, activations, grads, path: PlacedPath, method) -> None:
        """maps[chunk images, target] += sum_i weights[start + i] * ReLU(method.reduce(A_i - A0, dA_i)) over the
        chunk's nodes i: a gradient method's reduction (igcam_engine.methods) of the chunk's rows."""

    @abstractmethod
    def to_host(self, array) -> np.ndarray:
        """A result of the stages (maps at layer resolution, activations) as a host array."""

    @abstractmethod
    def finish(self, maps, size) -> np.ndarray:
        """Maps upsampled to the input size (H, W), as a host array."""
