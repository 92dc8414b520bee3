"""Targets in every front end: `igcam export` (--outputs, --task, --detector), `igcam explain` (--target JSON,
@FILE, --mask, a detection's overlay) and the service's request handling (targets as JSON, a mask as a multipart
field, the JSON answer), each against the Python API's maps for the same targets (the API's against float64
autograd: tests/test_targets.py)."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from support.comparisons import assert_maps_match
from test_targets import SHAPE, Segmenter, YoloV8Head, export

from igcam_engine import Explainer
from igcam_engine.apps.protocols import Request
from igcam_engine.apps.serve import ExplainService
from igcam_engine.data import sample_images
from igcam_engine.images import load_image, load_mask, to_model_input
from igcam_engine.targets import BoxScoreTarget, SemanticSegmentationTarget

PHOTO = sample_images()[0]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return export(Segmenter, tmp_path_factory.mktemp("seg") / "bundle", seed=1, preprocess="imagenet")[1]


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return export(YoloV8Head, tmp_path_factory.mktemp("det") / "bundle", detector="yolov8", preprocess="imagenet")[1]


def model_input(bundle):
    explainer = Explainer(bundle)
    return explainer, to_model_input(load_image(PHOTO), explainer.input_shape, explainer.preprocess)[0]


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "igcam_engine.apps.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def mask_png(path, box=(4, 6, 14, 20), size=(64, 48)):
    """A mask drawn over the photo at its own size: white inside `box` (top, left, bottom, right in 24 x 32 model
    pixels, scaled to the photo)."""
    picture = np.zeros((size[1], size[0]), np.uint8)
    top, left, bottom, right = box
    sy, sx = size[1] / SHAPE[1], size[0] / SHAPE[2]
    picture[round(top * sy):round(bottom * sy), round(left * sx):round(right * sx)] = 255
    Image.fromarray(picture).save(path)
    return path


def test_explain_takes_targets_as_json_a_file_and_a_mask(segmenter, tmp_path):
    explainer, image = model_input(segmenter)
    scores = explainer.model_outputs(image)[0][0]
    category = int(np.bincount(scores.argmax(axis=0).ravel()).argmax())
    target = json.dumps({"kind": "segmentation", "category": category})
    result = cli("explain", segmenter, PHOTO, "--target", target, "--steps", "4", "-o", tmp_path / "json")
    assert result.returncode == 0, result.stderr
    entry = json.loads((tmp_path / "json" / "results.json").read_text())[0]
    assert entry["classes"][0]["class"] == category and entry["maps"][0]["target"]["category"] == category
    assert "pixels" in entry["maps"][0]["target"]["mask"]  # the predicted mask, summarised
    expected = explainer.explain(image, SemanticSegmentationTarget(category), steps=4)
    assert_maps_match(np.load(tmp_path / "json" / f"{PHOTO.stem}.class{category}.npy")[None], expected, 1e-6, 1e-6)

    (tmp_path / "targets.json").write_text(json.dumps([json.loads(target), {"kind": "segmentation", "category": 0}]))
    result = cli("explain", segmenter, PHOTO, "--target", f"@{tmp_path / 'targets.json'}", "--steps", "4", "--method",
                 "gradcam", "-o", tmp_path / "file")
    assert result.returncode == 0 or "predicted nowhere" in result.stderr, result.stderr

    mask = mask_png(tmp_path / "mask.png", size=Image.open(PHOTO).size)
    result = cli("explain", segmenter, PHOTO, "--target", "2", "--mask", mask, "--steps", "4", "-o", tmp_path / "mask")
    assert result.returncode == 0, result.stderr
    pixels = load_mask(mask, explainer.input_shape, explainer.preprocess)
    assert pixels.sum() > 0
    expected = explainer.explain(image, SemanticSegmentationTarget(2, pixels), steps=4)
    assert_maps_match(np.load(tmp_path / "mask" / f"{PHOTO.stem}.class2.npy")[None], expected, 1e-6, 1e-6)


@pytest.mark.parametrize("args,message", [
    (["--target", "{not json"], "the targets are not valid JSON"),
    (["--target", '{"kind": "box", "index": 1, "category": 0}'], "BoxScoreTarget needs a detector's bundle"),
    (["--target", "@/nonexistent.json"], "no such file: the targets file '/nonexistent.json'"),
    (["--mask", "mask.png"], "--mask goes with --target C (a class) on a segmenter's bundle"),
    (["--target", '{"kind": "segmentation", "category": 1}', "--top-k", "2"], "give target or top_k, not both"),
])
def test_bad_targets_on_the_command_line_are_one_line(segmenter, tmp_path, args, message):
    mask_png(tmp_path / "mask.png")
    result = cli("explain", segmenter, PHOTO, *args, "-o", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_a_detectors_overlay_has_its_box_and_results_list_the_detections(detector, tmp_path):
    explainer, image = model_input(detector)
    result = cli("export", "--onnx", _onnx(tmp_path), "--detector", "yolov8", "--tensor", "feat",
                 "--preprocess", "imagenet", "-o", tmp_path / "bundle")
    assert result.returncode == 0 and "detection (yolov8), 3 classes" in result.stdout, result.stderr
    target = BoxScoreTarget(40, 1, [4.0, 3.0, 20.0, 18.0])
    result = cli("explain", detector, PHOTO, "--target", json.dumps(target.to_json()), "--steps", "4", "-o",
                 tmp_path / "out")
    assert result.returncode == 0, result.stderr
    entry = json.loads((tmp_path / "out" / "results.json").read_text())[0]
    assert "detections" in entry and entry["maps"][0]["target"]["index"] == 40
    expected = explainer.explain(image, target, steps=4)
    assert_maps_match(np.load(tmp_path / "out" / f"{PHOTO.stem}.box40.class1.npy")[None], expected, 1e-6, 1e-6)
    overlay = np.asarray(Image.open(tmp_path / "out" / f"{PHOTO.stem}.box40.class1.png"))
    width, height = Image.open(PHOTO).size
    x, y = round(4.0 * width / SHAPE[2]), round(11.0 * height / SHAPE[1])  # on the box's left edge
    assert (overlay[y, max(x - 1, 0):x + 2] == 255).all(axis=-1).any(), "the box is drawn"


def _onnx(folder):
    """The detector as a plain ONNX file (torch's exporter), its backbone's output named feat."""
    torch.manual_seed(0)
    model = YoloV8Head().eval()
    path = folder / "detector.onnx"

    class Named(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return model.head(x, model.backbone(x))

    import onnx

    torch.onnx.export(Named().eval(), (torch.zeros(1, *SHAPE),), str(path), dynamo=False, input_names=["x"],
                      output_names=["raw"], dynamic_axes={"x": {0: "b"}, "raw": {0: "b"}})
    graph = onnx.load(str(path))
    stage = next(n for n in graph.graph.node if n.op_type == "Relu" and "stage" in n.name)
    old = stage.output[0]
    for node in graph.graph.node:
        node.input[:] = ["feat" if x == old else x for x in node.input]
    stage.output[0] = "feat"
    onnx.save(graph, str(path))
    return path


# ---------------------------------------------------------------- the service's request handling


def multipart(fields: dict) -> tuple:
    boundary = "igcamboundary"
    body = b""
    for name, value in fields.items():
        disposition = f'form-data; name="{name}"' + ('; filename="f.png"' if isinstance(value, bytes) else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += (value if isinstance(value, bytes) else str(value).encode()) + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def serve(service, body, content_type, params):
    """What an engine replica does with a request: decode, run (as its own batch), encode; (status, type, body)."""
    response = service.answer(Request("POST", "/explain", params, content_type, body=body))
    return response.status, response.content_type, response.body


def test_the_service_takes_targets_and_masks(segmenter, tmp_path):
    service = ExplainService(str(segmenter))
    explainer, image = model_input(segmenter)
    photo = PHOTO.read_bytes()
    mask = np.zeros(SHAPE[1:], np.float32)
    mask[3:12, 5:25] = 1
    target = {"kind": "segmentation", "category": 3, "mask": mask.tolist()}
    status, kind, reply = serve(service, photo, "image/png", {"target": json.dumps(target), "steps": "4",
                                                              "output": "json"})
    assert status == 200, reply
    answer = json.loads(reply)
    assert answer["targets"][0]["target"]["category"] == 3 and "classes" in answer["prediction"]
    expected = explainer.explain(image, SemanticSegmentationTarget(3, mask), steps=4)
    assert_maps_match(np.array(answer["maps"], np.float32), expected, 1e-6, 1e-6)

    drawn = io.BytesIO()
    Image.fromarray((mask * 255).astype(np.uint8)).resize(Image.open(PHOTO).size, Image.NEAREST).save(drawn, "PNG")
    body, content_type = multipart({"target": "3", "steps": "4", "output": "npy", "image": photo,
                                    "mask": drawn.getvalue()})
    status, _, reply = serve(service, body, content_type, {})
    assert status == 200, reply
    pixels = load_mask(drawn.getvalue(), explainer.input_shape, explainer.preprocess)
    assert_maps_match(np.load(io.BytesIO(reply)), explainer.explain(image, SemanticSegmentationTarget(3, pixels),
                                                                     steps=4), 1e-6, 1e-6)
    for params, message in (({"target": "[" * 5}, "the targets are not valid JSON"),
                            ({"target": json.dumps({"kind": "segmentation", "category": 3, "mask": [[1]]})},
                             r"mask is [1, 1]; it must be the score map's [24, 32]"),
                            ({"target": json.dumps([{"kind": "segmentation", "category": 1}] * 11)},
                             "11 targets per image, more than the top_k limit 10"),
                            ({"mask": "1"}, "a mask is an image: send it as the multipart field 'mask'")):
        status, _, reply = serve(service, photo, "image/png", params)
        assert status == 400 and message in json.loads(reply)["error"], reply


def test_the_service_draws_a_detection(detector):
    service = ExplainService(str(detector))
    target = BoxScoreTarget(40, 1, [4.0, 3.0, 20.0, 18.0])
    status, kind, reply = serve(service, PHOTO.read_bytes(), "image/png",
                                {"target": json.dumps(target.to_json()), "steps": "4"})
    assert status == 200 and kind == "image/png"
    explainer, image = model_input(detector)
    status, _, reply = serve(service, PHOTO.read_bytes(), "image/png", {"target": json.dumps(target.to_json()),
                                                                          "steps": "4", "output": "npy"})
    assert_maps_match(np.load(io.BytesIO(reply)), explainer.explain(image, target, steps=4), 1e-6, 1e-6)
