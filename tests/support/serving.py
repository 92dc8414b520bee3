"""Starting `igcam serve` in a test: a free port, and the command run until its /ready answers."""
import socket
import time
import urllib.request

from support.processes import Scope


def free_port():
    """A port the kernel just handed out; serve_on retries should another process take it first."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_on(scope: Scope, bundle, *options, attempts=3, ready_within=180):
    """Starts `igcam serve` on a free port and waits for /ready; returns the base URL."""
    for _ in range(attempts):
        port = free_port()
        process = scope.start(["serve", bundle, "--port", port, *options])
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
                    if response.status == 200:
                        return base
            except OSError:
                time.sleep(1)
        scope.stop()
        if "Failed to bind to address" not in scope.output():
            raise RuntimeError(f"igcam serve did not become ready in {ready_within} s:\n{scope.output()[-4000:]}")
    raise RuntimeError(f"igcam serve found no free port in {attempts} attempts")
