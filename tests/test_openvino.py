"""The OpenVINO backend (providers="openvino"): float32 maps equal the float64 torch reference and the ONNX Runtime
engine's; bfloat16 maps stay within the tolerance measured on the pretrained EfficientNet-Lite0 and a real photo, and
are really bf16 (they differ from float32's); threads, chunking and several targets give the maps of one plain call;
bad choices are one clear error."""
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from support.comparisons import assert_maps_match, max_normalized_difference, max_relative_difference, normalized
from support.reference import igcam_reference, randomized, top_classes

from igcam_engine import Explainer, zoo
from igcam_engine.apps.cli import main
from igcam_engine.data import sample_images
from igcam_engine.errors import UserError
from igcam_engine.export import from_torch
from igcam_engine.images import load_image, to_model_input
from igcam_engine.preprocess import black_input
from igcam_engine.quadrature import quadrature

openvino = pytest.importorskip("openvino", reason="the openvino extra is not installed (pip install '.[openvino]')")
HAS_BF16 = "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
needs_bf16 = pytest.mark.skipif(not HAS_BF16, reason="this CPU has no bfloat16 instructions (AVX512_BF16 or AMX)")

SHAPE = (3, 64, 80)
# Measured with benchmarks/precision.py on the pretrained EfficientNet-Lite0 and chelsea (m = 16, official): bf16's
# normalized max |difference| 2.9 % and 1 - correlation 4e-4 against float32; the bounds leave ~1.5x of room.
BF16_NORMALISED, BF16_CORRELATION, BF16_RAW = 0.045, 0.999, 0.05


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    torch.manual_seed(0)
    model = randomized(zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1))).eval()
    path = from_torch(model, "layer4", SHAPE, tmp_path_factory.mktemp("resnet"))
    return model, path


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """The pretrained EfficientNet-Lite0 bundle and chelsea in its input space."""
    model = zoo.efficientnet_lite0(pretrained=True).eval()
    shape = (3, 224, 224)
    path = from_torch(model, "_head_act", shape, tmp_path_factory.mktemp("lite0"),
                      preprocess=zoo.EFFICIENTNET_LITE0_PREPROCESS)
    explainer = Explainer(path, "cpu")
    image = to_model_input(load_image(sample_images()[0]), shape, explainer.preprocess)[0][None]
    return model, path, explainer, image


def images(count=2, seed=0):
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


def test_f32_equals_the_float64_reference_and_onnx_runtime(resnet):
    model, path = resnet
    x = images()
    targets = top_classes(model, x)[:, 0]
    explainer = Explainer(path, "openvino")
    assert explainer.precision == "f32" and explainer.providers == ["OpenVINO CPU"]
    alphas, weights = quadrature("left", 8)
    expected = igcam_reference(model, "layer4", x, targets, alphas, weights, np.zeros((1, *SHAPE)), False)
    maps = explainer.explain(x, targets, steps=8, baseline="zeros")
    assert_maps_match(maps, expected, 1e-4, 1e-4)
    onnx_runtime = Explainer(path, "cpu").explain(x, targets, steps=8, baseline="zeros")
    assert max_normalized_difference(maps, onnx_runtime) <= 1e-4
    assert max_relative_difference(maps, onnx_runtime) <= 1e-4
    scores = explainer.predict(x)
    with torch.no_grad():
        np.testing.assert_allclose(scores, model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


@needs_bf16
def test_bf16_on_a_pretrained_model_and_a_real_photo(lite0):
    """Within the measured tolerance of the float32 maps (scale included), and not equal to them: bf16 really ran."""
    model, path, f32, image = lite0
    target = int(np.argmax(f32.predict(image)))
    bf16 = Explainer(path, "openvino", precision="bf16")
    assert bf16.precision == "bf16"
    maps = bf16.explain(image, target, steps=16)
    black = np.array(black_input(f32.preprocess), np.float64)[:, None, None][None]
    alphas, weights = quadrature("left", 16)
    expected = igcam_reference(model, "_head_act", image, [target], alphas, weights, black, False)
    assert_maps_match(f32.explain(image, target, steps=16), expected, 1e-4, 1e-4)
    assert max_normalized_difference(maps, expected) <= BF16_NORMALISED
    assert max_relative_difference(maps, expected) <= BF16_RAW
    assert np.corrcoef(normalized(maps).ravel(), normalized(expected).ravel())[0, 1] >= BF16_CORRELATION
    assert max_normalized_difference(maps, expected) > 1e-3, "bf16 maps equal float32's: was bf16 used at all?"
    convolutions = bf16.placement()["forward"]
    assert convolutions["OpenVINO CPU bf16"]["Convolution"] == 49 and "Convolution" not in convolutions.get("OpenVINO CPU f32", {})


@pytest.mark.parametrize("precision", ["f32", pytest.param("bf16", marks=needs_bf16)])
def test_threads_chunks_and_several_targets_give_one_calls_maps(resnet, precision):
    model, path = resnet
    explainer = Explainer(path, "openvino", precision=precision)
    x = images(3, seed=1)
    targets = top_classes(model, x, k=2)
    together = explainer.explain(x, targets, steps=6, variant="paper")
    assert together.shape == (3, 2, *SHAPE[1:])
    tolerance = dict(rtol=1e-5, atol=1e-5 * np.abs(together).max()) if precision == "f32" else \
        dict(rtol=0, atol=2e-2 * np.abs(together).max())  # bf16: other batch shapes, other blockings
    for t in range(2):
        one = explainer.explain(x, targets[:, t], steps=6, variant="paper")
        np.testing.assert_allclose(one, together[:, t], **tolerance)
    chunked = explainer.explain(x, targets, steps=6, variant="paper", batch_size=4)  # 6 rows per image: split
    np.testing.assert_allclose(chunked, together, **tolerance)
    fresh = Explainer(path, "openvino", precision=precision)
    jobs = [(images(2, seed=s), top_classes(model, images(2, seed=s))[:, 0]) for s in range(6)]
    sequential = [fresh.explain(x, t, steps=4) for x, t in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: fresh.explain(job[0], job[1], steps=4), jobs))
    for a, b in zip(sequential, threaded):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_gradient_free_methods_run_on_openvino(resnet):
    model, path = resnet
    x = images(1)
    target = int(top_classes(model, x)[0, 0])
    for method in ("eigencam", "ablationcam"):
        maps = Explainer(path, "openvino").explain(x, target, method=method)
        assert max_normalized_difference(maps, Explainer(path, "cpu").explain(x, target, method=method)) <= 1e-4


@pytest.mark.parametrize("kwargs,message", [
    (dict(providers="openvino", precision="int8"), "unknown precision 'int8' for the OpenVINO backend; accepted: f32, bf16"),
    (dict(providers="cpu", precision="bf16"), "precision 'bf16' is the OpenVINO backend's (providers 'openvino')"),
    (dict(providers="openvino", fp16=True), "fp16 and tf32 are TensorRT's and CUDA's options"),
])
def test_bad_backend_choices_say_what_is_accepted(resnet, kwargs, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        Explainer(resnet[1], **kwargs)


def test_a_cpu_without_bf16_is_an_error_not_a_silent_float32(resnet, monkeypatch):
    import igcam_engine.backends.openvino as backend

    class CoreWithoutBF16:
        def get_property(self, device, name):
            return {"OPTIMIZATION_CAPABILITIES": ["FP32", "INT8"], "FULL_DEVICE_NAME": "Old CPU"}[name]

    monkeypatch.setattr(backend, "_core", CoreWithoutBF16)
    with pytest.raises(UserError, match=r"^precision bf16: this CPU \(Old CPU\) has no bfloat16 instructions"):
        Explainer(resnet[1], "openvino", precision="bf16")


def test_without_openvino_the_error_names_the_extra(resnet, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(UserError, match=r"pip install '\.\[openvino\]'"):
        Explainer(resnet[1], "openvino")


def test_a_graph_openvino_refuses_is_one_line(resnet, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(resnet[1], copy)
    (copy / "gradient.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(UserError, match=r"gradient\.onnx cannot be compiled by OpenVINO: ") as error:
        Explainer(copy, "openvino", verify=False)
    assert "\n" not in str(error.value)


def test_cli_explain_reports_the_precision(resnet, tmp_path, capsys):
    import json

    from PIL import Image

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(photo)
    precision = "bf16" if HAS_BF16 else "f32"
    assert main(["explain", str(resnet[1]), str(photo), "-o", str(tmp_path / "out"), "--providers", "openvino",
                 "--precision", precision, "--steps", "4", "--placement"]) == 0
    assert f"forward.onnx on OpenVINO CPU {precision}: " in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "results.json").read_text())[0]["precision"] == precision
    assert main(["explain", str(resnet[1]), str(photo), "-o", str(tmp_path / "out2"), "--precision", "bf16",
                 "--providers", "cpu"]) == 2
    assert "precision 'bf16' is the OpenVINO backend's" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_batch_checks_the_backend_before_ray_starts(resnet, tmp_path):
    from igcam_engine.apps.batch import run_batch
    from igcam_engine.backends import BackendOptions

    with pytest.raises(UserError, match="precision 'bf16' is the OpenVINO backend's"):
        run_batch(resnet[1], tmp_path, tmp_path / "out", backend=BackendOptions("cpu", precision="bf16"))


@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None and not os.environ.get("CI"), reason="ray[serve] is not installed")
def test_served_on_openvino(resnet, tmp_path):
    """igcam serve --providers openvino: /stats names the precision and the maps are the backend's."""
    import io
    import json
    import urllib.request

    from PIL import Image
    from support.processes import Scope
    from support.serving import serve_on

    precision = "bf16" if HAS_BF16 else "f32"
    picture = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    explainer = Explainer(resnet[1], "openvino", precision=precision)
    image = to_model_input(picture, explainer.input_shape, explainer.preprocess)[0]
    target = int(explainer.predict(image).argmax())  # a predicted class: its map is not all ReLU-clipped
    scope = Scope(tmp_path / "serve.log")
    try:
        base = serve_on(scope, resnet[1], "--providers", "openvino", "--precision", precision)
        request = urllib.request.Request(f"{base}/explain?steps=4&target={target}&output=npy", data=buffer.getvalue(),
                                         headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=120) as response:
            served = np.load(io.BytesIO(response.read()))
        with urllib.request.urlopen(f"{base}/stats", timeout=30) as response:
            assert json.loads(response.read())["precision"] == precision
    finally:
        scope.stop()
    assert_maps_match(served, explainer.explain(image[None], target, steps=4), 1e-5, 1e-5)
    assert not scope.members(), "igcam serve left processes behind"


@pytest.mark.slow
def test_bench_precision_runs_every_backend(tmp_path):
    """The study runs and writes every backend's row: the float32 backends agree, bf16 is off by more than
    rounding and int8 by more than bf16 (the maps themselves are checked against float64 torch above)."""
    import json

    assert main(["bench", "precision", "--models", "efficientnet_lite0", "--peer-steps", "2", "--repeats", "1",
                 "--warmup", "0", "-o", str(tmp_path)]) == 0
    (entry,) = json.loads((tmp_path / "precision.json").read_text())["results"]
    rows = entry["backends"]
    assert list(rows) == ["ort_f32", "openvino_f32", "openvino_bf16", "ort_int8"] and entry["photos"] == 4
    assert rows["ort_f32"]["normalized_max_delta"] == 0 and rows["openvino_f32"]["normalized_max_delta"] <= 1e-4
    if HAS_BF16:
        assert 1e-3 < rows["openvino_bf16"]["normalized_max_delta"] < rows["ort_int8"]["normalized_max_delta"]
    assert all(row["median_s"] > 0 for row in rows.values() if "skipped" not in row)
    assert "| efficientnet_lite0 _head_act | openvino_bf16 |" in (tmp_path / "precision.md").read_text()


def test_onnx_runtime_reports_float32(resnet):
    explainer = Explainer(resnet[1], "cpu", precision="f32")
    assert explainer.precision == "f32" and explainer.providers == ["CPUExecutionProvider"]
