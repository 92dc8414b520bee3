"""igcam bench: the peers compute the same maps as the engine (so the timings compare equal work), and each
study runs and writes its files."""
import json

import numpy as np
import pytest
import torch
from reference import max_normalized_difference

from igcam_engine import Explainer, zoo
from igcam_engine.apps.cli import main
from igcam_engine.benchmarks.recipes import official_recipe, tuned_recipe
from igcam_engine.export import from_torch


@pytest.mark.parametrize("recipe", [official_recipe, tuned_recipe])
def test_pytorch_peers_compute_the_official_map(recipe, tmp_path):
    torch.manual_seed(0)
    model = zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1)).eval()
    shape = (3, 64, 64)
    explainer = Explainer(from_torch(model, "layer4", shape, tmp_path))
    image = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    alphas = torch.arange(8, dtype=torch.float32) / 8
    peer = recipe(model, "layer4", torch.from_numpy(image[0]), 3, alphas)[0, 0].detach().numpy()
    assert max_normalized_difference(peer[None], explainer.explain(image, 3, steps=8)) <= 1e-3


def test_bench_help_names_every_study(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for kind in ("latency", "quadrature", "adaptive", "targets", "all", "benchmarks/RESULTS.md"):
        assert kind in text


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


def test_quadrature_and_adaptive_studies_on_a_small_case(tmp_path):
    from igcam_engine.benchmarks.quadrature import (
        adaptive_markdown,
        adaptive_study,
        quadrature_markdown,
        quadrature_study,
    )

    torch.manual_seed(0)
    model = zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1)).eval()
    explainer = Explainer(from_torch(model, "layer4", (3, 64, 64), tmp_path))
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    cases = [("small resnet", explainer, images, np.array([1, 2]))]
    report = quadrature_study((1, 2, 4, 64), reference_steps=64, cases=cases, log=lambda *_: None)
    # Gauss-Legendre with as many nodes as the reference is the reference: zero error, found within target
    assert report["smallest_passes_within_target"]["gauss-legendre"] <= 64
    gl64 = [r for r in report["rows"] if r["rule"] == "gauss-legendre" and r["passes"] == 64]
    assert gl64[0]["max_delta"] < 1e-6
    assert "| gauss-legendre |" in quadrature_markdown(report)
    adaptive = adaptive_study(tolerances=(0.05,), reference_steps=64, cases=cases, log=lambda *_: None)
    assert all(r["passes"] >= 2 for r in adaptive["rows"]) and "| small resnet |" in adaptive_markdown(adaptive)
