"""Ray for `igcam serve` and `igcam batch`: a Ray started here listens on loopback only (its GCS, raylet and agents
bound to 127.0.0.1, whatever address the service itself binds), or the command joins a cluster's address; SIGTERM
stops a command as Ctrl-C does, through its clean-up, so nothing it started is left running."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path

from igcam_engine.errors import UserError

PR_SET_CHILD_SUBREAPER = 36
SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # 0: Ray runs as on a laptop, on 127.0.0.1


def start_ray(address, extra: str) -> object:
    """ray, initialised: a local instance on loopback (address None) or the cluster at `address`."""
    if not address:
        # Ray's single-node mode: its node address is the loopback one, and its servers (GCS, raylet, workers,
        # agents) listen there only. Read when ray is imported, and inherited by every process Ray starts.
        os.environ[SINGLE_NODE] = "0"
    try:
        import ray
    except ImportError:
        raise UserError(f"this command needs Ray: pip install 'igcam-engine[{extra}]'") from None
    # Ray's core worker would install a handler of its own for SIGTERM that aborts the process (leaving its agents
    # behind); the one below stops it cleanly from the start.
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    _become_subreaper()
    stop_on_sigterm()
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    except BaseException:  # stopped while starting (Ray's own SIGTERM handler exits then): what started stops too
        stop_ray(ray)
        raise
    stop_on_sigterm()
    return ray


def stop_ray(ray) -> None:
    """ray.shutdown(), then whatever process this command started that is still running: Ray's agents can outlive
    a shutdown that interrupts their start, and, this process being their subreaper, they are still its
    descendants then. SIGTERM, SIGKILL after 3 s, and the exited ones reaped."""
    try:
        ray.shutdown()
    finally:
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 1.0)):
            alive = [pid for pid in _descendants(os.getpid()) if _alive(pid)]
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while any(_alive(pid) for pid in alive) and time.monotonic() < deadline:
                _reap()
                time.sleep(0.1)
        _reap()


def _become_subreaper() -> None:
    """Descendants orphaned while Ray starts or stops are re-parented to this process, not to init (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _descendants(root: int) -> list[int]:
    """The processes below `root`, from /proc (Linux; elsewhere none are known and ray.shutdown does it all)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_on_sigterm() -> None:
    """SIGTERM (what Kubernetes and systemd send) raises KeyboardInterrupt in the main thread, as Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def serve_replica_on_loopback() -> None:
    """Ray Serve (2.60) opens one more gRPC server in every replica, for calls between deployments, bound to [::]
    (every interface) whatever the node's address. Called in a replica's constructor, which runs before that
    server starts: in single-node mode it is bound to loopback, as Ray's own servers are."""
    if os.environ.get(SINGLE_NODE) != "0":
        return
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback", False):
        return

    def loopback(server, address: str):
        return bind(server, "127.0.0.1:" + address.rsplit(":", 1)[1] if address.startswith("[::]:") else address)

    loopback.loopback = True
    replica.add_port_to_grpc_server = loopback

