"""`igcam bench methods` runs against pytorch-grad-cam and writes its table; its rows time equal work: the engine's
maps and pytorch-grad-cam's agree for every method (IG-CAM: its GradCAM looped over the path)."""
import json

from igcam_engine.apps.cli import main


def test_bench_methods_runs_small_and_compares_equal_maps(tmp_path):
    code = main(["bench", "methods", "--small", "--models", "mobilenet_v2", "--steps", "4", "--repeats", "1",
                 "--warmup", "0", "-o", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "methods.json").read_text())
    (entry,) = report["results"]
    rows = {row["method"]: row for row in entry["rows"]}
    assert set(rows) == {"gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam",
                         "ablationcam", "igcam (m=4)"}
    for method, row in rows.items():
        assert row["engine"]["median_s"] > 0 and row["peer"]["median_s"] > 0
        assert abs(row["ratio"] - row["peer"]["median_s"] / row["engine"]["median_s"]) < 1e-9
        if method != "eigencam":  # pytorch-grad-cam keeps SVD's arbitrary sign (README "Methods")
            assert row["normalized_error"] <= 1e-3, (method, row["normalized_error"])
    table = (tmp_path / "methods.md").read_text()
    assert "| mobilenet_v2 (features.18) | scorecam |" in table
