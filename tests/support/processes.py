"""Commands the tests start that start Ray (`igcam serve`, `igcam batch`): each runs with a private Ray temporary
directory and a marker in its environment, its output goes to a file (a pipe nobody drains would block it), and
`stop` leaves no process behind, whatever state the command is in."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

MARKER = "IGCAM_TEST_SCOPE"


class Scope:
    """One command and every process it starts (they inherit the marker), Ray's daemons included."""

    def __init__(self, log: Path, cache: Path | None = None):
        """cache: the bundle cache its Ray workers use (default: one of its own, removed with its Ray directory)."""
        self.id = uuid.uuid4().hex
        # Ray's socket paths must stay short (AF_UNIX allows 107 bytes): a short directory in /tmp, not tmp_path.
        self.ray_dir = Path(tempfile.mkdtemp(prefix="igcam-ray-", dir="/tmp"))
        self.log = Path(log)
        cache = cache if cache is not None else self.ray_dir / "bundles"
        self.env = {**os.environ, MARKER: self.id, "RAY_TMPDIR": str(self.ray_dir), "IGCAM_CACHE": str(cache)}
        self.process = None

    def run(self, args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
        """Runs `igcam args...` to completion (bounded), then stops whatever it left."""
        try:
            result = subprocess.run([sys.executable, "-m", "igcam_engine.apps.cli", *map(str, args)], cwd=cwd,
                                    env=self.env, capture_output=True, text=True, timeout=timeout)
        finally:
            self.stop()
        return result

    def start(self, args, cwd=None) -> subprocess.Popen:
        """Starts `igcam args...` in the background, its output in the log file."""
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "igcam_engine.apps.cli", *map(str, args)],
                                            cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self.process

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def members(self) -> list[int]:
        """Live processes carrying this scope's marker (the command, Ray's daemons and workers)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # gone meanwhile, or not ours to read
                continue
            if f"{MARKER}={self.id}".encode() in environ.split(b"\0") and state != "Z":
                pids.append(int(entry.name))
        return pids

    def commands(self) -> list[str]:
        """The command lines of the scope's live processes."""
        found = []
        for pid in self.members():
            try:
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        return found

    def stop(self, grace: float = 30) -> list[int]:
        """SIGINT to the command (its own clean shutdown), then SIGTERM and SIGKILL to every process still in the
        scope; returns the processes that had to be killed after the grace period."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        killed = []
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            members = self.members()
            if not members:
                break
            killed = members
            for pid in members:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.members() and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.ray_dir, ignore_errors=True)
        return killed
