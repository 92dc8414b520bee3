"""GPU latency in one run: the official PyTorch recipe on CUDA, the engine with the CUDA provider (fp32) and with
TensorRT (fp32, fp16). ResNet-50 (this repo's torchvision-layout architecture, random weights), 224x224, layer4,
official variant, one image per explanation.

    python -m igcam_engine.benchmarks.gpu --steps 50 --repeats 50 --json benchmarks/results-gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from igcam_engine import Explainer, quadrature, zoo
from igcam_engine.benchmarks.measure import measure
from igcam_engine.benchmarks.models import SHAPE
from igcam_engine.benchmarks.recipes import official_recipe
from igcam_engine.export import from_torch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.exit(2, "bench_gpu: no CUDA device visible to torch\n")

    torch.manual_seed(0)
    model = zoo.resnet50().eval()
    image = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    samples = {}
    with tempfile.TemporaryDirectory() as workdir:
        bundle = from_torch(model, "layer4", SHAPE, Path(workdir) / "resnet50")
        configurations = {
            "engine CUDA EP fp32": dict(providers="cuda"),
            "engine TensorRT fp32": dict(providers="tensorrt", engine_cache=Path(workdir) / "trt32"),
            "engine TensorRT fp16": dict(providers="tensorrt", fp16=True, engine_cache=Path(workdir) / "trt16"),
        }
        for name, options in configurations.items():
            explainer = Explainer(bundle, **options)
            samples[name] = measure(lambda e=explainer: e.explain(image, 1, steps=args.steps), args.warmup, args.repeats)
            print(f"{name}: p50 {samples[name]['median_s'] * 1e3:.2f} ms", file=sys.stderr)

    gpu_model = model.cuda()
    alphas = torch.from_numpy(quadrature("left", args.steps)[0].astype(np.float32)).cuda()
    image_t = torch.from_numpy(image[0]).cuda()

    def recipe():
        official_recipe(gpu_model, "layer4", image_t, 1, alphas)
        torch.cuda.synchronize()

    samples["official PyTorch recipe (CUDA, eager)"] = measure(recipe, args.warmup, args.repeats)

    rows = ["| configuration | p50 | p95 | explanations/s |", "|---|---|---|---|"]
    for name, result in samples.items():
        p50 = result["median_s"]
        rows.append(f"| {name} | {p50 * 1e3:.2f} ms | {result['p95_s'] * 1e3:.2f} ms | {1 / p50:.1f} |")
    device = {"name": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "cuda": torch.version.cuda, "onnxruntime": __import__("onnxruntime").__version__}
    if args.json:
        args.json.write_text(json.dumps({"device": device, "steps": args.steps, "samples": samples}, indent=2) + "\n")
    print(f"Device: {device}\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
