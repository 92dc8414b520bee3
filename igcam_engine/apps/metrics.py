"""`GET /metrics` of `igcam serve`: Prometheus text from the front (which sees every request), in a registry of its
own (prometheus_client, which ray[serve] installs). Labels take values from fixed sets only (a route's template, the
HTTP method, the status code): no path, model name, parameter or any other request content, and no secret."""
from __future__ import annotations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
METHODS = ("GET", "POST")


class ServiceMetrics:
    def __init__(self):
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.content_type = CONTENT_TYPE_LATEST
        self.requests = Counter("igcam_requests", "HTTP requests answered, by route, method and status",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("igcam_request_duration_seconds", "From a request's arrival to its answer, by route",
                                 ("route",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batches = Histogram("igcam_engine_batch_size", "Images per engine call", buckets=BATCH_BUCKETS,
                                 registry=self.registry)
        self.queued = Gauge("igcam_engine_queue_depth", "Requests handed to the engine replicas and not yet answered",
                            registry=self.registry)
        self.reading = Gauge("igcam_bodies_reading", "Requests whose bodies are still arriving",
                             registry=self.registry)
        self.ready = Gauge("igcam_engine_ready", "1 while an engine replica runs", registry=self.registry)

    def observe(self, route, method: str, response, seconds: float) -> None:
        """One answered request: `route` is its Route, or None when it matched none."""
        template = route.path if route is not None else "unmatched"
        self.requests.labels(template, method if method in METHODS else "other", str(response.status)).inc()
        self.latency.labels(template).observe(seconds)
        for size in response.batches:
            self.batches.observe(size)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
