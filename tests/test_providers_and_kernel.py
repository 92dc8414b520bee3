"""GPU-path pieces that run without a GPU: provider resolution, node placement, the kernel's compilation."""
import re
import shutil
import subprocess
from pathlib import Path

import onnxruntime as ort
import pytest

from igcam_engine import Explainer, UserError
from igcam_engine.backends import BackendOptions
from igcam_engine.backends.onnxruntime import CPU, CUDA, TENSORRT, cuda_options, on_gpu, resolve_providers, tensorrt_options

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = CUDA in ort.get_available_providers()


def test_cpu_and_default_resolution():
    assert resolve_providers("cpu") == [CPU]
    chain = resolve_providers(None)
    assert chain[-1] == CPU and (on_gpu(chain) == HAS_CUDA)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
@pytest.mark.parametrize("name", ["cuda", "tensorrt"])
def test_unavailable_gpu_provider_is_a_clear_error(name):
    with pytest.raises(UserError, match=f"provider '{name}' is not available here; this onnxruntime offers: .*CPU"):
        resolve_providers(name)


def test_unknown_provider_names():
    with pytest.raises(UserError, match="unknown provider 'gpu'"):
        resolve_providers("gpu")
    with pytest.raises(UserError, match="'FancyExecutionProvider' is not available"):
        resolve_providers(["FancyExecutionProvider"])


def test_explicit_provider_lists_pass_through():
    assert resolve_providers([("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]) == [
        ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"})]
    assert resolve_providers(["cpu"]) == [CPU]


def test_cuda_options_keep_float32_exact_unless_tf32_is_asked_for():
    assert cuda_options() == {"device_id": 0, "use_tf32": 0}
    assert cuda_options(device_id=2, tf32=True) == {"device_id": 2, "use_tf32": 1}


def test_tensorrt_options(tmp_path):
    options = tensorrt_options(fp16=True, engine_cache=tmp_path / "engines", workspace_bytes=2 << 30, device_id=1)
    assert options["trt_fp16_enable"] is True and options["device_id"] == 1
    assert options["trt_engine_cache_enable"] and Path(options["trt_engine_cache_path"]).is_dir()
    assert options["trt_max_workspace_size"] == 2 << 30
    with pytest.raises(UserError, match="workspace_bytes must be a positive integer, got 0"):
        BackendOptions("cpu", workspace_bytes=0).checked()
    assert on_gpu([(TENSORRT, options), CUDA, CPU]) and not on_gpu([CPU])


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    import torch

    from igcam_engine import zoo
    from igcam_engine.export import from_torch

    torch.manual_seed(0)
    model = zoo.vgg16(num_classes=4, width=4, hidden=16).eval()
    return from_torch(model, "features.29", (3, 224, 224), tmp_path_factory.mktemp("vgg"))


def test_placement_report_on_cpu(small_bundle):
    report = Explainer(small_bundle, providers="cpu").placement()
    assert set(report) == {"forward", "gradient"}
    assert set(report["forward"]) == {CPU} and report["forward"][CPU]["Conv"] == 13
    assert "ConvTranspose" in report["gradient"][CPU]  # the max-pool and FC gradients run as graph nodes


def test_cli_placement(small_bundle, tmp_path, capsys):
    from igcam_engine.apps.cli import main
    from igcam_engine.data import sample_images

    code = main(["explain", str(small_bundle), str(sample_images()[0]), "--steps", "2", "--providers", "cpu",
                 "--placement", "-o", str(tmp_path)])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    forward = next(line for line in lines if line.startswith("forward.onnx on CPUExecutionProvider: "))
    assert "Conv x13" in forward and "MaxPool x4" in forward  # the fifth pool is after features.29
    assert any(line.startswith("gradient.onnx on CPUExecutionProvider: ") and "ConvTranspose x" in line
               for line in lines)


def test_gpu_stages_without_pycuda_say_what_to_install():
    pytest.importorskip("onnxruntime")
    try:
        import pycuda  # noqa: F401
        pytest.skip("pycuda is installed")
    except ImportError:
        pass
    from igcam_engine.device import DeviceStages

    with pytest.raises(UserError, match=r"pip install '\.\[gpu\]'"):
        DeviceStages(None, None)


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)


def _code(ptx: str) -> str:
    """PTX without its comment lines (they name the compiler build)."""
    return "\n".join(line for line in ptx.splitlines() if not line.lstrip().startswith("//"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_kernel_compiles_and_shipped_ptx_is_current(tmp_path):
    source = ROOT / "kernels" / "igcam.cu"
    fresh = tmp_path / "igcam.ptx"
    subprocess.run([NVCC, "-ptx", "-arch=compute_75", "-O3", "-o", str(fresh), str(source)], check=True, timeout=300)
    assert _code(fresh.read_text()) == _code((ROOT / "kernels" / "igcam.ptx").read_text()), \
        "kernels/igcam.ptx is stale: run bash kernels/build.sh"
    # ptxas for Hopper too: catches register/shared-memory problems the PTX step does not
    result = subprocess.run([NVCC, "-cubin", "-arch=sm_90", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"),
                             str(source)], check=True, capture_output=True, text=True, timeout=300)
    for kernel in ("igcam_accumulate_f32", "igcam_accumulate_f16", "igcam_upsample_bilinear"):
        assert kernel in result.stderr
    assert not re.search(r"bytes stack frame, [1-9]\d* bytes spill", result.stderr), result.stderr


def test_shipped_ptx_defines_every_kernel():
    ptx = (ROOT / "kernels" / "igcam.ptx").read_text()
    for kernel in ("igcam_accumulate_f32", "igcam_accumulate_f16", "igcam_upsample_bilinear"):
        assert f".entry {kernel}" in ptx


def test_each_gradient_method_has_its_form_in_the_kernel():
    """methods.py's `kernel` numbers are the FORM_* constants of igcam.cu, each form's comment names its method."""
    from igcam_engine.methods import METHOD_TABLE

    source = (ROOT / "kernels" / "igcam.cu").read_text()
    enum = dict((name, int(value)) for name, value in re.findall(r"FORM_(\w+) = (\d+)", source))
    forms = {name.replace("++", "PP").upper(): row.kernel for name, row in METHOD_TABLE.items() if row.kernel is not None}
    assert forms == enum
    assert {name for name, row in METHOD_TABLE.items() if row.integrable} == \
        {name for name, row in METHOD_TABLE.items() if row.kernel is not None}
    for name in enum:
        assert re.search(rf"^//\s+FORM_{name}\s", source, re.M), f"FORM_{name} is not described in igcam.cu's header"
