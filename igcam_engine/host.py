"""The host implementation of the stages (see igcam_engine.stages): the graphs return numpy arrays, numpy reduces
them (igcam_engine.methods, igcam_engine.maps). `forward` and `gradient` are sessions of the bundle's graphs with
ONNX Runtime's `run` (ONNX Runtime's own, or the OpenVINO backend's sessions)."""
from __future__ import annotations

import numpy as np

from igcam_engine.maps import upsample
from igcam_engine.methods import accumulate
from igcam_engine.stages import Chunk, Forward, PlacedPath, Stages

AT_THE_IMAGE = np.ones(1, np.float32)  # one node at alpha 1 with the image as its own baseline: the image itself


class HostStages(Stages):
    def __init__(self, forward, gradient, held, outputs):
        self._forward, self._gradient = forward, gradient
        self._held = [h.name for h in held]  # the bundle's held tensors: forward outputs, gradient inputs
        self._outputs = ["activations", *self._held]
        self._results = [o.name for o in outputs]  # the bundle's kept outputs: gradient outputs
        self._seeds = [o.seed for o in outputs]  # their cotangents: gradient inputs
        # outputs only: every seed is zero (one row, which every row reads)
        self._no_seeds = [np.zeros((1, *o.shape), np.float32) for o in outputs]

    def _run_forward(self, feeds) -> Forward:
        activations, *held = self._forward.run(self._outputs, feeds)
        return Forward(activations, tuple(held))

    def _gradient_feeds(self, forward: Forward, seeds: list, index: np.ndarray) -> dict:
        return {"activations": forward.activations, "seed_index": np.ascontiguousarray(index, np.int64),
                **dict(zip(self._seeds, seeds)), **dict(zip(self._held, forward.held))}

    def put(self, array: np.ndarray):
        return array

    def interpolate(self, images, chunk: Chunk, base, alphas: np.ndarray, keep: bool = False) -> Forward:
        feeds = {"images": images[chunk.first:chunk.last],
                 "baseline": base if len(base) == 1 else base[chunk.first:chunk.last],
                 "alphas": np.asarray(alphas, np.float32)}
        return self._run_forward(feeds)

    def activations(self, images, keep: bool = False) -> Forward:
        # forward.onnx interpolates; at alpha 1 from the image itself, base + 1 * (x - base) is x exactly
        return self._run_forward({"images": images, "baseline": images, "alphas": AT_THE_IMAGE})

    def gradient(self, forward: Forward, seeds: list, index: np.ndarray):
        return self._gradient.run(["activation_grad"], self._gradient_feeds(forward, seeds, index))[0]

    def outputs(self, forward: Forward) -> list:
        # gradient.onnx takes the seeds of its gradient output; the outputs do not depend on them
        index = np.zeros(len(forward.activations), np.int64)
        return self._gradient.run(self._results, self._gradient_feeds(forward, self._no_seeds, index))

    def maps(self, images: int, targets: int, size):
        return np.zeros((images, targets, *size), np.float32)

    def accumulate(self, maps, chunk: Chunk, target: int, activations, grads, path: PlacedPath, method) -> None:
        base = path.base_activations
        if base is not None and len(base) > 1:
            base = base[chunk.first:chunk.last]
        accumulate(maps[chunk.first:chunk.last, target], activations, grads, base,
                   path.weights[chunk.start:chunk.stop], method)

    def to_host(self, array) -> np.ndarray:
        return array

    def finish(self, maps, size) -> np.ndarray:
        return upsample(maps, size)
