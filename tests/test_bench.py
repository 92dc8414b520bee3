"""igcam bench: the peers compute the same maps as the engine (so the timings compare equal work), and each
study runs and writes its files."""
import json

import numpy as np
import pytest
import torch
from support.comparisons import assert_maps_match, normalized
from support.reference import igcam_reference, randomized, top_classes

from igcam_engine import Explainer, zoo
from igcam_engine.apps.cli import main
from igcam_engine.benchmarks.recipes import official_recipe, tuned_recipe
from igcam_engine.export import from_torch


@pytest.mark.parametrize("recipe", [official_recipe, tuned_recipe])
def test_pytorch_peers_compute_the_official_map(recipe, tmp_path):
    """The peers compute the engine's map, scale included (the official recipe divides by m as the engine does)."""
    torch.manual_seed(0)
    model = zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1)).eval()
    shape = (3, 64, 64)
    explainer = Explainer(from_torch(model, "layer4", shape, tmp_path))
    image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    target = int(top_classes(model, image)[0, 0])
    alphas = torch.arange(8, dtype=torch.float32) / 8
    peer = recipe(model, "layer4", torch.from_numpy(image[0]), target, alphas)[0, 0].detach().numpy()
    assert_maps_match(peer[None], explainer.explain(image, target, steps=8), 1e-3, 1e-4)


def test_bench_help_names_every_study(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for kind in ("latency", "quadrature", "adaptive", "targets", "all", "benchmarks/RESULTS.md"):
        assert kind in text


@pytest.mark.slow
def test_bench_latency_and_targets_run_small(tmp_path):
    for kind in ("latency", "targets"):
        code = main(["bench", kind, "--small", "--models", "resnet50", "--steps", "2", "--peer-steps", "2",
                     "--batches", "1,2", "--repeats", "1", "--warmup", "0", "-o", str(tmp_path)])
        assert code == 0
    report = json.loads((tmp_path / "latency.json").read_text())
    configurations = report["results"][0]["configurations"]
    for key in ("floor", "ort_forward", "engine_m2", "tuned_pytorch", "official_pytorch", "engine_gradcam"):
        assert configurations[key]["median_s"] > 0 and len(configurations[key]["samples"]) == 1
    assert "torch" in report["machine"] and (tmp_path / "latency.md").read_text().startswith("| model")
    assert (tmp_path / "latency.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "targets.json").read_text())["rows"]) == 4


def test_bench_rejects_unknown_models(capsys):
    assert main(["bench", "latency", "--models", "alexnet", "-o", "x"]) == 2
    assert "unknown model(s) ['alexnet']" in capsys.readouterr().err


@pytest.mark.slow
def test_quadrature_and_adaptive_studies_on_a_small_case(tmp_path):
    """The study's reported errors against the same errors computed here from the float64 torch reference."""
    from igcam_engine.benchmarks.quadrature import (
        adaptive_markdown,
        adaptive_study,
        quadrature_markdown,
        quadrature_study,
    )
    from igcam_engine.quadrature import quadrature

    torch.manual_seed(0)
    model = randomized(zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1)))  # biases: maps change along the path
    explainer = Explainer(from_torch(model, "layer4", (3, 64, 64), tmp_path))
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    targets = top_classes(model, images)[:, 0]
    cases = [("small resnet", explainer, images, targets)]
    report = quadrature_study((1, 2, 4), reference_steps=32, cases=cases, log=lambda *_: None)

    def reference(rule, steps):
        alphas, weights = quadrature(rule, steps)
        return igcam_reference(model, "layer4", images, targets, alphas, weights, np.zeros((1, 3, 64, 64)), False)

    converged = reference("gauss-legendre", 32)
    for rule, steps in (("left", 2), ("midpoint", 4), ("gauss-legendre", 1)):
        (row,) = [r for r in report["rows"] if r["rule"] == rule and r["passes"] == steps]
        expected = float(np.abs(normalized(reference(rule, steps)) - normalized(converged)).max())
        assert expected > 1e-3, "the case must have a visible quadrature error"
        assert abs(row["max_delta"] - expected) <= 1e-3 * max(expected, 1e-2), (rule, steps, row, expected)
    assert "| gauss-legendre |" in quadrature_markdown(report)
    adaptive = adaptive_study(tolerances=(0.05,), reference_steps=32, cases=cases, log=lambda *_: None)
    for row in adaptive["rows"]:
        alphas, weights = quadrature(row["rule"], row["passes"])
        expected = float(np.abs(normalized(reference(row["rule"], row["passes"])) - normalized(converged)).max())
        assert abs(row["max_delta"] - expected) <= 1e-3 * max(expected, 1e-2)
    assert "| small resnet |" in adaptive_markdown(adaptive)
