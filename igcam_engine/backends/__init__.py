"""The backend seam: which runtime computes a bundle's graphs, and where the stages keep the data.

`BackendOptions` is what a caller asks for (providers, precision and the GPU options), checked once by
`checked()` before anything loads; `open_backend(manifest, options)` returns a `Backend`: its stages
(igcam_engine.stages), the precision its graphs actually compute in, its provider list and its placement report.
Each backend is one module with `check(options) -> options` and `load(manifest, options) -> Backend`:

- onnxruntime: ONNX Runtime's CPU, CUDA and TensorRT execution providers (the default);
- openvino: OpenVINO's runtime on the CPU, in float32 or bfloat16 (providers="openvino").

Adding a backend is one module and one entry in BACKENDS.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace
from typing import Callable

from igcam_engine.errors import BundleError, OptionError
from igcam_engine.stages import Stages
from igcam_engine.validators import flag, integer

# providers value -> backend module; anything else is ONNX Runtime's
BACKENDS = {"openvino": "igcam_engine.backends.openvino"}
DEFAULT_BACKEND = "igcam_engine.backends.onnxruntime"
SHORTHANDS = ("auto", "cpu", "cuda", "tensorrt", "openvino")


@dataclass(frozen=True)
class BackendOptions:
    """providers: None or "auto" (the best available: TensorRT, CUDA, CPU), "cpu", "cuda", "tensorrt", ONNX
    Runtime's own list of names or (name, options) tuples, or "openvino". precision: the OpenVINO backend's, "f32"
    (the default) or "bf16"; ONNX Runtime computes in f32. fp16, engine_cache (a folder) and workspace_bytes
    configure TensorRT; tf32 lets the CUDA provider use TF32 tensor cores; device_id picks the GPU."""

    providers: object = None
    precision: str | None = None
    fp16: bool = False
    tf32: bool = False
    engine_cache: object = None
    workspace_bytes: int | None = None
    device_id: int = 0

    @property
    def module(self) -> str:
        return BACKENDS.get(self.providers, DEFAULT_BACKEND) if isinstance(self.providers, str) else DEFAULT_BACKEND

    def checked(self) -> "BackendOptions":
        """Every option checked, and the precision the chosen backend is asked for filled in."""
        providers = None if self.providers == "auto" else self.providers
        if providers is not None and not isinstance(providers, str):
            if not isinstance(providers, (list, tuple)) or not providers or not all(
                    isinstance(p, str) or (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                           and isinstance(p[1], dict)) for p in providers):
                raise OptionError(f"providers must be one of {', '.join(SHORTHANDS)}, or a list of ONNX Runtime provider "
                                  f"names or (name, options) pairs, got {providers!r}"[:300])
            providers = list(providers)
        if self.engine_cache is not None and not isinstance(self.engine_cache, (str, os.PathLike)):
            raise OptionError(f"engine_cache must be a folder's path, got {type(self.engine_cache).__name__}")
        options = replace(self, providers=providers, fp16=flag(self.fp16, "fp16"), tf32=flag(self.tf32, "tf32"),
                          device_id=integer(self.device_id, "device_id", 0),
                          workspace_bytes=None if self.workspace_bytes is None else
                          integer(self.workspace_bytes, "workspace_bytes", 1))
        return importlib.import_module(options.module).check(options)


def providers_text(text: str):
    """A command line's or a query's providers: "auto" (None), a shorthand, or comma-separated ONNX Runtime names."""
    if text == "auto":
        return None
    if "," in text or text.endswith("ExecutionProvider"):
        return [name.strip() for name in text.split(",")]
    return text


@dataclass(frozen=True)
class Backend:
    """An opened backend: its stages, what it computes in ("f32", "bf16", "tf32" or TensorRT's "fp16"), the providers
    that compute (ONNX Runtime's resolved list, or ["OpenVINO CPU"]), and `placement()`: which nodes ran where."""

    name: str
    stages: Stages
    precision: str
    providers: list
    placement: Callable[[], dict]
    sessions: dict  # graph -> a session with ONNX Runtime's get_inputs/get_outputs


def open_backend(manifest, options: BackendOptions) -> Backend:
    """The backend `options` choose, with the bundle's forward and gradient graphs loaded and checked against its
    manifest."""
    options = options.checked()
    backend = importlib.import_module(options.module).load(manifest, options)
    _check_graphs(manifest, backend.sessions)
    return backend


def _check_graphs(manifest, sessions: dict) -> None:
    """The graphs' own inputs and outputs must agree with the manifest's shapes and outputs."""
    def dims(port):
        return [d if isinstance(d, int) else None for d in port.shape]

    forward, gradient = sessions["forward"], sessions["gradient"]
    found = {
        "input.shape": ({i.name: dims(i) for i in forward.get_inputs()}.get("images", [None] * 4)[1:],
                        list(manifest.input.shape)),
        "target_layer.shape": ({o.name: dims(o) for o in forward.get_outputs()}.get("activations", [None] * 4)[1:],
                               list(manifest.target_layer.shape)),
    }
    outputs, inputs = {o.name: dims(o) for o in forward.get_outputs()}, {i.name: dims(i) for i in gradient.get_inputs()}
    results = {o.name: dims(o) for o in gradient.get_outputs()}
    for output in manifest.outputs:
        found[f"outputs ({output.name})"] = (results.get(output.name, [None])[1:], list(output.shape))
        found[f"outputs ({output.seed}, gradient)"] = (inputs.get(output.seed, [None])[1:], list(output.shape))
    for held in manifest.held:
        found[f"held ({held.name})"] = (outputs.get(held.name, [None])[1:], list(held.shape))
        found[f"held ({held.name}, gradient)"] = (inputs.get(held.name, [None])[1:], list(held.shape))
    for field, (graph, claimed) in found.items():
        if graph != claimed:
            raise BundleError(f"bundle '{manifest.root}': manifest field '{field}' says {claimed}, the graphs "
                              f"have {graph}")
