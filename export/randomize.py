"""A copy of a bundle whose head (the layers after the target) has its learned parameters randomized: the model
of Adebayo et al.'s sanity check ("Sanity checks for saliency maps", NeurIPS 2018), whose maps must differ from the
trained model's if the maps depend on what the head learned.

Each parameter of the head is a random permutation of its own values: its scale and sign mix stay (so no variance
turns negative and nothing overflows) while its learned arrangement is gone. The same parameter is permuted the
same way in every graph of the bundle, so the gradient graph stays the derivative of its forward part.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from igcam_engine.bundle import GRAPHS, MANIFEST, load_manifest

from .writer import staged, write_bundle

OWN_PREFIX = "igcam/"  # the exporter's own constants (class indices, shapes), never parameters


def randomized_head(bundle, out, seed: int = 0) -> Path:
    """Writes into `out` the bundle with every floating-point parameter of its gradient graph (more than one value,
    not one of the exporter's constants) permuted; returns `out`. Raises a BundleError for a bundle that does not
    load."""
    manifest = load_manifest(bundle)
    root = manifest.root
    graphs = {name: onnx.load(manifest.graph_path(name)) for name in GRAPHS}
    head = {t.name for t in graphs["gradient"].graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
            and int(np.prod(t.dims)) > 1 and not t.name.startswith(OWN_PREFIX)}
    permuted = {}
    for name in sorted(head):  # sorted: the permutation of each parameter depends on the seed alone
        tensor = next(t for t in graphs["gradient"].graph.initializer if t.name == name)
        values = numpy_helper.to_array(tensor, base_dir=str(root))
        order = np.random.default_rng([seed, len(permuted)]).permutation(values.size)
        permuted[name] = numpy_helper.from_array(values.ravel()[order].reshape(values.shape), name)
    for model in graphs.values():
        for tensor in model.graph.initializer:
            if tensor.name in permuted:
                tensor.CopyFrom(permuted[tensor.name])
            elif tensor.data_location == onnx.TensorProto.EXTERNAL:
                tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor, base_dir=str(root)), tensor.name))
    kept = json.loads((root / MANIFEST).read_text())
    for field in ("format", "format_version", "graphs", "weights"):
        kept.pop(field, None)
    kept["randomized_head"] = {"seed": seed, "parameters": sorted(head)}
    with staged(out) as staging:
        write_bundle(staging, graphs, kept)
    return Path(out)
