"""`igcam serve` under load on 127.0.0.1: 64 requests from 8 clients, maps equal to in-process explanations,
batching visible, bad requests answered with 4xx while the server keeps serving."""
import importlib.util
import io
import json
import os
import re
import subprocess
import urllib.request

import numpy as np
import pytest
import torch
from support.comparisons import assert_maps_match
from support.processes import Scope
from support.serving import serve_on

from igcam_engine import Explainer, zoo
from igcam_engine.apps.protocols import ROUTES
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


def test_openapi_lists_every_route_and_each_answers(server):
    """/openapi.json is generated from the route table: every route is in it, and every documented operation
    answers (with its data or a refusal of the empty request; never "no such route" or "wrong method")."""
    base, _ = server
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as response:
        document = json.loads(response.read())
    assert set(document["paths"]) == {route.path for route in ROUTES}
    for path, operations in document["paths"].items():
        for method in operations:
            status, body, _, _ = serve_load.request(method.upper(), base + path.replace("{model}", "igcam"),
                                                    b"" if method == "post" else None, "application/json")
            assert status not in (404, 405), (method, path, status, body[:200])


def metric_values(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    return text, {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                  for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_count_requests_statuses_latency_and_batches(server):
    base, _ = server
    _, before = metric_values(base)
    photo = sample_images()[1].read_bytes()
    for _ in range(3):
        assert serve_load.request("GET", f"{base}/v2/models/igcam", None, "")[0] == 200
    for _ in range(2):
        assert serve_load.post(f"{base}/v2/models/igcam/infer", b'{"inputs": []}', "application/json")[0] == 400
    assert serve_load.post(f"{base}/explain?steps=2&output=npy", photo, "image/png")[0] == 200
    secret = "s3cr3t-token"
    assert serve_load.post(f"{base}/v2/models/{secret}/infer?key={secret}", secret.encode(), "text/plain")[0] == 404
    text, after = metric_values(base)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("igcam_requests_total", route="/v2/models/{model}", method="GET", status="200") == 3
    assert delta("igcam_requests_total", route="/v2/models/{model}/infer", method="POST", status="400") == 2
    assert delta("igcam_requests_total", route="/explain", method="POST", status="200") == 1
    assert delta("igcam_requests_total", route="unmatched", method="POST", status="404") == 1
    assert delta("igcam_request_duration_seconds_count", route="/v2/models/{model}") == 3
    assert delta("igcam_engine_batch_size_count") >= 1 and delta("igcam_engine_batch_size_sum") >= 1
    assert after[("igcam_engine_ready", ())] == 1 and after[("igcam_engine_queue_depth", ())] == 0
    assert secret not in text
    routes = {route.path for route in ROUTES} | {"unmatched"}
    for name, labels in after:
        for label, value in labels:
            if label == "route":
                assert value in routes
            else:
                assert re.fullmatch(r"GET|POST|other|\d{3}|[\d.e+]+|\+Inf", value)


CLIENTS_PYTHON = os.environ.get("IGCAM_CLIENTS_PYTHON", ".venv-clients/bin/python")


@pytest.mark.skipif(not os.path.exists(CLIENTS_PYTHON) and not os.environ.get("CI"),
                    reason="the clients' virtualenv (.venv-clients: tritonclient[http], kserve) is not built")
def test_triton_and_kserve_clients_get_the_apis_maps(server, tmp_path):
    """Triton's InferenceServerClient (binary tensors on and off) and KServe's InferenceRESTClient (V2 infer, binary
    and JSON; V1 predict and explain) in their own virtualenv: the Python API's maps, predictions and refusals."""
    base, bundle = server
    assert os.path.exists(CLIENTS_PYTHON), "CI builds .venv-clients (scripts/test.sh)"
    photos = sample_images()
    pixels = np.stack([np.asarray(load_image(photos[0]).resize((60, 45))),
                       np.asarray(load_image(photos[1]).resize((60, 45)))])
    np.save(tmp_path / "pixels.npy", pixels)
    parameters = {"target": 3, "steps": 4, "method": "gradcam++", "integrate": True}
    (tmp_path / "request.json").write_text(json.dumps({"pixels": str(tmp_path / "pixels.npy"), "file": str(photos[2]),
                                                       "parameters": parameters}))
    done = subprocess.run([CLIENTS_PYTHON, os.path.join(os.path.dirname(__file__), "support", "protocol_clients.py"),
                           base, "igcam", str(tmp_path / "request.json"), str(tmp_path / "answers.npz")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    arrays, facts = np.load(tmp_path / "answers.npz"), json.loads((tmp_path / "answers.json").read_text())

    explainer = Explainer(bundle)
    images = np.stack([to_model_input(p, explainer.input_shape, explainer.preprocess)[0] for p in pixels])
    options = {k: v for k, v in parameters.items() if k != "target"}
    expected = explainer.explain(images, np.array([[3], [3]]), **options)
    scores = explainer.predict(images)
    for client in ("triton_binary", "triton_json", "kserve_v2_binary", "kserve_v2_json"):
        assert arrays[f"{client}_maps"].shape == (2, 1, 96, 128), client
        for n in range(2):
            assert_maps_match(arrays[f"{client}_maps"][n], expected[n], 1e-5, 1e-5)
        np.testing.assert_allclose(arrays[f"{client}_scores"][:, 0], scores[:, 3], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(arrays["triton_binary_classes"], scores.argmax(axis=1))

    file_image = to_model_input(load_image(photos[2]), explainer.input_shape, explainer.preprocess)[0]
    v1_images = np.stack([file_image, images[0]])
    assert_maps_match(arrays["kserve_v1_maps_0"], explainer.explain(v1_images[:1], np.array([[3]]), **options)[0],
                      1e-5, 1e-5)
    assert_maps_match(arrays["kserve_v1_maps_1"], expected[0], 1e-5, 1e-5)
    kserve = facts["kserve"]
    assert [p["predicted"] for p in kserve["v1_predictions"]] == explainer.predict(v1_images).argmax(axis=1).tolist()
    assert kserve["v1_explain_predictions"] == kserve["v1_predictions"]
    assert {k: kserve["v1_explanation"][k] for k in ("method", "integrate", "steps", "precision", "shape")} == \
        {"method": "gradcam++", "integrate": True, "steps": 4, "precision": "f32", "shape": [1, 96, 128]}
    assert all(kserve[k] is True for k in ("v1_live", "v1_model_ready", "v2_live", "v2_ready", "v2_model_ready"))
    assert "steps must be a positive integer or 'auto', got 0" in kserve["refused"]["message"]
    assert kserve["refused"]["status"] == 400

    triton = facts["triton"]
    assert triton["live"] and triton["ready"] and triton["model_ready"]
    assert triton["metadata"]["name"] == "igcam" and triton["server"]["extensions"] == ["binary_tensor_data"]
    assert {(i["name"], i["datatype"]) for i in triton["metadata"]["inputs"]} == \
        {("image", "UINT8"), ("files", "BYTES"), ("input", "FP32")}
    assert triton["refused"]["status"] == "400" and "unknown parameter(s) 'stpes'" in triton["refused"]["message"]
    assert triton["unknown_model"]["status"] == "404"
