"""Suite-wide guards: the tests write nothing into the source tree and leave no process behind (see
processes.py); a run that does either fails, naming what it found."""
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders that tools, not tests, write into (virtualenvs, npm's packages, Python's and pytest's caches).
NOT_SOURCE = {".git", ".venv", ".venv-notorch", "node_modules", "__pycache__", ".pytest_cache", ".ruff_cache"}
MARKER = "IGCAM_TEST_SCOPE"
TREE = pytest.StashKey[dict]()
# The corpus of real architectures needs torchvision and timm: it runs in its own virtualenv (scripts/test.sh).
collect_ignore = ["corpus"] if importlib.util.find_spec("torchvision") is None else []


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _tree() -> dict:
    files = {}
    for folder, names, filenames in os.walk(ROOT):
        names[:] = [n for n in names if n not in NOT_SOURCE]
        for name in filenames:
            path = Path(folder) / name
            try:
                stat = path.stat()
            except OSError:
                continue
            files[str(path.relative_to(ROOT))] = (stat.st_mtime_ns, stat.st_size)
    return files


def _marked_processes() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if any(item.startswith(f"{MARKER}=".encode()) for item in environ.split(b"\0")) and state != "Z":
            found.append(f"{entry.name} {command}")
    return found


def pytest_sessionstart(session):
    session.config.stash[TREE] = _tree()


def pytest_sessionfinish(session, exitstatus):
    before, after = session.config.stash.get(TREE, None), _tree()
    if before is None:
        return
    written = sorted(path for path, stamp in after.items() if before.get(path) != stamp)
    leftovers = _marked_processes() if Path("/proc").is_dir() else []
    problems = [f"a test wrote into the source tree: {path}" for path in written]
    problems += [f"a test left a process running: {process}" for process in leftovers]
    if problems:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for problem in problems:
            (reporter.write_line if reporter else print)(f"ERROR: {problem}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
