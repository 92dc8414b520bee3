"""Hostile and careless input to bundles, images, the API and the CLI: every case gets one line saying what was
wrong (a UserError; exit status 2 from the CLI) or the right result, and nothing is read outside a bundle."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.images import png_claiming
from support.tiny_onnx import build_model

from igcam_engine import Explainer, UserError
from igcam_engine.apps.cli import main
from igcam_engine.bundle import sha256
from igcam_engine.data import sample_images
from igcam_engine.export import from_onnx
from igcam_engine.images import load_image, to_model_input

SHAPE = (3, 12, 10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    build_model(root / "tiny.onnx")
    return from_onnx(root / "tiny.onnx", root / "bundle", tensor="feat", preprocess="imagenet")


@pytest.fixture
def copy(bundle, tmp_path):
    """A copy of the bundle to tamper with, and a function that rewrites its manifest."""
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)

    def edit(change):
        manifest = json.loads((target / "manifest.json").read_text())
        change(manifest)
        (target / "manifest.json").write_text(json.dumps(manifest))
        return target

    return target, edit


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


def refused(path, match):
    with pytest.raises(UserError, match=match) as error:
        Explainer(path)
    return one_line(error)


# ---------------------------------------------------------------- bundles


def test_graph_paths_outside_the_bundle_are_refused_before_they_are_opened(copy, tmp_path):
    target, edit = copy
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copyfile(target / "forward.onnx", elsewhere / "forward.onnx")
    digest = sha256(elsewhere / "forward.onnx")
    for name in ("../elsewhere/forward.onnx", str(elsewhere / "forward.onnx"), "..", "sub/forward.onnx"):
        edit(lambda m, name=name: m["graphs"]["forward"].update(file=name, sha256=digest))
        refused(target, r"manifest field 'graphs.forward.file' must be a plain file name inside the bundle")
    edit(lambda m: m["graphs"]["forward"].update(file="forward.onnx"))
    for name in ("../../secret", "/etc/passwd"):
        edit(lambda m, name=name: m["weights"].update(file=name))
        refused(target, r"manifest field 'weights.file' must be a plain file name")


def test_links_out_of_the_bundle_are_refused(copy, tmp_path):
    target, _ = copy
    outside = tmp_path / "weights-outside.bin"
    shutil.move(target / "weights.bin", outside)
    (target / "weights.bin").symlink_to(outside)
    refused(target, "weights.bin is a link that leads out of the bundle")
    (target / "weights.bin").unlink()
    shutil.move(outside, target / "weights.bin")
    (target / "stray.bin").symlink_to("/etc/passwd")
    refused(target, "stray.bin is a link that leads out of the bundle")


@pytest.mark.parametrize("change,match", [
    (lambda m: m.pop("task"), "manifest field 'task' is missing"),
    (lambda m: m["task"].update(classes="6"), r"'task.classes' must be an integer in \[1, "),
    (lambda m: m["task"].update(classes=True), r"'task.classes' must be an integer"),
    (lambda m: m["task"].update(classes=7), r"'task.classes' must be 6 \(what the outputs hold\)"),
    (lambda m: m["task"].update(kind="segmentation"), r"'task' must be outputs that a segmentation task reads"),
    (lambda m: m["task"].update(kind="detection"), r"'task.detector' must be one of \['yolov8'"),
    (lambda m: m["task"].update(kind="embedding"), r"'task.classes' must be null for embeddings"),
    (lambda m: m.pop("outputs"), "manifest field 'outputs' is missing"),
    (lambda m: m.update(outputs=[]), r"'outputs' must be a list of 1 to 16"),
    (lambda m: m["outputs"][0].update(name="output_1"), r"'outputs\[0\]' must be \{name: 'output_0'"),
    (lambda m: m["outputs"][0].update(shape=[6, 1 << 24]), r"'outputs' must be at most \d+ elements per row"),
    (lambda m: m["outputs"][0].update(layout="NCHW"), r"'outputs\[0\].layout' must be null, or one of"),
    (lambda m: m.update(labels=["a", "b"]), r"'labels' must be null or a list of 6 strings"),
    (lambda m: m.update(labels=[1, 2, 3, 4, 5, 6]), r"'labels' must be null or a list of 6 strings"),
    (lambda m: m["input"].update(shape=[3, 100000, 100000]), r"'input.shape\[1\]' must be an integer in \[1, 16384\]"),
    (lambda m: m["input"].update(shape=[3, 8000, 9000]), r"'input.shape' must be at most \d+ elements"),
    (lambda m: m["input"].update(shape="3,12,10"), r"'input.shape' must be a list \[C, H, W\]"),
    (lambda m: m["input"].update(shape=[3, 12, 11]), r"'input.shape' says \[3, 12, 11\], the graphs have \[3, 12, 10\]"),
    (lambda m: m["target_layer"].update(shape=[5, 12, 10]), r"'target_layer.shape' says \[5, 12, 10\], the graphs have"),
    (lambda m: (m["outputs"][0].update(shape=[7]), m["task"].update(classes=7), m.update(labels=None)),
     r"'outputs \(output_0\)' says \[7\], the graphs have \[6\]"),
    (lambda m: m["preprocess"].update(resize="zoom"), r"'preprocess': preprocess resize 'zoom' is not one of"),
    (lambda m: m["preprocess"].update(scale="a lot"), r"'preprocess': preprocess scale must be a finite number"),
    (lambda m: m["preprocess"].pop("std"), r"'preprocess': preprocess lacks \['std'\]"),
    (lambda m: m["graphs"].pop("gradient"), "manifest field 'graphs.gradient' is missing"),
    (lambda m: m["graphs"]["gradient"].update(sha256="beef"), "'graphs.gradient.sha256' must be 64 lowercase"),
    (lambda m: m["outputs"][0].update(before="Relu"), r"manifest field 'outputs\[0\].before' must be"),
    (lambda m: m["input"].update(dtype="float16"), "'input.dtype' must be 'float32'"),
])
def test_every_manifest_field_is_checked(copy, change, match):
    _, edit = copy
    refused(edit(change), match)


def test_malformed_manifests(copy):
    target, _ = copy
    for text, match in (("[1, 2]", "must hold a JSON object"), ("{not json", "is not valid JSON"),
                        ('{"format": "igcam-bundle", "format_version": 9}', "v9 is not supported")):
        (target / "manifest.json").write_text(text)
        refused(target, match)
    with open(target / "manifest.json", "wb") as f:
        f.truncate(17 << 20)
    refused(target, "a manifest is at most")


def test_a_graph_onnx_runtime_refuses_is_one_line(copy):
    target, edit = copy
    (target / "forward.onnx").write_bytes(b"\x08\x07not a model at all")
    edit(lambda m: m["graphs"]["forward"].update(sha256=sha256(target / "forward.onnx")))
    refused(target, r"forward.onnx cannot be loaded by ONNX Runtime")


# ---------------------------------------------------------------- images


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    bomb = png_claiming(50000, 50000)
    assert len(bomb) < 2000
    with pytest.raises(UserError, match=r"image bytes claims 2500000000 pixels, more than the limit of 40000000"):
        load_image(bomb)
    (tmp_path / "bomb.png").write_bytes(bomb)
    with pytest.raises(UserError, match="bomb.png' claims 2500000000 pixels"):
        load_image(tmp_path / "bomb.png")
    with pytest.raises(UserError, match="image bytes is 7000x6000 pixels, more than the limit of 40000000"):
        load_image(png_claiming(7000, 6000))  # within Pillow's own bound, beyond ours
    big = Image.new("RGB", (2000, 1500))
    with pytest.raises(UserError, match="is 2000x1500 pixels, more than the limit of 1000000"):
        load_image(_png(big), max_pixels=1_000_000)
    assert load_image(_png(big)).size == (2000, 1500)


def _png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


def test_sixteen_bit_pictures_are_scaled_not_clipped():
    ramp = (np.arange(256, dtype=np.uint16)[None, :].repeat(4, 0) * 257)  # 0..65535
    picture = np.asarray(load_image(_png(Image.fromarray(ramp))))
    assert picture.shape == (4, 256, 3)
    np.testing.assert_array_equal(picture[0, :, 0], np.arange(256))  # not 255 everywhere


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated by 90 degrees
    upright = load_image(_png(wide, format="JPEG", exif=exif.tobytes()))
    assert upright.size == (20, 40)


def test_numpy_pictures_feed_to_model_input():
    spec = {"resize": "stretch", "scale": 1 / 255, "mean": [0, 0, 0], "std": [1, 1, 1]}
    gray = np.linspace(0, 1, 12 * 10).reshape(12, 10)
    x, shown = to_model_input(gray, SHAPE, spec)
    assert x.shape == SHAPE and np.allclose(x[0], x[1]) and abs(x.max() - 1) < 1e-6
    rgb = (np.arange(12 * 10 * 3) % 256).astype(np.uint8).reshape(12, 10, 3)
    x, shown = to_model_input(rgb, SHAPE, spec)
    np.testing.assert_array_equal(shown, rgb)
    with pytest.raises(UserError, match=r"floating-point numpy picture must hold finite values in \[0, 1\]"):
        to_model_input(gray * 255, SHAPE, spec)
    with pytest.raises(UserError, match=r"a numpy picture must be \[H, W\]"):
        to_model_input(np.zeros((2, 3, 4, 5), np.uint8), SHAPE, spec)
    with pytest.raises(UserError, match="must be a PIL image or a numpy array"):
        to_model_input("cat.png", SHAPE, spec)


def test_undecodable_bytes_name_themselves():
    with pytest.raises(UserError, match=r"^cannot read image bytes as an image") as error:
        load_image(b"\x89PNG\r\n\x1a\n rest missing")
    assert "BytesIO" not in str(error.value)


# ---------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def explainer(bundle):
    return Explainer(bundle)


def images(count=2):
    return np.random.default_rng(0).standard_normal((count, *SHAPE)).astype(np.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(images=images().astype(np.float64) * 1e300), r"NaN or infinite values \(in float32\)"),
    (dict(images=np.full((1, *SHAPE), 3e38, np.float32), targets=[1]), "overflowed float32"),
    (dict(baseline=np.full(SHAPE, np.nan)), "baseline contains NaN"),
    (dict(subtract_baseline="false"), r"subtract_baseline must be true or false \(or 1/0\), got 'false'"),
    (dict(normalize="no"), "normalize must be true or false"),
    (dict(rule=""), "unknown quadrature rule ''"),
    (dict(method=""), "unknown method ''"),
    (dict(variant=""), "unknown variant ''"),
    (dict(images=np.zeros((0, *SHAPE), np.float32), targets=np.zeros(0, int)), "the batch is empty"),
    (dict(targets=[[1, 2], [3]]), r"targets of shape \[B, T\] need the same number of classes"),
    (dict(targets=[5000, 1]), r"class indices in \[0, 5\], got 5000$"),
    (dict(baseline=object()), "a baseline must be 'black', 'zeros' or an array"),
])
def test_explain_arguments(explainer, kwargs, match):
    arguments = {"images": images(), "targets": [1, 2], **kwargs}
    with pytest.raises(UserError, match=match) as error:
        explainer.explain(arguments.pop("images"), arguments.pop("targets"), steps=2, **arguments)
    one_line(error)


def test_labels_and_adaptive_take_the_documented_arguments(explainer):
    with pytest.raises(UserError, match=r"class must be a class index in \[0, 5\], got -1"):
        explainer.label(-1)
    adaptive = explainer.explain_adaptive(images(), [1, 2], steps="auto", method="igcam", tolerance=0.5)
    np.testing.assert_array_equal(adaptive.maps, explainer.explain(images(), [1, 2], steps="auto", tolerance=0.5))


def test_memory_stays_bounded_whatever_rows_per_call_asks(bundle):
    """rows per engine call are capped by the memory budget; the maps do not change."""
    small = Explainer(bundle, memory_budget=2_000_000)
    rows = []
    stages = small.backend.stages
    interpolate = stages.interpolate

    def record(images, chunk, base, alphas, keep=False):
        rows.append(chunk.rows)
        return interpolate(images, chunk, base, alphas, keep)

    stages.interpolate = record
    maps = small.explain(images(4), [1, 2, 3, 4], steps=64, rows_per_call=10**9)
    assert rows and max(rows) <= small.max_rows_per_call < 64 * 4
    np.testing.assert_allclose(maps, Explainer(bundle).explain(images(4), [1, 2, 3, 4], steps=64), rtol=1e-5,
                               atol=1e-6 * np.abs(maps).max())


# ---------------------------------------------------------------- the CLI


def cli(*args):
    return subprocess.run([sys.executable, "-m", "igcam_engine.apps.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("where", ["a file", "under a file", "/dev/null", "read-only"])
def test_unusable_output_folders_are_refused_before_the_model_runs(bundle, tmp_path, where):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    file = tmp_path / "file"
    file.write_text("x")
    output = {"a file": file, "under a file": file / "out", "/dev/null": Path("/dev/null"),
              "read-only": tmp_path / "locked"}[where]
    if where == "read-only":
        output.mkdir(mode=0o500)
    result = cli("explain", bundle, sample_images()[0], "--steps", "2", "-o", output)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "output" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file"] + (["locked"] if where == "read-only" else []))


def test_an_unreadable_image_among_others(bundle, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(50000, 50000))
    result = cli("explain", bundle, sample_images()[0], broken, bomb, "--steps", "2", "-o", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("igcam: error:") == 2 and "broken.png" in result.stderr
    assert "claims 2500000000 pixels" in result.stderr
    entries = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [("error" in e) for e in entries] == [False, True, True]
    assert (tmp_path / "out" / "chelsea.class{}.npy".format(entries[0]["predicted"])).exists()


def test_colliding_names_get_distinct_files(bundle, tmp_path):
    (tmp_path / "other").mkdir()
    photo = sample_images()[0]
    for path in (tmp_path / "a.png", tmp_path / "a-2.png", tmp_path / "other" / "a.png"):
        shutil.copyfile(photo, path)
    result = cli("explain", bundle, tmp_path / "a.png", tmp_path / "other" / "a.png", tmp_path / "a-2.png",
                 "--target", "1", "--steps", "2", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    entries = json.loads((tmp_path / "out" / "results.json").read_text())
    names = [Path(e["maps"][0]["map"]).name for e in entries]
    assert names == ["a.class1.npy", "a-3.class1.npy", "a-2.class1.npy"]


def test_cli_option_mistakes(bundle, tmp_path):
    result = cli("explain", bundle, sample_images()[0], "--tolerance", "2", "-o", tmp_path)
    assert result.returncode == 2 and "tolerance and max_steps are for steps='auto'" in result.stderr
    result = cli("explain", bundle, sample_images()[0], "--target", "5000", "-o", tmp_path)
    assert result.stderr == "igcam: error: target must be a class index in [0, 5], got 5000\n"
    result = cli("explain", bundle, sample_images()[0], "--top-k", "2", "--steps", "2", "-o", tmp_path)
    assert result.returncode == 0 and result.stdout.count(" (p=") == 3  # the prediction and both maps


def test_layers_say_which_tensors_can_be_targets(tmp_path, capsys):
    build_model(tmp_path / "tiny.onnx")
    assert main(["layers", str(tmp_path / "tiny.onnx")]) == 0
    tensors, outputs = capsys.readouterr().out.split("\n\n")
    rows = {line.split()[0]: line for line in tensors.splitlines()[1:]}
    assert rows["feat"].endswith("yes") and "no (1x1" in rows["g"]
    assert outputs.splitlines()[1].split() == ["prob", "logits", "(before", "its", "Softmax)", "[6]"]
