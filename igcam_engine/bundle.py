"""The bundle on disk: a directory with manifest.json, the ONNX graphs and one shared weights file.

Graphs (all with a dynamic batch; H, W fixed at export):
- forward.onnx   (images [N,C,H,W], baseline [Nb,C,H,W], alphas [M]) -> activations [N*M,K,h,w]
                 rows are image-major: row n*M + i holds baseline + alphas[i] * (images[n] - baseline).
- gradient.onnx  (activations [R,K,h,w], targets [R] int64) -> activation_grad [R,K,h,w], logits [R,classes]
- igcam.onnx     (images, baseline, alphas, targets [N]) -> activations, activation_grad, logits (both above in one)
- explain.onnx   (images, baseline, alphas, weights [M], targets [N], subtract_baseline [1]) -> maps [N,H,W]
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from igcam_engine.errors import UserError

FORMAT = "igcam-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
GRAPHS = ("forward", "gradient", "igcam", "explain")


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
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: bundle format {manifest.get('format')!r} v{manifest.get('format_version')} is not supported; "
            f"this igcam-engine reads {FORMAT} v{FORMAT_VERSION} (re-export the model)"
        )
    files = [manifest["graphs"][g] for g in GRAPHS] + [manifest["weights"]]
    for entry in files:
        file = root / entry["file"]
        if not file.is_file():
            raise UserError(f"bundle '{bundle}' is incomplete: {entry['file']} is missing")
        if verify and sha256(file) != entry["sha256"]:
            raise UserError(f"bundle '{bundle}' is corrupted: {entry['file']} does not match its sha256 in the manifest")
    manifest["root"] = str(root)
    return manifest


def graph_path(manifest: dict, graph: str) -> str:
    return str(Path(manifest["root"]) / manifest["graphs"][graph]["file"])
