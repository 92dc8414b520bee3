"""Every bound and every kind of bad option answered alike by each front end: the API raises the error's kind, the
CLI (`igcam explain` and `igcam batch`) prints the same line and exits with status 2 before anything is written, the
service answers the status of that kind with the same line, and batch refuses before Ray starts.

The service runs in-process (ExplainService: its parsing and engine calls, without Ray Serve; tests/test_serve.py
drives the deployed one), so this file stays in the inner loop."""
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from support.tiny_onnx import build_model

from igcam_engine import Explainer, ExplainOptions, Limits, TargetChoice
from igcam_engine.apps.batch import run_batch
from igcam_engine.apps.cli import main
from igcam_engine.apps.protocols import STATUS, HTTPError, Request, native_jobs, status_of
from igcam_engine.apps.serve import ExplainService
from igcam_engine.data import sample_images
from igcam_engine.errors import InputError, LimitError, OptionError, UserError
from igcam_engine.export import from_onnx
from igcam_engine.images import load_image, to_model_input

LIMITS = Limits(steps=64, pixels=200_000)
# id -> (text options as a command line or a query string gives them, the same values given to the API, the error's
# kind, its message). Limits: 64 passes per map; the tiny model has 6 classes and 4 channels at its target.
CASES = {
    "steps over the step limit": ({"steps": "1000"}, {"steps": 1000}, OptionError,
                                  "steps 1000 is more than 64 passes per map, the step limit (step_limit; --step-limit "
                                  "raises it)"),
    "steps zero": ({"steps": "0"}, {"steps": 0}, OptionError, "steps must be a positive integer or 'auto', got 0"),
    "steps not a number": ({"steps": "many"}, {"steps": "many"}, OptionError,
                           "steps must be a positive integer or 'auto', got 'many'"),
    "max_steps over the step limit": ({"steps": "auto", "max_steps": "100000"}, {"steps": "auto", "max_steps": 100000},
                                      OptionError, "max_steps 100000 is more than 64 passes per map, the step limit "
                                      "(step_limit; --step-limit raises it)"),
    "tolerance with fixed steps": ({"tolerance": "0.1"}, {"tolerance": 0.1}, OptionError,
                                   "tolerance and max_steps are for steps='auto' (the refinement stops when the maps "
                                   "change by less than tolerance); steps is 50"),
    "tolerance nan": ({"steps": "auto", "tolerance": "nan"}, {"steps": "auto", "tolerance": float("nan")}, OptionError,
                      "tolerance must be a number in (0, 1), got nan"),
    "unknown method": ({"method": "lime"}, {"method": "lime"}, OptionError,
                       "unknown method 'lime'; accepted: igcam, gradcam, gradcam++, xgradcam, hirescam, layercam, "
                       "eigencam, scorecam, ablationcam"),
    "unknown rule": ({"rule": "simpson"}, {"rule": "simpson"}, OptionError,
                     "unknown quadrature rule 'simpson'; accepted: left, right, midpoint, trapezoid, gauss-legendre"),
    "unknown variant": ({"variant": "fast"}, {"variant": "fast"}, OptionError,
                        "unknown variant 'fast'; accepted: official, paper"),
    "unknown baseline": ({"baseline": "white"}, {"baseline": "white"}, OptionError,
                         "unknown baseline 'white'; accepted: black, zeros"),
    "a flag that is no flag": ({"subtract_baseline": "maybe"}, {"subtract_baseline": "maybe"}, OptionError,
                               "subtract_baseline must be true or false (or 1/0), got 'maybe'"),
    "channels beyond the layer's": ({"method": "scorecam", "channels": "5"}, {"method": "scorecam", "channels": 5},
                                    OptionError, "channels (the target layer's channels) must be an integer in [1, 4], "
                                    "got 5"),
    "channels for a method without": ({"method": "gradcam", "channels": "2"}, {"method": "gradcam", "channels": 2},
                                      OptionError, "channels applies to scorecam and ablationcam (one pass per "
                                      "channel), not gradcam"),
    "target out of range": ({"target": "6"}, {"target": 6}, OptionError,
                            "target must be a class index in [0, 5], got 6"),
    "target not a number": ({"target": "cat"}, {"target": "cat"}, OptionError,
                            "target must be a class index (integers) in [0, 5], got 'cat'"),
    "top_k beyond the classes": ({"top_k": "7"}, {"top_k": 7}, OptionError, "top_k must be an integer in [1, 6], got 7"),
    "target and top_k": ({"target": "1", "top_k": "2"}, {"target": 1, "top_k": 2}, OptionError,
                         "give target or top_k, not both"),
}
TARGET_FIELDS = ("target", "top_k")
# text option -> the flag spelling it on the command line
FLAGS = {name: "--" + name.replace("_", "-") for name in (*ExplainOptions.__dataclass_fields__, *TARGET_FIELDS)}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounds")
    build_model(root / "tiny.onnx")
    return from_onnx(root / "tiny.onnx", root / "bundle", tensor="feat", preprocess="imagenet")


@pytest.fixture(scope="module")
def service(bundle):
    return ExplainService(str(bundle), limits=LIMITS)


@pytest.fixture(scope="module")
def photo():
    return sample_images()[0]


def api_error(bundle, photo, values) -> UserError:
    explainer = Explainer(bundle, limits=LIMITS)
    image = to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)[0]
    with pytest.raises(UserError) as error:
        choice = TargetChoice(values.get("target"), values.get("top_k")).checked(explainer.manifest, LIMITS)
        explainer.explain(image, choice.select(explainer.manifest, explainer.model_outputs(image)),
                          **{k: v for k, v in values.items() if k not in TARGET_FIELDS})
    return error.value


def command_line(texts) -> list:
    return [*(word for name, text in texts.items() for word in (FLAGS[name], text)), "--step-limit", "64"]


@pytest.mark.parametrize("case", CASES)
def test_every_front_end_refuses_alike(bundle, service, photo, tmp_path, capsys, case):
    texts, values, kind, message = CASES[case]
    error = api_error(bundle, photo, values)
    assert type(error) is kind and str(error) == message
    with pytest.raises(kind) as served:
        native_jobs(service, Request("POST", "/explain", texts, "image/png", body=photo.read_bytes()))
    assert str(served.value) == message and status_of(served.value) == STATUS[kind] == 400
    for command in (["explain", str(bundle), str(photo)], ["batch", str(bundle), str(photo.parent)]):
        assert main([*command, "-o", str(tmp_path / "out"), *command_line(texts)]) == 2
        assert capsys.readouterr().err == f"igcam: error: {message}\n"
        assert not (tmp_path / "out").exists(), "nothing is written before the options are checked"
    options = {k: v for k, v in values.items() if k not in TARGET_FIELDS}
    with pytest.raises(kind, match="^" + re.escape(message) + "$"):
        run_batch(bundle, photo.parent, tmp_path / "out", ExplainOptions.of(**options),
                  TargetChoice(values.get("target"), values.get("top_k")), limits=LIMITS)


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data,kind,message", [
    (png(500, 500), LimitError, "is 500x500 pixels, more than the limit of 200000 (--max-pixels raises it)"),
    (b"\x89PNG\r\n\x1a\n and then nothing", InputError, "as an image (accepted: PNG, JPEG, BMP, WebP, TIFF, ...)"),
])
def test_bad_images_are_answered_by_kind(bundle, service, tmp_path, capsys, data, kind, message):
    """An image over the pixel limit, and bytes that are no image: the same kind and the same words everywhere
    (each names the image its own way: a path, a file name, "image bytes")."""
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    with pytest.raises(kind, match=re.escape(message)):
        load_image(path, LIMITS.pixels)
    with pytest.raises(kind) as served:
        native_jobs(service, Request("POST", "/explain", {}, "image/png", body=data))
    assert message in str(served.value) and status_of(served.value) == STATUS[kind]
    assert main(["explain", str(bundle), str(path), "-o", str(tmp_path / "out"), "--max-pixels", "200000"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"igcam: error: cannot read '{path}'" if kind is InputError else f"igcam: error: '{path}'")
    assert message in line
    (entry,) = json.loads((tmp_path / "out" / "results.json").read_text())
    assert entry["kind"] == kind.kind and message in entry["error"]


def test_statuses_follow_the_kind_not_the_wording(service):
    """The same message under two kinds gets two statuses: the service reads the type."""
    assert status_of(OptionError("more than the limit")) == 400
    assert status_of(LimitError("trapezoid")) == 413
    assert status_of(InputError("x")) == 422
    with pytest.raises(HTTPError) as error:
        native_jobs(service, Request("POST", "/explain", {}, "image/png"))
    assert error.value.status == 400


def test_work_is_bounded_before_it_is_allocated(bundle):
    """Targets per image, the maps of a call and one interpolated image's memory are refused before anything is
    computed; rows per call stay within the memory budget whatever is asked (tests/test_hostile.py)."""
    explainer = Explainer(bundle)
    image = np.zeros((2, 3, 12, 10), np.float32)
    with pytest.raises(OptionError, match=r"^targets: 1000000 classes per image, more than 6"):
        explainer.explain(image, np.zeros((2, 10**6), np.int64))
    small = Explainer(bundle, memory_budget=60_000)
    with pytest.raises(LimitError, match=r"^11 image\(s\) x 6 target\(s\) of maps and seeds need about"):
        small.explain(np.zeros((11, 3, 12, 10), np.float32), np.tile(np.arange(6), (11, 1)))
    with pytest.raises(OptionError, match="^rows_per_call must be a positive integer, got 0$"):
        explainer.explain(image, 1, rows_per_call=0)
    with pytest.raises(LimitError, match=r"^one interpolated image of this model needs about 0\.1 MiB"):
        Explainer(bundle, memory_budget=50_000)


def test_inputs_are_type_checked_before_a_library_sees_them(bundle, tmp_path):
    import torch

    explainer = Explainer(bundle)
    images = torch.zeros(1, 3, 12, 10, requires_grad=True)  # numpy() would refuse it
    assert explainer.explain(images, torch.tensor([1]), steps=2).shape == (1, 12, 10)
    for call, kind, message in (
        (lambda: Explainer(None), UserError, "a bundle is a folder's path"),
        (lambda: load_image(5), OptionError, "an image is a file's path or its encoded bytes, got int"),
        (lambda: explainer.explain(None, 1), InputError, "images must be an array"),
        (lambda: explainer.explain(images, 1, {"steps": 2}), OptionError, "options must be an ExplainOptions"),
        (lambda: explainer.explain(images, 1, stpes=2), OptionError, "unknown option(s) 'stpes'"),
        (lambda: from_onnx(None, tmp_path / "b"), OptionError, "the ONNX file must be a path"),
    ):
        with pytest.raises(kind) as error:
            call()
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
