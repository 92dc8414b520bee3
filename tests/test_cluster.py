"""`igcam batch` and `igcam serve` on a two-node Ray cluster on 127.0.0.1 (examples/two_nodes.py): work on both
nodes, outputs through a filesystem URI, maps equal to local ones, a node killed mid-run and the job completing, a
rerun doing nothing, two replicas on two nodes, Serve's applications of others left alone, every socket on
loopback, and the address forms."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from support.comparisons import assert_maps_match
from support.folders import bundle_and_photos
from support.processes import Scope
from support.serving import free_port
from support.sockets import listening

from igcam_engine import Explainer
from igcam_engine.data import sample_images
from igcam_engine.images import load_image, to_model_input

HAS_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("pandas") is not None
pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not HAS_RAY and not os.environ.get("CI"), reason="ray[data,serve] is not installed")]
IMAGES = 32
HERE = Path(__file__).resolve().parent


class TwoNodes:
    """The helper cluster in a scope of its own (its processes carry the scope's marker)."""

    def __init__(self, log: Path, cpus_per_node: int = 1, env: dict | None = None):
        self.scope = Scope(log)
        self.scope.env.update(env or {})
        self.process = subprocess.Popen([sys.executable, str(HERE.parent / "examples" / "two_nodes.py"),
                                         "--cpus-per-node", str(cpus_per_node)], env=self.scope.env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line, "the two-node cluster did not start"
        self.address = json.loads(line)["address"]

    def kill_worker(self):
        self.process.stdin.write("kill-worker\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "killed"

    def stop(self):
        try:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.scope.stop()
        assert not self.scope.members(), "the cluster left processes behind"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    assert HAS_RAY, "ray[data,serve] must be installed in CI (scripts/setup.sh installs the scale and serve extras)"
    root = tmp_path_factory.mktemp("cluster")
    return (root, *bundle_and_photos(root, IMAGES))


@pytest.fixture(scope="module")
def cluster(work):
    nodes = TwoNodes(work[0] / "cluster.log")
    try:
        yield nodes
    finally:
        nodes.stop()


def run(root, *args, timeout=600, env=None):
    scope = Scope(root / "command.log")
    for name, value in (env or {}).items():  # None: not set
        if value is None:
            scope.env.pop(name, None)
        else:
            scope.env[name] = value
    result = scope.run(list(args), cwd=root, timeout=timeout)
    assert not scope.members(), "the command left processes behind"
    return result


def expected_map(bundle, photo, steps):
    explainer = Explainer(bundle, "cpu")
    image = to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)[0]
    target = int(np.argmax(explainer.predict(image[None])))
    return target, explainer.explain(image, target, steps=steps)


def replica_nodes(address, application, env) -> list[str]:
    """The nodes of the application's live engine replicas, from the cluster's actor table (a driver of its own: Serve's
    proxy prefers replicas on its own node, so answers alone would not show where the replicas are)."""
    script = f"""
import json, os
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import ray
from ray._private import state
ray.init(address={address!r}, logging_level="ERROR", include_dashboard=False)
print(json.dumps([a["Address"]["NodeID"] for a in state.actors().values()
                  if a["State"] == "ALIVE" and a["ActorClassName"] == "ServeReplica:{application}:Engine"]))
"""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_batch_on_two_nodes_through_a_uri_then_a_rerun_that_does_nothing(work, cluster, tmp_path):
    root, bundle, images = work
    out = f"file://{tmp_path}/out"
    first = run(root, "batch", bundle, images, "-o", out, "--address", cluster.address, "--steps", "4",
                "--batch-size", "2")
    assert first.returncode == 0, first.stderr
    assert f"{IMAGES} explained, 0 already done, 0 failed" in first.stdout
    assert "actors on a cluster of 2 node(s)" in first.stdout
    (nodes_line,) = [line for line in first.stdout.splitlines() if line.startswith("explained on ")]
    counts = [int(part.rsplit(": ", 1)[1]) for part in nodes_line[len("explained on "):].split(", ")]
    assert len(counts) == 2 and sum(counts) == IMAGES and min(counts) > 0, nodes_line
    records = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("photo*.json")]
    assert len(records) == IMAGES and len({r["node"] for r in records}) == 2
    for photo in sorted(images.iterdir())[:3]:
        target, expected = expected_map(bundle, photo, 4)
        assert_maps_match(np.load(tmp_path / "out" / f"{photo.stem}.class{target}.npy")[None], expected, 1e-5, 1e-5)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    again = run(root, "batch", bundle, images, "-o", out, "--address", cluster.address, "--steps", "4")
    assert again.returncode == 0 and f"0 explained, {IMAGES} already done" in again.stdout, again.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == stamps


def test_the_bundle_need_exist_only_where_igcam_runs(work, cluster, tmp_path):
    """A relative bundle path, resolved where the command runs: the replicas and actors get the files from Ray."""
    root, bundle, images = work
    small = tmp_path / "images"
    small.mkdir()
    for photo in sorted(images.iterdir())[:4]:
        shutil.copyfile(photo, small / photo.name)
    result = run(root, "batch", os.path.relpath(bundle, root), small, "-o", tmp_path / "out", "--address",
                 cluster.address, "--steps", "2")
    assert result.returncode == 0 and "4 explained" in result.stdout, result.stderr


def test_serve_two_replicas_on_two_nodes_and_leave_others_alone(work, cluster, tmp_path):
    root, bundle, _ = work
    port = free_port()
    scope = Scope(tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}/cam"
    try:
        process = scope.start(["serve", os.path.relpath(bundle, root), "--address", cluster.address, "--replicas",
                               "2", "--port", port, "--name", "cam", "--route-prefix", "/cam", "--providers", "cpu"],
                              cwd=root)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(1)
        else:
            raise AssertionError(f"igcam serve did not become ready:\n{scope.output()[-4000:]}")
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
            assert json.load(response) == {"status": "ok"}
        request = urllib.request.Request(f"{base}/explain?output=npy", data=sample_images()[0].read_bytes(),
                                         headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=60) as response:
            targets = json.loads(response.headers["X-Igcam-Targets"])
            served = np.load(__import__("io").BytesIO(response.read()))
        target, expected = expected_map(bundle, sample_images()[0], 50)
        assert targets == [{"kind": "classifier", "category": target}]
        assert_maps_match(served, expected, 1e-5, 1e-5)
        with urllib.request.urlopen(f"{base}/stats", timeout=10) as response:
            assert "node" in json.load(response)
        placed = replica_nodes(cluster.address, "cam", scope.env)
        assert len(placed) == 2 and len(set(placed)) == 2, f"replicas on {placed}"
        sockets = listening(scope.members() + cluster.scope.members())
        assert sockets and all(address in ("127.0.0.1", "::1") for _, address, _ in sockets), sockets
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        scope.stop()
    # its own applications are gone, the cluster (and Serve on it) still up: --stop finds nothing to remove
    stopped = run(root, "serve", "--stop", "--address", cluster.address, "--name", "cam")
    assert stopped.returncode == 0 and "no application 'cam' is running" in stopped.stdout, stopped.stderr


def test_serve_killed_is_removed_by_stop(work, cluster, tmp_path):
    root, bundle, _ = work
    port = free_port()
    scope = Scope(tmp_path / "serve.log")
    try:
        process = scope.start(["serve", bundle, "--address", cluster.address, "--port", port, "--name", "crashed",
                               "--providers", "cpu"], cwd=root)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "Ctrl-C stops" not in scope.output():
            time.sleep(1)
        assert "Ctrl-C stops" in scope.output(), scope.output()[-4000:]
        # where Serve already runs on the cluster (a test before left it, as igcam serve leaves other users' Serve),
        # its proxy keeps its port: the command says so and prints where the application is
        (url,) = re.findall(r"igcam serve: (http://\S+)/explain", scope.output())
        assert url.endswith(f":{port}") or "do not apply to it" in scope.output(), scope.output()[-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
            assert response.status == 200, "the application outlives its driver"
    finally:
        scope.stop()
    stopped = run(root, "serve", "--stop", "--address", cluster.address, "--name", "crashed")
    assert stopped.returncode == 0 and "removed crashed, crashed-health" in stopped.stdout, stopped.stderr


@pytest.mark.parametrize("address, message", [
    ("ray://127.0.0.1:10001", "Ray Client, which Ray Data does not run through"),
    ("head-node", "is not a Ray address"),
    ("auto", "--address auto: no Ray cluster runs on this machine"),
])
def test_batch_address_forms(work, tmp_path, address, message):
    root, bundle, images = work
    result = run(root, "batch", bundle, images, "-o", tmp_path / "out", "--address", address, timeout=180)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_without_address_a_local_ray_even_where_ray_address_names_a_cluster(work, cluster, tmp_path):
    root, bundle, images = work
    small = tmp_path / "images"
    small.mkdir()
    shutil.copyfile(sorted(images.iterdir())[0], small / "one.png")
    result = run(root, "batch", bundle, small, "-o", tmp_path / "out", "--steps", "2",
                 env={"RAY_ADDRESS": cluster.address})
    assert result.returncode == 0 and "cluster of 1 node(s)" in result.stdout, result.stderr


def test_a_node_killed_mid_run_and_the_job_completes(work, tmp_path):
    """Ray Data restarts the lost actor's work elsewhere; every record is whole and the maps are right."""
    root, bundle, images = work
    nodes = TwoNodes(tmp_path / "cluster.log")
    scope = Scope(tmp_path / "batch.log")
    out = tmp_path / "out"
    try:
        process = scope.start(["batch", bundle, images, "-o", f"file://{out}", "--address", nodes.address, "--steps",
                               "128", "--batch-size", "1"], cwd=root)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(out.glob("photo*.json"))) < 3 and process.poll() is None:
            time.sleep(0.2)
        assert process.poll() is None and len(list(out.glob("photo*.json"))) < IMAGES, scope.output()[-3000:]
        nodes.kill_worker()
        assert process.wait(timeout=600) == 0, scope.output()[-4000:]
        assert f"{IMAGES} explained" in scope.output()
    finally:
        scope.stop()
        nodes.stop()
    records = [json.loads(p.read_text()) for p in out.glob("photo*.json")]
    assert len(records) == IMAGES
    photo = sorted(images.iterdir())[-1]
    target, expected = expected_map(bundle, photo, 128)
    assert_maps_match(np.load(out / f"{photo.stem}.class{target}.npy")[None], expected, 1e-5, 1e-5)


def test_locations_and_options_are_checked(tmp_path, monkeypatch):
    from igcam_engine import UserError
    from igcam_engine.apps.cluster import check_address, check_workers_cache, parse_runtime_env
    from igcam_engine.apps.storage import Location

    local, uri = Location.parse(tmp_path / "a"), Location.parse(f"file://{tmp_path}/a")
    assert local.same_as(uri) and local.local and not uri.local
    uri.create()
    uri.write("x.json", b"{}")
    assert local.files() == {"x.json": 2} and local.read("x.json") == b"{}"
    assert uri.join("x.json") == f"{tmp_path}/a/x.json" and uri.filesystem is not None
    assert local.join("x.json") == f"{tmp_path}/a/x.json" and local.filesystem is None
    for text, message in (("ftp://host/x", "unsupported storage scheme 'ftp://'"),):
        with pytest.raises(UserError, match=message):
            Location.parse(text)
    assert check_address("auto", "batch") == "auto" and check_address("10.0.0.1:6379", "batch") == "10.0.0.1:6379"
    assert check_address("ray://head:10001", "serve") == "ray://head:10001"
    with pytest.raises(UserError, match="ray://HOST:PORT"):
        check_address("ray://head", "serve")
    assert parse_runtime_env('{"env_vars": {"A": "1"}}') == {"env_vars": {"A": "1"}}
    (tmp_path / "env.json").write_text('{"pip": ["onnxruntime"]}')
    assert parse_runtime_env(f"@{tmp_path}/env.json") == {"pip": ["onnxruntime"]}
    for text, message in (("[1]", "must be a JSON object"), ("{", "must be a JSON object"),
                          ("@/nonexistent.json", "cannot read the file")):
        with pytest.raises(UserError, match=message):
            parse_runtime_env(text)

    # a local Ray's workers use this machine's bundle cache, as the runtime environment's variables say
    (tmp_path / "file").write_text("not a folder")
    broken, fine = str(tmp_path / "file" / "cache"), str(tmp_path / "cache")
    monkeypatch.setenv("IGCAM_CACHE", broken)
    with pytest.raises(UserError, match="cannot use the bundle cache"):
        check_workers_cache(None)
    check_workers_cache(None, {"env_vars": {"IGCAM_CACHE": fine}})
    check_workers_cache("10.0.0.1:6379")  # a cluster's nodes check their own
    monkeypatch.setenv("IGCAM_CACHE", fine)
    with pytest.raises(UserError, match="cannot use the bundle cache"):
        check_workers_cache(None, {"env_vars": {"IGCAM_CACHE": broken}})


@pytest.fixture(scope="module")
def s3(work):
    """A moto S3 server on 127.0.0.1 (PyPI's moto[server]), standing in for object storage."""
    pytest.importorskip("moto", reason="moto[server] is not installed (the dev extra installs it)")
    port = free_port()
    log = open(work[0] / "moto.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.3)
        yield port, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_batch_from_and_to_object_storage(work, cluster, s3, tmp_path):
    """Images in an S3 bucket, outputs to another prefix: read by the nodes, written through pyarrow's S3, the
    credentials never printed, a rerun that does nothing."""
    import pyarrow.fs

    root, bundle, images = work
    port, moto_pid = s3
    options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1&allow_bucket_creation=true"
    fs, _ = pyarrow.fs.FileSystem.from_uri(f"s3://KEY:SECRET@photos/?{options}")
    fs.create_dir("photos")
    for photo in sorted(images.iterdir())[:8]:
        with fs.open_output_stream(f"photos/in/{photo.name}") as f:
            f.write(photo.read_bytes())
    source, out = f"s3://KEY:SECRET@photos/in?{options}", f"s3://KEY:SECRET@photos/out?{options}"
    first = run(root, "batch", bundle, source, "-o", out, "--address", cluster.address, "--steps", "4")
    assert first.returncode == 0 and "8 explained" in first.stdout, first.stderr
    assert "SECRET" not in first.stdout + first.stderr and "outputs in s3://photos/out/" in first.stdout
    names = {info.path.rsplit("/", 1)[1] for info in fs.get_file_info(pyarrow.fs.FileSelector("photos/out"))}
    assert len([n for n in names if n.endswith(".json")]) == 8
    photo = sorted(images.iterdir())[0]
    target, expected = expected_map(bundle, photo, 4)
    with fs.open_input_stream(f"photos/out/{photo.stem}.class{target}.npy") as f:
        assert_maps_match(np.load(__import__("io").BytesIO(f.read()))[None], expected, 1e-5, 1e-5)
    record = json.loads(fs.open_input_stream(f"photos/out/{photo.stem}.json").read())
    assert record["maps"][0]["overlay"].startswith("s3://photos/out/") and "SECRET" not in json.dumps(record)
    again = run(root, "batch", bundle, source, "-o", out, "--address", cluster.address, "--steps", "4")
    assert again.returncode == 0 and "0 explained, 8 already done" in again.stdout, again.stderr
    assert all(address == "127.0.0.1" for _, address, _ in listening([moto_pid]))


def test_token_auth_a_small_job_spread_and_one_line_for_a_wrong_token(work, tmp_path):
    """A cluster with token authentication and two CPUs per node: 12 images with --actors 2 land on both nodes
    (the actors spread before doubling up; the calls are small enough for both); a wrong token, no token, or the
    token without RAY_AUTH_MODE are each one line within seconds, not ActorDiedError or a 20 s ConnectionError."""
    root, bundle, images = work
    home = tmp_path / "home"  # no ~/.ray/auth_token of this machine's own
    home.mkdir()
    token = "0123456789abcdef" * 4
    nodes = TwoNodes(tmp_path / "cluster.log", cpus_per_node=2,
                     env={"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    try:
        twelve = tmp_path / "twelve"
        twelve.mkdir()
        for photo in sorted(images.iterdir())[:12]:
            shutil.copy(photo, twelve / photo.name)
        client = {"HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
        done = run(root, "batch", bundle, twelve, "-o", tmp_path / "out", "--address", nodes.address, "--steps", "2",
                   "--actors", "2", env=client)
        assert done.returncode == 0, done.stderr
        assert "12 explained" in done.stdout and "2 actors on a cluster of 2 node(s) (4 CPUs), 6 images per " \
            "engine call" in done.stdout, done.stdout
        records = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("photo*.json")]
        assert len(records) == 12 and len({r["node"] for r in records}) == 2, "the small job stayed on one node"

        for env, message in (({**client, "RAY_AUTH_TOKEN": "f" * 64}, "refused this machine's authentication "
                               "token: set RAY_AUTH_TOKEN"),
                             ({"HOME": str(home), "RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None},
                              "uses token authentication and this machine has no token: set RAY_AUTH_MODE=token"),
                             ({**client, "RAY_AUTH_MODE": None}, "uses token authentication: set RAY_AUTH_MODE=token "
                              "here")):
            started = time.monotonic()
            refused = run(root, "batch", bundle, twelve, "-o", tmp_path / "refused", "--address", nodes.address,
                          env=env)
            (line,) = refused.stderr.strip().splitlines()
            assert refused.returncode == 2 and line.startswith(f"igcam: error: the Ray cluster at {nodes.address} ")
            assert message in line, line
            assert time.monotonic() - started < 15
    finally:
        nodes.stop()
