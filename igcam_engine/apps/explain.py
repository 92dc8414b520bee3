"""`igcam explain`: image files -> per image and class an overlay and a raw map, plus results.json.

An image that cannot be read or explained is reported (one line on stderr and an entry with its error in
results.json) and the others are still explained; the options are checked, and the output folder prepared, before
the model runs."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.apps.outputs import prepare_output, unique_names, write_explanation
from igcam_engine.errors import UserError
from igcam_engine.explainer import adaptive_options, path_nodes
from igcam_engine.images import MAX_PIXELS, load_image, to_model_input
from igcam_engine.methods import check_channels


class Progress:
    """A progress bar on stderr when it is a terminal; `say` prints a result line on stdout without gluing it to
    the bar."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.shown = sys.stderr.isatty()

    def _draw(self):
        if self.shown:
            filled = int(30 * self.done / max(self.total, 1))
            print(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}", end="",
                  file=sys.stderr, flush=True)

    def _clear(self):
        if self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def say(self, line: str, error: bool = False):
        self._clear()
        print(line, file=sys.stderr if error else sys.stdout, flush=True)
        self._draw()

    def step(self):
        self.done += 1
        self._draw()

    def close(self):
        self._clear()


def explain_files(bundle, image_paths, output: Path, *, target=None, top_k=None, method="igcam", integrate=None,
                  variant="official", rule=None, steps=50, channels=None, baseline="black", batch_size=None,
                  providers=None, precision=None, fp16=False, tf32=False, engine_cache=None, placement=False, tolerance=0.01,
                  max_pixels=MAX_PIXELS) -> list[dict]:
    """Explains image files with a bundle; writes <name>.class<C>.png overlays, .npy raw maps and results.json
    (an entry per image: its prediction and maps, or its error)."""
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    if steps == "auto":
        row, passes = adaptive_options(method, variant, rule, tolerance, integrate=integrate)[0], None
    else:
        row, alphas = path_nodes(method, variant, rule, steps, integrate=integrate)[:2]
        passes = len(alphas)
    explainer = Explainer(bundle, providers=providers, precision=precision, fp16=fp16, tf32=tf32,
                          engine_cache=engine_cache)
    check_channels(channels, row, explainer.manifest["target_layer"]["shape"][0])
    options = dict(method=method, integrate=integrate, variant=variant, rule=rule, steps=steps, channels=channels,
                   baseline=baseline, batch_size=batch_size, tolerance=tolerance)
    output = prepare_output(output)
    if target is not None and not 0 <= target < explainer.num_classes:  # one error, not one per image
        raise UserError(f"--target must be a class index in [0, {explainer.num_classes - 1}], got {target}")
    if top_k is not None and top_k > explainer.num_classes:
        raise UserError(f"--top-k must be at most the model's {explainer.num_classes} classes, got {top_k}")
    if placement:
        for graph, by_provider in explainer.placement().items():
            for provider, ops in by_provider.items():
                print(f"{graph}.onnx on {provider}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
    results, progress = [], Progress(len(image_paths), "explaining")
    try:
        for path, name in zip(image_paths, unique_names(image_paths)):
            try:
                entry = _explain_one(explainer, path, name, output, target, top_k, options, passes, max_pixels)
            except UserError as e:
                results.append({"image": str(path), "error": str(e)})
                progress.say(f"igcam: error: {e}", error=True)
            else:
                results.append(entry)
                progress.say(f"{path}: predicted {entry['predicted']} '{entry['label']}' "
                             f"(p={entry['probability']:.2f}); "
                             + ", ".join(f"map of {m['target']} '{m['label']}' (p={m['probability']:.2f}) -> "
                                         f"{m['overlay']}" for m in entry["maps"])
                             + f" [{entry['seconds']:.2f} s, {entry['passes']} passes]")
            progress.step()
    finally:
        progress.close()
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _explain_one(explainer, path, name, output, target, top_k, options, passes, max_pixels) -> dict:
    """One image's files and summary entry; `passes` is the fixed number of path nodes (None: steps="auto",
    reported by the refinement)."""
    picture = load_image(path, max_pixels)
    image, shown = to_model_input(picture, explainer.input_shape, explainer.preprocess)
    started = time.perf_counter()
    scores = explainer.predict(image)[0]
    targets = [target] if target is not None else list(np.argsort(-scores)[: top_k or 1])
    if options["steps"] == "auto":
        adaptive = {key: value for key, value in options.items() if key not in ("steps", "channels")}
        result = explainer.explain_adaptive(image[None], np.array([targets]), **adaptive)
        maps, passes = result.maps[0], result.passes
    else:
        maps = explainer.explain(image[None], np.array([targets]), **options)[0]
    elapsed = time.perf_counter() - started
    return {"image": str(path), "seconds": elapsed, "passes": passes,
            **write_explanation(output, name, picture, shown, maps, targets, scores, explainer)}
