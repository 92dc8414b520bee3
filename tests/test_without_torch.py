"""from_onnx and the runtime with no torch at all: a model built with onnx.helper, checked against an
independent float64 numpy implementation (forward by loops, gradients by central finite differences).

scripts/test.sh runs this file again in a virtualenv where torch is not installed.
"""
import subprocess
import sys

import numpy as np
import onnx
import pytest
import support.tiny_onnx as tiny
from onnx import numpy_helper
from support.comparisons import assert_maps_match
from support.tiny_onnx import SHAPE, build_model, reference_map

from igcam_engine import Explainer
from igcam_engine.export import from_onnx, layers


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
    for name, original in dict(W2=tiny.W2, B2=tiny.B2, W3=tiny.W3, B3=tiny.B3).items():
        permuted = [v for v in found.values() if v.shape == original.shape
                    and np.array_equal(np.sort(v.ravel()), np.sort(original.astype(np.float32).ravel()))]
        assert len(permuted) == 1 and not np.array_equal(permuted[0], original.astype(np.float32)), name
        monkeypatch.setattr(tiny, name, permuted[0].astype(np.float64))
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
