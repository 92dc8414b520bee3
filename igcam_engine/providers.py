"""Execution providers: names users write ("cpu", "cuda", "tensorrt") -> ONNX Runtime provider lists."""
from __future__ import annotations

import ctypes.util
import json
import os
from pathlib import Path

from igcam_engine.errors import UserError

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
SHORT_NAMES = {"cpu": CPU, "cuda": CUDA, "tensorrt": TENSORRT}


def _available() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install 'igcam-engine[cpu]' (or [gpu])") from None
    available = onnxruntime.get_available_providers()
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
    Path(cache).mkdir(parents=True, exist_ok=True)
    options = {
        "device_id": device_id, "trt_fp16_enable": bool(fp16),
        "trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
    }
    if workspace_bytes is not None:
        if int(workspace_bytes) <= 0:
            raise UserError(f"workspace_bytes must be positive, got {workspace_bytes}")
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
            raise UserError(f"unknown provider '{providers}'; accepted: cpu, cuda, tensorrt, openvino or ONNX Runtime names")
        chain = {"cpu": [CPU], "cuda": [CUDA, CPU], "tensorrt": [TENSORRT, CUDA, CPU]}[providers]
        if SHORT_NAMES[providers] not in available:
            raise UserError(f"provider '{providers}' is not available here; this onnxruntime offers: {', '.join(available)}"
                            + (" (install 'igcam-engine[gpu]' and TensorRT/CUDA libraries for GPUs)" if providers != "cpu" else ""))
        options = {TENSORRT: tensorrt_options(fp16, engine_cache, workspace_bytes, device_id),
                   CUDA: cuda_options(device_id, tf32), CPU: {}}
        return [(name, options[name]) if options[name] else name for name in chain if name in available]
    resolved = []
    for provider in providers:
        name = provider[0] if isinstance(provider, tuple) else SHORT_NAMES.get(provider, provider)
        if name not in available:
            raise UserError(f"execution provider '{name}' is not available; this onnxruntime offers: {', '.join(available)}")
        resolved.append((name, provider[1]) if isinstance(provider, tuple) else name)
    return resolved


def first_provider(providers: list) -> str:
    """The name of the first (preferred) provider."""
    return providers[0][0] if isinstance(providers[0], tuple) else providers[0]


def on_gpu(providers: list) -> bool:
    """Whether the first (preferred) provider computes on an NVIDIA GPU."""
    return first_provider(providers) in (CUDA, TENSORRT)


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
