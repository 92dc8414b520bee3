"""The bundle on disk: a directory with manifest.json, the ONNX graphs and one shared weights file.

Graphs (all with a dynamic batch; H, W fixed at export):
- forward.onnx   (images [N,C,H,W], baseline [Nb,C,H,W], alphas [M]) -> activations [N*M,K,h,w]
                 rows are image-major: row n*M + i holds baseline + alphas[i] * (images[n] - baseline).
- gradient.onnx  (activations [R,K,h,w], targets [R] int64) -> activation_grad [R,K,h,w], logits [R,classes]
- igcam.onnx     (images, baseline, alphas, targets [N]) -> activations, activation_grad, logits (both above in one)
- explain.onnx   (images, baseline, alphas, weights [M], targets [N], subtract_baseline [1]) -> maps [N,H,W]

A bundle may come from anywhere: the manifest is checked field by field before anything it names is opened, every
file it names must be a plain name inside the bundle (no separator, no "..", no link leading out), and sizes are
bounded before anything is allocated from them (see LIMITS).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

from igcam_engine.errors import UserError
from igcam_engine.preprocess import resolve_preprocess

FORMAT = "igcam-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
GRAPHS = ("forward", "gradient", "igcam", "explain")
# Bounds on what a manifest may ask for (a model outside them is not a CNN classifier this engine serves).
LIMITS = {
    "manifest_bytes": 16 << 20,
    "channels": 64,  # image channels
    "side": 16384,  # image height and width
    "input_elements": 64 << 20,  # C * H * W
    "activation_elements": 64 << 20,  # K * h * w
    "classes": 1 << 20,
}
SCORE_OPS = (None, "Softmax", "LogSoftmax")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(bundle, verify: bool = True) -> dict:
    """Reads and checks a bundle's manifest; with `verify`, every file's sha256 must match."""
    root = Path(bundle)
    path = root / MANIFEST
    if not path.is_file():
        raise UserError(f"'{bundle}' is not a bundle: no {MANIFEST} (create one with `igcam export`)")
    if path.stat().st_size > LIMITS["manifest_bytes"]:
        raise UserError(f"{path} is {path.stat().st_size} bytes; a manifest is at most {LIMITS['manifest_bytes']}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: bundle format {manifest.get('format')!r} v{manifest.get('format_version')} is not supported; "
            f"this igcam-engine reads {FORMAT} v{FORMAT_VERSION} (re-export the model)"
        )
    checked = _checked(manifest, f"bundle '{bundle}'")
    for entry in [checked["graphs"][g] for g in GRAPHS] + [checked["weights"]]:
        file = _inside(root, entry["file"], bundle)
        if verify and sha256(file) != entry["sha256"]:
            raise UserError(f"bundle '{bundle}' is corrupted: {entry['file']} does not match its sha256 in the manifest")
    _no_link_out(root, bundle)
    checked["root"] = str(root)
    return checked


def graph_path(manifest: dict, graph: str) -> str:
    return str(Path(manifest["root"]) / manifest["graphs"][graph]["file"])


def _checked(manifest: dict, where: str) -> dict:
    """The manifest's fields, each checked for type, range and consistency; one error naming the field."""
    def fail(field, expected, value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise UserError(f"{where}: manifest field '{field}' must be {expected}, got {shown}")

    def get(container, key, field):
        if not isinstance(container, dict) or key not in container:
            raise UserError(f"{where}: manifest field '{field}' is missing")
        return container[key]

    def integer(value, field, low, high):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            fail(field, f"an integer in [{low}, {high}]", value)
        return value

    def text(value, field):
        if not isinstance(value, str) or not value:
            fail(field, "a non-empty string", value)
        return value

    def dims(value, field, what):
        if not isinstance(value, list) or len(value) != 3:
            fail(field, f"a list [{what}]", value)
        first = integer(value[0], f"{field}[0]", 1, LIMITS["channels"] if what == "C, H, W" else 1 << 20)
        rest = [integer(v, f"{field}[{i + 1}]", 1, LIMITS["side"]) for i, v in enumerate(value[1:])]
        return [first, *rest]

    image = get(manifest, "input", "input")
    shape = dims(get(image, "shape", "input.shape"), "input.shape", "C, H, W")
    if math.prod(shape) > LIMITS["input_elements"]:
        fail("input.shape", f"at most {LIMITS['input_elements']} elements", shape)
    if get(image, "layout", "input.layout") != "NCHW":
        fail("input.layout", "'NCHW'", image["layout"])
    if get(image, "dtype", "input.dtype") != "float32":
        fail("input.dtype", "'float32'", image["dtype"])
    text(get(image, "name", "input.name"), "input.name")
    layer = get(manifest, "target_layer", "target_layer")
    activation = dims(get(layer, "shape", "target_layer.shape"), "target_layer.shape", "K, h, w")
    if math.prod(activation) > LIMITS["activation_elements"]:
        fail("target_layer.shape", f"at most {LIMITS['activation_elements']} elements", activation)
    classes = integer(get(manifest, "num_classes", "num_classes"), "num_classes", 1, LIMITS["classes"])
    labels = get(manifest, "labels", "labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != classes
                               or not all(isinstance(label, str) for label in labels)):
        fail("labels", f"null or a list of {classes} strings (one per class)", labels)
    logits = manifest.get("logits", {"tensor": "", "before": None})  # bundles written before it was recorded
    if not isinstance(logits, dict) or logits.get("before") not in SCORE_OPS:
        fail("logits", "{tensor, before: null, 'Softmax' or 'LogSoftmax'}", logits)
    preprocess = get(manifest, "preprocess", "preprocess")
    try:
        preprocess = None if preprocess is None else resolve_preprocess(preprocess, channels=shape[0], strict=True)
    except UserError as e:
        raise UserError(f"{where}: manifest field 'preprocess': {e}") from None
    graphs = get(manifest, "graphs", "graphs")
    files = {name: _file_entry(get(graphs, name, f"graphs.{name}"), f"graphs.{name}", fail) for name in GRAPHS}
    weights = _file_entry(get(manifest, "weights", "weights"), "weights", fail)
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "input": {"name": image["name"], "shape": shape, "layout": "NCHW", "dtype": "float32"},
        "preprocess": preprocess,
        "target_layer": {"name": str(layer.get("name", "")), "tensor": str(layer.get("tensor", "")),
                         "shape": activation},
        "logits": {"tensor": str(logits.get("tensor", "")), "before": logits["before"]},
        "num_classes": classes, "labels": labels,
        "opset": manifest.get("opset"),
        "graphs": files, "weights": weights,
    }


def _file_entry(entry, field, fail) -> dict:
    if not isinstance(entry, dict):
        fail(field, "{file, sha256}", entry)
    name = entry.get("file")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or os.path.isabs(name):
        fail(f"{field}.file", "a plain file name inside the bundle (no separator, no '..')", name)
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        fail(f"{field}.sha256", "64 lowercase hexadecimal digits", entry.get("sha256"))
    return {"file": name, "sha256": entry["sha256"]}


def _inside(root: Path, name: str, bundle) -> Path:
    """The bundle's file `name`, which must be a regular file that stays inside the bundle once links resolve."""
    file = root / name
    if not file.is_file():
        raise UserError(f"bundle '{bundle}' is incomplete: {name} is missing")
    if root.resolve() not in file.resolve().parents:
        raise UserError(f"bundle '{bundle}': {name} is a link that leads out of the bundle; a bundle's files are "
                        "regular files inside it")
    return file


def _no_link_out(root: Path, bundle) -> None:
    """No entry of the bundle's directory may be a link leading out of it (ONNX external data could name one)."""
    inside = root.resolve()
    for entry in root.iterdir():
        if entry.is_symlink() and inside not in entry.resolve().parents:
            raise UserError(f"bundle '{bundle}': {entry.name} is a link that leads out of the bundle; a bundle's files "
                            "are regular files inside it")
