"""The ONNX Runtime backend: a bundle's graphs as ONNX Runtime sessions on the CPU, CUDA or TensorRT provider.

Names users write ("cpu", "cuda", "tensorrt", None for the best available) become ONNX Runtime provider lists with
their options; on a GPU provider the stages are the device's (igcam_engine.device: IOBinding and the fused kernel),
otherwise the host's (igcam_engine.host).
"""
from __future__ import annotations

import ctypes.util
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from igcam_engine.errors import BundleError, OptionError, Unavailable, install_hint

NAME = "onnxruntime"
CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
SHORT_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}
GRAPHS = ("forward", "gradient")


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise Unavailable(f"onnxruntime is not installed: {install_hint('cpu')} (or gpu)") from None
    onnxruntime.set_default_logger_severity(3)  # its warnings would precede the one-line errors below
    return onnxruntime


def _available() -> list[str]:
    available = _onnxruntime().get_available_providers()
    # onnxruntime-gpu lists TensorRT even where TensorRT's own library is missing; then it is not really there.
    if TENSORRT in available and ctypes.util.find_library("nvinfer") is None and not _loadable("libnvinfer.so.10"):
        available = [p for p in available if p != TENSORRT]
    return available


def _loadable(library: str) -> bool:
    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def default_engine_cache() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(root) / "igcam" / "tensorrt")


def tensorrt_options(fp16=False, engine_cache=None, workspace_bytes=None, device_id=0) -> dict:
    """TensorRT provider options: engines (and timing data) are cached so that the second start does not rebuild."""
    cache = str(engine_cache or default_engine_cache())
    try:
        Path(cache).mkdir(parents=True, exist_ok=True)
        problem = None if os.access(cache, os.W_OK | os.X_OK) else "not writable"
    except OSError as e:
        problem = e.strerror or str(e)
    if problem:
        raise OptionError(f"cannot use the TensorRT engine cache '{cache}': {problem} (choose another with "
                          "engine_cache / --engine-cache)")
    options = {
        "device_id": device_id, "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
    }
    if workspace_bytes is not None:
        options["trt_max_workspace_size"] = int(workspace_bytes)
    return options


def cuda_options(device_id=0, tf32=False) -> dict:
    """CUDA provider options. TF32 (tensor-core float32 with a 10-bit mantissa, on by default in ONNX Runtime on
    Ampere and newer GPUs) is off unless asked for: float32 maps then equal the CPU's to float32 precision."""
    return {"device_id": device_id, "use_tf32": int(bool(tf32))}


def resolve_providers(providers=None, *, fp16=False, engine_cache=None, workspace_bytes=None, device_id=0,
                      tf32=False) -> list:
    """None picks the best available (TensorRT, else CUDA, else CPU); later providers stay as fallbacks for the
    nodes an earlier one refuses."""
    available = _available()
    if providers is None:
        providers = next((name for name in ("tensorrt", "cuda") if SHORT_NAMES[name] in available), "cpu")
    if isinstance(providers, str):
        if providers not in SHORT_NAMES:
            raise OptionError(f"unknown provider '{providers}'; accepted: auto, cpu, cuda, tensorrt, openvino or ONNX "
                              "Runtime names")
        chain = {"cpu": [CPU], "cuda": [CUDA, CPU], "tensorrt": [TENSORRT, CUDA, CPU]}[providers]
        if SHORT_NAMES[providers] not in available:
            raise Unavailable(f"provider '{providers}' is not available here; this onnxruntime offers: "
                              f"{', '.join(available)}" + (" (install the gpu extra and TensorRT/CUDA libraries for "
                                                           "GPUs)" if providers != "cpu" else ""))
        options = {TENSORRT: tensorrt_options(fp16, engine_cache, workspace_bytes, device_id),
                   CUDA: cuda_options(device_id, tf32), CPU: {}}
        return [(name, options[name]) if options[name] else name for name in chain if name in available]
    resolved = []
    for provider in providers:
        name = provider[0] if isinstance(provider, tuple) else SHORT_NAMES.get(provider, provider)
        if name not in available:
            raise Unavailable(f"execution provider '{name}' is not available; this onnxruntime offers: "
                              f"{', '.join(available)}")
        resolved.append((name, provider[1]) if isinstance(provider, tuple) else name)
    return resolved


def first_provider(providers: list) -> str:
    """The name of the first (preferred) provider."""
    return providers[0][0] if isinstance(providers[0], tuple) else providers[0]


def on_gpu(providers: list) -> bool:
    """Whether the first (preferred) provider computes on an NVIDIA GPU."""
    return first_provider(providers) in (CUDA, TENSORRT)


def check(options):
    """The options ONNX Runtime takes: it computes in float32 (TensorRT: fp16 on request)."""
    if options.precision == "bf16":
        raise OptionError("precision 'bf16' is the OpenVINO backend's (providers 'openvino'); ONNX Runtime computes in "
                          "f32 (TensorRT: fp16, CUDA: tf32, each a flag)")
    if options.precision not in (None, "f32"):
        raise OptionError(f"unknown precision {options.precision!r} for ONNX Runtime; accepted: f32 (TensorRT: fp16, "
                          "CUDA: tf32, each a flag)")
    return replace(options, precision="f32")


def load(manifest, options):
    """Sessions of the bundle's forward and gradient graphs on the resolved providers, and their stages."""
    from igcam_engine.backends import Backend

    providers = resolve_providers(options.providers, fp16=options.fp16, engine_cache=options.engine_cache,
                                  workspace_bytes=options.workspace_bytes, device_id=options.device_id,
                                  tf32=options.tf32)
    sessions = {graph: _session(manifest, graph, providers) for graph in GRAPHS}
    first = first_provider(providers)
    precision = "fp16" if options.fp16 and first == TENSORRT else "tf32" if options.tf32 and first == CUDA else "f32"
    if on_gpu(providers):
        from igcam_engine.device import DeviceStages

        stages = DeviceStages(sessions["forward"], sessions["gradient"], options.device_id, manifest.held,
                              manifest.outputs)
    else:
        from igcam_engine.host import HostStages

        stages = HostStages(sessions["forward"], sessions["gradient"], manifest.held, manifest.outputs)
    return Backend(NAME, stages, precision, providers, lambda: placement(manifest, providers), sessions)


def _session(manifest, graph: str, providers, options=None):
    """An ONNX Runtime session of a bundle graph; a graph ONNX Runtime refuses is a bundle error, in one line."""
    ort = _onnxruntime()
    if options is None:
        options = ort.SessionOptions()
    options.log_severity_level = 3  # the one-line error below says what went wrong
    try:
        return ort.InferenceSession(manifest.graph_path(graph), options, providers=providers)
    except Exception as e:  # onnxruntime's errors have no common base class
        raise BundleError(f"bundle '{manifest.root}': {graph}.onnx cannot be loaded by ONNX Runtime: "
                          f"{str(e).splitlines()[0][:300]}") from None


def placement(manifest, providers) -> dict:
    """Which nodes ran on which provider, per graph: {graph: {provider: {op type: count}}}, from one profiled run of
    a black image (TensorRT refuses some ops, which then run on CUDA or the CPU)."""
    ort = _onnxruntime()
    image = np.zeros((1, *manifest.input.shape), np.float32)
    report = {}
    with tempfile.TemporaryDirectory() as directory:
        sessions = {}
        for graph in GRAPHS:
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = f"{directory}/igcam-{graph}"
            sessions[graph] = _session(manifest, graph, providers, options)
        feeds = {"images": image, "baseline": image, "alphas": np.array([0.5, 1.0], np.float32)}
        held = [h.name for h in manifest.held]
        activations, *values = sessions["forward"].run(["activations", *held], feeds)
        seeds = {o.seed: np.zeros((1, *o.shape), np.float32) for o in manifest.outputs}
        sessions["gradient"].run(None, {"activations": activations, "seed_index": np.zeros(2, np.int64), **seeds,
                                        **dict(zip(held, values))})
        for graph, session in sessions.items():
            report[graph] = node_placement(session.end_profiling())
    return report


def node_placement(profile_path: str) -> dict:
    """{provider: {op type: count}} from an ONNX Runtime profile (SessionOptions.enable_profiling): which nodes
    ran where. TensorRT shows its fused engines as single nodes; anything it refused appears under CUDA or CPU."""
    placement = {}
    for event in json.loads(Path(profile_path).read_text()):
        args = event.get("args", {})
        if event.get("cat") == "Node" and "provider" in args and event.get("name", "").endswith("_kernel_time"):
            ops = placement.setdefault(args["provider"], {})
            ops[args.get("op_name", "?")] = ops.get(args.get("op_name", "?"), 0) + 1
    return placement
