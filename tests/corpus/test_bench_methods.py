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


def test_bench_tasks_runs_small_and_compares_equal_maps(tmp_path):
    """`igcam bench tasks`: a segmenter's and a detector's targets, the engine and pytorch-grad-cam agreeing."""
    code = main(["bench", "tasks", "--small", "--steps", "4", "--repeats", "1", "--warmup", "0", "-o", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "tasks.json").read_text())
    rows = {(entry["model"], row["method"]): row for entry in report["results"] for row in entry["rows"]}
    assert set(rows) == {("deeplabv3_mobilenet_v3_large", "gradcam"), ("deeplabv3_mobilenet_v3_large", "igcam (m=4)"),
                         ("yolov8n", "gradcam"), ("yolov8n", "igcam (m=4)"), ("yolov8n", "eigencam")}
    for (model, method), row in rows.items():
        if method != "eigencam":  # pytorch-grad-cam keeps SVD's arbitrary sign
            assert row["normalized_error"] <= 1e-3, (model, method, row["normalized_error"])
    assert "| yolov8n (model.9) |" in (tmp_path / "tasks.md").read_text()
