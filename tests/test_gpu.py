"""The GPU path on a real NVIDIA GPU (skipped elsewhere, with the reason).

Needs onnxruntime-gpu (CUDA provider), pycuda and a device; the TensorRT cases also need TensorRT's libraries.
"""
import numpy as np
import onnxruntime as ort
import pytest
from support.comparisons import assert_maps_match, normalized

from igcam_engine import Explainer
from igcam_engine.backends.onnxruntime import CUDA, TENSORRT, resolve_providers
from igcam_engine.maps import upsample
from igcam_engine.methods import METHOD_TABLE, accumulate
from igcam_engine.stages import Chunk, PlacedPath


def _gpu_missing():
    if CUDA not in ort.get_available_providers():
        return "onnxruntime has no CUDA provider (install onnxruntime-gpu: pip install '.[gpu]')"
    try:
        import pycuda.driver as cuda

        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device"
    except ImportError:
        return "pycuda is not installed (pip install '.[gpu]')"
    except Exception as e:  # no driver: pycuda raises its own errors
        return f"CUDA is not usable here: {e}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_missing() is not None, reason=str(_gpu_missing()))]


def _tensorrt_missing():
    try:
        resolve_providers("tensorrt")
    except Exception as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def stages():
    from igcam_engine.device import DeviceStages

    class Stub:  # DeviceStages needs a forward session only for its output type
        def get_outputs(self):
            return [type("Out", (), {"type": "tensor(float)"})()]

    return DeviceStages(Stub(), None)


# (images, steps, channels, h, w): K not a multiple of 32, h*w from 1x1 to 56x56, K up to 4096, m up to 128, B to 16
KERNEL_CASES = [(1, 1, 3, 1, 1), (2, 3, 33, 7, 7), (16, 2, 100, 14, 14), (1, 128, 70, 3, 5), (3, 4, 4096, 1, 1),
                (2, 5, 257, 56, 56), (4, 50, 2048, 7, 7), (1, 7, 4095, 2, 3)]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[str(c) for c in KERNEL_CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("base_rows", [0, 1, "per-image"])
@pytest.mark.parametrize("offsets", [(0, 0), (2, 3)], ids=["chunk at 0", "chunk at image 2, step 3"])
@pytest.mark.parametrize("method", [name for name, row in METHOD_TABLE.items() if row.kernel is not None])
def test_kernel_equals_numpy_reduction(stages, case, dtype, base_rows, offsets, method):
    """One chunk: images first..first+n of a batch of first+n+1, quadrature steps start..start+m of start+m+2,
    so that the image, baseline-row and weight offsets all matter; each gradient method's form of the kernel.
    Grad-CAM++ and XGrad-CAM divide by a channel's activation mass: their activations are rectified (as after a
    ReLU) and the baseline small, so that no channel's mass is near 0 (where float32 rounding decides the sign)."""
    method = METHOD_TABLE[method]
    n, m, k, h, w = case
    first, start = offsets
    total = first + n + 1
    rng = np.random.default_rng(sum(case))
    acts = rng.standard_normal((n * m, k, h, w))
    grads = rng.standard_normal((n * m, k, h, w)).astype(dtype)
    base = None if base_rows == 0 else rng.standard_normal((total if base_rows == "per-image" else 1, k, h, w))
    if method.name in ("gradcam++", "xgradcam"):
        acts = np.abs(acts) + 0.5
        base = None if base is None else 0.1 * np.abs(base)
    acts = acts.astype(dtype)
    base = None if base is None else base.astype(dtype)
    weights = rng.random(start + m + 2).astype(np.float32)
    expected = np.zeros((total, 2, h, w), np.float32)
    chunk_base = None if base is None else (base[first:first + n] if len(base) > 1 else base)
    accumulate(expected[first:first + n, 1], acts.astype(np.float32), grads.astype(np.float32),
               None if chunk_base is None else chunk_base.astype(np.float32), weights[start:start + m], method)
    maps = stages.maps(total, 2, (h, w))
    path = PlacedPath(stages.put(weights), None if base is None else stages.put(base))
    stages.accumulate(maps, Chunk(first, first + n, start, start + m), 1, stages.put(acts), stages.put(grads), path,
                      method)
    got = stages.finish(maps, (h, w))
    np.testing.assert_array_equal(got[:, 0], 0)  # the other target's maps stay untouched
    np.testing.assert_array_equal(got[:first], 0)  # and so do the images outside the chunk
    np.testing.assert_array_equal(got[first + n:], 0)
    np.testing.assert_allclose(got[:, 1], expected[:, 1], rtol=2e-4, atol=2e-4 * max(np.abs(expected).max(), 1))
    assert np.abs(expected).max() > 0


@pytest.mark.parametrize("src,dst", [((7, 7), (224, 224)), ((1, 1), (5, 3)), ((56, 56), (60, 61)), ((3, 5), (3, 5))])
def test_upsample_kernel_equals_numpy(stages, src, dst):
    coarse = np.random.default_rng(0).standard_normal((2, 3, *src)).astype(np.float32)
    maps = stages.maps(2, 3, src)
    with stages._context():
        stages._cuda.memcpy_htod(maps.pointer, coarse)
    np.testing.assert_allclose(stages.finish(maps, dst), upsample(coarse, dst), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import torch

    from igcam_engine import zoo
    from igcam_engine.export import from_torch

    torch.manual_seed(0)
    model = zoo.resnet50(num_classes=20, width=16).eval()
    return from_torch(model, "layer4", (3, 128, 160), tmp_path_factory.mktemp("gpu"))


IMAGES = np.random.default_rng(1).standard_normal((3, 3, 128, 160)).astype(np.float32)


IMAGES = np.random.default_rng(1).standard_normal((3, 3, 128, 160)).astype(np.float32)
PER_IMAGE_BASELINE = np.random.default_rng(2).standard_normal((3, 3, 128, 160)).astype(np.float32) * 0.3
CASES = {
    "official": dict(),
    "paper": dict(variant="paper"),
    "gradcam": dict(method="gradcam"),
    "gauss-legendre chunks": dict(rule="gauss-legendre", steps=9, subtract_baseline=True, batch_size=4),
    "per-image baselines, chunks": dict(variant="paper", steps=7, baseline=PER_IMAGE_BASELINE, batch_size=5),
    **{method: dict(method=method) for method in ("gradcam++", "xgradcam", "hirescam", "layercam", "eigencam")},
    "scorecam, 64 channels": dict(method="scorecam", channels=64, batch_size=16),
    "ablationcam, 64 channels": dict(method="ablationcam", channels=64, batch_size=16),
    "integrated gradcam++, chunks": dict(method="gradcam++", integrate=True, variant="paper", steps=6, batch_size=4),
    "integrated layercam": dict(method="layercam", integrate=True, steps=8),
}


@pytest.mark.parametrize("kwargs", list(CASES.values()), ids=list(CASES))
def test_cuda_maps_equal_cpu_maps(bundle, kwargs):
    cpu_explainer = Explainer(bundle, providers="cpu")
    targets = cpu_explainer.predict(IMAGES).argmax(axis=1)
    cpu = cpu_explainer.explain(IMAGES, targets, **kwargs)
    gpu = Explainer(bundle, providers="cuda").explain(IMAGES, targets, **kwargs)
    assert_maps_match(gpu, cpu, normalized_tolerance=1e-4, raw_tolerance=1e-4)


def test_tf32_is_off_unless_asked_for(bundle):
    """TF32 rounds convolution inputs to a 10-bit mantissa: off by default (exact float32), within 1e-2 when on."""
    exact = Explainer(bundle, providers="cuda")
    options = exact._sessions["forward"].get_provider_options()[CUDA]
    assert options["use_tf32"] == "0"
    fast = Explainer(bundle, providers="cuda", tf32=True)
    assert fast._sessions["forward"].get_provider_options()[CUDA]["use_tf32"] == "1"
    assert (exact.precision, fast.precision) == ("f32", "tf32")
    targets = exact.predict(IMAGES).argmax(axis=1)
    cpu = Explainer(bundle, providers="cpu").explain(IMAGES, targets, steps=16)
    assert_maps_match(fast.explain(IMAGES, targets, steps=16), cpu, normalized_tolerance=1e-2, raw_tolerance=1e-2)


def test_several_targets_and_chunks_on_gpu(bundle):
    explainer = Explainer(bundle, providers="cuda")
    targets = np.argsort(-explainer.predict(IMAGES), axis=1)[:, :2]
    both = explainer.explain(IMAGES, targets, steps=10, batch_size=3)
    for t in range(2):
        single = explainer.explain(IMAGES, targets[:, t], steps=10, batch_size=7)
        np.testing.assert_allclose(both[:, t], single, rtol=1e-4, atol=1e-5 * np.abs(single).max())


@pytest.mark.parametrize("method", [name for name, row in METHOD_TABLE.items() if row.kernel is not None])
def test_no_host_copy_of_activations_or_gradients(bundle, monkeypatch, method):
    """Only maps (and logits for predict) leave the device, for every gradient method integrated along the path:
    every device-to-host copy is recorded, and every output of every run is bound to device memory (an output
    bound to the host would be copied inside ONNX Runtime)."""
    explainer = Explainer(bundle, providers="cuda")
    copies, outputs = [], []
    original_numpy = ort.OrtValue.numpy
    monkeypatch.setattr(ort.OrtValue, "numpy", lambda self: copies.append(self.shape()) or original_numpy(self))
    import pycuda.driver as cuda

    original_dtoh = cuda.memcpy_dtoh
    monkeypatch.setattr(cuda, "memcpy_dtoh", lambda dest, src: copies.append(dest.shape) or original_dtoh(dest, src))
    binding = type(explainer._sessions["forward"].io_binding())
    original_bind = binding.bind_output

    def record_output(self, name, device_type="cpu", *args, **kwargs):
        outputs.append((name, device_type))
        return original_bind(self, name, device_type, *args, **kwargs)

    monkeypatch.setattr(binding, "bind_output", record_output)
    maps = explainer.explain(IMAGES, [1, 2, 3], method=method, integrate=True, steps=8, variant="paper", batch_size=5)
    assert copies == [(3, 1, 128, 160)] and maps.shape == (3, 128, 160)
    assert outputs and all(device == "cuda" for _, device in outputs), outputs
    for by_provider in explainer.placement().values():
        for ops in by_provider.values():
            assert "MemcpyToHost" not in ops


def test_weights_placed_once_per_call_and_one_stream_per_thread(bundle, monkeypatch):
    explainer = Explainer(bundle, providers="cuda")
    stages = explainer.backend.stages
    placed, original_put = [], type(stages).put
    monkeypatch.setattr(type(stages), "put", lambda self, array: placed.append(np.shape(array)) or original_put(self, array))
    explainer.explain(IMAGES, [1, 2, 3], steps=12, batch_size=5)  # nine chunks (3 per image)
    assert [shape for shape in placed if len(shape) == 1] == [(12,)]
    assert stages._stream() is stages._stream()
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        streams = list(pool.map(lambda _: id(stages._stream()), range(2)))
    assert id(stages._stream()) not in streams


@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_tensorrt_fp16_maps_close_to_cpu(bundle, tmp_path):
    cpu_explainer = Explainer(bundle, providers="cpu")
    targets = cpu_explainer.predict(IMAGES).argmax(axis=1)
    cpu = cpu_explainer.explain(IMAGES, targets, variant="paper", steps=16)
    trt = Explainer(bundle, providers="tensorrt", fp16=True, engine_cache=tmp_path).explain(
        IMAGES, targets, variant="paper", steps=16)
    assert_maps_match(trt, cpu, normalized_tolerance=1e-2, raw_tolerance=1e-2)
    for a, b in zip(trt, cpu):
        assert np.corrcoef(normalized(a).ravel(), normalized(b).ravel())[0, 1] >= 0.999
    assert list(tmp_path.iterdir()), "the TensorRT engine cache stayed empty"


@pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
def test_tensorrt_fp32_maps_equal_cpu(bundle, tmp_path):
    cpu_explainer = Explainer(bundle, providers="cpu")
    targets = cpu_explainer.predict(IMAGES).argmax(axis=1)
    cpu = cpu_explainer.explain(IMAGES, targets, steps=8)
    trt = Explainer(bundle, providers=[(TENSORRT, {"trt_engine_cache_enable": True,
                                                   "trt_engine_cache_path": str(tmp_path)}), CUDA]).explain(
        IMAGES, targets, steps=8)
    assert_maps_match(trt, cpu, normalized_tolerance=1e-3, raw_tolerance=1e-3)


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    from test_targets import Segmenter, export

    return export(Segmenter, tmp_path_factory.mktemp("gpu-seg") / "bundle", seed=1)[1]


@pytest.mark.parametrize("kwargs", [dict(steps=8), dict(method="gradcam"), dict(variant="paper", steps=6,
                                                                               batch_size=5)])
def test_seeds_on_the_device_give_the_cpu_maps(segmenter, kwargs):
    """A segmentation mask's seed placed on the device once per call (chunks read it by image index), and a cosine
    similarity's seeds made per row from the outputs brought back: the CPU provider's maps."""
    from igcam_engine.targets import SemanticSegmentationTarget, SimilarityToConceptTarget

    x = np.random.default_rng(3).standard_normal((3, 3, 24, 32)).astype(np.float32)
    mask = np.zeros((24, 32), np.float32)
    mask[4:16, 6:26] = 1
    cpu_explainer = Explainer(segmenter, providers="cpu")
    concept = np.random.default_rng(4).standard_normal(4 * 24 * 32)
    targets = [[SemanticSegmentationTarget(2, mask), SimilarityToConceptTarget(concept)]] * 3
    cpu = cpu_explainer.explain(x, targets, **kwargs)
    gpu = Explainer(segmenter, providers="cuda").explain(x, targets, **kwargs)
    assert_maps_match(gpu, cpu, 1e-4, 1e-4)
