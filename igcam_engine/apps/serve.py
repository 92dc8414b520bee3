"""`igcam serve`: explanations over HTTP with Ray Serve, requests from different clients batched into one engine call.

Three protocols on one service (igcam_engine.apps.protocols has the routes, /openapi.json describes them):
igcam's own `POST /explain` (an image file; a PNG overlay, .npy maps or JSON), KServe's V1 data plane
(`/v1/models/NAME:predict` and `:explain`) and the Open Inference Protocol (`/v2/...`: Triton's and KServe V2's
clients). Also `GET /healthz` (a deployment of its own, never queued behind explanations), `/ready` (200 while an
engine replica runs), `/stats` (one engine replica's counts, batch sizes, precision and node) and `/metrics`
(Prometheus). NAME is the application's --name; the paths are under its --route-prefix. The bundle is shipped to
the replicas through Ray's object store, so it need exist only where `igcam serve` runs.

Two deployments: the front takes every request, answers health, metadata and documents itself, and reads a body to
its end (a size limit while it streams, chunked or not; a deadline counted from the request's arrival: 408) before
the request reaches an engine replica through a deployment handle, so that stalled uploads hold only the front's
cheap slots, never the engine's. The engine's replicas decode, batch and explain off the event loop; requests
beyond their queue get 503 with Retry-After. Bad requests get a 4xx with a one-line JSON message, {"error": ...},
its status chosen by the error's type (protocols.STATUS), and never stop the server.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np

from igcam_engine.apps.arguments import (
    Command,
    add_backend_arguments,
    add_limit_arguments,
    backend_options,
    limits,
)
from igcam_engine.apps.cluster import add_cluster_arguments, serve_replica_on_loopback
from igcam_engine.apps.protocols import (
    HTTPError,
    Job,
    Request,
    Response,
    error_response,
    json_response,
    match,
    native_jobs,
    native_response,
    openapi,
    v1_jobs,
    v1_response,
    v2_jobs,
    v2_model_metadata,
    v2_response,
)
from igcam_engine.backends import BackendOptions
from igcam_engine.errors import OptionError, UserError
from igcam_engine.options import Limits
from igcam_engine.validators import integer, number

MAX_BODY_BYTES = 20 << 20
BODY_TIMEOUT_S = 15.0  # the whole body must arrive within this, counted from the request's arrival
# One request may not hold a replica for minutes: its passes per map, Score-CAM's and Ablation-CAM's channels (a
# request without `channels` takes this many of largest activation mass) and its classes are bounded.
SERVICE_LIMITS = Limits(steps=256, channels=256, top_k=10)
RETRY_AFTER_S = 1
# Requests the front holds at once: each costs a coroutine while its body streams in (or stalls), never an engine
# slot; beyond, Serve answers 503.
FRONT_REQUESTS = 1024
READY_CACHE_S = 1.0  # how long the front trusts its last look at the engine's replicas


class ExplainService:
    """One engine replica's work: an Explainer, the protocols' codecs (igcam_engine.apps.protocols) and engine calls
    over batches of jobs (all synchronous, CPU-bound work that the deployment runs off the event loop);
    `serve_application` wraps it in Ray Serve deployments."""

    def __init__(self, bundle, backend: BackendOptions | None = None, limits: Limits = SERVICE_LIMITS,
                 model: str = "igcam"):
        from igcam_engine import Explainer

        self.explainer = Explainer(bundle, **asdict(backend or BackendOptions()), limits=limits)
        self.manifest, self.limits, self.model = self.explainer.manifest, self.explainer.limits, model
        self.batch_sizes: Counter = Counter()
        self.explained = 0
        # Warm the sessions: Ray Serve routes no request here before this constructor returns.
        self.explainer.model_outputs(np.zeros((1, *self.explainer.input_shape), np.float32))

    def decode(self, request: Request):
        """(the request's jobs, the function that turns their results into its Response); a UserError (its status
        by type) or HTTPError for what is wrong with it."""
        route = match(request.method, request.path, self.model)
        if route.name == "explain":
            jobs = native_jobs(self, request)
            return jobs, partial(self._finish, jobs, partial(native_response, self, jobs))
        if route.name in ("v1_predict", "v1_explain"):
            jobs = v1_jobs(self, request, explain=route.name == "v1_explain")
            return jobs, partial(self._finish, jobs, partial(v1_response, self, jobs))
        if route.name == "v2_infer":
            jobs, asked = v2_jobs(self, request)
            return jobs, partial(self._finish, jobs, partial(v2_response, self, self.model, asked))
        raise HTTPError(404, f"{request.method} {request.path} is not answered by the engine")

    def _finish(self, jobs: list[Job], encode, results: list) -> Response:
        self.explained += len(jobs)
        refused = next((r for r in results if isinstance(r, (UserError, HTTPError))), None)
        try:
            return error_response(refused) if refused is not None else encode(results)
        except (UserError, HTTPError) as e:
            return error_response(e)

    def run(self, jobs: list[Job]) -> list:
        """One engine call per group of compatible jobs (igcam_engine.apps.outputs.explain_images); returns
        (the prediction, the map entries, the targets, the maps) per job (a prediction alone for a job without
        options), or its UserError."""
        from igcam_engine.apps.outputs import explain_images, map_entry, prediction

        self.batch_sizes[len(jobs)] += 1
        results = [None] * len(jobs)
        groups = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.group(), []).append(index)
        for indices in groups.values():
            first = jobs[indices[0]]
            images = np.stack([jobs[i].image for i in indices])
            if first.options is None:
                try:
                    outputs = self.explainer.model_outputs(images)
                except UserError as e:
                    outputs = e
                for position, i in enumerate(indices):
                    results[i] = outputs if isinstance(outputs, UserError) else (
                        prediction(self.explainer, [o[position] for o in outputs]),)
                continue
            for i, result in zip(indices, explain_images(self.explainer, images, first.targets, first.options)):
                if isinstance(result, UserError):
                    results[i] = result
                    continue
                targets, maps, outputs = result
                results[i] = (prediction(self.explainer, outputs),
                              [map_entry(t, self.explainer, outputs) for t in targets], targets, maps)
        return results

    def answer(self, request: Request) -> Response:
        """The whole request at once, its jobs in one batch (in-process use and tests; the deployment batches
        jobs across requests)."""
        try:
            jobs, finish = self.decode(request)
        except (UserError, HTTPError) as e:
            return error_response(e)
        return finish(self.run(jobs))

    def stats(self) -> dict:
        return {"explained": self.explained, "precision": self.explainer.precision,
                "batch_sizes": {str(size): count for size, count in sorted(self.batch_sizes.items())}}


def _inside_prefix(request) -> str:
    """The request's path below the application's route prefix (Ray Serve passes the prefix as the ASGI root
    path), without a trailing slash."""
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/")


async def read_body(request, limit: int = MAX_BODY_BYTES, deadline: float | None = None) -> bytes:
    """The request body, read as it streams: 413 once it passes `limit` (chunked or not; the rest is drained,
    not kept, so that the client reads the answer), 408 when it has not all arrived by `deadline` (the event loop's
    clock; default BODY_TIMEOUT_S from now)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BODY_TIMEOUT_S if deadline is None else deadline
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
        await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
    except asyncio.TimeoutError:
        raise HTTPError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s") from None
    if oversized:
        raise HTTPError(413, f"the request body exceeds the limit of {limit} bytes")
    return b"".join(chunks)


def serve_application(shipped: list, *, model: str = "igcam", replicas: int = 1, max_batch: int = 8,
                      batch_wait_ms: float = 10.0, backend: BackendOptions | None = None,
                      limits: Limits = SERVICE_LIMITS, cpus_per_replica: float = 1.0, max_queued: int | None = None,
                      application: str | None = None, prefix: str = "/", manifest=None):
    """The Ray Serve application for a bundle shipped with cluster.ship_bundle: its ingress, the front (every HTTP
    request: bodies read to their end under a deadline counted from arrival, health, metadata, /metrics and
    /openapi.json answered at once), bound to the engine (replicas of ExplainService, reached through a deployment
    handle with each body already read, so that a slow client never holds an engine slot). An engine replica
    takes up to 4 x max_batch requests at once (at least 16) and queues up to `max_queued` more (default: as
    many); beyond, the front answers 503 with Retry-After. `application` (the Serve application's name, default
    `model`) is where the front looks for the engine's replicas; `manifest` (the bundle's) describes the model."""
    from ray import serve
    from ray.serve.config import BackpressureConfig
    from ray.serve.exceptions import BackPressureError
    from starlette.responses import Response as StarletteResponse

    from igcam_engine import __version__
    from igcam_engine.apps.metrics import ServiceMetrics

    ongoing = max(4 * max_batch, 16)
    application = application or model
    busy = HTTPError(503, "the service is busy; retry after the time in Retry-After",
                     {"Retry-After": str(RETRY_AFTER_S)})

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      max_ongoing_requests=ongoing, max_queued_requests=max_queued or ongoing)
    class Engine:
        def __init__(self):
            import ray

            from igcam_engine.apps.cluster import materialize_bundle

            serve_replica_on_loopback()
            self.service = ExplainService(materialize_bundle(shipped), backend, limits, model)
            self.node = ray.get_runtime_context().get_node_id()
            self.explain_batch.set_max_batch_size(max_batch)
            self.explain_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def explain_batch(self, jobs: list[Job]) -> list:
            # The engine call blocks; run it off the event loop so requests keep queueing meanwhile. The batch's
            # size rides with its first job's answer: /metrics counts each batch once.
            results = await asyncio.get_running_loop().run_in_executor(None, self.service.run, jobs)
            return [(result, len(jobs) if n == 0 else 0) for n, result in enumerate(results)]

        async def handle(self, request: Request) -> Response:
            if request.path == "/stats":
                return json_response({**self.service.stats(), "node": self.node})
            loop = asyncio.get_running_loop()
            try:
                jobs, finish = await loop.run_in_executor(None, self.service.decode, request)
            except (HTTPError, UserError) as e:
                return error_response(e)
            answered = await asyncio.gather(*(self.explain_batch(job) for job in jobs))
            response = await loop.run_in_executor(None, finish, [result for result, _ in answered])
            return replace(response, batches=tuple(size for _, size in answered if size))

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=FRONT_REQUESTS,
                      max_queued_requests=FRONT_REQUESTS,
                      backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S))
    class Front:
        def __init__(self, engine):
            serve_replica_on_loopback()
            self.engine = engine
            self.metrics = ServiceMetrics()
            self.checked_at, self.engine_ready = -READY_CACHE_S, False
            self.documents = {"openapi": openapi(model, __version__, prefix),
                              "v2_model": v2_model_metadata(model, manifest)}

        async def ready(self) -> bool:
            """Whether an engine replica is running (Serve's controller says; looked at once per READY_CACHE_S):
            the engine's readiness, never its queue's."""
            loop = asyncio.get_running_loop()
            if loop.time() - self.checked_at >= READY_CACHE_S:
                self.checked_at = loop.time()
                self.engine_ready = await loop.run_in_executor(None, engine_running, application)
                self.metrics.ready.set(int(self.engine_ready))
            return self.engine_ready

        async def answer(self, route) -> Response:
            """A route the front answers itself."""
            if route.name in ("ready", "v2_ready", "v2_model_ready"):
                ready = await self.ready()
                return json_response({"ready": ready}, 200 if ready else 503)
            if route.name == "v1_model":
                return json_response({"name": model, "ready": await self.ready()})
            if route.name == "metrics":
                return Response(200, self.metrics.content_type, self.metrics.text())
            documents = {"openapi": self.documents["openapi"], "v2_model": self.documents["v2_model"],
                         "v1_models": {"models": [model]}, "v1_live": {"status": "alive"},
                         "v2_live": {"live": True}, "healthz": {"status": "ok"},
                         "v2_server": {"name": "igcam-engine", "version": __version__,
                                       "extensions": ["binary_tensor_data"]}}
            return json_response(documents[route.name])

        async def __call__(self, request):
            loop = asyncio.get_running_loop()
            arrived, route, path = loop.time(), None, _inside_prefix(request)
            try:
                route = match(request.method, path, model)
                if route.answered_by != "engine":
                    response = await self.answer(route)
                else:
                    with self.metrics.reading.track_inprogress():
                        body = await read_body(request, deadline=arrived + BODY_TIMEOUT_S)
                    headers = request.headers
                    with self.metrics.queued.track_inprogress():
                        response = await self.engine.handle.remote(Request(
                            request.method, path, dict(request.query_params),
                            headers.get("content-type", ""), headers.get("inference-header-content-length"), body))
            except (HTTPError, UserError) as e:
                response = error_response(e)
            except BackPressureError:
                response = error_response(busy)
            self.metrics.observe(route, request.method, response, loop.time() - arrived)
            return StarletteResponse(response.body, status_code=response.status, media_type=response.content_type,
                                     headers=response.headers)

    return Front.bind(Engine.bind())


def engine_running(application: str) -> bool:
    """Whether the application's Engine deployment has a running replica (asked of Serve's controller)."""
    from ray import serve

    status = serve.status().applications.get(application)
    engine = status.deployments.get("Engine") if status else None
    return bool(engine and engine.replica_states.get("RUNNING", 0))


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
    from igcam_engine.apps.cluster import check_address, check_workers_cache, ship_bundle, start_ray, stop_ray
    from igcam_engine.bundle import load_manifest

    check_address(address, "serve")
    check_workers_cache(address, runtime_env)
    server, backend, limits = server.checked(), (backend or BackendOptions()).checked(), limits.checked()
    manifest = load_manifest(bundle)  # a bad bundle is a one-line error here, not a crashed replica
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
        serve.run(serve_application(ship_bundle(ray, bundle), model=name, replicas=server.replicas,
                                    max_batch=server.max_batch, batch_wait_ms=server.batch_wait_ms, backend=backend,
                                    limits=limits, prefix=prefix, manifest=manifest),
                  name=name, route_prefix=prefix, blocking=False)
        base = f"http://{host}:{port}{prefix.rstrip('/')}"
        print(f"igcam serve: {base}/explain (POST an image), KServe V1 {base}/v1/models/{name}, Open Inference "
              f"Protocol {base}/v2/models/{name}; {base}/openapi.json lists every route; application '{name}'; "
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
