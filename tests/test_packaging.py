"""The built wheel installs clean import paths: igcam_engine and igcam_engine.export, no top-level `export`."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("igcam_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"igcam_engine"}
    for required in ("igcam_engine/export/rules.py", "igcam_engine/data/samples/chelsea.png",
                     "igcam_engine/data/imagenet_labels.txt", "igcam_engine/data/ATTRIBUTION.md",
                     "igcam_engine/kernels/igcam.cu", "igcam_engine/kernels/igcam.ptx"):
        assert required in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "igcam = igcam_engine.cli:main" in entry_points
