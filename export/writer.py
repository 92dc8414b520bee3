"""Writes the bundle directory: graphs with their initializers in one shared weights file, and the manifest."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from igcam_engine.bundle import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, sha256
from igcam_engine.errors import OptionError

INLINE_BYTES = 1024  # smaller tensors stay inside the graphs
ALIGN = 4096  # page-aligned offsets let ONNX Runtime map the weights instead of copying them


@contextlib.contextmanager
def staged(out):
    """A new directory beside `out` to write a bundle into; when the block succeeds it takes `out`'s place (an
    existing bundle there is replaced only then), when it fails it is removed and `out` is left as it was."""
    out = Path(out)
    if out.is_symlink():
        raise OptionError(f"output '{out}' is a link; write the bundle to a plain path (the folder it names, or a new "
                          "one)")
    if out.exists() and not out.is_dir():
        raise OptionError(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise OptionError(f"output directory '{out}' is not empty and is not a bundle; choose a new or empty directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as e:
        raise OptionError(f"cannot write the bundle next to '{out}': {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a bundle gets the usual permissions
    try:
        yield staging
        try:
            if out.exists():
                previous = staging.with_suffix(".previous")
                out.rename(previous)
                staging.rename(out)
                shutil.rmtree(previous)
            else:
                staging.rename(out)
        except OSError as e:
            raise OptionError(f"cannot put the bundle in place at '{out}': {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_bundle(out: Path, graphs: dict, manifest: dict) -> Path:
    """Writes the graphs, their shared weights file and the manifest into the (new, empty) directory `out`."""
    out = Path(out)
    _externalize(graphs, out / WEIGHTS)
    entries = {}
    for name, model in graphs.items():
        path = out / f"{name}.onnx"
        onnx.save(model, path)
        onnx.checker.check_model(str(path), full_check=True)
        entries[name] = {"file": path.name, "sha256": sha256(path)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **manifest,
        "graphs": entries,
        "weights": {"file": WEIGHTS, "sha256": sha256(out / WEIGHTS)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def _externalize(graphs: dict, path: Path) -> None:
    """Moves large initializers of all graphs into one file, each distinct tensor stored once: the graphs share
    the backbone's weights instead of carrying a copy each."""
    placed = {}
    with open(path, "wb") as f:
        for model in graphs.values():
            for tensor in model.graph.initializer:
                data = numpy_helper.to_array(tensor)
                raw = np.ascontiguousarray(data).astype(data.dtype.newbyteorder("<")).tobytes()
                if len(raw) < INLINE_BYTES:
                    continue
                key = hashlib.sha256(raw + str(data.dtype).encode() + str(data.shape).encode()).digest()
                if key not in placed:
                    offset = -(-f.tell() // ALIGN) * ALIGN
                    f.seek(offset)
                    f.write(raw)
                    placed[key] = offset
                external = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
                external.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", path.name), ("offset", str(placed[key])), ("length", str(len(raw)))):
                    entry = external.external_data.add()
                    entry.key, entry.value = k, v
                tensor.CopyFrom(external)
