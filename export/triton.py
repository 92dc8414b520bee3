"""A Triton Inference Server model repository (onnxruntime backend) from a bundle's explain.onnx.

Triton's dynamic batching needs every input to carry the batch dimension, so the quadrature (nodes, weights),
the baseline (black, per the bundle's preprocessing) and the subtraction flag are fixed at export time and become
constants of the model: requests carry images [N, C, H, W] and, for a classifier, class indices targets [N] (their
one-hot seeds are made inside the model), for any other model the seeds of its outputs, seed_i [N, ...]
(docs/bundle-format.md); the response is maps [N, H, W].
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from igcam_engine.bundle import WEIGHTS, load_manifest
from igcam_engine.errors import OptionError
from igcam_engine.options import VARIANTS, ExplainOptions
from igcam_engine.preprocess import black_input
from igcam_engine.validators import integer

TENSORRT_PRECISIONS = ("off", "fp32", "fp16")


def triton_repository(bundle, out, *, name="igcam_explain", options: ExplainOptions | None = None, steps=50, rule=None,
                      variant="official", max_batch_size=8, queue_delay_us=2000, tensorrt="off",
                      workspace_bytes=1 << 30) -> Path:
    """Writes out/<name>/config.pbtxt and out/<name>/1/model.onnx (+ its weights); returns the model folder.
    `options` (or steps, rule and variant) fix IG-CAM's path: explain.onnx computes integrated Grad-CAM from the
    black baseline on a fixed grid."""
    manifest = load_manifest(bundle)
    options = (options or ExplainOptions(steps=steps, rule=rule, variant=variant)).checked()
    if options.method != "igcam" or options.adaptive or not isinstance(options.baseline, str) \
            or options.baseline != "black" or options.normalize:
        raise OptionError("explain.onnx computes IG-CAM (method 'igcam') from the black baseline on a fixed grid "
                          f"of steps, unnormalized; got method {options.method!r}, steps {options.steps!r}, baseline "
                          f"{options.record()['baseline']!r}, normalize {options.normalize}")
    if tensorrt not in TENSORRT_PRECISIONS:
        raise OptionError(f"tensorrt must be one of {', '.join(TENSORRT_PRECISIONS)}, got '{tensorrt}'")
    integer(max_batch_size, "max_batch_size", 1)
    alphas, weights = options.nodes()
    black = np.array(black_input(manifest.preprocess, manifest.input.shape[0]), np.float32)
    constants = {
        "alphas": alphas.astype(np.float32), "weights": weights.astype(np.float32),
        "baseline": np.broadcast_to(black[None, :, None, None], (1, *manifest.input.shape)).copy(),
        "subtract_baseline": np.array([float(options.subtract)], np.float32),
    }
    model = onnx.load(manifest.graph_path("explain"), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in constants]
    if manifest.task.kind == "classification" and len(manifest.outputs) == 1:
        # targets [N] int64 -> seed_0 [N, classes]: the one-hot of each image's class
        seed = manifest.outputs[0].seed
        inputs = [i for i in inputs if i.name != seed] + [onnx.helper.make_tensor_value_info(
            "targets", onnx.TensorProto.INT64, ["batch"])]
        constants["igcam/triton/classes"] = np.arange(manifest.num_classes, dtype=np.int64)[None]
        model.graph.node.insert(0, onnx.helper.make_node("Unsqueeze", ["targets", "igcam/triton/axis"],
                                                         ["igcam/triton/column"]))
        model.graph.node.insert(1, onnx.helper.make_node("Equal", ["igcam/triton/column", "igcam/triton/classes"],
                                                         ["igcam/triton/hot"]))
        model.graph.node.insert(2, onnx.helper.make_node("Cast", ["igcam/triton/hot"], [seed],
                                                         to=onnx.TensorProto.FLOAT))
        constants["igcam/triton/axis"] = np.array([1], np.int64)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    model.doc_string = f"igcam-engine explain: {options.rule or VARIANTS[options.variant][0]} rule, {options.steps} " \
                       f"steps, variant {options.variant}"

    folder = Path(out) / name
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx.save(model, version / "model.onnx")
    shutil.copyfile(manifest.root / WEIGHTS, version / WEIGHTS)
    onnx.checker.check_model(str(version / "model.onnx"), full_check=True)
    (folder / "config.pbtxt").write_text(_config(name, manifest, max_batch_size, queue_delay_us, tensorrt,
                                                 workspace_bytes))
    return folder


def _config(name, manifest, max_batch_size, queue_delay_us, tensorrt, workspace_bytes) -> str:
    c, h, w = manifest.input.shape
    if manifest.task.kind == "classification" and len(manifest.outputs) == 1:
        targets = ['  { name: "targets" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } }']
    else:
        targets = [f'  {{ name: "{o.seed}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, o.shape))} ] }}'
                   for o in manifest.outputs]
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        f'  {{ name: "images" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }},',
        ",\n".join(targets),
        "]",
        "output [",
        f'  {{ name: "maps" data_type: TYPE_FP32 dims: [ {h}, {w} ] }}',
        "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
    ]
    if tensorrt != "off":
        lines += [
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {",
            '  name: "tensorrt"',
            f'  parameters {{ key: "precision_mode" value: "{tensorrt.upper()}" }}',
            f'  parameters {{ key: "max_workspace_size_bytes" value: "{int(workspace_bytes)}" }}',
            "} ] } }",
        ]
    return "\n".join(lines) + "\n"
