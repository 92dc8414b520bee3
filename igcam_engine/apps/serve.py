"""`igcam serve`: explanations over HTTP with Ray Serve, requests from different clients batched into one engine call.

    POST /explain   an image (PNG/JPEG/... as a raw body with its image/* content type, or the field "image" of a
                    multipart/form-data body) and parameters (query string or form fields): target or top_k, method,
                    variant, steps, rule, output = png | npy | json.
                    png: the overlay (the predicted classes in the X-Igcam-Predictions header); npy: the maps,
                    float32 [T, H, W] in .npy format; json: {"predictions": [...], "targets": [...], "maps": ...}.
    GET  /healthz   200 while the process answers.
    GET  /ready     200 once a replica's ONNX Runtime sessions are warm (unanswered before).
    GET  /stats     the sizes of the batches the engine ran (how much batching happened).

Bad requests get a 4xx with a one-line JSON message and never stop the server.
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import io
import json
import time
from dataclasses import dataclass

import numpy as np

from igcam_engine.errors import UserError

MAX_BODY_BYTES = 20 << 20
MAX_STEPS = 256
MAX_TOP_K = 10
OUTPUTS = ("png", "npy", "json")


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    image: np.ndarray  # model input [C, H, W]
    picture: object  # the decoded photo (for overlays)
    shown: np.ndarray  # what the model sees, uint8 [H, W, 3]
    target: int | None
    top_k: int
    method: str
    variant: str
    steps: int
    rule: str | None
    output: str

    def group(self):
        """Jobs with the same key run as one engine call."""
        return (self.method, self.variant, self.steps, self.rule, self.target is None, self.top_k)


def _int(params, name, default, low, high):
    text = params.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise HTTPError(400, f"{name} must be an integer, got '{text}'") from None
    if not low <= value <= high:
        raise HTTPError(400, f"{name} must be in [{low}, {high}], got {value}")
    return value


def _choice(params, name, default, accepted):
    value = params.get(name, default)
    if value not in accepted:
        raise HTTPError(400, f"{name} must be one of {', '.join(accepted)}, got '{value}'")
    return value


def _multipart(body: bytes, content_type: str):
    """(image bytes, form fields) from a multipart/form-data body, with the standard library's MIME parser."""
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
        elif name:
            fields[name] = payload.decode(errors="replace")
    if image is None:
        raise HTTPError(400, "multipart body has no 'image' field")
    return image, fields


class ExplainService:
    """One replica: an Explainer plus request parsing; `serve_application` wraps it in a Ray Serve deployment."""

    def __init__(self, bundle: str, providers=None):
        from igcam_engine import Explainer

        self.explainer = Explainer(bundle, providers=providers)
        self.batch_sizes: list[int] = []
        # Warm the sessions: Ray Serve routes no request here before this constructor returns.
        self.explainer.predict(np.zeros((1, *self.explainer.input_shape), np.float32))

    def parse(self, body: bytes, content_type: str, params: dict) -> Job:
        from igcam_engine.explainer import METHODS, VARIANTS
        from igcam_engine.images import load_image, to_model_input
        from igcam_engine.quadrature import RULES

        if len(body) > MAX_BODY_BYTES:
            raise HTTPError(413, f"body of {len(body)} bytes exceeds the limit of {MAX_BODY_BYTES}")
        kind = content_type.split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            body, fields = _multipart(body, content_type)
            params = {**fields, **params}
        elif not kind.startswith("image/") and kind != "application/octet-stream":
            raise HTTPError(415, f"content type '{kind}' is not accepted; send an image (image/png, image/jpeg, ...) "
                                 "or multipart/form-data with an 'image' field")
        if not body:
            raise HTTPError(400, "the request has no image")
        classes = self.explainer.num_classes
        target = _int(params, "target", None, 0, classes - 1)
        top_k = _int(params, "top_k", 1, 1, min(MAX_TOP_K, classes))
        if target is not None and "top_k" in params:
            raise HTTPError(400, "give target or top_k, not both")
        try:
            picture = load_image(bytes(body))
        except UserError as e:
            raise HTTPError(422, str(e)) from None
        image, shown = to_model_input(picture, self.explainer.input_shape, self.explainer.preprocess)
        return Job(image, picture, shown, target, top_k,
                   _choice(params, "method", "igcam", METHODS),
                   _choice(params, "variant", "official", tuple(VARIANTS)),
                   _int(params, "steps", 50, 1, MAX_STEPS),
                   _choice(params, "rule", None, (None, *RULES)),
                   _choice(params, "output", "png", OUTPUTS))

    def run(self, jobs: list[Job]) -> list:
        """One engine call per group of compatible jobs; returns (predictions, targets, maps) per job."""
        from igcam_engine.apps.outputs import class_probabilities

        self.batch_sizes.append(len(jobs))
        results = [None] * len(jobs)
        groups = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.group(), []).append(index)
        for indices in groups.values():
            first = jobs[indices[0]]
            images = np.stack([jobs[i].image for i in indices])
            scores = self.explainer.predict(images)
            order = np.argsort(-scores, axis=1)
            targets = (np.array([[jobs[i].target] for i in indices]) if first.target is not None
                       else order[:, : first.top_k])
            try:
                maps = self.explainer.explain(images, targets, method=first.method, variant=first.variant,
                                              steps=first.steps, rule=first.rule)
            except UserError as e:  # e.g. trapezoid with steps=1: the whole group was asked the same
                for i in indices:
                    results[i] = HTTPError(400, str(e))
                continue
            probabilities = class_probabilities(scores)
            for row, i in enumerate(indices):
                predictions = [{"class": int(c), "label": self.explainer.label(int(c)),
                                "probability": float(probabilities[row, c])} for c in order[row, :5]]
                results[i] = (predictions, [int(t) for t in targets[row]], maps[row])
        return results

    def respond(self, job: Job, result):
        """(status, content type, body bytes, extra headers)."""
        from igcam_engine.images import overlay_on_photo

        if isinstance(result, HTTPError):
            return _error(result)
        predictions, targets, maps = result
        headers = {"X-Igcam-Predictions": json.dumps(predictions[:3]), "X-Igcam-Targets": json.dumps(targets)}
        if job.output == "npy":
            buffer = io.BytesIO()
            np.save(buffer, maps.astype(np.float32))
            return 200, "application/octet-stream", buffer.getvalue(), headers
        if job.output == "json":
            body = {"predictions": predictions, "targets": targets, "shape": list(maps.shape),
                    "maps": maps.astype(np.float32).tolist()}
            return 200, "application/json", json.dumps(body).encode(), headers
        buffer = io.BytesIO()
        overlay_on_photo(job.picture, job.shown, maps[0], self.explainer.preprocess).save(buffer, format="PNG")
        return 200, "image/png", buffer.getvalue(), headers


def _error(error: HTTPError):
    return error.status, "application/json", json.dumps({"error": str(error)}).encode(), {}


def serve_application(bundle: str, *, replicas: int = 1, max_batch: int = 8, batch_wait_ms: float = 10.0,
                      providers=None, cpus_per_replica: float = 1.0):
    """The Ray Serve application (deployment bound to its arguments)."""
    from ray import serve
    from starlette.responses import JSONResponse, Response

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=max(4 * max_batch, 16))
    class Explain:
        def __init__(self):
            self.service = ExplainService(bundle, providers)
            self.explain_batch.set_max_batch_size(max_batch)
            self.explain_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def explain_batch(self, jobs: list[Job]) -> list:
            # The engine call blocks; run it off the event loop so requests keep queueing meanwhile.
            return await asyncio.get_running_loop().run_in_executor(None, self.service.run, jobs)

        async def __call__(self, request):
            path = request.url.path.rstrip("/")
            if request.method == "GET" and path == "/healthz":
                return JSONResponse({"status": "ok"})
            if request.method == "GET" and path == "/ready":  # reachable only once the sessions are warm
                return JSONResponse({"ready": True})
            if request.method == "GET" and path == "/stats":
                return JSONResponse({"batch_sizes": self.service.batch_sizes})
            if path != "/explain":
                return JSONResponse({"error": f"no route {request.method} {path or '/'}; see GET /healthz, "
                                              "/ready, /stats, POST /explain"}, status_code=404)
            if request.method != "POST":
                return JSONResponse({"error": "POST an image to /explain"}, status_code=405)
            declared = int(request.headers.get("content-length") or 0)
            if declared > MAX_BODY_BYTES:
                async for _ in request.stream():  # drain, never hold: answering mid-upload resets the connection
                    pass
                status, kind, body, headers = _error(HTTPError(413, f"body of {declared} bytes exceeds the limit "
                                                                    f"of {MAX_BODY_BYTES}"))
                return Response(body, status_code=status, media_type=kind)
            try:
                job = self.service.parse(await request.body(), request.headers.get("content-type", ""),
                                         dict(request.query_params))
            except HTTPError as e:
                status, kind, body, headers = _error(e)
                return Response(body, status_code=status, media_type=kind)
            result = await self.explain_batch(job)
            status, kind, body, headers = self.service.respond(job, result)
            return Response(body, status_code=status, media_type=kind, headers=headers)

    return Explain.bind()


def run_server(bundle: str, host: str = "127.0.0.1", port: int = 8000, *, replicas=1, max_batch=8, batch_wait_ms=10.0,
               providers=None, address=None):
    """Starts Ray (or joins `address`), deploys the application and serves until interrupted."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise UserError("igcam serve needs Ray Serve: pip install 'igcam-engine[serve]'") from None
    from igcam_engine.bundle import load_manifest

    load_manifest(bundle)  # a bad bundle is a one-line error here, not a crashed replica
    ray.init(address=address, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(serve_application(str(bundle), replicas=replicas, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
                                providers=providers), name="igcam", route_prefix="/", blocking=False)
    print(f"igcam serve: http://{host}:{port}/explain (POST an image), /healthz, /ready, /stats; Ctrl-C stops",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
