"""Reduced precision on the CPU (`igcam bench precision`): the engine with ONNX Runtime in float32 against the
OpenVINO backend in float32 and bfloat16 and against ONNX Runtime with an int8 forward graph (static QDQ
quantization calibrated on the photos' interpolation batches; the gradient graph stays float32), same model, same
image, same m, same run; with the map error of each against the float32 engine on the real photos of the shipped
localization set for the pretrained EfficientNet-Lite0/1/2 (the random-weight ResNet-50 and VGG-16: timing only)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.benchmarks.measure import machine, map_errors, measure, ms
from igcam_engine.benchmarks.models import build_model, model_shape
from igcam_engine.data import localization_photos
from igcam_engine.errors import UserError
from igcam_engine.images import load_image, to_model_input
from igcam_engine.preprocess import black_input
from igcam_engine.quadrature import quadrature

PRECISION_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "vgg16")
BACKENDS = ("ort_f32", "openvino_f32", "openvino_bf16", "ort_int8")


def precision_study(models=PRECISION_MODELS, steps=32, repeats=5, warmup=1, small=False, log=print) -> dict:
    from igcam_engine.export import from_torch

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            model, layer, preprocess = build_model(name, small)
            shape = model_shape(name)
            bundle = from_torch(model, layer, shape, Path(workdir) / name, preprocess=preprocess)
            reference = Explainer(bundle, "cpu")
            photos = np.stack([to_model_input(load_image(photo["file"]), shape, reference.preprocess)[0]
                               for photo in localization_photos()])
            targets = reference.predict(photos).argmax(axis=1)
            pretrained = name.startswith("efficientnet_lite")
            expected = reference.explain(photos, targets, steps=steps) if pretrained else None
            entry = {"model": name, "layer": layer, "pretrained": pretrained, "steps": steps, "photos": len(photos),
                     "backends": {}}
            for backend in BACKENDS:
                try:
                    explainer = _backend(backend, bundle, reference, photos, steps, Path(workdir) / f"{name}-int8")
                except UserError as e:  # OpenVINO absent, or no bf16 on this CPU: the row says why
                    entry["backends"][backend] = {"skipped": str(e)}
                    log(f"  {name:20s} {backend:14s} skipped: {e}")
                    continue
                row = measure(lambda: explainer.explain(photos[:1], int(targets[0]), steps=steps), warmup, repeats)
                row["precision"] = explainer.precision if backend != "ort_int8" else "int8 forward, f32 gradient"
                if expected is not None:
                    maps = explainer.explain(photos, targets, steps=steps)
                    row["normalized_max_delta"], row["one_minus_correlation"] = map_errors(maps, expected)
                    row["raw_relative_delta"] = float(np.abs(maps - expected).max() / np.abs(expected).max())
                entry["backends"][backend] = row
                log(f"  {name:20s} {backend:14s} {row['median_s'] * 1e3:9.1f} ms"
                    + (f"  max|d| {row['normalized_max_delta']:.4f}" if expected is not None else ""))
            results.append(entry)
    return {"machine": {**machine(), "openvino": _openvino_version()}, "results": results}


def _backend(backend, bundle, reference, photos, steps, int8_dir) -> Explainer:
    if backend == "ort_f32":
        return reference
    if backend.startswith("openvino"):
        return Explainer(bundle, "openvino", precision=backend.split("_")[1])
    black = np.array(black_input(reference.preprocess, photos.shape[1]), np.float32)[:, None, None]
    return int8_explainer(bundle, photos, np.broadcast_to(black, photos[:1].shape), steps, int8_dir)


def int8_explainer(bundle, photos, base, steps, directory: Path) -> Explainer:
    """The bundle with forward.onnx quantized by ONNX Runtime (static, QDQ, per-channel int8 weights, uint8
    activations), calibrated on the interpolation batches of `photos` from `base` (the left rule's alphas)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    shutil.copytree(bundle, directory)
    base = np.ascontiguousarray(base, np.float32)
    alphas = quadrature("left", steps)[0].astype(np.float32)

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{"images": photo[None], "baseline": base, "alphas": alphas} for photo in photos])

        def get_next(self):
            return next(self.feeds, None)

    quantized = directory / "forward.int8.onnx"
    quantize_static(str(Path(bundle) / "forward.onnx"), str(quantized), Batches(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    quantized.replace(directory / "forward.onnx")
    return Explainer(directory, "cpu", verify=False)  # its forward.onnx is no longer the one the manifest hashes


def _openvino_version():
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def markdown(report: dict) -> str:
    lines = [f"Reduced precision on the CPU ({report['machine']['cpu']}, {report['machine']['cpus']} cores; OpenVINO "
             f"{report['machine']['openvino']}, ONNX Runtime {report['machine']['onnxruntime']}): one image, m = "
             f"{report['results'][0]['steps']}, median of the timed runs; map error against the ONNX Runtime float32 "
             "engine, worst over the shipped photos (normalized max |Δ|, 1 − correlation, raw max |Δ| / max |map|).",
             "", "| model | backend | precision | time | × ORT f32 | norm. max \\|Δ\\| | 1 − corr | raw \\|Δ\\| |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in report["results"]:
        base = entry["backends"]["ort_f32"]["median_s"]
        for backend, row in entry["backends"].items():
            if "skipped" in row:
                lines.append(f"| {entry['model']} {entry['layer']} | {backend} | — | skipped: {row['skipped']} | | | | |")
                continue
            errors = (f"{row['normalized_max_delta']:.2%} | {row['one_minus_correlation']:.1e} | {row['raw_relative_delta']:.2%}"
                      if "normalized_max_delta" in row else "random weights: timing only | | ")
            lines.append(f"| {entry['model']} {entry['layer']} | {backend} | {row['precision']} | {ms(row['median_s'])} | "
                         f"{row['median_s'] / base:.2f} | {errors} |")
    return "\n".join(lines)
