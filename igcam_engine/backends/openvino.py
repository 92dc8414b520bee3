"""The OpenVINO backend: a bundle's graphs compiled by OpenVINO's runtime for the CPU, in float32 or bfloat16.

OpenVINO reads the bundle's ONNX files as they are; `OpenVINOSession` gives a compiled graph the part of ONNX
Runtime's session interface the host stages use (`run`, `get_inputs`, `get_outputs`), so that the reduction and
the upsampling stay the host's (igcam_engine.host) for every backend. bfloat16 is OpenVINO's
INFERENCE_PRECISION_HINT: convolutions and matrix products run with bf16 inputs and float32 accumulation on CPUs
with bf16 dot-product instructions (AVX512_BF16, AMX); where the CPU has none, OpenVINO would quietly run float32
instead, so asking for bf16 there is an error that says so.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, replace

from igcam_engine.errors import BundleError, OptionError, Unavailable, UserError, install_hint

NAME = "openvino"
GRAPHS = ("forward", "gradient")
PRECISIONS = ("f32", "bf16")  # OpenVINO's own names (INFERENCE_PRECISION_HINT values)
DEVICE = "CPU"


def _core():
    try:
        import openvino
    except ImportError:
        raise Unavailable(f"the OpenVINO backend needs OpenVINO's runtime: {install_hint('openvino')}") from None
    return openvino.Core()


def check(options):
    """The options OpenVINO takes: a precision (float32 unless bfloat16 is asked for), none of the GPU options."""
    if options.fp16 or options.tf32:
        raise OptionError("fp16 and tf32 are TensorRT's and CUDA's options; the OpenVINO backend takes a precision")
    precision = "f32" if options.precision is None else options.precision
    if precision not in PRECISIONS:
        raise OptionError(f"unknown precision {precision!r} for the OpenVINO backend; accepted: {', '.join(PRECISIONS)}")
    return replace(options, precision=precision)


def load(manifest, options):
    """The bundle's forward and gradient graphs compiled by OpenVINO for the CPU, behind the host stages."""
    from igcam_engine.backends import Backend
    from igcam_engine.host import HostStages

    compiled = sessions({graph: manifest.graph_path(graph) for graph in GRAPHS}, options.precision, manifest.root)
    stages = HostStages(compiled["forward"], compiled["gradient"], manifest.held, manifest.outputs)
    return Backend(NAME, stages, compiled["forward"].precision, [f"OpenVINO {DEVICE}"],
                   lambda: {graph: session.placement() for graph, session in compiled.items()}, compiled)


@dataclass(frozen=True)
class Port:
    """A graph input or output as ONNX Runtime's NodeArg shows it: a name and a shape (None for a dynamic dim)."""

    name: str
    shape: list


class OpenVINOSession:
    """One bundle graph compiled by OpenVINO. `run` may be called from several threads: each thread has its own
    infer request (OpenVINO's requests are not shared between threads; the compiled model is)."""

    def __init__(self, path: str, precision: str, core=None):
        core = core or _core()
        if precision == "bf16" and "BF16" not in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"):
            raise Unavailable(f"precision bf16: this CPU ({core.get_property(DEVICE, 'FULL_DEVICE_NAME')}) has no bfloat16 "
                            "instructions (AVX512_BF16 or AMX), so OpenVINO would run float32; use precision f32")
        self.compiled = core.compile_model(path, DEVICE, {"INFERENCE_PRECISION_HINT": precision,
                                                          "PERFORMANCE_HINT": "LATENCY"})
        # what OpenVINO will actually compute in, which a caller reports (it may differ from the hint elsewhere)
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if self.precision != precision:
            raise Unavailable(f"precision {precision}: OpenVINO compiles this graph in {self.precision} on this CPU")
        self._requests = threading.local()

    def run(self, output_names, feeds: dict) -> list:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        results = request.infer(feeds)  # copies: the next call on this request may not overwrite what it returned
        names = [port.name for port in self.get_outputs()] if output_names is None else output_names
        return [results[name] for name in names]

    def get_inputs(self) -> list:
        return [_port(node) for node in self.compiled.inputs]

    def get_outputs(self) -> list:
        return [_port(node) for node in self.compiled.outputs]

    def placement(self) -> dict:
        """{"OpenVINO CPU <precision>": {layer type: count}} of the compiled graph's executed layers: which ran in
        bfloat16 and which stayed in float32."""
        report = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str)
            if kind in ("Const", "Input", "Output"):
                continue
            layers = report.setdefault(f"OpenVINO {DEVICE} {info['runtimePrecision'].astype(str)}", {})
            layers[kind] = layers.get(kind, 0) + 1
        return report


# The bundle graphs' own input and output names: OpenVINO gives a port every name of its tensor (an output_0 that
# is an Identity of the model's "logits" is both), and the port is known by the graph's.
IO_NAME = re.compile(r"(output|seed|held)_\d+|images|baseline|alphas|weights|activations|activation_grad|seed_index|"
                     r"subtract_baseline|maps")


def _port(node) -> Port:
    shape = node.get_partial_shape()
    name = next((n for n in sorted(node.get_names()) if IO_NAME.fullmatch(n)), node.get_any_name())
    return Port(name, [d.get_length() if d.is_static else None for d in shape])


def sessions(graph_paths: dict, precision: str, bundle: str) -> dict:
    """{graph: OpenVINOSession} sharing one OpenVINO core; a graph OpenVINO refuses is one UserError line."""
    core = _core()
    compiled = {}
    for graph, path in graph_paths.items():
        try:
            compiled[graph] = OpenVINOSession(path, precision, core)
        except UserError:
            raise
        except Exception as e:  # OpenVINO raises RuntimeError with its call stack first, the reason last
            lines = [line for line in str(e).splitlines() if line.strip() and not line.startswith("Exception from")]
            raise BundleError(f"bundle '{bundle}': {graph}.onnx cannot be compiled by OpenVINO: "
                            f"{(lines or ['no reason given'])[0][:300]}") from None
    return compiled
