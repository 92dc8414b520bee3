"""The paper's comparison on the shipped localization set (`igcam bench evaluation`): every metric of
igcam_engine.evaluation for IG-CAM (both presets, m = 50 and adaptive), Grad-CAM, Grad-CAM++ and other methods on the
pretrained EfficientNet-Lite0, Lite1 and Lite2, images the model classifies correctly; and the same metrics computed
with PyTorch eager (the authors' recipe for the maps, torch forward passes for the perturbed images) on the same
images in the same run, timed against the engine."""
from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np

from igcam_engine.backends import BackendOptions
from igcam_engine.benchmarks.measure import machine
from igcam_engine.evaluation import Model, configs, evaluate, summary_table
from igcam_engine.evaluation.annotations import shipped_set
from igcam_engine.preprocess import black_input

EVALUATION_MODELS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
METHODS = ("igcam", "igcam-paper", "gradcam", "gradcam++", "layercam", "eigencam", "ablationcam")
STEPS = (50, "auto")
COMPOSITES = 300
SANITY_IMAGES = 40
EAGER_IMAGES = 20  # images of the engine-vs-eager timing (Lite0, Grad-CAM and IG-CAM m = 50, no sanity check)
EAGER_CONFIGS = tuple(configs(("igcam", "gradcam"), (50,)))


class EagerModel(Model):
    """The same model in PyTorch eager: class probabilities by torch forward passes (batches of 64, no autograd),
    maps by the authors' recipe (benchmarks.recipes.official_recipe) for IG-CAM (official) and Grad-CAM (m = 1)."""

    def __init__(self, model, layer, input_shape, preprocess, num_classes=1000):
        self.model, self.layer = model, layer
        self.input_shape, self.preprocess, self.num_classes, self.labels = tuple(input_shape), preprocess, num_classes, None

    def probabilities(self, images, mask=None):  # a classifier's: the object's mask changes nothing
        import torch

        with torch.no_grad():
            out = [torch.softmax(self.model(torch.from_numpy(images[i:i + 64])).double(), dim=1).numpy()
                   for i in range(0, len(images), 64)]
        return np.concatenate(out)

    def explain(self, images, targets, config, mask=None):
        import torch

        from igcam_engine.benchmarks.recipes import official_recipe

        if config not in EAGER_CONFIGS:
            raise ValueError(f"the eager model computes {[c.label for c in EAGER_CONFIGS]}, not {config.label}")
        alphas = config.options.nodes()[0]  # the official variant's left rule, or one node at alpha 1
        black = torch.tensor(black_input(self.preprocess, self.input_shape[0]), dtype=torch.float32)[:, None, None]
        shifted = _shifted(self.model, black)
        alphas = torch.from_numpy(alphas.astype(np.float32))
        # the recipe interpolates alpha * x from zero: on the shifted model its zero is the black image
        return np.stack([official_recipe(shifted, f"model.{self.layer}", torch.from_numpy(image) - black, int(target),
                                         alphas)[0, 0].numpy() for image, target in zip(images, targets)])

    def randomized(self, directory):
        raise NotImplementedError("the eager timing runs without the sanity check")


def _shifted(model, black):
    """model(black + x) as a module (its layers keep their names under `model.`)."""
    import torch

    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(black + x)

    return Shifted()


def evaluation_study(small: bool = False, providers=None, log=print) -> dict:
    import torch

    from igcam_engine.benchmarks.models import build_model, model_shape
    from igcam_engine.export import from_torch

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        data = shipped_set(Path(workdir) / "shipped", composites=COMPOSITES)
        for name in EVALUATION_MODELS:
            model, layer, preprocess = build_model(name)
            shape = model_shape(name)
            bundle = from_torch(model, layer, shape, Path(workdir) / name, preprocess=preprocess)
            log(f"  {name} ({shape[1]}x{shape[2]}, {layer}): evaluating ...")
            started = time.perf_counter()
            report = evaluate(bundle, data, methods=METHODS, steps=STEPS, only_correct=True, limit=8 if small else None,
                              sanity_images=4 if small else SANITY_IMAGES, backend=BackendOptions(providers), keep_maps=0)
            report.pop("kept")
            entry = {"model": name, "layer": layer, "input": list(shape), "seconds": time.perf_counter() - started,
                     "counts": report["counts"], "summary": report["summary"], "timing": report["seconds"]}
            if name == EVALUATION_MODELS[0]:
                entry["eager"] = _engine_vs_eager(bundle, data, model, layer, shape, preprocess,
                                                  4 if small else EAGER_IMAGES, providers, log)
            results.append(entry)
            log(f"  {name}: {report['counts']['evaluated']} images in {entry['seconds']:.0f} s")
    return {"machine": machine(), "torch_threads": torch.get_num_threads(), "methods": [c.label for c in configs(METHODS, STEPS)],
            "composites": COMPOSITES, "results": results}


def _engine_vs_eager(bundle, data, model, layer, shape, preprocess, images, providers, log) -> dict:
    """The same metrics (no sanity check) on the same correctly classified images, engine then eager."""
    eager = EagerModel(copy.deepcopy(model).eval(), layer, shape, preprocess)
    timings = {}
    for label, subject in (("engine", bundle), ("eager", eager)):
        started = time.perf_counter()
        report = evaluate(subject, data, methods=("igcam", "gradcam"), steps=(50,), only_correct=True,
                          limit=images, sanity=False, backend=BackendOptions(providers), keep_maps=0)
        timings[label] = {"seconds": time.perf_counter() - started, "evaluated": report["counts"]["evaluated"],
                          "summary": report["summary"], "stages": report["seconds"]}
    timings["speedup"] = timings["eager"]["seconds"] / timings["engine"]["seconds"]
    log(f"  engine {timings['engine']['seconds']:.1f} s, eager {timings['eager']['seconds']:.1f} s "
        f"(x{timings['speedup']:.1f}) on {timings['engine']['evaluated']} images")
    return timings


def markdown(report: dict) -> str:
    lines = []
    for entry in report["results"]:
        counts = entry["counts"]
        lines += [f"**{entry['model']}** ({entry['input'][1]}×{entry['input'][2]}, layer {entry['layer']}): "
                  f"{counts['evaluated']} correctly classified images of {counts['entries']} entries, "
                  f"{entry['seconds']:.0f} s (maps {entry['timing']['maps']:.0f} s, perturbed images "
                  f"{entry['timing']['perturbations']:.0f} s, sanity {entry['timing']['sanity']:.0f} s)", "",
                  *summary_table(entry["summary"])]
        lines.append("")
        if "eager" in entry:
            e = entry["eager"]
            lines += [f"Engine against PyTorch eager, same metrics (IG-CAM m = 50 and Grad-CAM, no sanity check) on the "
                      f"same {e['engine']['evaluated']} images: engine {e['engine']['seconds']:.1f} s, PyTorch eager "
                      f"{e['eager']['seconds']:.1f} s (×{e['speedup']:.1f}); mean deletion AUC engine / eager: " +
                      ", ".join(f"{label} {e['engine']['summary'][label]['deletion']['mean']:.4f} / "
                                f"{e['eager']['summary'][label]['deletion']['mean']:.4f}" for label in e["engine"]["summary"]),
                      ""]
    return "\n".join(lines)
