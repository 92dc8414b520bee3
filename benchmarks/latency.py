"""Latency per model at m interpolation steps (one 224x224 image): the floor (forward.onnx alone: the m images
through the backbone up to the target layer), ONNX Runtime forward-only of the whole classifier on the same
batch, the official PyTorch recipe (one batch of m images, forward + backward, parameter gradients on, as the
authors' notebook), tuned PyTorch (parameters frozen, autograd only from the target layer on), the engine at
several m, plain Grad-CAM (engine vs pytorch-grad-cam when it imports), latency against the number of images,
and each configuration's peak resident memory above the process's level before it ran."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.benchmarks.measure import machine, measure, ms
from igcam_engine.benchmarks.models import LATENCY_MODELS, SHAPE, build_model
from igcam_engine.benchmarks.recipes import official_recipe, pytorch_grad_cam, tuned_recipe
from igcam_engine.quadrature import quadrature


def latency(models=LATENCY_MODELS, steps=(8, 16, 32, 50), peer_steps=32, batches=(1, 2, 4), repeats=5, warmup=1,
            providers=None, small=False, log=print) -> dict:
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in models:
            results.append(_model_latency(name, Path(workdir), steps, peer_steps,
                                          batches if name == models[0] else (), repeats, warmup, providers, small, log))
    return {"machine": machine(), "results": results}


def _model_latency(name, workdir, steps, peer_steps, batches, repeats, warmup, providers, small, log) -> dict:
    import onnxruntime as ort
    import torch

    from igcam_engine.export import from_torch

    model, layer, preprocess = build_model(name, small)
    explainer = Explainer(from_torch(model, layer, SHAPE, workdir / name, preprocess=preprocess), providers=providers)
    image = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
    alphas, _ = quadrature("left", peer_steps)
    rows = (alphas[:, None, None, None] * image).astype(np.float32)
    classifier_path = workdir / f"{name}.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(rows),), str(classifier_path), input_names=["x"],
                          dynamic_axes={"x": {0: "n"}}, opset_version=18, dynamo=False)
    classifier = ort.InferenceSession(str(classifier_path), providers=explainer.providers)
    forward = ort.InferenceSession(explainer.manifest.graph_path("forward"), providers=explainer.providers)
    feeds = {"images": image, "baseline": np.zeros_like(image), "alphas": alphas.astype(np.float32)}
    image_t, alphas_t = torch.from_numpy(image[0]), torch.from_numpy(alphas.astype(np.float32))
    target = int(np.argmax(explainer.predict(image)))
    run = {}

    def record(key, fn):
        run[key] = measure(fn, warmup, repeats)
        log(f"  {name:20s} {key:28s} {run[key]['median_s'] * 1e3:9.1f} ms")

    record("floor", lambda: forward.run(None, feeds))
    record("ort_forward", lambda: classifier.run(None, {"x": rows}))
    for m in dict.fromkeys([*steps, peer_steps]):  # the ratios compare the engine at the peers' m
        record(f"engine_m{m}", lambda m=m: explainer.explain(image, target, steps=m))
    for p in model.parameters():
        p.requires_grad_(False)
    record("tuned_pytorch", lambda: tuned_recipe(model, layer, image_t, target, alphas_t))
    for p in model.parameters():
        p.requires_grad_(True)
    record("official_pytorch", lambda: official_recipe(model, layer, image_t, target, alphas_t))
    record("engine_gradcam", lambda: explainer.explain(image, target, method="gradcam"))
    grad_cam, reason = pytorch_grad_cam(model, layer)
    if grad_cam is not None:
        record("pytorch_grad_cam", lambda: grad_cam(image_t, target))
    entry = {"model": name, "layer": layer, "peer_steps": peer_steps, "configurations": run,
             "pytorch_grad_cam": reason or "measured"}
    if batches:
        entry["batches"] = {}
        for count in batches:
            images = np.repeat(image, count, axis=0)
            entry["batches"][count] = measure(lambda x=images: explainer.explain(x, target, steps=peer_steps), warmup, repeats)
            log(f"  {name:20s} batch {count} x m={peer_steps:<14d} {entry['batches'][count]['median_s'] * 1e3:9.1f} ms")
    return entry


def markdown(report: dict) -> str:
    steps = sorted(int(k[len("engine_m"):]) for k in report["results"][0]["configurations"] if k.startswith("engine_m"))
    m = report["results"][0]["peer_steps"]
    lines = [
        f"| model (layer) | floor m={m} | ORT fwd m={m} | " + " | ".join(f"engine m={s}" for s in steps)
        + f" | tuned PyTorch m={m} | official PyTorch m={m} | engine / ORT fwd | official / engine | tuned / engine |",
        "|---" * (6 + len(steps) + 2) + "|",
    ]
    for entry in report["results"]:
        c = entry["configurations"]
        engine = c[f"engine_m{m}"]["median_s"]
        lines.append(
            f"| {entry['model']} ({entry['layer']}) | {ms(c['floor']['median_s'])} | {ms(c['ort_forward']['median_s'])} | "
            + " | ".join(ms(c[f"engine_m{s}"]["median_s"]) for s in steps)
            + f" | {ms(c['tuned_pytorch']['median_s'])} | {ms(c['official_pytorch']['median_s'])} "
            f"| {engine / c['ort_forward']['median_s']:.2f}x | {c['official_pytorch']['median_s'] / engine:.1f}x "
            f"| {c['tuned_pytorch']['median_s'] / engine:.1f}x |"
        )
    lines += ["", "Peak resident memory above the process's level before each configuration ran (m = "
              f"{m}; the engine's sessions and weights were loaded before):", "",
              "| model | ORT fwd | engine | tuned PyTorch | official PyTorch |", "|---|---|---|---|---|"]
    for entry in report["results"]:
        c = entry["configurations"]
        lines.append(f"| {entry['model']} | " + " | ".join(
            f"{c[k]['peak_rss_mb']:.0f} MB" for k in ("ort_forward", f"engine_m{m}", "tuned_pytorch", "official_pytorch")) + " |")
    lines += ["", "Plain Grad-CAM (one forward + backward):", "", "| model | engine method=gradcam | pytorch-grad-cam |",
              "|---|---|---|"]
    for entry in report["results"]:
        c = entry["configurations"]
        peer = ms(c["pytorch_grad_cam"]["median_s"]) if "pytorch_grad_cam" in c else entry["pytorch_grad_cam"]
        lines.append(f"| {entry['model']} | {ms(c['engine_gradcam']['median_s'])} | {peer} |")
    first = report["results"][0]
    if "batches" in first:
        lines += ["", f"Latency against the number of images ({first['model']}, m = {m}):", "",
                  "| images | per call | per image |", "|---|---|---|"]
        for count, result in first["batches"].items():
            lines.append(f"| {count} | {ms(result['median_s'])} | {ms(result['median_s'] / int(count))} |")
    return "\n".join(lines)


def plot(report: dict, axis) -> None:
    """Bars per model: the floor, ORT forward-only, the engine and the PyTorch peers at the peers' m."""
    m = report["results"][0]["peer_steps"]
    keys = ["floor", "ort_forward", f"engine_m{m}", "tuned_pytorch", "official_pytorch"]
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = [e["configurations"][key]["median_s"] for e in report["results"]]
        axis.bar(np.arange(len(values)) + i * width, values, width, label=key.replace("_", " "))
    axis.set_xticks(np.arange(len(report["results"])) + 0.4 - width / 2,
                    [e["model"] for e in report["results"]], rotation=15)
    axis.set_ylabel(f"seconds per explanation (m = {m})")
    axis.set_yscale("log")
