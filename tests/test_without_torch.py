"""from_onnx and the runtime with no torch at all: a model built with onnx.helper, checked against an
independent float64 numpy implementation (forward by loops, gradients by central finite differences).

scripts/test.sh runs this file again in a virtualenv where torch is not installed.
"""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from comparisons import assert_maps_match
from onnx import TensorProto, helper, numpy_helper

from igcam_engine import Explainer
from igcam_engine.export import from_onnx, layers

SHAPE = (3, 12, 10)
rng = np.random.default_rng(0)
W1, B1 = rng.standard_normal((4, 3, 3, 3)) * 0.5, rng.standard_normal(4) * 0.1
W2, B2 = rng.standard_normal((5, 4, 3, 3)) * 0.5, rng.standard_normal(5) * 0.1
W3, B3 = rng.standard_normal((6, 5)), rng.standard_normal(6) * 0.1


def build_model(path):
    init = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in dict(w1=W1, b1=B1, w2=W2, b2=B2, w3=W3, b3=B3).items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["feat"]),
        helper.make_node("Conv", ["feat", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *SHAPE])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", 6])], init,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path)


def conv(x, w, b, stride):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    k, _, kh, kw = w.shape
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.empty((k, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, i, j] = np.tensordot(w, patch, axes=3) + b
    return out


def feature(x):
    return np.maximum(conv(x, W1, B1, 1), 0)


def score(feat, target):
    pooled = np.maximum(conv(feat, W2, B2, 2), 0).mean(axis=(1, 2))
    return (W3 @ pooled + B3)[target]


def grad_fd(feat, target, eps=1e-6):
    grad = np.zeros_like(feat)
    for index in np.ndindex(feat.shape):
        up, down = feat.copy(), feat.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (score(up, target) - score(down, target)) / (2 * eps)
    return grad


def bilinear(m, size):
    """Half-pixel bilinear with clamped edges, written out point by point."""
    h, w = m.shape
    out = np.empty(size)
    for y in range(size[0]):
        for x in range(size[1]):
            sy, sx = max((y + 0.5) * h / size[0] - 0.5, 0), max((x + 0.5) * w / size[1] - 0.5, 0)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            top = m[y0, x0] * (1 - fx) + m[y0, x1] * fx
            bottom = m[y1, x0] * (1 - fx) + m[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def reference_map(image, target, alphas, weights, subtract):
    image = image.astype(np.float64)
    base = feature(np.zeros_like(image))
    total = 0
    for alpha, weight in zip(alphas, weights):
        feat = feature(alpha * image)
        g = grad_fd(feat, target).mean(axis=(1, 2))
        total = total + weight * np.maximum(np.tensordot(g, feat - base if subtract else feat, axes=1), 0)
    return bilinear(total, SHAPE[1:])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    build_model(path)
    return path


@pytest.mark.notorch
def test_layers_and_default_target(model_path):
    rows = {r["tensor"]: r for r in layers(model_path)}
    assert rows["feat"]["shape"] == [4, 12, 10] and rows["feat"]["cut"]
    assert rows["r2"]["shape"] == [5, 6, 5] and rows["r2"]["cut"]


@pytest.mark.notorch
@pytest.mark.parametrize("variant,alphas,weights,subtract", [
    ("official", np.arange(4) / 4, np.full(4, 0.25), False),
    ("paper", np.arange(1, 5) / 4, np.full(4, 0.25), True),
])
def test_maps_match_finite_differences(model_path, tmp_path, variant, alphas, weights, subtract):
    explainer = Explainer(from_onnx(model_path, tmp_path / "bundle", tensor="feat"))
    images = np.random.default_rng(1).standard_normal((2, *SHAPE)).astype(np.float32)
    targets = [2, 5]
    maps = explainer.explain(images, targets, variant=variant, steps=4)
    expected = np.stack([reference_map(image, target, alphas, weights, subtract)
                         for image, target in zip(images, targets)])
    assert_maps_match(maps, expected)


@pytest.mark.notorch
def test_runtime_and_from_onnx_never_import_torch(model_path, tmp_path):
    script = f"""
import sys, numpy as np
from igcam_engine import Explainer
from igcam_engine.export import from_onnx
e = Explainer(from_onnx({str(model_path)!r}, {str(tmp_path / 'b')!r}))
e.explain(np.zeros((1, 3, 12, 10), np.float32), 1, steps=2)
assert 'torch' not in sys.modules, 'torch was imported'
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


@pytest.mark.notorch
def test_cli_lists_layers_and_exports_without_torch(model_path, tmp_path):
    """`pip install '.[cpu,onnx]'` is the whole torch-free install: layers, export, explain."""
    from igcam_engine.apps.cli import main
    from igcam_engine.data import sample_images

    assert main(["layers", str(model_path)]) == 0
    assert main(["export", "--onnx", str(model_path), "--tensor", "feat", "-o", str(tmp_path / "bundle")]) == 0
    photo = sample_images()[0]
    assert main(["explain", str(tmp_path / "bundle"), str(photo), "--steps", "2", "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.suffix for p in (tmp_path / "out").iterdir()) == [".json", ".npy", ".png"]


@pytest.mark.notorch
def test_a_missing_onnx_is_one_line_naming_the_install(model_path):
    script = ("import sys; sys.modules['onnx'] = None\n"
              "from igcam_engine.apps.cli import main\n"
              f"sys.exit(main(['layers', {str(model_path)!r}]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "needs onnx: pip install '.[onnx]'" in result.stderr



@pytest.mark.notorch
def test_randomized_head_matches_finite_differences_of_the_permuted_head(model_path, tmp_path, monkeypatch):
    """The sanity check's model without torch: every parameter after the target permuted (the backbone's kept), and
    its maps those of finite differences through the permuted head."""
    from igcam_engine.export.randomize import randomized_head

    bundle = from_onnx(model_path, tmp_path / "bundle", tensor="feat")
    out = randomized_head(bundle, tmp_path / "random", seed=4)
    graph = onnx.load(str(out / "gradient.onnx"))
    found = {t.name: numpy_helper.to_array(t, base_dir=str(out)) for t in graph.graph.initializer}
    module = sys.modules[__name__]
    for name, original in dict(W2=W2, B2=B2, W3=W3, B3=B3).items():
        permuted = [v for v in found.values() if v.shape == original.shape
                    and np.array_equal(np.sort(v.ravel()), np.sort(original.astype(np.float32).ravel()))]
        assert len(permuted) == 1 and not np.array_equal(permuted[0], original.astype(np.float32)), name
        monkeypatch.setattr(module, name, permuted[0].astype(np.float64))
    images = np.random.default_rng(2).standard_normal((1, *SHAPE)).astype(np.float32)
    maps = Explainer(out).explain(images, [3], method="gradcam")
    assert_maps_match(maps, reference_map(images[0], 3, [1.0], [1.0], False)[None])


@pytest.mark.notorch
def test_evaluate_without_torch(model_path, tmp_path):
    """`igcam evaluate` with the torch-free install: report written, sanity check included, torch never imported."""
    from PIL import Image

    from igcam_engine.data import sample_images

    bundle = from_onnx(model_path, tmp_path / "bundle", tensor="feat")
    data = tmp_path / "data"
    data.mkdir()
    lines = ["file,class,x0,y0,x1,y1"]
    for photo in sample_images():
        Image.open(photo).convert("RGB").resize((50, 60)).save(data / f"{photo.stem}.png")
        lines.append(f"{photo.stem}.png,1|2|4,5,10,40,50")
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    script = f"""
import sys
from igcam_engine.apps.cli import main
code = main(['evaluate', {str(bundle)!r}, {str(data)!r}, '-o', {str(tmp_path / 'report')!r}, '--methods', 'igcam,gradcam',
             '--steps', '4', '--perturbation-steps', '4'])
assert code == 0, code
assert 'torch' not in sys.modules, 'torch was imported'
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    import json

    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert report["counts"]["evaluated"] == 3 and report["summary"]["gradcam"]["sanity"]["n"] == 3
