"""The quadrature study: map error against a converged reference (Gauss-Legendre, 256 nodes) as a function of the
number of forward passes, per rule, over several models and images, and the smallest m per rule within 1 %; and
the adaptive study: passes used by steps="auto" and the error of its maps against the same reference."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from igcam_engine import Explainer
from igcam_engine.benchmarks.measure import map_errors
from igcam_engine.benchmarks.models import SHAPE, build_model
from igcam_engine.data import sample_images
from igcam_engine.images import load_image, to_model_input
from igcam_engine.quadrature import RULES

QUADRATURE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
ERROR_TARGET = 0.01


def quadrature_cases(small=False):
    """(case name, explainer, images, targets): pretrained EfficientNet-Lite0 on the sample photos (two layers),
    and ResNet-50 (random weights) on the same photos."""
    from igcam_engine.export import from_torch

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
                delta, decorrelation = map_errors(explainer.explain(images, targets, rule=rule, steps=m), reference)
                rows.append({"case": case, "rule": rule, "passes": m, "max_delta": delta, "one_minus_corr": decorrelation})
        delta, decorrelation = map_errors(explainer.explain(images, targets, rule="left", steps=50), reference)
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
                delta, decorrelation = map_errors(result.maps, reference)
                rows.append({"case": case, "rule": rule, "tolerance": tolerance, "passes": result.passes,
                             "converged": result.converged, "max_delta": delta, "one_minus_corr": decorrelation})
                log(f"  {case} {rule} tol {tolerance}: {result.passes} passes, error {delta:.4f}")
    return {"reference": f"gauss-legendre, {reference_steps} nodes", "rows": rows}


def quadrature_markdown(report: dict) -> str:
    rows, steps = report["rows"], sorted({r["passes"] for r in report["rows"] if r["rule"] in RULES})

    def worst(metric, rule, m, case=None):
        values = [r[metric] for r in rows if r["rule"] == rule and r["passes"] == m and case in (None, r["case"])]
        return max(values) if values else None

    def smallest(metric, rule, case=None):
        return next((m for m in steps if (worst(metric, rule, m, case) or 1) <= ERROR_TARGET), f"> {steps[-1]}")

    lines = []
    for metric, title in (("max_delta", "normalized max |Δ|"), ("one_minus_corr", "1 − correlation")):
        lines += [f"Worst {title} over {len(report['cases'])} model/layer cases × {report['images']} photos, against "
                  f"{report['reference']}:", "",
                  "| rule | " + " | ".join(f"m={s}" for s in steps) + " | smallest m ≤ 1 % |", "|---" * (len(steps) + 2) + "|"]
        for rule in RULES:
            cells = [f"{worst(metric, rule, s):.4f}" if worst(metric, rule, s) is not None else "—" for s in steps]
            lines.append(f"| {rule} | " + " | ".join(cells) + f" | {smallest(metric, rule)} |")
        lines.append("")
    lines += ["Smallest m with normalized max |Δ| ≤ 1 %, per case:", "",
              "| case | " + " | ".join(RULES) + " |", "|---" * (len(RULES) + 1) + "|"]
    for case in report["cases"]:
        lines.append(f"| {case} | " + " | ".join(str(smallest("max_delta", rule, case)) for rule in RULES) + " |")
    left50 = [r for r in rows if r["rule"].startswith("left (")]
    lines += ["", "The official preset (left rule, m = 50) against the reference: " + "; ".join(
        f"{r['case']} max |Δ| {r['max_delta']:.4f}, 1 − corr {r['one_minus_corr']:.5f}" for r in left50) + "."]
    return "\n".join(lines)


def adaptive_markdown(report: dict) -> str:
    lines = [f"steps=\"auto\" against {report['reference']} (maps of 3 photos per case; error: worst normalized "
             "max |Δ|):", "", "| case | rule | tolerance | passes | converged | error |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['case']} | {r['rule']} | {r['tolerance']} | {r['passes']} | {r['converged']} | {r['max_delta']:.4f} |")
    return "\n".join(lines)


def plot(report: dict, axis) -> None:
    """Worst normalized error against the number of passes, one line per rule."""
    for rule in RULES:
        steps = sorted({r["passes"] for r in report["rows"] if r["rule"] == rule})
        worst = [max(r["max_delta"] for r in report["rows"] if r["rule"] == rule and r["passes"] == s) for s in steps]
        axis.loglog(steps, worst, marker="o", label=rule)
    axis.axhline(ERROR_TARGET, color="grey", linestyle="--", label="1 %")
    axis.set_xlabel("forward passes (m)")
    axis.set_ylabel("worst normalized max |Δ| vs reference")
