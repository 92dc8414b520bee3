"""The service's protocols in process (an engine replica's decode, run and encode, without Ray): KServe V1 and the
Open Inference Protocol give the Python API's maps for the same images and options, the binary tensor extension is
read and written as its specification says (encoded here by hand, independently of the service's codec), every
refusal is {"error": ...} with its status, and the OpenAPI document lists every route. The same over HTTP, with
Triton's and KServe's own clients: tests/test_serve_protocols.py."""
import base64
import io
import json
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from support.comparisons import assert_maps_match

from igcam_engine import Explainer, __version__, zoo
from igcam_engine.apps.protocols import ROUTES, Request, match, openapi
from igcam_engine.apps.serve import SERVICE_LIMITS, ExplainService
from igcam_engine.data import sample_images
from igcam_engine.export import from_torch
from igcam_engine.images import load_image, to_model_input

SHAPE = (3, 64, 64)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    return from_torch(model, "features.18", SHAPE, tmp_path_factory.mktemp("protocols") / "bundle",
                      preprocess="imagenet")


@pytest.fixture(scope="module")
def service(bundle):
    return ExplainService(str(bundle), limits=replace(SERVICE_LIMITS, pixels=500_000), model="lite")


@pytest.fixture(scope="module")
def pictures():
    """Two photos of different sizes as uint8 [H, W, 3], and their files."""
    files = [p.read_bytes() for p in sample_images()[:2]]
    return [np.asarray(load_image(f).resize((70 + 9 * n, 50 + 5 * n))) for n, f in enumerate(files)], files


def expected_maps(bundle, picture, targets, **options):
    explainer = Explainer(bundle)
    image = to_model_input(picture, explainer.input_shape, explainer.preprocess)[0]
    return explainer.explain(image[None], np.array([targets]), **options)[0]


def post(service, path, body, content_type="application/json", header_length=None):
    response = service.answer(Request("POST", path, {}, content_type, header_length,
                                      json.dumps(body).encode() if isinstance(body, dict) else body))
    return response


def binary_request(header: dict, blobs: list) -> tuple:
    """The binary tensor data extension's request: the JSON header, then each binary input's bytes in order."""
    text = json.dumps(header).encode()
    return text + b"".join(blobs), str(len(text))


def read_binary_response(response) -> dict:
    """{name: array} of a response in the binary extension (its JSON header's length in the response header)."""
    length = int(response.headers["Inference-Header-Content-Length"])
    header, data, at, found = json.loads(response.body[:length]), response.body[length:], 0, {}
    types = {"FP32": "<f4", "INT64": "<i8"}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        chunk, at = data[at:at + size], at + size
        if output["datatype"] == "BYTES":
            values, i = [], 0
            while i < len(chunk):
                (n,) = struct.unpack_from("<I", chunk, i)
                values.append(chunk[i + 4:i + 4 + n].decode())
                i += 4 + n
            found[output["name"]] = np.array(values, dtype=object).reshape(output["shape"])
        else:
            found[output["name"]] = np.frombuffer(chunk, types[output["datatype"]]).reshape(output["shape"])
    assert at == len(data)
    return found


def test_v2_json_tensors_give_the_apis_maps(bundle, service, pictures):
    images, _ = pictures
    request = {"id": "r1", "parameters": {"target": 3, "steps": 4, "method": "gradcam++", "integrate": True},
               "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *images[0].shape],
                           "data": images[0].tolist()}]}
    response = post(service, "/v2/models/lite/infer", request)
    assert response.status == 200 and response.content_type == "application/json", response.body
    answer = json.loads(response.body)
    assert answer["model_name"] == "lite" and answer["id"] == "r1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert list(outputs) == ["maps", "scores", "targets", "prediction", "classes"]
    maps = np.array(outputs["maps"]["data"], np.float32).reshape(outputs["maps"]["shape"])
    assert maps.shape == (1, 1, 64, 64)
    assert_maps_match(maps[0], expected_maps(bundle, images[0], [3], steps=4, method="gradcam++", integrate=True),
                      1e-6, 1e-6)
    assert json.loads(outputs["targets"]["data"][0]) == {"kind": "classifier", "category": 3}
    predicted = json.loads(outputs["prediction"]["data"][0])["predicted"]
    assert outputs["classes"]["data"] == [predicted] and outputs["classes"]["datatype"] == "INT64"


def test_v2_binary_tensors_both_ways(bundle, service, pictures):
    """Two images of the same size as one UINT8 tensor in binary, the top 2 classes; maps and scores in binary,
    targets as JSON."""
    images, _ = pictures
    batch = np.stack([images[0], images[0][::-1].copy()])
    header = {"parameters": {"top_k": 2, "steps": 3},
              "inputs": [{"name": "image", "datatype": "UINT8", "shape": list(batch.shape),
                          "parameters": {"binary_data_size": batch.nbytes}}],
              "outputs": [{"name": "maps", "parameters": {"binary_data": True}},
                          {"name": "scores", "parameters": {"binary_data": True}},
                          {"name": "targets", "parameters": {"binary_data": True}}]}
    body, length = binary_request(header, [batch.tobytes()])
    response = post(service, "/v2/models/lite/infer", body, "application/octet-stream", length)
    assert response.status == 200, response.body
    found = read_binary_response(response)
    assert found["maps"].shape == (2, 2, 64, 64) and found["scores"].shape == (2, 2)
    explainer = Explainer(bundle)
    for n in range(2):
        image = to_model_input(batch[n], explainer.input_shape, explainer.preprocess)[0]
        scores = explainer.predict(image[None])[0]
        top = [int(c) for c in np.argsort(-scores)[:2]]
        assert [json.loads(t)["category"] for t in found["targets"][n]] == top
        np.testing.assert_allclose(found["scores"][n], scores[top], rtol=1e-5)
        assert_maps_match(found["maps"][n], explainer.explain(image[None], np.array([top]), steps=3)[0], 1e-6, 1e-6)


def test_v2_files_and_model_space_input(bundle, service, pictures):
    """Image files as BYTES (binary, length-prefixed), and the model's own float32 input [B, C, H, W] as JSON."""
    _, files = pictures
    packed = b"".join(struct.pack("<I", len(f)) + f for f in files)
    header = {"parameters": {"target": 5, "steps": 2, "binary_data_output": True},
              "inputs": [{"name": "files", "datatype": "BYTES", "shape": [2],
                          "parameters": {"binary_data_size": len(packed)}}]}
    body, length = binary_request(header, [packed])
    found = read_binary_response(post(service, "/v2/models/lite/infer", body, "application/octet-stream", length))
    for n, file in enumerate(files):
        assert_maps_match(found["maps"][n], expected_maps(bundle, load_image(file), [5], steps=2), 1e-6, 1e-6)
    explainer = Explainer(bundle)
    image = to_model_input(load_image(files[1]), explainer.input_shape, explainer.preprocess)[0]
    request = {"parameters": {"target": 5, "steps": 2}, "outputs": [{"name": "maps"}],
               "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, *SHAPE], "data": image.ravel().tolist()}]}
    answer = json.loads(post(service, "/v2/models/lite/infer", request).body)
    (maps,) = answer["outputs"]
    assert_maps_match(np.array(maps["data"], np.float32).reshape(maps["shape"])[0],
                      explainer.explain(image[None], np.array([[5]]), steps=2)[0], 1e-6, 1e-6)


def test_kserve_v1_predict_and_explain(bundle, service, pictures):
    images, files = pictures
    instances = [{"b64": base64.b64encode(files[0]).decode()}, images[1].tolist()]
    response = post(service, "/v1/models/lite:predict", {"instances": instances})
    assert response.status == 200, response.body
    explainer = Explainer(bundle)
    inputs = [to_model_input(p, explainer.input_shape, explainer.preprocess)[0]
              for p in (load_image(files[0]), images[1])]
    predictions = json.loads(response.body)["predictions"]
    assert [p["predicted"] for p in predictions] == [int(explainer.predict(x).argmax()) for x in inputs]
    response = post(service, "/v1/models/lite:explain",
                    {"instances": instances, "parameters": {"target": 7, "steps": 3, "method": "layercam",
                                                            "integrate": True}})
    answer = json.loads(response.body)
    assert answer["predictions"] == predictions and len(answer["explanations"]) == 2
    for image, explanation in zip(inputs, answer["explanations"]):
        assert (explanation["method"], explanation["steps"], explanation["precision"]) == ("layercam", 3, "f32")
        assert_maps_match(np.array(explanation["maps"], np.float32),
                          explainer.explain(image[None], np.array([[7]]), steps=3, method="layercam",
                                            integrate=True)[0], 1e-6, 1e-6)


def png_of(width, height) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


TENSOR = {"name": "image", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": [0] * 12}


@pytest.mark.parametrize("path,body,header_length,status,message", [
    ("/v2/models/lite/infer", {"inputs": [TENSOR], "parameters": {"stpes": 3}}, None, 400,
     "unknown parameter(s) 'stpes'; accepted: target, top_k, method"),
    ("/v2/models/lite/infer", {"inputs": [{**TENSOR, "datatype": "FP64"}]}, None, 400,
     "input 'image' has datatype 'FP64'; accepted: UINT8 (image), BYTES (files), FP32 (input)"),
    ("/v2/models/lite/infer", {"inputs": [{**TENSOR, "shape": [1, True, 2, 3]}]}, None, 400,
     "input 'image''s shape must be an integer"),
    ("/v2/models/lite/infer", {"inputs": [{**TENSOR, "data": [0] * 11}]}, None, 422,
     "input 'image' has 11 values, its shape [1, 2, 2, 3] needs 12"),
    ("/v2/models/lite/infer", {"inputs": [{**TENSOR, "data": [300] * 12}]}, None, 422,
     "input 'image' must hold integers in 0..255 (uint8)"),
    ("/v2/models/lite/infer", {"inputs": [{**TENSOR, "shape": [40, 2, 2, 3], "data": [0] * 480}]}, None, 413,
     "input 'image' must hold 1 to 32 images along its first axis"),
    ("/v2/models/lite/infer", {"inputs": [TENSOR], "parameters": {"steps": 5000}}, None, 400,
     "steps 5000 is more than 256 passes per map"),
    ("/v2/models/lite/infer", {"inputs": [TENSOR], "parameters": {"target": 10}}, None, 400,
     "target must be a class index in [0, 9], got 10"),
    ("/v2/models/lite/infer", {"inputs": [TENSOR], "parameters": {"steps": [3]}}, None, 400,
     "parameter 'steps' must be a string, number or boolean, got list"),
    ("/v2/models/lite/infer", {"inputs": [TENSOR], "outputs": [{"name": "heat"}]}, None, 400,
     "unknown output 'heat'; this model's outputs: maps, scores, targets, prediction, classes"),
    ("/v2/models/lite/infer", {"inputs": [{**TENSOR, "name": "input", "datatype": "FP32"}]}, None, 422,
     "input 'input' must be [B, 3, 64, 64], got [1, 2, 2, 3]"),
    ("/v2/models/lite/infer", {"inputs": [{**TENSOR, "data": None, "parameters": {"binary_data_size": 12}}]},
     None, 400, "input 'image' claims 12 bytes of binary data; 0 remain"),
    ("/v2/models/lite/infer", b"{}", "40", 400, "Inference-Header-Content-Length '40' is not a length within"),
    ("/v2/models/lite/infer", b"{not json", None, 400, "the body is not JSON"),
    ("/v2/models/other/infer", {"inputs": [TENSOR]}, None, 404, "model 'other' is not served here; this service "
     "serves 'lite'"),
    ("/v1/models/lite:explain", {"instances": [{"b64": "%%%"}]}, None, 422, "instance 0's b64 is not base64"),
    ("/v1/models/lite:explain", {"instances": [{"b64": png_of(1000, 1000)}]}, None, 413,
     "instance 0 is 1000x1000 pixels, more than the limit"),
    ("/v1/models/lite:explain", {"instances": [[[1, 2]]]}, None, 422, "instance 0 must be uint8 pixels [H, W, 3]"),
    ("/v1/models/lite:explain", {"instances": [[[[1, 2, 3]]], [[1, 2]]]}, None, 422,
     "instance 1 must be uint8 pixels"),
    ("/v1/models/lite:explain", {"inputs": []}, None, 400, "unknown parameter(s) 'inputs'; accepted: instances, "
     "parameters"),
    ("/v1/models/lite:predict", {"instances": [[[[1, 2, 3]]]], "parameters": {"steps": 3}}, None, 400,
     "unknown parameter(s) 'steps'; accepted: "),
    ("/v1/models/lite:explain", {"instances": "x"}, None, 400, "'instances' must be a non-empty list of images"),
])
def test_refusals_are_protocol_shaped(service, path, body, header_length, status, message):
    response = post(service, path, body, "application/json", header_length)
    assert response.status == status and response.content_type == "application/json", response.body
    (error,) = json.loads(response.body).values()
    assert message in error and "\n" not in error, error


def test_routes_and_their_document():
    document = openapi("lite", __version__)
    assert set(document["paths"]) == {route.path for route in ROUTES}
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        assert operation["operationId"] == route.name and operation["responses"]["200"]
        assert match(route.method, route.path.replace("{model}", "lite"), "lite") is route
    for method, path, status in (("GET", "/v2/models/lite/infer", 405), ("DELETE", "/explain", 405),
                                 ("GET", "/v3", 404), ("GET", "/v1/models/x", 404)):
        with pytest.raises(Exception) as refused:
            match(method, path, "lite")
        assert refused.value.status == status
