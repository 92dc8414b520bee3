"""Latency of the engine against ONNX Runtime forward-only and the official PyTorch recipe, in one run.

For each model (random weights: timing does not depend on their values), one 224x224 image, m interpolation steps
(official variant: left rule, no baseline subtraction), it times:
  floor        forward.onnx alone: the m interpolated images through the backbone up to the target layer
  ort_forward  the whole exported classifier on the same m-image batch in ONNX Runtime (forward only)
  engine       Explainer.explain: interpolation, backbone, tail gradient, reduction, upsampling
  torch        the authors' recipe: one batch of m interpolated images, forward + backward in PyTorch eager with
               parameter gradients on, then the same reduction
Each after warm-up, `--repeats` times; reports medians and p90 and ratios within the same run.

    .venv/bin/python benchmarks/bench_cpu.py --steps 32 --repeats 7 --json benchmarks/results-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

from igcam_engine import Explainer, quadrature
from igcam_engine.bundle import graph_path
from igcam_engine.export import from_torch, models

MODELS = {
    "resnet50": (models.resnet50, "layer4"),
    "vgg16": (models.vgg16, "features.29"),
}
SHAPE = (3, 224, 224)


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def torch_recipe(model, layer, image, target, alphas):
    """The notebook's IG-CAM: one forward + backward over the batch of interpolated images, parameters trainable."""
    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        batch = alphas[:, None, None, None] * image[None]  # black (zero) baseline in the notebook's input space
        scores = model(batch)
        activation = captured[0]
        activation.retain_grad()
        scores[:, target].sum().backward()
        weights = activation.grad.mean(dim=(2, 3), keepdim=True)
        step_maps = F.relu((weights * activation).sum(1, keepdim=True))
        coarse = step_maps.sum(0, keepdim=True) / len(alphas)
        return F.interpolate(coarse, size=image.shape[-2:], mode="bilinear", align_corners=False).detach()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)


def bench(name: str, steps: int, warmup: int, repeats: int, workdir: Path) -> dict:
    factory, layer = MODELS[name]
    torch.manual_seed(0)
    model = factory().eval()
    bundle = from_torch(model, layer, SHAPE, workdir / name)
    explainer = Explainer(bundle)
    image = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    alphas, _ = quadrature("left", steps)
    rows = (alphas[:, None, None, None] * image).astype(np.float32)

    forward = ort.InferenceSession(graph_path(explainer.manifest, "forward"), providers=["CPUExecutionProvider"])
    feeds = {"images": image, "baseline": np.zeros_like(image), "alphas": alphas.astype(np.float32)}
    classifier_path = workdir / f"{name}-classifier.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(rows),), str(classifier_path), input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, opset_version=18, dynamo=True, verbose=False)
    classifier = ort.InferenceSession(str(classifier_path), providers=["CPUExecutionProvider"])
    image_t, alphas_t = torch.from_numpy(image[0]), torch.from_numpy(alphas.astype(np.float32))

    samples = {
        "floor": timed(lambda: forward.run(None, feeds), warmup, repeats),
        "ort_forward": timed(lambda: classifier.run(None, {"x": rows}), warmup, repeats),
        "engine": timed(lambda: explainer.explain(image, 1, steps=steps), warmup, repeats),
        "torch": timed(lambda: torch_recipe(model, layer, image_t, 1, alphas_t), warmup, repeats),
    }
    return {"model": name, "layer": layer, "steps": steps, "samples": samples}


def summarize(result: dict) -> dict:
    s = result["samples"]
    med = {k: statistics.median(v) for k, v in s.items()}
    p90 = {k: float(np.percentile(v, 90)) for k, v in s.items()}
    return {
        **{f"{k}_median_s": v for k, v in med.items()},
        **{f"{k}_p90_s": v for k, v in p90.items()},
        "engine_over_ort_forward": med["engine"] / med["ort_forward"],
        "engine_over_floor": med["engine"] / med["floor"],
        "torch_over_engine": med["torch"] / med["engine"],
    }


def markdown(results: list[dict]) -> str:
    lines = [
        "| model (layer) | m | floor: fwd to layer | ORT forward-only | engine | official PyTorch | engine / ORT fwd | "
        "engine / floor | PyTorch / engine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["summary"]
        lines.append(
            f"| {r['model']} ({r['layer']}) | {r['steps']} | {s['floor_median_s']:.3f} s | {s['ort_forward_median_s']:.3f} s "
            f"| {s['engine_median_s']:.3f} s (p90 {s['engine_p90_s']:.3f}) | {s['torch_median_s']:.3f} s "
            f"| {s['engine_over_ort_forward']:.3f}x | {s['engine_over_floor']:.3f}x | {s['torch_over_engine']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,vgg16", help="comma separated: " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write every sample and the machine description here")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            result = bench(name, args.steps, args.warmup, args.repeats, Path(workdir))
            result["summary"] = summarize(result)
            results.append(result)
            print(f"{name}: {json.dumps(result['summary'])}", file=sys.stderr)
    machine = {
        "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "onnxruntime": ort.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
