"""`igcam explain`: image files -> per image and class an overlay and a raw map, plus results.json."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.apps.outputs import write_explanation
from igcam_engine.errors import UserError
from igcam_engine.images import load_image, to_model_input


def _progress(items, label):
    """Yields items, drawing a progress bar on stderr when it is a terminal."""
    items = list(items)
    show = sys.stderr.isatty()
    for done, item in enumerate(items):
        if show:
            filled = int(30 * done / max(len(items), 1))
            print(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{len(items)}", end="", file=sys.stderr)
        yield item
    if show:
        print(f"\r{label} [{'#' * 30}] {len(items)}/{len(items)}", file=sys.stderr)


def explain_files(bundle, image_paths, output: Path, *, target=None, top_k=None, method="igcam", variant="official",
                  rule=None, steps=50, baseline="black", batch_size=None, providers=None, fp16=False, tf32=False,
                  engine_cache=None, placement=False, tolerance=0.01) -> list[dict]:
    """Explains image files with a bundle; writes <name>.class<C>.png overlays, .npy raw maps and results.json."""
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {top_k}")
    explainer = Explainer(bundle, providers=providers, fp16=fp16, tf32=tf32, engine_cache=engine_cache)
    if placement:
        for graph, by_provider in explainer.placement().items():
            for provider, ops in by_provider.items():
                print(f"{graph}.onnx on {provider}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
    output.mkdir(parents=True, exist_ok=True)
    results, stems = [], set()
    for path in _progress(image_paths, "explaining"):
        picture = load_image(path)
        image, shown = to_model_input(picture, explainer.input_shape, explainer.preprocess)
        started = time.perf_counter()
        scores = explainer.predict(image)[0]
        order = np.argsort(-scores)
        targets = [target] if target is not None else list(order[: top_k or 1])
        passes = 1 if method == "gradcam" else steps
        if steps == "auto":
            if method != "igcam":
                raise UserError("--steps auto refines the IG-CAM integral; use it with --method igcam")
            result = explainer.explain_adaptive(image[None], np.array([targets]), tolerance=tolerance, rule=rule,
                                                variant=variant, baseline=baseline, batch_size=batch_size)
            maps, passes = result.maps[0], result.passes
        else:
            maps = explainer.explain(image[None], np.array([targets]), method=method, variant=variant, rule=rule,
                                     steps=steps, baseline=baseline, batch_size=batch_size)[0]
        elapsed = time.perf_counter() - started
        stem = Path(path).stem
        stem = stem if stem not in stems else f"{stem}-{len(stems)}"
        stems.add(stem)
        entry = {"image": str(path), "seconds": elapsed, "passes": passes,
                 **write_explanation(output, stem, picture, shown, maps, targets, scores, explainer)}
        results.append(entry)
        print(f"{path}: predicted {entry['predicted']} '{entry['label']}' (p={entry['probability']:.2f}); "
              + ", ".join(f"map of {m['target']} -> {m['overlay']}" for m in entry["maps"])
              + f" [{elapsed:.2f} s, {passes} passes]")
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results
