"""A Triton Inference Server model repository (onnxruntime backend) from a bundle's explain.onnx.

Triton's dynamic batching needs every input to carry the batch dimension, so the quadrature (nodes, weights),
the baseline (black, per the bundle's preprocessing) and the subtraction flag are fixed at export time and become
constants of the model: requests carry only images [N, C, H, W] and targets [N]; the response is maps [N, H, W].
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from igcam_engine.bundle import WEIGHTS, graph_path, load_manifest
from igcam_engine.errors import UserError
from igcam_engine.explainer import VARIANTS
from igcam_engine.preprocess import black_input
from igcam_engine.quadrature import quadrature

TENSORRT_PRECISIONS = ("off", "fp32", "fp16")


def triton_repository(bundle, out, *, name="igcam_explain", steps=50, rule=None, variant="official",
                      max_batch_size=8, queue_delay_us=2000, tensorrt="off", workspace_bytes=1 << 30) -> Path:
    """Writes out/<name>/config.pbtxt and out/<name>/1/model.onnx (+ its weights); returns the model folder."""
    manifest = load_manifest(bundle)
    if variant not in VARIANTS:
        raise UserError(f"unknown variant '{variant}'; accepted: {', '.join(VARIANTS)}")
    if tensorrt not in TENSORRT_PRECISIONS:
        raise UserError(f"tensorrt must be one of {', '.join(TENSORRT_PRECISIONS)}, got '{tensorrt}'")
    if max_batch_size < 1:
        raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")
    default_rule, subtract = VARIANTS[variant]
    alphas, weights = quadrature(rule or default_rule, steps)
    channels = manifest["input"]["shape"][0]
    black = np.array(black_input(manifest["preprocess"], channels), np.float32)
    constants = {
        "alphas": alphas.astype(np.float32), "weights": weights.astype(np.float32),
        "baseline": np.broadcast_to(black[None, :, None, None], (1, *manifest["input"]["shape"])).copy(),
        "subtract_baseline": np.array([float(subtract)], np.float32),
    }
    model = onnx.load(graph_path(manifest, "explain"), load_external_data=False)
    inputs = [i for i in model.graph.input if i.name not in constants]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in constants.items())
    model.doc_string = f"igcam-engine explain: {rule or default_rule} rule, {steps} steps, variant {variant}"

    folder = Path(out) / name
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    onnx.save(model, version / "model.onnx")
    shutil.copyfile(Path(manifest["root"]) / WEIGHTS, version / WEIGHTS)
    onnx.checker.check_model(str(version / "model.onnx"), full_check=True)
    (folder / "config.pbtxt").write_text(_config(name, manifest, max_batch_size, queue_delay_us, tensorrt,
                                                 workspace_bytes))
    return folder


def _config(name, manifest, max_batch_size, queue_delay_us, tensorrt, workspace_bytes) -> str:
    c, h, w = manifest["input"]["shape"]
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [",
        f'  {{ name: "images" data_type: TYPE_FP32 dims: [ {c}, {h}, {w} ] }},',
        '  { name: "targets" data_type: TYPE_INT64 dims: [ 1 ] reshape: { shape: [ ] } }',
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
