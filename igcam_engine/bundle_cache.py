"""The bundle cache: one folder of bundles, each under a key that hashes what it holds, kept to at most
CACHE_BUNDLES bundles and CACHE_BYTES bytes ($IGCAM_CACHE_BUNDLES, $IGCAM_CACHE_BYTES), the least recently used
evicted first. The notebook path exports a PyTorch model's bundle into it once per model state; a Ray node keeps a
bundle shipped through the object store in it once, for every replica and actor there and for the next deployment
of the same bundle. A folder per worker would be left behind by every worker Ray kills (its clean-up never runs);
a keyed folder is reused instead.

Bundles are put in place whole (written into a hidden `.partial` folder beside, then renamed), so a process reading
the cache never sees half a bundle, and two processes placing the same key at once leave one."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from igcam_engine.bundle import MANIFEST
from igcam_engine.errors import OptionError

CACHE_BUNDLES = 16
CACHE_BYTES = 4 << 30
KEY_CHARS = 24  # of a hex sha256: enough to tell bundles apart, short enough for a path
STALE_PARTIAL_S = 3600  # a .partial folder this old was left by a process killed while writing it


def default_cache() -> Path:
    """$IGCAM_CACHE, else $XDG_CACHE_HOME/igcam-engine/bundles, else ~/.cache/igcam-engine/bundles."""
    if os.environ.get("IGCAM_CACHE"):
        return Path(os.environ["IGCAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "igcam-engine" / "bundles"


def entry(key: str, cache=None) -> Path:
    """Where the bundle under `key` (a hex digest) lives in `cache` (default_cache() when None)."""
    return usable(cache) / key[:KEY_CHARS]


def usable(cache=None) -> Path:
    """The cache folder (default_cache() when None), created; refused in one line when it cannot be written."""
    folder = Path(cache or default_cache())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK | os.X_OK)
    except OSError as e:
        raise OptionError(f"cannot use the bundle cache '{folder}': {e.strerror or e} (set IGCAM_CACHE or cache_dir "
                          "to a writable folder)") from None
    if not writable:
        raise OptionError(f"the bundle cache '{folder}' is not writable (set IGCAM_CACHE or cache_dir to a writable "
                          "folder)")
    return folder


def present(path: Path) -> bool:
    """Whether a bundle is in place at `path`; if so it counts as just used (evicted last)."""
    if not (path / MANIFEST).is_file():
        return False
    os.utime(path)
    return True


def place(key: str, fetch, cache=None) -> Path:
    """The bundle under `key` in `cache`; when it is missing, `fetch()` gives its files (name -> bytes), which are
    written and put in place whole, and the cache is bounded."""
    path = entry(key, cache)
    if present(path):
        return path
    files = fetch()
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        for name, data in files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise OptionError(f"a bundle's files are plain names; got {name!r}")
            (staging / name).write_bytes(data)
        try:
            staging.rename(path)
        except OSError:
            if not (path / MANIFEST).is_file():
                raise
            # another process put the same bundle in place first: theirs is used, this copy dropped
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    evict(path.parent, keep=path)
    return path


def evict(cache: Path, keep: Path) -> None:
    """Removes the least recently used bundles while the cache holds more than its bounds allow, and `.partial`
    folders left by killed writers. Bundles being written (hidden folders) are never counted or removed."""
    bundles, limit = int(os.environ.get("IGCAM_CACHE_BUNDLES", CACHE_BUNDLES)), int(
        os.environ.get("IGCAM_CACHE_BYTES", CACHE_BYTES))
    entries = []
    for item in cache.iterdir():
        if item.is_symlink() or not item.is_dir():
            continue
        if item.name.startswith("."):
            if item.name.endswith(".partial") and time.time() - item.stat().st_mtime > STALE_PARTIAL_S:
                shutil.rmtree(item, ignore_errors=True)
            continue
        if (item / MANIFEST).is_file():
            size = sum(f.stat().st_size for f in item.iterdir() if f.is_file() and not f.is_symlink())
            entries.append((item.stat().st_mtime, item, size))
    entries.sort(key=lambda e: e[0])
    total = sum(size for _, _, size in entries)
    while entries and (len(entries) > bundles or total > limit):
        _, item, size = entries.pop(0)
        if item == keep:
            continue
        shutil.rmtree(item, ignore_errors=True)
        total -= size
