"""`igcam batch` over a folder of 21 images, one of them corrupt: 20 maps, the bad file reported, the same maps
as `igcam explain`, and a rerun that does no work."""
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
from support.comparisons import assert_maps_match, max_normalized_difference
from support.folders import bundle_and_photos
from support.images import png_claiming
from support.processes import Scope

from igcam_engine import Explainer
from igcam_engine.apps.cli import main
from igcam_engine.images import load_image, to_model_input
from igcam_engine.targets import ClassifierOutputTarget, LinearTarget

HAS_RAY_DATA = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pandas") is not None
pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not HAS_RAY_DATA and not os.environ.get("CI"), reason="ray[data] is not installed")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    bundle, images = bundle_and_photos(root, 20)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but the rest is not")
    (images / "huge.png").write_bytes(png_claiming(50000, 50000))
    (images / "looped.png").symlink_to("looped.png")  # a link to itself: never silently skipped
    return root, bundle, images


def batch(root, bundle, images, out, *extra):
    """Runs `igcam batch` to completion (bounded) and checks that it left no process behind."""
    scope = Scope(root / "batch.log", cache=root / "bundle-cache")
    result = scope.run(["batch", bundle, images, "-o", out, "--steps", "4", "--batch-size", "6", "--actors", "2",
                        *extra], cwd=root, timeout=600)
    assert not scope.members(), "igcam batch left processes behind"
    return result


def test_folder_with_a_corrupt_image_then_a_rerun_that_does_nothing(folder, tmp_path):
    assert HAS_RAY_DATA, "ray[data] must be installed in CI (scripts/setup.sh installs the scale extra)"
    root, bundle, images = folder
    out = tmp_path / "out"
    first = batch(root, bundle, images, out)
    assert first.returncode == 1, first.stderr
    assert "20 explained, 0 already done, 3 failed" in first.stdout
    assert "local://" not in first.stderr and "deprecat" not in first.stderr.lower(), first.stderr
    assert "corrupt.png: cannot read 'corrupt.png' as an image" in first.stderr
    assert "huge.png: 'huge.png' claims 2500000000 pixels, more than the limit" in first.stderr
    assert "looped.png: 'looped.png' cannot be read: a broken link or a link loop" in first.stderr
    assert len(list(out.glob("*.npy"))) == 20 and len(list(out.glob("photo*.json"))) == 20
    failures = {f["image"].split("/")[-1]: f["kind"] for f in json.loads((out / "failures.json").read_text())}
    assert failures == {"looped.png": "bad input", "corrupt.png": "bad input", "huge.png": "too large"}

    # same maps as igcam explain (one image at a time, in process)
    explained = tmp_path / "explain"
    assert main(["explain", str(bundle), str(images / "photo00.png"), "--steps", "4", "--providers", "cpu",
                 "-o", str(explained)]) == 0
    (single,) = explained.glob("photo00.class*.npy")
    assert_maps_match(np.load(out / single.name)[None], np.load(single)[None], 1e-5, 1e-5)

    # the two actors' node holds one copy of the bundle, in its bundle cache under the manifest's sha256
    (cached,) = (root / "bundle-cache").iterdir()
    assert cached.name == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:24]
    listed = json.loads((bundle / "manifest.json").read_text())
    files = {"manifest.json", listed["weights"]["file"], *(g["file"] for g in listed["graphs"].values())}
    assert {f.name: f.read_bytes() for f in cached.iterdir()} == {name: (bundle / name).read_bytes() for name in files}
    inode = (cached / "manifest.json").stat().st_ino

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = batch(root, bundle, images, out)
    assert second.returncode == 0, second.stderr
    assert "0 explained, 20 already done, 0 failed" in second.stdout and "3 image(s) failed in an earlier run" in \
        second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps, "the rerun wrote files"
    assert (root / "bundle-cache" / cached.name / "manifest.json").stat().st_ino == inode, \
        "the second job's actors reused the node's copy of the bundle"


def test_bad_options_are_one_line_errors(folder, tmp_path):
    root, bundle, images = folder
    for extra, message in ((["--target", "10"], "target must be a class index in [0, 9], got 10"),):
        result = batch(root, bundle, images, tmp_path / "o", *extra)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    result = batch(root, bundle, tmp_path / "missing", tmp_path / "o")
    assert result.returncode == 2 and "does not exist" in result.stderr
    # the local Ray's workers would share this machine's bundle cache: one that cannot be made is refused up front
    (tmp_path / "file").write_text("not a folder")
    scope = Scope(root / "cache.log", cache=tmp_path / "file" / "cache")
    result = scope.run(["batch", bundle, images, "-o", tmp_path / "o"], cwd=root, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot use the bundle cache '{tmp_path}/file/cache': Not a directory (set IGCAM_CACHE" in result.stderr


def first_photos(images, count: int, folder):
    """A folder with copies of the first `count` photos of `images`."""
    folder.mkdir()
    for photo in sorted(images.glob("photo*"))[:count]:
        shutil.copyfile(photo, folder / photo.name)
    return folder


def test_a_rerun_with_other_options_redoes_the_work(folder, tmp_path):
    root, bundle, images = folder
    small, out = first_photos(images, 3, tmp_path / "images"), tmp_path / "out"
    first = batch(root, bundle, small, out)
    assert first.returncode == 0 and "3 explained" in first.stdout, first.stderr
    again = batch(root, bundle, small, out, "--target", "3", "--method", "layercam", "--integrate")
    assert again.returncode == 0 and "3 explained, 0 already done" in again.stdout, again.stderr
    records = [json.loads(p.read_text()) for p in out.glob("photo*.json")]
    assert all(r["options"]["targets"]["target"] == 3 and r["maps"][0]["target"]["category"] == 3 for r in records)
    assert all(r["options"]["explain"]["method"] == "layercam" and r["options"]["explain"]["integrate"] for r in records)
    # the maps are the API's for those options (the API's against float64 torch: tests/test_methods.py)
    explainer = Explainer(bundle, "cpu")
    for photo in sorted(small.iterdir()):
        image = to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)[0]
        expected = explainer.explain(image, 3, method="layercam", integrate=True, steps=4)
        assert_maps_match(np.load(out / f"{photo.stem}.class3.npy")[None], expected, 1e-5, 1e-5)
    assert all(r["precision"] == "f32" == r["options"]["precision"] for r in records)
    # targets as JSON (docs/targets.md): their records name them, and the maps are the API's for them
    weights = [1.0, -1.0] + [0.0] * 8  # class 0's score against class 1's
    given = json.dumps([{"kind": "classifier", "category": 1}, {"kind": "linear", "weights": weights}])
    third = batch(root, bundle, small, out, "--target", given)
    assert third.returncode == 0 and "3 explained, 0 already done" in third.stdout, third.stderr
    for photo in sorted(small.iterdir()):
        record = json.loads((out / f"{photo.stem}.json").read_text())
        assert record["options"]["targets"]["targets"] == json.loads(given)
        image = to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)[0]
        expected = explainer.explain(image[None], [[ClassifierOutputTarget(1), LinearTarget(weights)]], steps=4)[0]
        for index, name in enumerate(("class1", "linear")):
            assert_maps_match(np.load(out / f"{photo.stem}.{name}.npy")[None], expected[index:index + 1], 1e-5, 1e-5)


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the openvino extra is not installed")
def test_batch_on_the_openvino_backend(folder, tmp_path):
    """bf16 where the CPU has it (the precision is part of the options: the f32 outputs are redone), else f32."""
    import openvino

    root, bundle, images = folder
    small, out = first_photos(images, 2, tmp_path / "images"), tmp_path / "out"
    assert batch(root, bundle, small, out).returncode == 0
    precision = "bf16" if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES") else "f32"
    again = batch(root, bundle, small, out, "--providers", "openvino", "--precision", precision)
    done = "2 explained, 0 already done" if precision == "bf16" else "0 explained, 2 already done"
    assert again.returncode == 0 and done in again.stdout, again.stderr
    # the in-process backend's maps (tests/test_openvino.py holds those to float64 torch); bf16 on other batch
    # shapes rounds differently, but stays much closer to itself than to float32 (13 % on this random model)
    explainer, onnx_runtime = Explainer(bundle, "openvino", precision=precision), Explainer(bundle, "cpu")
    for photo in sorted(small.iterdir()):
        record = json.loads((out / f"{photo.stem}.json").read_text())
        image = to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)[0]
        target = record["maps"][0]["target"]["category"]
        got = np.load(out / f"{photo.stem}.class{target}.npy")[None]
        tolerance = 2e-2 if precision == "bf16" else 1e-5
        assert_maps_match(got, explainer.explain(image, target, steps=4), tolerance, tolerance)
        if precision == "bf16":
            assert max_normalized_difference(got, onnx_runtime.explain(image, target, steps=4)) > 1e-3
        assert record["precision"] == record["options"]["precision"] == precision


def test_the_output_folder_may_not_be_the_input_folder(folder):
    root, bundle, images = folder
    result = batch(root, bundle, images, images)
    assert result.returncode == 2 and "the output folder is the input folder" in result.stderr


def test_sigterm_stops_a_batch_and_everything_it_started(folder, tmp_path):
    root, bundle, images = folder
    scope = Scope(tmp_path / "batch.log")
    try:
        process = scope.start(["batch", bundle, images, "-o", tmp_path / "out", "--steps", "64", "--batch-size", "1"],
                              cwd=root)
        deadline = time.monotonic() + 120
        while not any("ray::" in command for command in scope.commands()) and time.monotonic() < deadline:
            time.sleep(0.5)  # wait until Ray's workers run
        assert process.poll() is None, scope.output()
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while scope.members() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not scope.members(), f"left after SIGTERM: {scope.commands()}"
    finally:
        scope.stop()
