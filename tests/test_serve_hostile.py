"""`igcam serve` against careless and hostile clients on 127.0.0.1 (bounded in count and time): 100 stalled uploads
leave readiness and valid requests on every route family answered and get their 408 at the deadline; a burst gets
503 instead of an unbounded queue while /healthz stays fast; oversized, chunked, many-part and misspelled requests
get a 4xx on every protocol's routes; Ray listens on loopback only; SIGTERM stops every process the command
started."""
import base64
import importlib.util
import json
import os
import signal
import socket
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from support.images import png_claiming
from support.processes import Scope
from support.serving import serve_on
from support.sockets import listening

from igcam_engine import zoo
from igcam_engine.benchmarks import serve_load
from igcam_engine.data import sample_images
from igcam_engine.export import from_torch
from igcam_engine.images import load_image

HAS_RAY = importlib.util.find_spec("ray") is not None
pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not HAS_RAY and not os.environ.get("CI"), reason="ray[serve] is not installed")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    return from_torch(model, "features.18", (3, 64, 64), tmp_path_factory.mktemp("hostile-serve") / "bundle",
                      preprocess="imagenet")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    scope = Scope(tmp_path_factory.mktemp("hostile-serve-log") / "serve.log")
    try:
        yield serve_on(scope, bundle, "--providers", "cpu", "--max-batch", "4"), scope
    finally:
        scope.stop()


def healthz_seconds(base) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
        assert response.status == 200
    return time.perf_counter() - started


def test_every_socket_listens_on_loopback(server):
    _, scope = server
    found = listening(scope.members())
    assert found, "no listening socket found: the test would prove nothing"
    outside = [(pid, address, port) for pid, address, port in found if address not in ("127.0.0.1", "::1")]
    assert not outside, f"listening beyond loopback: {outside}"


def stalled_upload(port: int, path: str = "/explain") -> socket.socket:
    """Headers announcing 100 kB of PNG, then 10 bytes, then nothing."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n".encode()
                       + b"Content-Length: 100000\r\n\r\n\x89PNG\r\n\x1a\n\x00\x00")
    return connection


def valid_requests(base: str, photo: bytes) -> dict:
    """One valid request of each route family, its status and seconds: igcam's /explain, KServe V1's :explain, the
    Open Inference Protocol's infer."""
    picture = np.asarray(load_image(photo).resize((32, 24)))
    requests = {
        "explain": (f"{base}/explain?steps=2&output=npy", photo, "image/png"),
        "v1": (f"{base}/v1/models/igcam:explain", json.dumps(
            {"instances": [{"b64": base64.b64encode(photo).decode()}], "parameters": {"steps": 2}}).encode(),
               "application/json"),
        "v2": (f"{base}/v2/models/igcam/infer", json.dumps(
            {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, *picture.shape],
                         "data": picture.ravel().tolist()}], "parameters": {"steps": 2}}).encode(), "application/json")}
    answers = {}
    for family, (url, body, kind) in requests.items():
        started = time.perf_counter()
        status, *_ = serve_load.post(url, body, kind, timeout=60)
        answers[family] = (status, time.perf_counter() - started)
    return answers


def get(url: str):
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, time.perf_counter() - started


def test_stalled_uploads_leave_readiness_and_every_route_family_answered(server):
    """100 uploads that stall, on every route family: they hold none of the engine's slots, so /ready and valid
    requests are answered meanwhile, and each stalled upload gets its 408 at the body deadline counted from its
    arrival (15 s), not from when a replica took it."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    photo = sample_images()[0].read_bytes()
    paths = ["/explain", "/v1/models/igcam:explain", "/v2/models/igcam/infer"]
    started = time.monotonic()
    stalled = [stalled_upload(port, paths[n % 3]) for n in range(100)]
    try:
        time.sleep(1)
        for path in ("/ready", "/v2/health/ready", "/v2/models/igcam/ready", "/healthz"):
            status, seconds = get(base + path)
            assert status == 200 and seconds < 1.0, (path, status, seconds)
        answers = valid_requests(base, photo)
        assert {family: status for family, (status, _) in answers.items()} == {"explain": 200, "v1": 200, "v2": 200}
        assert time.monotonic() - started < 12, "the valid requests waited for the stalled ones"
        arrivals = []
        for connection in stalled:
            connection.settimeout(30)
            assert connection.recv(64).startswith(b"HTTP/1.1 408")
            arrivals.append(time.monotonic() - started)
        assert 14 < min(arrivals) and max(arrivals) < 22, (min(arrivals), max(arrivals))
    finally:
        for connection in stalled:
            connection.close()
    print(f"valid requests with 100 stalled uploads: {answers}; 408 after {min(arrivals):.1f}-{max(arrivals):.1f} s")


def test_a_burst_beyond_the_queue_gets_503_and_healthz_stays_fast(server):
    base, _ = server
    photo = sample_images()[0].read_bytes()
    health, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            health.append(healthz_seconds(base))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            burst = list(pool.map(lambda _: serve_load.post(f"{base}/explain?steps=2&output=npy", photo, "image/png",
                                                            timeout=120), range(200)))
    finally:
        stop.set()
        watcher.join()
    statuses = [status for status, *_ in burst]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    assert 503 in statuses, "200 requests beyond the queue were all queued"
    assert all(headers.get("retry-after") for status, _, headers, _ in burst if status == 503)
    assert len(health) >= 5 and max(health) < 1.0, f"/healthz took up to {max(health):.2f} s"
    deadline = time.monotonic() + 45  # the burst drains; the service serves again
    while True:
        status, body, headers, _ = serve_load.post(f"{base}/explain?steps=2", photo, "image/png")
        if status == 200 or time.monotonic() > deadline:
            break
        assert status == 503
        time.sleep(float(headers.get("retry-after", 1)))
    assert status == 200 and body.startswith(b"\x89PNG")
    print(f"healthz median {statistics.median(health) * 1e3:.0f} ms, max {max(health) * 1e3:.0f} ms; "
          f"{statuses.count(200)} explained, {statuses.count(503)} told to retry")


def raw_request(port: int, head: bytes, chunks) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(head)
        for chunk in chunks:
            try:
                connection.sendall(chunk)
            except OSError:  # the server answered and closed early
                break
        answer = b""
        while True:
            data = connection.recv(65536)
            if not data:
                return answer
            answer += data
            if b"\r\n\r\n" in answer and b'"error"' in answer:
                return answer


def test_a_chunked_upload_over_the_limit_gets_413(server):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    megabyte = b"\x00" * (1 << 20)
    chunks = [f"{len(megabyte):x}\r\n".encode() + megabyte + b"\r\n" for _ in range(22)] + [b"0\r\n\r\n"]
    answer = raw_request(port, b"POST /explain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 20971520 bytes" in answer


def test_a_multipart_body_of_many_parts_is_refused_at_once(server):
    base, _ = server
    boundary = "b"
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nx\r\n"
                   for i in range(50000)).encode() + f"--{boundary}--\r\n".encode()
    started = time.perf_counter()
    status, reply, _, _ = serve_load.post(f"{base}/explain", body, f"multipart/form-data; boundary={boundary}")
    assert status == 400 and "at most 16 fields" in json.loads(reply)["error"]
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("query,body,status,message", [
    ("?rule=bogus", None, 400, "unknown quadrature rule 'bogus'; accepted: left, right"),
    ("?rule=", None, 400, "unknown quadrature rule ''; accepted:"),
    ("?stpes=3", None, 400, "unknown parameter(s) 'stpes'; accepted: target, top_k"),
    ("", png_claiming(50000, 50000), 413, "claims 2500000000 pixels, more than the limit"),
    ("", png_claiming(7000, 6000), 413, "is 7000x6000 pixels, more than the limit of 40000000"),
    ("", b"\x89PNG\r\n\x1a\n truncated", 422, "cannot read image bytes as an image"),
])
def test_bad_parameters_and_images(server, query, body, status, message):
    base, _ = server
    photo = sample_images()[0].read_bytes()
    got, reply, _, _ = serve_load.post(f"{base}/explain{query}", photo if body is None else body, "image/png")
    error = json.loads(reply)["error"]
    assert got == status and message in error and "BytesIO" not in error


@pytest.mark.parametrize("path", ["/v1/models/igcam:explain", "/v2/models/igcam/infer"])
def test_the_protocols_routes_get_the_same_bounds(server, path):
    """A body over 20 MiB (declared, or chunked), a misspelled parameter and a wrong type on KServe's and the Open
    Inference Protocol's routes: the answers of /explain, in the protocols' {"error": ...} shape."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    got, reply, _, _ = serve_load.post(base + path, b"{" + b" " * (21 << 20) + b"}", "application/json")
    assert got == 413 and "exceeds the limit of 20971520 bytes" in json.loads(reply)["error"]
    megabyte = b" " * (1 << 20)
    chunks = [f"{len(megabyte):x}\r\n".encode() + megabyte + b"\r\n" for _ in range(22)] + [b"0\r\n\r\n"]
    answer = raw_request(port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode(), chunks)
    assert answer.startswith(b"HTTP/1.1 413")
    body = ({"instances": [[[[1, 2, 3]]]], "parameters": {"stpes": 3}} if "v1" in path else
            {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 3]}],
             "parameters": {"stpes": 3}})
    got, reply, _, _ = serve_load.post(base + path, json.dumps(body).encode(), "application/json")
    assert got == 400 and "unknown parameter(s) 'stpes'" in json.loads(reply)["error"]
    body["parameters"] = {"steps": {"a": 1}}
    got, reply, _, _ = serve_load.post(base + path, json.dumps(body).encode(), "application/json")
    assert got == 400 and json.loads(reply) == {"error": "parameter 'steps' must be a string, number or boolean, "
                                                         "got dict"}


def test_stats_stay_bounded(server):
    base, _ = server
    with urllib.request.urlopen(f"{base}/stats", timeout=30) as response:
        stats = json.loads(response.read())
    assert set(stats) == {"explained", "batch_sizes", "precision", "node"} and len(stats["batch_sizes"]) <= 4  # one count per size
    assert stats["precision"] == "f32"


def test_sigterm_stops_everything_the_command_started(bundle, tmp_path):
    scope = Scope(tmp_path / "serve.log")
    try:
        serve_on(scope, bundle, "--providers", "cpu")
        assert len(scope.members()) > 3  # the command, Ray's daemons, the replicas
        scope.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while scope.members() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not scope.members(), f"left after SIGTERM: {scope.members()}"
    finally:
        scope.stop()
