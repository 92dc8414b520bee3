"""The HTTP surface of `igcam serve` as data and plain functions, without Ray: every route (its method, path, who
answers it, what it takes and returns: the OpenAPI document is generated from this table, and the deployments
dispatch through it, so that the two cannot drift apart), and the codecs of its three protocols, each turning a
request read to its end into engine jobs and their results into a response:

- igcam's own `POST /explain` (an image file, query or form parameters; a PNG overlay, .npy maps or JSON);
- KServe's V1 data plane: `GET /v1/models[/NAME]`, `POST /v1/models/NAME:predict` and `:explain` with
  `{"instances": [...]}` (images as TensorFlow Serving's `{"b64": "..."}` or nested uint8 lists [H, W, 3]);
- the Open Inference Protocol (KServe V2, Triton, MLServer): health, server and model metadata, and
  `POST /v2/models/NAME/infer` with typed tensors as JSON or in the binary tensor data extension.

Every refusal has one shape on every route, `{"error": "one line"}`, its status chosen by the error's type (STATUS)
or the transport's own (HTTPError). docs/serving-protocols.md is the user's page.
"""
from __future__ import annotations

import base64
import binascii
import email.message
import email.parser
import email.policy
import io
import json
import re
import struct
from dataclasses import dataclass, field

import numpy as np

from igcam_engine.errors import (
    BundleError,
    InputError,
    LimitError,
    NotFound,
    OptionError,
    Unavailable,
    UserError,
)
from igcam_engine.options import TEXT, ExplainOptions
from igcam_engine.targets import SemanticSegmentationTarget, TargetChoice
from igcam_engine.validators import choice, integer, parameter_text

MAX_PARTS = 16  # multipart fields
MAX_IMAGES = 32  # images in one V1 or V2 request
OUTPUTS = ("png", "npy", "json")
EXPLAIN_PARAMETERS = tuple(name for name in TEXT if name != "rows_per_call")  # the engine's own batching is ours
PARAMETERS = ("target", "top_k", *EXPLAIN_PARAMETERS, "output", "mask")
PROTOCOL_PARAMETERS = ("target", "top_k", *EXPLAIN_PARAMETERS)  # V1's and V2's request "parameters"
# An error's type -> the HTTP status it is answered with (any other UserError: 422).
STATUS = {OptionError: 400, NotFound: 404, LimitError: 413, InputError: 422, BundleError: 500, Unavailable: 503}
MAX_HEADER = 4096  # characters of a JSON header value (a long prediction is cut, the body has it all)


class HTTPError(Exception):
    """A refusal of the transport itself (content type, body size or deadline, a route, a malformed form or
    tensor encoding) with its status."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}

    def __reduce__(self):  # crosses Ray's process boundaries whole
        return HTTPError, (self.status, str(self), self.headers)


def status_of(error: UserError) -> int:
    return next((status for kind, status in STATUS.items() if isinstance(error, kind)), 422)


@dataclass(frozen=True)
class Request:
    """An HTTP request with its body read to the end: what the front hands an engine replica."""

    method: str
    path: str  # below the application's route prefix, without a trailing slash
    query: dict = field(default_factory=dict)
    content_type: str = ""
    header_length: str | None = None  # Inference-Header-Content-Length (the V2 binary extension)
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: dict = field(default_factory=dict)
    batches: tuple = ()  # the sizes of the engine batches that served it (for /metrics; never sent)


def json_response(value, status: int = 200, headers: dict | None = None) -> Response:
    return Response(status, "application/json", json.dumps(value).encode(), headers or {})


def error_response(error: Exception) -> Response:
    """The answer to a refused request on any route: its status (an HTTPError's own, a UserError's by type) and
    one JSON line, {"error": ...}, the shape KServe's and the Open Inference Protocol's clients read."""
    if isinstance(error, HTTPError):
        return json_response({"error": str(error)}, error.status, error.headers)
    return json_response({"error": str(error)}, status_of(error))


@dataclass(frozen=True)
class Job:
    """One image's explanation (or, with options None, its prediction alone)."""

    image: np.ndarray  # model input [C, H, W]
    picture: object  # the decoded photo (for overlays), None for a model-space tensor
    shown: np.ndarray | None  # what the model sees, uint8 [H, W, 3]
    options: ExplainOptions | None  # checked; None: predict only
    targets: TargetChoice | None  # checked
    output: str = "json"

    def group(self):
        """Jobs with the same key run as one engine call."""
        return self.options, None if self.targets is None else json.dumps(self.targets.record(), sort_keys=True)


@dataclass(frozen=True)
class Route:
    """One route: `path` is a template ({model} is the served model's name), `answered_by` says where it is
    answered: "front" (the ingress, at once: health, metadata, documents), "engine" (an engine replica, after the
    body is read), "health" (the separate /healthz application)."""

    method: str
    path: str
    answered_by: str
    name: str
    summary: str
    request: dict | None = None  # OpenAPI requestBody content {media type: schema}
    response: dict | None = None  # OpenAPI 200 content {media type: schema}
    query: tuple = ()  # query parameters (names)

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(re.escape(self.path).replace(re.escape("{model}"), "(?P<model>[^/:]+)") + "$")


def _object(**properties) -> dict:
    return {"type": "object", "properties": properties}


ERROR = _object(error={"type": "string", "description": "one line: what was wrong and what is accepted"})
TENSOR = _object(name={"type": "string"}, datatype={"type": "string"},
                 shape={"type": "array", "items": {"type": "integer"}}, parameters={"type": "object"},
                 data={"type": "array", "description": "row-major, flat or nested; absent for binary data"})
V2_INFER = _object(id={"type": "string"}, parameters={"type": "object", "description": "target, top_k, method, "
                   "steps, ... (the options of /explain), binary_data_output"},
                   inputs={"type": "array", "items": TENSOR},
                   outputs={"type": "array", "items": _object(name={"type": "string"}, parameters={"type": "object"})})
V2_ANSWER = _object(model_name={"type": "string"}, id={"type": "string"}, parameters={"type": "object"},
                    outputs={"type": "array", "items": TENSOR})
V1_INSTANCES = _object(instances={"type": "array", "items": {"oneOf": [
    _object(b64={"type": "string", "description": "an image file (PNG, JPEG, ...) in base64"}),
    {"type": "array", "description": "uint8 pixels [H, W, 3]"}]}},
    parameters={"type": "object", "description": "target, top_k, method, steps, ... (the options of /explain)"})
BINARY = {"type": "string", "format": "binary"}
READY = _object(ready={"type": "boolean"})

ROUTES = (
    Route("POST", "/explain", "engine", "explain", "Explain an image: a PNG overlay, the maps as .npy, or JSON",
          {"image/*": BINARY, "multipart/form-data": _object(image=BINARY, mask=BINARY)},
          {"image/png": BINARY, "application/octet-stream": BINARY, "application/json": {"type": "object"}},
          PARAMETERS[:-1]),
    Route("GET", "/", "front", "v1_live", "KServe V1: the server is live",
          response={"application/json": _object(status={"type": "string", "enum": ["alive"]})}),
    Route("GET", "/healthz", "health", "healthz", "200 while the service answers (never queued)",
          response={"application/json": _object(status={"type": "string"})}),
    Route("GET", "/ready", "front", "ready", "200 while an engine replica is ready, 503 before",
          response={"application/json": READY}),
    Route("GET", "/stats", "engine", "stats", "One engine replica's counts, batch sizes, precision and node",
          response={"application/json": {"type": "object"}}),
    Route("GET", "/metrics", "front", "metrics", "Prometheus metrics: requests, statuses, latency, batches, queue",
          response={"text/plain": {"type": "string"}}),
    Route("GET", "/openapi.json", "front", "openapi", "This document",
          response={"application/json": {"type": "object"}}),
    Route("GET", "/v1/models", "front", "v1_models", "KServe V1: the models served",
          response={"application/json": _object(models={"type": "array", "items": {"type": "string"}})}),
    Route("GET", "/v1/models/{model}", "front", "v1_model", "KServe V1: a model's readiness",
          response={"application/json": _object(name={"type": "string"}, ready={"type": "boolean"})}),
    Route("POST", "/v1/models/{model}:predict", "engine", "v1_predict", "KServe V1: the model's predictions",
          {"application/json": V1_INSTANCES},
          {"application/json": _object(predictions={"type": "array", "items": {"type": "object"}})}),
    Route("POST", "/v1/models/{model}:explain", "engine", "v1_explain",
          "KServe V1: predictions and their explanations (maps [T, H, W] per instance)",
          {"application/json": V1_INSTANCES},
          {"application/json": _object(predictions={"type": "array", "items": {"type": "object"}},
                                       explanations={"type": "array", "items": {"type": "object"}})}),
    Route("GET", "/v2", "front", "v2_server", "Open Inference Protocol: server metadata",
          response={"application/json": _object(name={"type": "string"}, version={"type": "string"},
                                                 extensions={"type": "array", "items": {"type": "string"}})}),
    Route("GET", "/v2/health/live", "front", "v2_live", "Open Inference Protocol: the server is live",
          response={"application/json": _object(live={"type": "boolean"})}),
    Route("GET", "/v2/health/ready", "front", "v2_ready", "Open Inference Protocol: the server is ready",
          response={"application/json": READY}),
    Route("GET", "/v2/models/{model}", "front", "v2_model", "Open Inference Protocol: model metadata",
          response={"application/json": {"type": "object"}}),
    Route("GET", "/v2/models/{model}/ready", "front", "v2_model_ready", "Open Inference Protocol: the model is ready",
          response={"application/json": READY}),
    Route("POST", "/v2/models/{model}/infer", "engine", "v2_infer",
          "Open Inference Protocol: explain images given as tensors (JSON or the binary tensor data extension)",
          {"application/json": V2_INFER, "application/octet-stream": BINARY},
          {"application/json": V2_ANSWER, "application/octet-stream": BINARY}),
)


def match(method: str, path: str, model: str) -> Route:
    """The route for a request; HTTPError 404 (no such path, or another model's name) or 405 (another method)."""
    found = [(route, m) for route in ROUTES if (m := route.pattern.match(path or "/"))]
    if not found:
        raise HTTPError(404, f"no route {method} {path or '/'}; the routes are listed at GET /openapi.json")
    for route, matched in found:
        if route.method == method:
            named = matched.groupdict().get("model")
            if named is not None and named != model:
                raise HTTPError(404, f"model '{named}' is not served here; this service serves '{model}'")
            return route
    allowed = ", ".join(sorted({route.method for route, _ in found}))
    raise HTTPError(405, f"{method} is not accepted on {path}; use {allowed}", {"Allow": allowed})


def openapi(model: str, version: str, prefix: str = "/") -> dict:
    """The OpenAPI 3.1 document of every route (ROUTES), for the model served under `model`."""
    paths: dict = {}
    for route in ROUTES:
        operation = {"operationId": route.name, "summary": route.summary,
                     "responses": {"200": {"description": "OK", "content": {
                         kind: {"schema": schema} for kind, schema in (route.response or {}).items()}},
                         "4XX": {"description": "refused", "content": {"application/json": {"schema": ERROR}}},
                         "5XX": {"description": "failed or busy",
                                 "content": {"application/json": {"schema": ERROR}}}}}
        parameters = [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
                      for name in route.query]
        if "{model}" in route.path:
            parameters.insert(0, {"name": "model", "in": "path", "required": True,
                                  "schema": {"type": "string", "enum": [model]}})
        if parameters:
            operation["parameters"] = parameters
        if route.request:
            operation["requestBody"] = {"required": True, "content": {
                kind: {"schema": schema} for kind, schema in route.request.items()}}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {"openapi": "3.1.0", "info": {"title": f"igcam-engine serving '{model}'", "version": version},
            "servers": [{"url": prefix}], "paths": paths, "components": {"schemas": {"Error": ERROR}}}


def header_json(value) -> str:
    """JSON for a response header: ASCII, and at most MAX_HEADER characters (the start of it, then "...")."""
    text = json.dumps(value)
    return text if len(text) <= MAX_HEADER else text[:MAX_HEADER - 3] + "..."


# igcam's own /explain


def _multipart(body: bytes, content_type: str):
    """(image bytes, form fields) from a multipart/form-data body, with the standard library's MIME parser, after
    bounding the number of parts (a body of many tiny parts would otherwise cost seconds to parse)."""
    boundary = email.message.Message()
    boundary["content-type"] = content_type
    marker = boundary.get_param("boundary")
    if not marker:
        raise HTTPError(400, "multipart/form-data without a boundary")
    if body.count(b"--" + str(marker).encode()) > MAX_PARTS + 1:
        raise HTTPError(400, f"a multipart body may hold at most {MAX_PARTS} fields")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise HTTPError(400, "malformed multipart/form-data body")
    image, fields = None, {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if name == "image":
            image = payload
        elif name == "mask":
            fields[name] = payload
        elif name:
            fields[name] = payload.decode(errors="replace")
    if image is None:
        raise HTTPError(400, "multipart body has no 'image' field")
    return image, fields


def _unknown(given, accepted) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise OptionError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(accepted)}")


def _choices(service, params: dict):
    """(the checked TargetChoice, the checked ExplainOptions) of a request's parameters (text values)."""
    targets = TargetChoice.from_text(params.get("target"), params.get("top_k")).checked(service.manifest, service.limits)
    return targets, _options(service, params)


def _options(service, params: dict) -> ExplainOptions:
    options = ExplainOptions.from_text({name: params[name] for name in EXPLAIN_PARAMETERS if name in params})
    return options.checked(service.limits, service.manifest.target_layer.channels)


def native_jobs(service, request: Request) -> list[Job]:
    """POST /explain: one image (a raw image/* body, or the field "image" of a multipart form; a segmenter's class
    mask as the field "mask") and parameters in the query string or form fields."""
    from igcam_engine.images import load_image, load_mask

    kind = request.content_type.split(";")[0].strip().lower()
    body, params = request.body, request.query
    if kind == "multipart/form-data":
        body, fields = _multipart(body, request.content_type)
        params = {**fields, **params}
    elif not kind.startswith("image/") and kind != "application/octet-stream":
        raise HTTPError(415, f"content type '{kind}' is not accepted; send an image (image/png, image/jpeg, ...) "
                             "or multipart/form-data with an 'image' field")
    _unknown(params, PARAMETERS)
    if not body:
        raise HTTPError(400, "the request has no image")
    if isinstance(params.get("mask"), str):
        raise OptionError("a mask is an image: send it as the multipart field 'mask'")
    manifest = service.manifest
    targets = TargetChoice.from_text(params.get("target"), params.get("top_k"))
    if params.get("mask") is not None:
        if targets.target is None or manifest.task.kind != "segmentation":
            raise OptionError("a mask goes with target=C (a class) on a segmenter's bundle")
        mask = load_mask(bytes(params["mask"]), manifest.input.shape, manifest.preprocess, service.limits.pixels)
        targets = TargetChoice(targets=(SemanticSegmentationTarget(targets.target, mask),))
    targets = targets.checked(manifest, service.limits)
    options = _options(service, params)
    output = choice(params.get("output", "png"), "output", OUTPUTS)
    return [_picture_job(service, load_image(bytes(body), service.limits.pixels), options, targets, output)]


def native_response(service, jobs: list[Job], results: list) -> Response:
    """A PNG overlay of the first target (the prediction in the X-Igcam-Predictions header, the targets in
    X-Igcam-Targets), the maps as float32 [T, H, W] .npy, or JSON {"prediction", "targets", "shape", "maps"}."""
    from igcam_engine.images import overlay_on_photo

    (job,), (result,) = jobs, results
    said, entries, targets, maps = result
    headers = {"X-Igcam-Predictions": header_json(said), "X-Igcam-Targets": header_json([e["target"] for e in entries])}
    if job.output == "npy":
        buffer = io.BytesIO()
        np.save(buffer, maps.astype(np.float32))
        return Response(200, "application/octet-stream", buffer.getvalue(), headers)
    if job.output == "json":
        return json_response({"prediction": said, "targets": entries, "shape": list(maps.shape),
                              "maps": maps.astype(np.float32).tolist()}, headers=headers)
    buffer = io.BytesIO()
    boxes = [(targets[0].box, entries[0]["name"])] if getattr(targets[0], "box", None) is not None else []
    overlay_on_photo(job.picture, job.shown, maps[0], service.explainer.preprocess, boxes).save(buffer, format="PNG")
    return Response(200, "image/png", buffer.getvalue(), headers)


# Parameters of V1's and V2's requests: JSON values, given to the same validators as query strings.


def _parameter_texts(parameters, where: str) -> dict:
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise OptionError(f"{where} must be an object of names and values")
    return {name: json.dumps(value) if name == "target" and isinstance(value, (dict, list))
            else parameter_text(value, name) for name, value in parameters.items()}


def _json_body(request: Request) -> dict:
    kind = request.content_type.split(";")[0].strip().lower()
    if kind not in ("application/json", ""):
        raise HTTPError(415, f"content type '{kind}' is not accepted here; send application/json")
    return _json_object(request.body)


def _json_object(data: bytes) -> dict:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise HTTPError(400, f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return body


def _picture_job(service, picture, options, targets, output: str = "json") -> Job:
    from igcam_engine.images import to_model_input

    image, shown = to_model_input(picture, service.explainer.input_shape, service.explainer.preprocess)
    return Job(image, picture, shown, options, targets, output)


def _pixels(service, array: np.ndarray, where: str):
    """A uint8 picture [H, W, 3] within the pixel limit, as a PIL image."""
    from PIL import Image

    from igcam_engine.images import check_pixels

    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise InputError(f"{where} must be uint8 pixels [H, W, 3], got shape {list(array.shape)}")
    check_pixels(array.shape[1], array.shape[0], service.limits.pixels, where)
    return Image.fromarray(np.ascontiguousarray(array, np.uint8))


# KServe V1


def _v1_pictures(service, body: dict) -> list:
    from igcam_engine.images import load_image

    _unknown(body, ("instances", "parameters"))
    instances = body.get("instances")
    if not isinstance(instances, list) or not instances:
        raise OptionError("'instances' must be a non-empty list of images: {\"b64\": \"...\"} or uint8 [H, W, 3]")
    if len(instances) > MAX_IMAGES:
        raise LimitError(f"{len(instances)} instances, more than {MAX_IMAGES} per request")
    pictures = []
    for n, instance in enumerate(instances):
        where = f"instance {n}"
        if isinstance(instance, dict):
            if set(instance) != {"b64"} or not isinstance(instance["b64"], str):
                raise OptionError(f"{where} must be {{\"b64\": \"<an image file in base64>\"}} or uint8 [H, W, 3]")
            try:
                data = base64.b64decode(instance["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise InputError(f"{where}'s b64 is not base64") from None
            pictures.append(load_image(data, service.limits.pixels, name=where))
        elif isinstance(instance, list):
            pictures.append(_pixels(service, _uint8_array(instance, where), where))
        else:
            raise OptionError(f"{where} must be {{\"b64\": \"...\"}} or uint8 [H, W, 3], got {type(instance).__name__}")
    return pictures


def _uint8_array(values, where: str) -> np.ndarray:
    try:
        array = np.asarray(values)
    except ValueError:
        raise InputError(f"{where} is not a rectangular array") from None
    if array.dtype.kind not in "iu" or (array.size and (array.min() < 0 or array.max() > 255)):
        raise InputError(f"{where} must hold integers in 0..255 (uint8)")
    return array.astype(np.uint8)


def v1_jobs(service, request: Request, explain: bool) -> list[Job]:
    """:predict and :explain: {"instances": [...], "parameters": {...}} (parameters: those of /explain)."""
    body = _json_body(request)
    params = _parameter_texts(body.get("parameters"), "'parameters'")
    if explain:
        _unknown(params, PROTOCOL_PARAMETERS)
        targets, options = _choices(service, params)
    else:
        _unknown(params, ())
        targets = options = None
    return [_picture_job(service, picture, options, targets) for picture in _v1_pictures(service, body)]


def v1_response(service, jobs: list[Job], results: list) -> Response:
    predictions = [result[0] for result in results]
    if jobs[0].options is None:
        return json_response({"predictions": predictions})
    options = jobs[0].options
    explanations = [{"method": options.method, "integrate": options.integrate, "steps": options.steps,
                     "precision": service.explainer.precision, "targets": entries, "shape": list(maps.shape),
                     "maps": maps.astype(np.float32).tolist()} for _, entries, _, maps in results]
    return json_response({"predictions": predictions, "explanations": explanations})


# The Open Inference Protocol (V2) and its binary tensor data extension

DATATYPES = {"UINT8": np.uint8, "FP32": np.float32, "INT64": np.int64, "BYTES": object}
V2_OUTPUTS = ("maps", "scores", "targets", "prediction", "classes")
DATATYPE_NAMES = {np.dtype(kind): name for name, kind in DATATYPES.items()}
INPUTS = ("'image' (UINT8 pixels [B, H, W, 3]), 'files' (BYTES [B], image files) or 'input' (FP32, the model's "
          "input [B, C, H, W])")


def v2_model_metadata(model: str, manifest) -> dict:
    """The model's inputs (the pictures as uint8 [B, H, W, 3], encoded image files as BYTES [B], or the model-space
    float32 tensor [B, C, H, W]: one of them per request), its outputs, and the request parameters it takes."""
    input_shape = manifest.input.shape
    shapes = {"maps": ("FP32", [-1, -1, *input_shape[1:]]), "scores": ("FP32", [-1, -1]),
              "targets": ("BYTES", [-1, -1]), "prediction": ("BYTES", [-1]), "classes": ("INT64", [-1])}
    outputs = [{"name": name, "datatype": shapes[name][0], "shape": shapes[name][1]}
               for name in v2_output_names(manifest)]
    return {"name": model, "versions": ["1"], "platform": "igcam-engine",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3]},
                       {"name": "files", "datatype": "BYTES", "shape": [-1]},
                       {"name": "input", "datatype": "FP32", "shape": [-1, *input_shape]}],
            "outputs": outputs, "parameters": {"accepted": list(PROTOCOL_PARAMETERS), "task": manifest.task.kind}}


def _v2_header(request: Request):
    """(the JSON header, the binary data after it) of an infer request."""
    body, binary = request.body, b""
    if request.header_length is not None:
        if not request.header_length.isdigit() or int(request.header_length) > len(body):
            raise HTTPError(400, f"Inference-Header-Content-Length {request.header_length!r} is not a length within "
                                 f"the body's {len(body)} bytes")
        body, binary = body[:int(request.header_length)], body[int(request.header_length):]
    return _json_object(body), binary


def _v2_tensor(tensor, binary: bytes, offset: int):
    """(name, datatype, array, the offset after its binary data) of one input tensor."""
    if not isinstance(tensor, dict):
        raise OptionError("each input must be an object with name, datatype, shape and data")
    _unknown(tensor, ("name", "datatype", "shape", "parameters", "data"))
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if datatype not in DATATYPES:
        raise OptionError(f"input '{name}' has datatype {datatype!r}; accepted: UINT8 (image), BYTES (files), FP32 "
                          "(input)")
    if not isinstance(shape, list):
        raise OptionError(f"input '{name}' needs its shape as a list of sizes, got {shape!r}")
    shape = [integer(d, f"input '{name}''s shape", 0) for d in shape]
    parameters = tensor.get("parameters") or {}
    _unknown(parameters, ("binary_data_size",))
    count = int(np.prod(shape, dtype=np.int64))
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise HTTPError(400, f"input '{name}' claims {size!r} bytes of binary data; {len(binary) - offset} remain")
        data, offset = binary[offset:offset + size], offset + size
        if datatype == "BYTES":
            values = _unpack_bytes(data, name)
        else:
            itemsize = np.dtype(DATATYPES[datatype]).itemsize
            if size != count * itemsize:
                raise HTTPError(400, f"input '{name}' of shape {shape} is {count * itemsize} bytes of {datatype}, "
                                     f"got {size}")
            values = np.frombuffer(data, np.dtype(DATATYPES[datatype]).newbyteorder("<"))
    elif "data" in tensor:
        values = _json_values(tensor["data"], datatype, name)
    else:
        raise OptionError(f"input '{name}' has neither data nor parameters.binary_data_size")
    array = np.asarray(values, dtype=DATATYPES[datatype] if datatype == "BYTES" else None)
    if array.size != count:
        raise InputError(f"input '{name}' has {array.size} values, its shape {shape} needs {count}")
    return name, datatype, array.reshape(shape), offset


def _json_values(data, datatype: str, name: str):
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).ravel()
        if not all(isinstance(v, str) for v in flat):
            raise InputError(f"input '{name}' (BYTES) must hold strings")
        return [v.encode("latin-1", errors="replace") for v in flat]
    if datatype == "UINT8":
        return _uint8_array(data, f"input '{name}'")
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"input '{name}' must hold numbers in a rectangular array") from None
    return array.astype(np.float32)


def _unpack_bytes(data: bytes, name: str) -> list:
    values, at = [], 0
    while at < len(data):
        if at + 4 > len(data):
            raise HTTPError(400, f"input '{name}': BYTES data ends inside an element's length")
        (length,) = struct.unpack_from("<I", data, at)
        if at + 4 + length > len(data):
            raise HTTPError(400, f"input '{name}': an element claims {length} bytes past the end of the data")
        values.append(data[at + 4:at + 4 + length])
        at += 4 + length
    return values


def _v2_outputs(header: dict, available: tuple) -> dict:
    """{output name: binary?} of the outputs asked for (default: all, binary when binary_data_output)."""
    parameters = header.get("parameters") or {}
    default = bool(parameters.get("binary_data_output", False))
    asked = header.get("outputs")
    if asked is None:
        return {name: default for name in available}
    if not isinstance(asked, list):
        raise OptionError("'outputs' must be a list of {\"name\": ...}")
    chosen = {}
    for output in asked:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in available:
            raise OptionError(f"unknown output {name!r}; this model's outputs: {', '.join(available)}")
        wanted = output.get("parameters") or {}
        _unknown(wanted, ("binary_data",))
        chosen[name] = bool(wanted.get("binary_data", default))
    return chosen


def v2_output_names(manifest) -> tuple:
    return V2_OUTPUTS if manifest.task.kind == "classification" else V2_OUTPUTS[:-1]


def v2_jobs(service, request: Request) -> tuple[list[Job], dict]:
    """POST /v2/models/NAME/infer: (the jobs, what the answer needs: the request's id and the outputs asked)."""
    from igcam_engine.images import load_image

    header, binary = _v2_header(request)
    _unknown(header, ("id", "model_name", "model_version", "parameters", "inputs", "outputs"))  # names: the path's
    parameters = dict(header.get("parameters") or {})
    parameters.pop("binary_data_output", None)
    params = _parameter_texts(parameters, "'parameters'")
    _unknown(params, PROTOCOL_PARAMETERS)
    outputs = _v2_outputs(header, v2_output_names(service.manifest))
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise OptionError(f"give exactly one input: {INPUTS}")
    name, datatype, array, offset = _v2_tensor(inputs[0], binary, 0)
    if offset != len(binary):
        raise HTTPError(400, f"{len(binary) - offset} bytes of binary data belong to no input")
    if not array.shape or not 1 <= array.shape[0] <= MAX_IMAGES:
        raise LimitError(f"input '{name}' must hold 1 to {MAX_IMAGES} images along its first axis")
    targets, options = _choices(service, params)
    if name == "image" and datatype == "UINT8":
        jobs = [_picture_job(service, _pixels(service, a, f"image {n}"), options, targets) for n, a in enumerate(array)]
    elif name == "files" and datatype == "BYTES":
        if array.ndim != 1:
            raise InputError(f"input 'files' is one image file per element, shape [B], got {list(array.shape)}")
        jobs = [_picture_job(service, load_image(bytes(a), service.limits.pixels, name=f"image {n}"), options, targets)
                for n, a in enumerate(array)]
    elif name == "input" and datatype == "FP32":
        expected = tuple(service.explainer.input_shape)
        if array.shape[1:] != expected:
            raise InputError(f"input 'input' must be [B, {', '.join(map(str, expected))}], got {list(array.shape)}")
        if not np.isfinite(array).all():
            raise InputError("input 'input' holds values that are not finite")
        jobs = [Job(np.ascontiguousarray(a, np.float32), None, None, options, targets) for a in array]
    else:
        raise OptionError(f"input '{name}' ({datatype}) is not accepted; give one of {INPUTS}")
    return jobs, {"id": header.get("id"), "outputs": outputs}


def v2_response(service, model: str, asked: dict, results: list) -> Response:
    counts = {len(maps) for *_, maps in results}
    if len(counts) != 1:
        raise InputError(f"the images found different numbers of targets ({sorted(counts)}): one tensor cannot hold "
                         "their maps; send them in separate requests or name the targets")
    values = {"maps": np.stack([maps for *_, maps in results]).astype(np.float32),
              "scores": np.array([[e["score"] for e in entries] for _, entries, _, _ in results], np.float32),
              "targets": np.array([[json.dumps(e["target"]) for e in entries] for _, entries, _, _ in results],
                                  dtype=object),
              "prediction": np.array([json.dumps(said) for said, *_ in results], dtype=object)}
    if "classes" in asked["outputs"]:
        values["classes"] = np.array([said["predicted"] for said, *_ in results], np.int64)
    tensors, blobs = [], []
    for name, binary in asked["outputs"].items():
        array = values[name]
        datatype = DATATYPE_NAMES[array.dtype]
        tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            blob = (b"".join(struct.pack("<I", len(v.encode())) + v.encode() for v in array.ravel())
                    if datatype == "BYTES" else array.astype(array.dtype.newbyteorder("<")).tobytes())
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    answer = {"model_name": model, "model_version": "1", "outputs": tensors}
    if asked["id"] is not None:
        answer["id"] = asked["id"]
    text = json.dumps(answer).encode()
    if not blobs:
        return Response(200, "application/json", text)
    return Response(200, "application/octet-stream", text + b"".join(blobs),
                    {"Inference-Header-Content-Length": str(len(text))})
