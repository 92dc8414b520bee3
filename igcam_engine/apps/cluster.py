"""Ray for `igcam serve` and `igcam batch`: without an address a Ray is started here, listening on loopback only (its
GCS, raylet and agents bound to 127.0.0.1, whatever address the service itself binds), and never a cluster found
through RAY_ADDRESS or a running `ray start`; with --address the command joins that cluster (`auto`, `host:port`
the GCS address, or `ray://host:port` Ray Client where the workload supports it). The bundle travels through the
object store (`ship_bundle`), so it need exist only where igcam runs. SIGTERM stops a command as Ctrl-C does,
through its clean-up, so nothing it started is left running."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

from igcam_engine.errors import OptionError, Unavailable, install_hint

PR_SET_CHILD_SUBREAPER = 36
SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # 0: Ray runs as on a laptop, on 127.0.0.1


def add_cluster_arguments(parser, client: str) -> None:
    """--address and --runtime-env, for igcam serve and igcam batch (`client`: the Ray Client form it accepts)."""
    parser.add_argument("--address", help="join a Ray cluster: auto (this machine is a node), HOST:PORT (the GCS "
                        f"address){', ' + client if client else ''}; default: start a Ray of its own on this machine, "
                        "on loopback, whatever RAY_ADDRESS says")
    parser.add_argument("--runtime-env", metavar="JSON", help="Ray runtime environment for the actors or replicas, a "
                        "JSON object or @FILE (e.g. '{\"pip\": [\"onnxruntime\"]}'); see docs/deploying.md")


def check_address(address, workload: str) -> str | None:
    """The --address forms Ray accepts for a driver of `workload` ("batch" or "serve"), in one line otherwise."""
    if address is None:
        return None
    if not isinstance(address, str):
        raise OptionError(f"--address must be text (auto, HOST:PORT or ray://HOST:PORT), got {type(address).__name__}")
    forms = "auto (a cluster this machine belongs to), HOST:PORT (the cluster's GCS address, port 6379 by default)"
    if address.startswith("ray://"):
        if workload == "batch":
            raise OptionError("--address ray://... is Ray Client, which Ray Data does not run through: give the GCS "
                            "address HOST:PORT (from a machine that reaches the cluster), auto on a cluster node, or "
                            "run igcam batch as a Ray job (ray job submit --address http://HEAD:8265 -- igcam batch ...)")
        if not re.fullmatch(r"ray://[^/:\s]+:\d{1,5}", address):
            raise OptionError(f"--address {address!r}: a Ray Client address is ray://HOST:PORT (port 10001 by default)")
        return address
    if address == "auto" or re.fullmatch(r"[^/:\s]+:\d{1,5}", address):
        return address
    extra = ", or ray://HOST:PORT (Ray Client)" if workload == "serve" else ""
    raise OptionError(f"--address {address!r} is not a Ray address; accepted: {forms}{extra}")


def check_workers_cache(address, runtime_env=None) -> None:
    """Without an address, the workers of the Ray this command starts run on this machine, in this environment
    (and the runtime environment's variables): a bundle cache they could not use is refused here, in one line,
    not in a traceback from each worker. A cluster's nodes have caches of their own, which their workers check."""
    from igcam_engine import bundle_cache

    if address is not None:
        return
    variables = (runtime_env or {}).get("env_vars")
    bundle_cache.usable(variables.get("IGCAM_CACHE") if isinstance(variables, dict) else None)


def _this_machines_cluster() -> str:
    """--address auto: the cluster RAY_ADDRESS names, or the one `ray start` last started on this machine (the
    address file Ray keeps in its temporary folder), as Ray would find it: read here because whether that address
    is on loopback decides how Ray must be imported."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    record = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    try:
        return record.read_text().strip() or "auto"
    except OSError:
        raise Unavailable("--address auto: no Ray cluster runs on this machine (no RAY_ADDRESS, no `ray start` here); "
                        "start one with `ray start --head`, give HOST:PORT, or leave --address out to start Ray here"
                        ) from None


def _on_loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0]
    return host in ("localhost", "::1", "[::1]") or host.startswith("127.")


def parse_runtime_env(text):
    """--runtime-env: a JSON object (or @FILE holding one) passed to Ray as the job's runtime environment."""
    if text is None:
        return None
    source = text
    if text.startswith("@"):
        try:
            source = Path(text[1:]).read_text()
        except OSError as e:
            raise OptionError(f"--runtime-env {text}: cannot read the file: {e.strerror or e}") from None
    try:
        value = json.loads(source)
    except (json.JSONDecodeError, RecursionError) as e:
        raise OptionError(f"--runtime-env must be a JSON object (or @FILE), e.g. '{{\"pip\": [\"onnxruntime\"]}}': {e}"
                        ) from None
    if not isinstance(value, dict):
        raise OptionError(f"--runtime-env must be a JSON object, got {type(value).__name__}")
    return value


def start_ray(address, extra: str, workload: str, runtime_env=None) -> object:
    """ray, initialized: a new local instance on loopback (address None) or the cluster at `address`."""
    address = check_address(address, workload)
    if address == "auto":
        address = _this_machines_cluster()
    if not address or _on_loopback(address):
        # Ray's single-node mode: its node address is the loopback one, and its servers (GCS, raylet, workers,
        # agents) listen there only. Read when ray is imported, and inherited by every process Ray starts. A driver
        # joining a cluster on this machine's loopback needs it too, or Ray would swap 127.0.0.1 for the address
        # of the machine's network interface, where that cluster does not listen.
        os.environ[SINGLE_NODE] = "0"
    try:
        import ray
    except ImportError:
        raise Unavailable(f"this command needs Ray: {install_hint(extra)}") from None
    if address and not address.startswith("ray://"):
        check_token(address)
    # Ray's core worker would install a handler of its own for SIGTERM that aborts the process (leaving its agents
    # behind); the one below stops it cleanly from the start.
    os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"
    _become_subreaper()
    stop_on_sigterm()
    try:
        # "local": a new instance even where RAY_ADDRESS or a `ray start` on this machine names a cluster
        ray.init(address=address or "local", include_dashboard=False, logging_level="ERROR", configure_logging=False,
                 runtime_env=runtime_env)
    except (ConnectionError, ValueError, RuntimeError) as e:
        stop_ray(ray)
        raise Unavailable(f"cannot {'join the Ray cluster at ' + address if address else 'start Ray'}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    except BaseException:  # stopped while starting (Ray's own SIGTERM handler exits then): what started stops too
        stop_ray(ray)
        raise
    stop_on_sigterm()
    return ray


TOKEN_HELP = ("RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's token; `ray "
              "get-auth-token` on its head node prints it")


def _token() -> str | None:
    """The token Ray would send, found where Ray looks (RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names,
    ~/.ray/auth_token). Read here, not through Ray's token loader: the loader keeps what it read for this process's
    own connections to the cluster afterwards (its actors then failed to start on a cluster without tokens)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def check_token(address: str) -> None:
    """One line, at once, when the cluster at `address` refuses this machine's authentication: ray.init would retry
    for 20 s and end in a ConnectionError whose cause is only in a log. One gRPC call to the cluster's GCS (the one
    Ray's own client makes first), with the token Ray would send; a cluster that cannot be reached is left to
    ray.init to report."""
    try:
        import grpc
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # another Ray's internals: ray.init says what it says
        return
    token = _token()

    def refused(send: bool) -> bool:
        with grpc.insecure_channel(address) as channel:
            try:
                gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                    gcs_service_pb2.GetClusterIdRequest(), timeout=5,
                    metadata=(("authorization", f"Bearer {token}"),) if send and token else ())
            except grpc.RpcError as e:
                return e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    sending = os.environ.get("RAY_AUTH_MODE") == "token"
    if not refused(sending):
        return
    if sending and token:
        raise Unavailable(f"the Ray cluster at {address} refused this machine's authentication token: set "
                          + TOKEN_HELP)
    if token and not refused(True):
        raise Unavailable(f"the Ray cluster at {address} uses token authentication: set RAY_AUTH_MODE=token here "
                          "(this machine has the cluster's token)")
    raise Unavailable(f"the Ray cluster at {address} uses token authentication and this machine has no token: set "
                      "RAY_AUTH_MODE=token and " + TOKEN_HELP)


def ship_bundle(ray, bundle) -> list:
    """The bundle's files (checked against the manifest first) put in the object store: [ref, key] for actors and
    replicas on any node to materialize with `materialize_bundle` (a list, so that Ray passes the reference
    itself, not its value, through deployment arguments). The key is the manifest's sha256: the manifest holds
    every other file's sha256, so the key names the bundle's whole content."""
    from igcam_engine.bundle import MANIFEST, load_manifest

    manifest = load_manifest(bundle)
    files = {name: (manifest.root / name).read_bytes() for name in manifest.files}
    return [ray.put(files), hashlib.sha256(files[MANIFEST]).hexdigest()]


def materialize_bundle(shipped: list) -> Path:
    """The shipped bundle on this node: in the node's bundle cache (igcam_engine.bundle_cache), fetched from the
    object store and written there by the first replica or actor that needs it, reused by the others and by a
    later deployment of the same bundle; a worker that Ray kills leaves no copy behind."""
    import ray

    from igcam_engine import bundle_cache

    ref, key = shipped
    return bundle_cache.place(key, lambda: ray.get(ref))


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

