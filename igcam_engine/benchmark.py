"""`igcam bench`: the engine against the recipes people run today, and the quadrature study, on this machine.

Every figure is measured in the same run as its peers: medians (and p90/p95) over timed repeats after warm-up,
ratios between configurations of that run. Needs the export extra (torch) for the PyTorch peers and matplotlib
for the plots; the runtime itself never imports either.

- latency: per model, at m interpolation steps (one 224x224 image): the floor (forward.onnx alone: the m images
  through the backbone up to the target layer), ONNX Runtime forward-only of the whole classifier on the same
  batch, the official PyTorch recipe (one batch of m images, forward + backward, parameter gradients on, as the
  authors' notebook), tuned PyTorch (parameters frozen, autograd only from the target layer on), the engine at
  several m, plain Grad-CAM (engine vs pytorch-grad-cam when it imports), latency against the number of images,
  and each configuration's peak resident memory above the process's level before it ran.
- quadrature: map error against a converged reference (Gauss-Legendre, 256 nodes) as a function of the number of
  forward passes, per rule, over several models and images; the smallest m per rule within 1 %.
- adaptive: passes used by steps="auto" and the error of its maps against the same reference.
- targets: the cost of k classes per image (one backbone pass, k gradient passes) against k separate calls.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.maps import normalize
from igcam_engine.quadrature import RULES, quadrature

SHAPE = (3, 224, 224)
LATENCY_MODELS = ("resnet50", "resnet50-layer3", "vgg16", "mobilenet_v2", "efficientnet_lite0")
QUADRATURE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
ERROR_TARGET = 0.01


# ---------------------------------------------------------------- models and peers


def build_model(name: str, small: bool = False):
    """(torch model, target layer, preprocess) for a benchmark model name; `small` narrows the random-weight
    models for a quick check of the set-up (EfficientNet-Lite0 always has its real ImageNet weights)."""
    import torch

    from igcam_engine.export import models

    torch.manual_seed(0)
    if name in ("resnet50", "resnet50-layer3"):
        model = models.resnet50(width=8 if small else 64)
        layer = "layer4" if name == "resnet50" else "layer3"
    elif name == "vgg16":
        model, layer = models.vgg16(width=8 if small else 64, hidden=64 if small else 4096), "features.29"
    elif name == "mobilenet_v2":
        model, layer = models.mobilenet_v2(width_mult=0.25 if small else 1.0), "features.18"
    elif name == "efficientnet_lite0":
        model, layer = models.efficientnet_lite0(pretrained=True), "_head_act"
        mean, std = models.EFFICIENTNET_LITE0_PREPROCESS["mean"], models.EFFICIENTNET_LITE0_PREPROCESS["std"]
        return model.eval(), layer, {"resize": "stretch", "scale": 1 / 255, "mean": mean, "std": std}
    else:
        raise ValueError(f"unknown benchmark model '{name}'; choose from {', '.join(LATENCY_MODELS)}")
    return model.eval(), layer, "imagenet"


def official_recipe(model, layer, image, target, alphas):
    """The authors' notebook: one batch of interpolated images (black baseline), forward + backward with the
    parameters' gradients on, channel weights from the layer's gradient, sum over steps."""
    import torch.nn.functional as F

    captured = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        scores = model(alphas[:, None, None, None] * image[None])
        activation = captured[0]
        activation.retain_grad()
        scores[:, target].sum().backward()
        step_maps = F.relu((activation.grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1, keepdim=True))
        coarse = step_maps.sum(0, keepdim=True) / len(alphas)
        return F.interpolate(coarse, size=image.shape[-2:], mode="bilinear", align_corners=False).detach()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)


def tuned_recipe(model, layer, image, target, alphas):
    """PyTorch as a careful user would write it: parameters frozen, the backbone run without recording, autograd
    only from the target layer's output to the score."""
    import torch
    import torch.nn.functional as F

    captured = []

    def start_graph_here(module, args, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = dict(model.named_modules())[layer].register_forward_hook(start_graph_here)
    try:
        scores = model(alphas[:, None, None, None] * image[None])
        activation = captured[0]
        (grad,) = torch.autograd.grad(scores[:, target].sum(), activation)
        step_maps = F.relu((grad.mean(dim=(2, 3), keepdim=True) * activation.detach()).sum(1, keepdim=True))
        coarse = step_maps.sum(0, keepdim=True) / len(alphas)
        return F.interpolate(coarse, size=image.shape[-2:], mode="bilinear", align_corners=False)
    finally:
        handle.remove()


def pytorch_grad_cam(model, layer):
    """pytorch-grad-cam's GradCAM for the layer, or the reason it cannot be used here."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ModuleNotFoundError as e:
        if e.name == "pytorch_grad_cam":
            return None, ("not installed: PyPI's grad-cam requires torchvision, which has no build for this torch, "
                          "so it is not a dependency of the bench")
        return None, f"not usable here: it imports {e.name}, which is missing"
    except Exception as e:  # torchvision present but not importable with this torch
        return None, f"not usable here: {type(e).__name__}: {e}"
    cam = GradCAM(model=model, target_layers=[dict(model.named_modules())[layer]])
    return (lambda image, target: cam(input_tensor=image[None], targets=[ClassifierOutputTarget(target)])), None


# ---------------------------------------------------------------- measuring


class PeakMemory:
    """Peak resident set size above the level at entry, sampled every 5 ms in a thread (Linux /proc)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the process's lifetime peak is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(fn, warmup: int, repeats: int) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    with PeakMemory() as memory:
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - started)
    return {"median_s": statistics.median(samples), "p90_s": float(np.percentile(samples, 90)),
            "p95_s": float(np.percentile(samples, 95)), "peak_rss_mb": memory.megabytes, "samples": samples}


def machine() -> dict:
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__}


# ---------------------------------------------------------------- the studies


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

    from igcam_engine.bundle import graph_path
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
    forward = ort.InferenceSession(graph_path(explainer.manifest, "forward"), providers=explainer.providers)
    feeds = {"images": image, "baseline": np.zeros_like(image), "alphas": alphas.astype(np.float32)}
    image_t, alphas_t = torch.from_numpy(image[0]), torch.from_numpy(alphas.astype(np.float32))
    target = int(np.argmax(explainer.predict(image)))
    run = {}

    def record(key, fn):
        run[key] = measure(fn, warmup, repeats)
        log(f"  {name:20s} {key:28s} {run[key]['median_s'] * 1e3:9.1f} ms")

    record("floor", lambda: forward.run(None, feeds))
    record("ort_forward", lambda: classifier.run(None, {"x": rows}))
    for m in steps:
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


def _errors(maps: np.ndarray, reference: np.ndarray):
    """(normalised max |difference|, 1 - correlation), worst over the maps."""
    a, b = normalize(maps).astype(np.float64), normalize(reference).astype(np.float64)
    deltas = np.abs(a - b).max(axis=(-2, -1))
    correlations = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    return float(deltas.max()), float(1 - min(correlations))


def quadrature_cases(small=False):
    """(case name, explainer, images, targets): pretrained EfficientNet-Lite0 on the sample photos (two layers),
    and ResNet-50 (random weights) on the same photos."""
    from igcam_engine.demo import sample_images
    from igcam_engine.export import from_torch
    from igcam_engine.images import load_image, to_model_input

    workdir = tempfile.mkdtemp(prefix="igcam-quadrature-")
    cases = []
    for name, layer in (("efficientnet_lite0", None), ("efficientnet_lite0", "_blocks.10"), ("resnet50", None)):
        model, default_layer, preprocess = build_model(name, small)
        layer = layer or default_layer
        explainer = Explainer(from_torch(model, layer, SHAPE, Path(workdir) / f"{name}-{layer}", preprocess=preprocess))
        images = np.stack([to_model_input(load_image(p), SHAPE, explainer.preprocess)[0] for p in sample_images()])
        targets = np.argmax(explainer.predict(images), axis=1)
        cases.append((f"{name} {layer}", explainer, images, targets))
    return cases


def quadrature_study(step_counts=QUADRATURE_STEPS, reference_steps=256, small=False, log=print, cases=None) -> dict:
    cases = cases or quadrature_cases(small)
    rows = []
    for case, explainer, images, targets in cases:
        reference = explainer.explain(images, targets, rule="gauss-legendre", steps=reference_steps)
        for rule in RULES:
            for m in step_counts:
                if rule == "trapezoid" and m < 2:
                    continue
                delta, decorrelation = _errors(explainer.explain(images, targets, rule=rule, steps=m), reference)
                rows.append({"case": case, "rule": rule, "passes": m, "max_delta": delta, "one_minus_corr": decorrelation})
        delta, decorrelation = _errors(explainer.explain(images, targets, rule="left", steps=50), reference)
        rows.append({"case": case, "rule": "left (official, m=50)", "passes": 50, "max_delta": delta,
                     "one_minus_corr": decorrelation})
        log(f"  {case}: official left-50 error {delta:.4f}")
    smallest = {}
    for rule in RULES:
        for m in step_counts:
            worst = [r["max_delta"] for r in rows if r["rule"] == rule and r["passes"] == m]
            if worst and max(worst) <= ERROR_TARGET:
                smallest[rule] = m
                break
    left50 = max(r["max_delta"] for r in rows if r["rule"] == "left (official, m=50)")
    return {"reference": f"gauss-legendre, {reference_steps} nodes", "error_target": ERROR_TARGET,
            "cases": [c[0] for c in cases], "images": len(cases[0][2]), "rows": rows,
            "smallest_passes_within_target": smallest, "official_left50_error": left50}


def adaptive_study(tolerances=(0.05, 0.02, 0.01), reference_steps=256, small=False, cases=None, log=print) -> dict:
    cases = cases or quadrature_cases(small)
    rows = []
    for case, explainer, images, targets in cases:
        reference = explainer.explain(images, targets, rule="gauss-legendre", steps=reference_steps)
        for rule in ("trapezoid", "midpoint"):
            for tolerance in tolerances:
                result = explainer.explain_adaptive(images, targets, rule=rule, tolerance=tolerance)
                delta, decorrelation = _errors(result.maps, reference)
                rows.append({"case": case, "rule": rule, "tolerance": tolerance, "passes": result.passes,
                             "converged": result.converged, "max_delta": delta, "one_minus_corr": decorrelation})
                log(f"  {case} {rule} tol {tolerance}: {result.passes} passes, error {delta:.4f}")
    return {"reference": f"gauss-legendre, {reference_steps} nodes", "rows": rows}


def targets_study(counts=(1, 2, 4, 8), steps=32, repeats=5, warmup=1, small=False, log=print) -> dict:
    from igcam_engine.export import from_torch

    model, layer, preprocess = build_model("resnet50", small)
    with tempfile.TemporaryDirectory() as workdir:
        explainer = Explainer(from_torch(model, layer, SHAPE, Path(workdir) / "resnet50", preprocess=preprocess))
        image = np.random.default_rng(0).standard_normal((1, *SHAPE)).astype(np.float32)
        single = measure(lambda: explainer.explain(image, 0, steps=steps), warmup, repeats)["median_s"]
        rows = []
        for k in counts:
            together = measure(lambda k=k: explainer.explain(image, np.arange(k)[None], steps=steps), warmup, repeats)
            rows.append({"targets": k, "one_call_s": together["median_s"], "separate_calls_s": k * single,
                         "speedup": k * single / together["median_s"]})
            log(f"  {k} targets: {together['median_s'] * 1e3:.1f} ms in one call, {k * single * 1e3:.1f} ms separately")
    return {"model": "resnet50 layer4", "steps": steps, "rows": rows}


# ---------------------------------------------------------------- reports


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def latency_markdown(report: dict) -> str:
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
            f"| {entry['model']} ({entry['layer']}) | {_ms(c['floor']['median_s'])} | {_ms(c['ort_forward']['median_s'])} | "
            + " | ".join(_ms(c[f"engine_m{s}"]["median_s"]) for s in steps)
            + f" | {_ms(c['tuned_pytorch']['median_s'])} | {_ms(c['official_pytorch']['median_s'])} "
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
        peer = _ms(c["pytorch_grad_cam"]["median_s"]) if "pytorch_grad_cam" in c else entry["pytorch_grad_cam"]
        lines.append(f"| {entry['model']} | {_ms(c['engine_gradcam']['median_s'])} | {peer} |")
    first = report["results"][0]
    if "batches" in first:
        lines += ["", f"Latency against the number of images ({first['model']}, m = {m}):", "",
                  "| images | per call | per image |", "|---|---|---|"]
        for count, result in first["batches"].items():
            lines.append(f"| {count} | {_ms(result['median_s'])} | {_ms(result['median_s'] / int(count))} |")
    return "\n".join(lines)


def quadrature_markdown(report: dict) -> str:
    rows, steps = report["rows"], sorted({r["passes"] for r in report["rows"] if r["rule"] in RULES})

    def worst(metric, rule, m, case=None):
        values = [r[metric] for r in rows if r["rule"] == rule and r["passes"] == m and case in (None, r["case"])]
        return max(values) if values else None

    def smallest(metric, rule, case=None):
        return next((m for m in steps if (worst(metric, rule, m, case) or 1) <= ERROR_TARGET), f"> {steps[-1]}")

    lines = []
    for metric, title in (("max_delta", "normalised max |Δ|"), ("one_minus_corr", "1 − correlation")):
        lines += [f"Worst {title} over {len(report['cases'])} model/layer cases × {report['images']} photos, against "
                  f"{report['reference']}:", "",
                  "| rule | " + " | ".join(f"m={s}" for s in steps) + " | smallest m ≤ 1 % |", "|---" * (len(steps) + 2) + "|"]
        for rule in RULES:
            cells = [f"{worst(metric, rule, s):.4f}" if worst(metric, rule, s) is not None else "—" for s in steps]
            lines.append(f"| {rule} | " + " | ".join(cells) + f" | {smallest(metric, rule)} |")
        lines.append("")
    lines += ["Smallest m with normalised max |Δ| ≤ 1 %, per case:", "",
              "| case | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 1) + "|"]
    for case in report["cases"]:
        lines.append(f"| {case} | " + " | ".join(str(smallest("max_delta", rule, case)) for rule in RULES) + " |")
    left50 = [r for r in rows if r["rule"].startswith("left (")]
    lines += ["", "The official preset (left rule, m = 50) against the reference: " + "; ".join(
        f"{r['case']} max |Δ| {r['max_delta']:.4f}, 1 − corr {r['one_minus_corr']:.5f}" for r in left50) + "."]
    return "\n".join(lines)


def adaptive_markdown(report: dict) -> str:
    lines = [f"steps=\"auto\" against {report['reference']} (maps of 3 photos per case; error: worst normalised "
             "max |Δ|):", "", "| case | rule | tolerance | passes | converged | error |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['case']} | {r['rule']} | {r['tolerance']} | {r['passes']} | {r['converged']} | {r['max_delta']:.4f} |")
    return "\n".join(lines)


def targets_markdown(report: dict) -> str:
    lines = [f"Several classes per image ({report['model']}, m = {report['steps']}, one image):", "",
             "| classes | one call | separate calls | saving |", "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['targets']} | {_ms(r['one_call_s'])} | {_ms(r['separate_calls_s'])} | {r['speedup']:.2f}x |")
    return "\n".join(lines)


def plot(kind: str, report: dict, path: Path) -> str | None:
    """Writes a PNG for a report; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'igcam-engine[bench]'): no plot"
    figure, axis = plt.subplots(figsize=(8, 4.5))
    if kind == "latency":
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
    else:
        for rule in RULES:
            steps = sorted({r["passes"] for r in report["rows"] if r["rule"] == rule})
            worst = [max(r["max_delta"] for r in report["rows"] if r["rule"] == rule and r["passes"] == s) for s in steps]
            axis.loglog(steps, worst, marker="o", label=rule)
        axis.axhline(ERROR_TARGET, color="grey", linestyle="--", label="1 %")
        axis.set_xlabel("forward passes (m)")
        axis.set_ylabel("worst normalised max |Δ| vs reference")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None


def write(kind: str, report: dict, markdown: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{kind}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{kind}.md").write_text(markdown + "\n")
    if kind in ("latency", "quadrature"):
        reason = plot(kind, report, out / f"{kind}.png")
        if reason:
            print(reason)
