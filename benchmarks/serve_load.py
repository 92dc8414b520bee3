"""Load for `igcam serve`: N requests from C concurrent clients (bounded in count and time), latency percentiles.

    python -m igcam_engine.benchmarks.serve_load http://127.0.0.1:8000 --requests 64 --clients 8 --steps 50

Sends the sample photos in turn as raw image bodies to POST /explain and prints p50/p95 latency, errors and the
server's batch sizes (GET /stats). Loopback or your own test hosts only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def _headers(headers) -> dict:
    return {name.lower(): value for name, value in headers.items()}


def post(url: str, body: bytes, content_type: str, timeout: float = 120.0):
    """(status, body, headers with lower-case names, seconds) of one POST."""
    return request("POST", url, body, content_type, timeout)


def request(method: str, url: str, body: bytes | None, content_type: str, timeout: float = 120.0):
    """(status, body, headers with lower-case names, seconds) of one request."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if content_type else {},
                                     method=method)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(), _headers(response.headers), time.perf_counter() - started
    except urllib.error.HTTPError as e:
        return e.code, e.read(), _headers(e.headers), time.perf_counter() - started


def load(base: str, images: list, requests: int = 64, clients: int = 8, query: str = "", timeout: float = 120.0):
    """Sends `requests` POSTs (image i % len(images)) from `clients` threads; returns the list of responses."""
    def one(index):
        return index, post(f"{base}/explain{query}", images[index % len(images)], "image/png", timeout)

    with ThreadPoolExecutor(clients) as pool:
        return [result for _, result in sorted(pool.map(one, range(requests)))]


def main(argv=None):
    from igcam_engine.data import sample_images

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    images = [p.read_bytes() for p in sample_images() if p.suffix == ".png"]
    responses = load(args.url.rstrip("/"), images, args.requests, args.clients, f"?steps={args.steps}&output=npy")
    seconds = [r[3] for r in responses]
    errors = sum(r[0] != 200 for r in responses)
    with urllib.request.urlopen(f"{args.url.rstrip('/')}/stats", timeout=30) as response:
        batches = json.loads(response.read())["batch_sizes"]
    print(json.dumps({"requests": args.requests, "clients": args.clients, "steps": args.steps, "errors": errors,
                      "p50_s": statistics.median(seconds), "p95_s": sorted(seconds)[int(0.95 * (len(seconds) - 1))],
                      "batch_sizes": batches}))


if __name__ == "__main__":
    main()
