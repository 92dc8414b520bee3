"""The bundle cache (igcam_engine.bundle_cache): a bundle placed once under its key and reused, put in place whole
even when two writers race, its files plain names, the cache bounded (the least recently used evicted, folders of
killed writers removed), and an unusable cache refused in one line."""
import os
import threading
import time

import pytest

from igcam_engine import bundle_cache
from igcam_engine.errors import UserError

KEY = "ab" * 32


def files(tag: str) -> dict:
    return {"manifest.json": f'{{"tag": "{tag}"}}'.encode(), "weights.bin": tag.encode() * 1000}


def test_a_bundle_is_placed_once_under_its_key_and_then_reused(tmp_path):
    path = bundle_cache.place(KEY, lambda: files("one"), tmp_path)
    assert path == tmp_path / KEY[:24]
    assert {f.name: f.read_bytes() for f in path.iterdir()} == files("one")

    def fetch():
        raise AssertionError("a placed bundle is not fetched again")

    os.utime(path, (1, 1))
    assert bundle_cache.place(KEY, fetch, tmp_path) == path
    assert path.stat().st_mtime > 1, "a reused bundle counts as just used"
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY[:24]]


def test_two_writers_of_the_same_key_leave_one_whole_bundle(tmp_path):
    both_fetched = threading.Barrier(2)
    placed = []

    def writer(tag):
        def fetch():
            both_fetched.wait(timeout=10)  # both found the key missing before either put its copy in place
            return files(tag)
        placed.append(bundle_cache.place(KEY, fetch, tmp_path))

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in ("one", "two")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert placed == [tmp_path / KEY[:24]] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY[:24]], "no staging folder left"
    kept = {f.name: f.read_bytes() for f in placed[0].iterdir()}
    assert kept in (files("one"), files("two")), "one writer's files, whole"


def test_a_file_name_that_leaves_the_bundle_is_refused(tmp_path):
    with pytest.raises(UserError, match="plain names; got '../evil'"):
        bundle_cache.place(KEY, lambda: {"manifest.json": b"{}", "../evil": b"x"}, tmp_path / "cache")
    assert not (tmp_path / "evil").exists()
    assert list((tmp_path / "cache").iterdir()) == [], "nothing half-written"


def test_the_cache_is_bounded_and_cleans_what_killed_writers_left(tmp_path, monkeypatch):
    monkeypatch.setenv("IGCAM_CACHE_BUNDLES", "2")
    first = bundle_cache.place("01" * 32, lambda: files("a"), tmp_path)
    second = bundle_cache.place("02" * 32, lambda: files("b"), tmp_path)
    os.utime(first, (time.time() - 100, time.time() - 100))
    os.utime(second, (time.time() - 50, time.time() - 50))
    bundle_cache.place("01" * 32, lambda: files("a"), tmp_path)  # used again: now the most recent
    stale, fresh = tmp_path / ".x.1.partial", tmp_path / ".x.2.partial"
    for folder in (stale, fresh):
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
    os.utime(stale, (time.time() - 2 * bundle_cache.STALE_PARTIAL_S,) * 2)
    third = bundle_cache.place("03" * 32, lambda: files("c"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, third.name, fresh.name]), \
        "the least recently used bundle and the stale partial folder removed; one being written kept"

    monkeypatch.setenv("IGCAM_CACHE_BUNDLES", "16")
    monkeypatch.setenv("IGCAM_CACHE_BYTES", "10")  # less than any bundle
    fourth = bundle_cache.place("04" * 32, lambda: files("d"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [fourth.name], \
        "bytes bound the cache too; the bundle just placed is kept, even over the bound"


def test_a_cache_that_cannot_be_made_is_refused_in_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("IGCAM_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(UserError, match=r"cannot use the bundle cache '.*file/cache': .*\(set IGCAM_CACHE"):
        bundle_cache.place(KEY, lambda: files("one"))
