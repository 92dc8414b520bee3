"""Several classes per image: k targets in one call (one backbone pass, k gradient passes) against k calls."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.benchmarks.measure import measure, ms
from igcam_engine.benchmarks.models import SHAPE, build_model


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


def markdown(report: dict) -> str:
    lines = [f"Several classes per image ({report['model']}, m = {report['steps']}, one image):", "",
             "| classes | one call | separate calls | saving |", "|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['targets']} | {ms(r['one_call_s'])} | {ms(r['separate_calls_s'])} | {r['speedup']:.2f}x |")
    return "\n".join(lines)
