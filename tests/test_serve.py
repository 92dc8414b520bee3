"""`igcam serve` under load on 127.0.0.1: 64 requests from 8 clients, maps equal to in-process explanations,
batching visible, bad requests answered with 4xx while the server keeps serving."""
import importlib.util
import io
import json
import os
import urllib.request

import numpy as np
import pytest
import torch
from support.comparisons import assert_maps_match
from support.processes import Scope
from support.serving import serve_on

from igcam_engine import Explainer, zoo
from igcam_engine.benchmarks import serve_load
from igcam_engine.data import sample_images
from igcam_engine.export import from_torch
from igcam_engine.images import load_image, to_model_input

HAS_RAY = importlib.util.find_spec("ray") is not None
pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not HAS_RAY and not os.environ.get("CI"), reason="ray[serve] is not installed")]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert HAS_RAY, "ray[serve] must be installed in CI (scripts/setup.sh installs the serve extra)"
    torch.manual_seed(0)
    model = zoo.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    root = tmp_path_factory.mktemp("serve")
    bundle = from_torch(model, "features.18", (3, 96, 128), root / "bundle", preprocess="imagenet")
    scope = Scope(root / "serve.log")
    try:
        yield serve_on(scope, bundle, "--max-batch", "8", "--batch-wait-ms", "50", "--providers", "cpu"), bundle
    finally:
        scope.stop()
        assert not scope.members(), "igcam serve left processes behind"


def test_load_from_eight_clients_is_batched_and_exact(server):
    base, bundle = server
    photos = [p.read_bytes() for p in sample_images() if p.suffix == ".png"]
    responses = serve_load.load(base, photos, requests=64, clients=8, query="?steps=6&variant=paper&output=npy")
    assert [r[0] for r in responses] == [200] * 64
    explainer = Explainer(bundle)
    expected = {}
    for i, (_, body, headers, _) in enumerate(responses):
        photo = photos[i % len(photos)]
        if photo not in expected:
            image = to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)[0]
            target = int(explainer.predict(image).argmax())
            expected[photo] = (target, explainer.explain(image, target, steps=6, variant="paper"))
        target, maps = expected[photo]
        assert json.loads(headers["x-igcam-targets"]) == [{"kind": "classifier", "category": target}]
        assert_maps_match(np.load(io.BytesIO(body)), maps, 1e-4, 1e-4)
    with urllib.request.urlopen(f"{base}/stats", timeout=30) as response:
        stats = json.loads(response.read())
    assert max(map(int, stats["batch_sizes"])) > 1, "no two requests were batched together"
    assert stats["explained"] >= 64


@pytest.mark.parametrize("body,content_type,query,status,message", [
    (b"hello", "text/plain", "", 415, "content type 'text/plain' is not accepted"),
    (b"\x89PNG broken", "image/png", "", 422, "cannot read image bytes"),
    (None, "image/png", "?target=10", 400, "target must be a class index in [0, 9], got 10"),
    (None, "image/png", "?steps=0", 400, "steps must be a positive integer or 'auto', got 0"),
    (None, "image/png", "?steps=5000", 400, "steps 5000 is more than 256 passes per map, the step limit"),
    (None, "image/png", "?output=gif", 400, "unknown output 'gif'; accepted: png, npy, json"),
    (b"", "image/png", "", 400, "the request has no image"),
    (None, "image/png", "?integrate=maybe", 400, "integrate must be true or false (or 1/0), got 'maybe'"),
    (None, "image/png", "?method=eigencam&integrate=1", 400, "eigencam has no gradient to integrate"),
    (None, "image/png", "?method=scorecam&channels=257", 400, "must be an integer in [1, 256], got 257"),
    (None, "image/png", "?method=gradcam&channels=4", 400, "channels applies to scorecam and ablationcam"),
    (b"\x00" * (21 << 20), "image/png", "", 413, "exceeds the limit"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, body, content_type, query, status, message):
    base, _ = server
    photo = sample_images()[0].read_bytes()
    got, reply, _, _ = serve_load.post(f"{base}/explain{query}", photo if body is None else body, content_type)
    assert got == status and message in json.loads(reply)["error"]
    ok, png, headers, _ = serve_load.post(f"{base}/explain?steps=2", photo, "image/png")
    assert ok == 200 and png.startswith(b"\x89PNG") and json.loads(headers["x-igcam-predictions"])


def test_multipart_upload_with_json_output(server):
    base, _ = server
    boundary = "igcamboundary"
    photo = sample_images()[1].read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n2\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"output\"\r\n\r\njson\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"c.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + photo + f"\r\n--{boundary}--\r\n".encode()
    status, reply, _, _ = serve_load.post(f"{base}/explain?steps=3", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200
    result = json.loads(reply)
    assert len(result["targets"]) == 2 and result["shape"] == [2, 96, 128] and len(result["prediction"]["top"]) == 5


@pytest.mark.parametrize("query,options", [
    ("method=layercam&integrate=1&steps=3", dict(method="layercam", integrate=True, steps=3)),
    ("method=scorecam&channels=6", dict(method="scorecam", channels=6)),
    ("method=ablationcam", dict(method="ablationcam", channels=256)),  # the service's default bound
    ("method=eigencam", dict(method="eigencam")),
])
def test_every_method_is_served(server, query, options):
    """The service's maps are the API's for the same options (the API's against float64 torch: test_methods.py)."""
    base, bundle = server
    photo = sample_images()[1]
    status, body, _, _ = serve_load.post(f"{base}/explain?target=3&output=npy&{query}", photo.read_bytes(), "image/png")
    assert status == 200, body
    explainer = Explainer(bundle)
    image = to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)[0]
    assert_maps_match(np.load(io.BytesIO(body)), explainer.explain(image[None], np.array([[3]]), **options)[0], 1e-4, 1e-4)
