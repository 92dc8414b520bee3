"""`igcam serve`: explanations over HTTP with Ray Serve, requests from different clients batched into one engine call.

    POST /explain   an image (PNG/JPEG/... as a raw body with its image/* content type, or the field "image" of a
                    multipart/form-data body; a segmenter's class mask as the field "mask") and parameters (query
                    string or form fields): target (a class, or targets as JSON: docs/targets.md) or top_k, the
                    options of igcam_engine.options.ExplainOptions (method, integrate, channels, variant, rule,
                    steps, tolerance, max_steps, baseline, subtract_baseline, normalize), output = png | npy | json.
                    png: the overlay of the first target (the prediction in the X-Igcam-Predictions header, the
                    targets in X-Igcam-Targets); npy: the maps, float32 [T, H, W] in .npy format; json:
                    {"prediction": {...}, "targets": [...], "maps": ...}.
    GET  /healthz   200 while the service answers: a deployment of its own, never queued behind explanations.
    GET  /ready     200 once a replica's ONNX Runtime sessions are warm (unanswered before).
    GET  /stats     how many requests this replica answered, the sizes of the batches its engine ran (bounded), the
                    precision its engine computes in (f32, or bf16 with --providers openvino --precision bf16) and
                    the Ray node it runs on.

The paths are under the application's route prefix (--route-prefix, default /). The bundle is shipped to the
replicas through Ray's object store, so it need exist only where `igcam serve` runs.

Untrusted input stays cheap to refuse: a body is read with a size limit while it streams (chunked or not) and a
deadline (a stalled upload gets 408 instead of holding a slot); image decoding, multipart parsing and PNG encoding
run off the event loop; requests beyond the replica's queue get 503 with Retry-After. Bad requests get a 4xx with
a one-line JSON message, its status chosen by the error's type (STATUS), and never stop the server.
"""
from __future__ import annotations

import asyncio
import email.message
import email.parser
import email.policy
import io
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from igcam_engine.apps.arguments import (
    Command,
    add_backend_arguments,
    add_limit_arguments,
    backend_options,
    limits,
)
from igcam_engine.apps.cluster import add_cluster_arguments, serve_replica_on_loopback
from igcam_engine.backends import BackendOptions
from igcam_engine.errors import (
    BundleError,
    InputError,
    LimitError,
    NotFound,
    OptionError,
    Unavailable,
    UserError,
)
from igcam_engine.options import TEXT, ExplainOptions, Limits
from igcam_engine.targets import SemanticSegmentationTarget, TargetChoice
from igcam_engine.validators import choice, integer, number

MAX_BODY_BYTES = 20 << 20
BODY_TIMEOUT_S = 15.0  # the whole body must arrive within this after the headers
MAX_PARTS = 16  # multipart fields
# One request may not hold a replica for minutes: its passes per map, Score-CAM's and Ablation-CAM's channels (a
# request without `channels` takes this many of largest activation mass) and its classes are bounded.
SERVICE_LIMITS = Limits(steps=256, channels=256, top_k=10)
OUTPUTS = ("png", "npy", "json")
EXPLAIN_PARAMETERS = tuple(name for name in TEXT if name != "rows_per_call")  # the engine's own batching is ours
PARAMETERS = ("target", "top_k", *EXPLAIN_PARAMETERS, "output", "mask")
RETRY_AFTER_S = 1
# An error's type -> the HTTP status it is answered with (any other UserError: 422).
STATUS = {OptionError: 400, NotFound: 404, LimitError: 413, InputError: 422, BundleError: 500, Unavailable: 503}


class HTTPError(Exception):
    """A refusal of the transport itself (content type, body size or deadline, a malformed form) with its status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def status_of(error: UserError) -> int:
    return next((status for kind, status in STATUS.items() if isinstance(error, kind)), 422)


@dataclass(frozen=True)
class Job:
    image: np.ndarray  # model input [C, H, W]
    picture: object  # the decoded photo (for overlays)
    shown: np.ndarray  # what the model sees, uint8 [H, W, 3]
    options: ExplainOptions  # checked
    targets: TargetChoice  # checked
    output: str

    def group(self):
        """Jobs with the same key run as one engine call."""
        return self.options, json.dumps(self.targets.record(), sort_keys=True)


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


class ExplainService:
    """One replica's engine: an Explainer plus request parsing and responses (all synchronous, CPU-bound work that
    the deployment runs off the event loop); `serve_application` wraps it in Ray Serve deployments."""

    def __init__(self, bundle: str, backend: BackendOptions | None = None, limits: Limits = SERVICE_LIMITS):
        from igcam_engine import Explainer

        self.explainer = Explainer(bundle, **asdict(backend or BackendOptions()), limits=limits)
        self.limits = self.explainer.limits
        self.batch_sizes: Counter = Counter()
        self.explained = 0
        # Warm the sessions: Ray Serve routes no request here before this constructor returns.
        self.explainer.model_outputs(np.zeros((1, *self.explainer.input_shape), np.float32))

    def parse(self, body: bytes, content_type: str, params: dict) -> Job:
        """A request's job; a UserError (its status by type) or HTTPError for what is wrong with it."""
        from igcam_engine.images import load_image, load_mask, to_model_input

        kind = content_type.split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            body, fields = _multipart(body, content_type)
            params = {**fields, **params}
        elif not kind.startswith("image/") and kind != "application/octet-stream":
            raise HTTPError(415, f"content type '{kind}' is not accepted; send an image (image/png, image/jpeg, ...) "
                                 "or multipart/form-data with an 'image' field")
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise OptionError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(PARAMETERS)}")
        if not body:
            raise HTTPError(400, "the request has no image")
        if isinstance(params.get("mask"), str):
            raise OptionError("a mask is an image: send it as the multipart field 'mask'")
        manifest = self.explainer.manifest
        targets = TargetChoice.from_text(params.get("target"), params.get("top_k"))
        if params.get("mask") is not None:
            if targets.target is None or manifest.task.kind != "segmentation":
                raise OptionError("a mask goes with target=C (a class) on a segmenter's bundle")
            mask = load_mask(bytes(params["mask"]), manifest.input.shape, manifest.preprocess, self.limits.pixels)
            targets = TargetChoice(targets=(SemanticSegmentationTarget(targets.target, mask),))
        targets = targets.checked(manifest, self.limits)
        options = ExplainOptions.from_text({name: params[name] for name in EXPLAIN_PARAMETERS if name in params})
        options = options.checked(self.limits, manifest.target_layer.channels)
        output = choice(params.get("output", "png"), "output", OUTPUTS)
        picture = load_image(bytes(body), self.limits.pixels)
        image, shown = to_model_input(picture, self.explainer.input_shape, self.explainer.preprocess)
        return Job(image, picture, shown, options, targets, output)

    def run(self, jobs: list[Job]) -> list:
        """One engine call per group of compatible jobs (igcam_engine.apps.outputs.explain_images); returns
        (the prediction, the map entries, the targets, the maps) per job, or its UserError."""
        from igcam_engine.apps.outputs import explain_images, map_entry, prediction

        self.batch_sizes[len(jobs)] += 1
        results = [None] * len(jobs)
        groups = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.group(), []).append(index)
        for indices in groups.values():
            first = jobs[indices[0]]
            images = np.stack([jobs[i].image for i in indices])
            for i, result in zip(indices, explain_images(self.explainer, images, first.targets, first.options)):
                if isinstance(result, UserError):
                    results[i] = result
                    continue
                targets, maps, outputs = result
                results[i] = (prediction(self.explainer, outputs),
                              [map_entry(t, self.explainer, outputs) for t in targets], targets, maps)
        return results

    def respond(self, job: Job, result):
        """(status, content type, body bytes, extra headers)."""
        from igcam_engine.images import overlay_on_photo

        self.explained += 1
        if isinstance(result, (UserError, HTTPError)):
            return _error(result)
        said, entries, targets, maps = result
        headers = {"X-Igcam-Predictions": _header(said), "X-Igcam-Targets": _header([e["target"] for e in entries])}
        if job.output == "npy":
            buffer = io.BytesIO()
            np.save(buffer, maps.astype(np.float32))
            return 200, "application/octet-stream", buffer.getvalue(), headers
        if job.output == "json":
            body = {"prediction": said, "targets": entries, "shape": list(maps.shape),
                    "maps": maps.astype(np.float32).tolist()}
            return 200, "application/json", json.dumps(body).encode(), headers
        buffer = io.BytesIO()
        boxes = [(targets[0].box, entries[0]["name"])] if getattr(targets[0], "box", None) is not None else []
        overlay_on_photo(job.picture, job.shown, maps[0], self.explainer.preprocess, boxes).save(buffer, format="PNG")
        return 200, "image/png", buffer.getvalue(), headers

    def stats(self) -> dict:
        return {"explained": self.explained, "precision": self.explainer.precision,
                "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())}}


MAX_HEADER = 4096  # characters of a JSON header value (a long prediction is cut, the body has it all)


def _header(value) -> str:
    """JSON for a response header: ASCII, and at most MAX_HEADER characters (the start of it, then "...")."""
    text = json.dumps(value)
    return text if len(text) <= MAX_HEADER else text[:MAX_HEADER - 3] + "..."


def _inside_prefix(request) -> str:
    """The request's path below the application's route prefix (Ray Serve passes the prefix as the ASGI root
    path), without a trailing slash."""
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/")


def _error(error):
    """The answer to a refused request: its status (an HTTPError's own, a UserError's by type), one JSON line."""
    status = error.status if isinstance(error, HTTPError) else status_of(error)
    return status, "application/json", json.dumps({"error": str(error)}).encode(), {}


async def read_body(request, limit: int = MAX_BODY_BYTES, timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The request body, read as it streams: 413 once it passes `limit` (chunked or not; the rest is drained,
    not kept, so that the client reads the answer), 408 when it has not all arrived within `timeout` seconds."""
    declared = request.headers.get("content-length", "")
    oversized = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0

    async def receive():
        nonlocal size, oversized
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                oversized = True
            if not oversized:
                chunks.append(chunk)

    try:
        await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {timeout:g} s") from None
    if oversized:
        raise HTTPError(413, f"the request body exceeds the limit of {limit} bytes")
    return b"".join(chunks)


def serve_application(shipped: list, *, replicas: int = 1, max_batch: int = 8, batch_wait_ms: float = 10.0,
                      backend: BackendOptions | None = None, limits: Limits = SERVICE_LIMITS,
                      cpus_per_replica: float = 1.0,
                      max_queued: int | None = None):
    """The Ray Serve application (its ingress deployment bound to its arguments) for a bundle shipped with
    cluster.ship_bundle. A replica takes up to 4 x max_batch requests at once (at least 16) and queues up to
    `max_queued` more (default: as many); beyond, Ray Serve answers 503 with Retry-After."""
    from ray import serve
    from ray.serve.config import BackpressureConfig
    from starlette.responses import JSONResponse, Response

    ongoing = max(4 * max_batch, 16)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=ongoing, max_queued_requests=max_queued or ongoing,
                      backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S))
    class Explain:
        def __init__(self):
            import ray

            from igcam_engine.apps.cluster import materialize_bundle

            serve_replica_on_loopback()
            self.folder = materialize_bundle(shipped)
            self.service = ExplainService(self.folder.name, backend, limits)
            self.node = ray.get_runtime_context().get_node_id()
            self.explain_batch.set_max_batch_size(max_batch)
            self.explain_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def explain_batch(self, jobs: list[Job]) -> list:
            # The engine call blocks; run it off the event loop so requests keep queueing meanwhile.
            return await asyncio.get_running_loop().run_in_executor(None, self.service.run, jobs)

        async def __call__(self, request):
            path = _inside_prefix(request)
            if request.method == "GET" and path == "/ready":  # reachable only once the sessions are warm
                return JSONResponse({"ready": True})
            if request.method == "GET" and path == "/stats":
                return JSONResponse({**self.service.stats(), "node": self.node})
            if path != "/explain":
                return JSONResponse({"error": f"no route {request.method} {path or '/'}; see GET /healthz, "
                                              "/ready, /stats, POST /explain"}, status_code=404)
            if request.method != "POST":
                return JSONResponse({"error": "POST an image to /explain"}, status_code=405)
            loop = asyncio.get_running_loop()
            try:
                body = await read_body(request)
                job = await loop.run_in_executor(None, self.service.parse, body,
                                                 request.headers.get("content-type", ""), dict(request.query_params))
                result = await self.explain_batch(job)
                status, kind, body, headers = await loop.run_in_executor(None, self.service.respond, job, result)
            except (HTTPError, UserError) as e:
                status, kind, body, headers = _error(e)
            return Response(body, status_code=status, media_type=kind, headers=headers)

    return Explain.bind()


def health_application():
    """/healthz: a deployment of its own, so that its answer never waits behind explanations."""
    from ray import serve
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    class Health:
        def __init__(self):
            serve_replica_on_loopback()

        async def __call__(self, request):
            return JSONResponse({"status": "ok"})

    return Health.bind()


@dataclass(frozen=True)
class ServerOptions:
    """Where and how the service listens: its address, the engine replicas, Serve's batching (images per engine call
    at most, and how long a request waits for others), the application's name and route prefix."""

    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    name: str = "igcam"
    route_prefix: str = "/"

    def checked(self) -> "ServerOptions":
        if not isinstance(self.host, str) or not re.fullmatch(r"[A-Za-z0-9.:\[\]_-]{1,255}", self.host):
            raise OptionError(f"--host must be an address or host name, got {self.host!r}")
        return ServerOptions(self.host, integer(self.port, "port", 1, 65535), integer(self.replicas, "replicas", 1, 1024),
                             integer(self.max_batch, "max_batch", 1, 1024),
                             number(self.batch_wait_ms, "batch_wait_ms", 0, 60_000), *check_route(self.name,
                                                                                                 self.route_prefix))


def run_server(bundle: str, server: ServerOptions = ServerOptions(), *, backend: BackendOptions | None = None,
               limits: Limits = SERVICE_LIMITS, address=None, runtime_env=None):
    """Starts Ray (loopback only) or joins `address`, deploys the applications `server.name` (at its route prefix)
    and NAME-health (at PREFIX/healthz) and serves until interrupted (Ctrl-C, SIGTERM). On the way out it removes
    its own applications only (on a cluster, other users' stay) and stops everything it started. Everything is
    checked before Ray starts."""
    from igcam_engine.apps.cluster import check_address, ship_bundle, start_ray, stop_ray
    from igcam_engine.bundle import load_manifest

    check_address(address, "serve")
    server, backend, limits = server.checked(), (backend or BackendOptions()).checked(), limits.checked()
    load_manifest(bundle)  # a bad bundle is a one-line error here, not a crashed replica
    name, prefix = server.name, server.route_prefix
    ray = start_ray(address, "serve", "serve", runtime_env)
    from ray import serve

    try:
        # One HTTP proxy, on the head node: on a cluster whose nodes share a machine (or a port range) a proxy per
        # node would contend for the port; a load balancer in front of several heads is the way to scale it.
        serve.start(proxy_location="HeadOnly", http_options={"host": server.host, "port": server.port,
                                                             "keep_alive_timeout_s": 5})
        host, port = _proxy_address(server.host, server.port)
        serve.run(health_application(), name=f"{name}-health", route_prefix=f"{prefix.rstrip('/')}/healthz",
                  blocking=False)
        serve.run(serve_application(ship_bundle(ray, bundle), replicas=server.replicas, max_batch=server.max_batch,
                                    batch_wait_ms=server.batch_wait_ms, backend=backend, limits=limits),
                  name=name, route_prefix=prefix, blocking=False)
        base = f"http://{host}:{port}{prefix.rstrip('/')}"
        print(f"igcam serve: {base}/explain (POST an image), {base}/healthz, /ready, /stats; application '{name}'; "
              "Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if address:
                for application in (name, f"{name}-health"):
                    serve.delete(application)
            else:
                serve.shutdown()  # this Ray, and its Serve, are this command's own
        finally:
            stop_ray(ray)


def _proxy_address(host: str, port: int):
    """Where Serve's HTTP proxy really listens: a cluster where Serve already runs keeps its own proxy, and the
    requested --host/--port are then not applied (said in one line, not left to a surprised client)."""
    from ray.serve.context import _get_global_client

    config = _get_global_client().http_config
    if (config.host, config.port) != (host, port):
        print(f"igcam serve: Serve already runs on this cluster with its HTTP proxy on {config.host}:{config.port}; "
              f"--host/--port ({host}:{port}) do not apply to it", flush=True)
    return config.host, config.port


def check_route(name, route_prefix) -> tuple:
    """(name, route prefix): the application name (letters, digits, - and _) and route prefix ("/" or "/a/b")
    checked."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise OptionError(f"--name must be 1 to 64 letters, digits, '-' or '_', got {name!r}")
    if not isinstance(route_prefix, str) or not re.fullmatch(r"/|(/[A-Za-z0-9._~-]+)+", route_prefix):
        raise OptionError(f"--route-prefix must be '/' or a path such as /igcam (no trailing slash), got {route_prefix!r}")
    return name, route_prefix


def stop_application(address, name: str = "igcam") -> list[str]:
    """Removes the applications `name` and `name`-health from the cluster at `address` (after an `igcam serve` that
    could not clean up, e.g. killed with SIGKILL); returns those it found."""
    from igcam_engine.apps.cluster import start_ray, stop_ray

    check_route(name, "/")
    if not address:
        raise OptionError("--stop removes an application from a running cluster: give its --address")
    ray = start_ray(address, "serve", "serve")
    try:
        from ray import serve

        running = set(serve.status().applications)
        removed = [a for a in (name, f"{name}-health") if a in running]
        for application in removed:
            serve.delete(application)
        return removed
    finally:
        stop_ray(ray)


def arguments(parser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory (from `igcam export`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", default="8000", help="port (default: 8000)")
    parser.add_argument("--replicas", default="1", metavar="N", help="engine replicas (default: 1)")
    parser.add_argument("--max-batch", default="8", metavar="N", help="images per engine call at most (default: 8)")
    parser.add_argument("--batch-wait-ms", default="10", metavar="MS",
                        help="how long a request waits for others to batch with (default: 10)")
    add_cluster_arguments(parser, "ray://HOST:PORT (Ray Client)")
    parser.add_argument("--name", default="igcam", help="the Serve application's name (default: igcam; its health "
                        "check is NAME-health)")
    parser.add_argument("--route-prefix", default="/", help="where the application's paths start (default: /)")
    parser.add_argument("--stop", action="store_true", help="remove the application NAME from the cluster at "
                        "--address (after an igcam serve that could not clean up) and exit")
    add_backend_arguments(parser)
    add_limit_arguments(parser, SERVICE_LIMITS, service=True)


def run(args) -> None:
    from igcam_engine.apps.cluster import parse_runtime_env
    from igcam_engine.validators import integer_text, number_text

    if args.stop:
        removed = stop_application(args.address, args.name)
        print(f"removed {', '.join(removed)}" if removed else f"no application '{args.name}' is running there")
        return
    if args.bundle is None:
        raise OptionError("give the bundle to serve (or --stop with --address to remove a running one)")
    server = ServerOptions(args.host, integer_text(args.port, "port"), integer_text(args.replicas, "replicas"),
                           integer_text(args.max_batch, "max_batch"), number_text(args.batch_wait_ms, "batch_wait_ms"),
                           args.name, args.route_prefix)
    run_server(args.bundle, server, backend=backend_options(args), limits=limits(args, SERVICE_LIMITS),
               address=args.address, runtime_env=parse_runtime_env(args.runtime_env))


COMMANDS = (Command("serve", "serve explanations over HTTP (Ray Serve, dynamic batching)", arguments, run),)
