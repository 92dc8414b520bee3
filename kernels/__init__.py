"""The fused CUDA kernels (igcam.cu) and their precompiled PTX (igcam.ptx, rebuilt by build.sh)."""
from importlib import resources


def source_path() -> str:
    return str(resources.files(__name__) / "igcam.cu")


def ptx_path() -> str:
    return str(resources.files(__name__) / "igcam.ptx")
