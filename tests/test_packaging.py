"""The wheel: clean import paths (igcam_engine and its subpackages, no top-level `export`), and the same import
paths from the repository root for a regular and an editable install alike (the checkout's igcam_engine/ shadows
an installed package there)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("export", "kernels", "benchmarks", "zoo", "apps")
# Imports the package and its subpackages and prints where each came from.
PROBE = "\n".join([
    "import importlib, sys",
    "for name in ('igcam_engine', " + ", ".join(f"'igcam_engine.{n}'" for n in SUBPACKAGES) + "):",
    "    print(name, importlib.import_module(name).__file__)",
    "print('editable', any('__editable__' in getattr(f, '__module__', '') for f in sys.meta_path))",
])
SKIP_IN_COPY = shutil.ignore_patterns(".git", ".venv*", "node_modules", "__pycache__", "build", "dist", "*.egg-info",
                                      ".pytest_cache", "igcam-demo")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel, built from a copy of the checkout so that the build leaves nothing in the source tree."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=SKIP_IN_COPY)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(root), str(source)],
                   check=True, capture_output=True, timeout=300)
    (path,) = root.glob("igcam_engine-*.whl")
    return path


@pytest.mark.slow
def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"igcam_engine"}
    for package, folder in (("igcam_engine", "igcam_engine"), ("igcam_engine/export", "export"),
                            ("igcam_engine/kernels", "kernels"), ("igcam_engine/benchmarks", "benchmarks"),
                            ("igcam_engine/zoo", "zoo")):
        for source in (ROOT / folder).rglob("*.py"):
            assert f"{package}/{source.relative_to(ROOT / folder).as_posix()}" in names, f"{source} is not packaged"
    for required in ("igcam_engine/export/rules/table.py", "igcam_engine/data/samples/chelsea.png",
                     "igcam_engine/data/imagenet_labels.txt", "igcam_engine/data/ATTRIBUTION.md",
                     "igcam_engine/kernels/igcam.cu", "igcam_engine/kernels/igcam.ptx",
                     "igcam_engine/benchmarks/latency.py", "igcam_engine/zoo/resnet.py", "igcam_engine/apps/cli.py",
                     "igcam_engine/evaluation/metrics.py", "igcam_engine/data/localization/boxes.csv",
                     *(f"igcam_engine/data/localization/{name}.png" for name in ("camera", "grass", "gravel", "brick"))):
        assert required in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "igcam = igcam_engine.apps.cli:main" in entry_points


def _probe(python, cwd, env=None) -> dict:
    """{module: file it was imported from, 'editable': whether a setuptools editable finder is active}."""
    result = subprocess.run([str(python), "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


@pytest.mark.slow
def test_regular_install_imports_from_the_repository_root(wheel, tmp_path):
    """`pip install .` (not editable) into a fresh virtualenv, then `python -c` from the repository root, where
    the checkout's igcam_engine/ comes first on sys.path, and from elsewhere, where the installed one does."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    # The dependencies (numpy, onnx, ...) come from this environment's site-packages as a plain path entry, which
    # runs none of its .pth files: no editable finder of this checkout is active in the throwaway environment.
    env = {**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    from_root = _probe(python, ROOT, env)
    assert from_root["editable"] == "False"
    assert from_root["igcam_engine"] == str(ROOT / "igcam_engine" / "__init__.py")
    for name, folder in (("export", "export"), ("kernels", "kernels"), ("benchmarks", "benchmarks"), ("zoo", "zoo")):
        assert from_root[f"igcam_engine.{name}"] == str(ROOT / folder / "__init__.py")
    elsewhere = _probe(python, tmp_path, env)
    for name in ("igcam_engine", *(f"igcam_engine.{n}" for n in SUBPACKAGES)):
        assert elsewhere[name].startswith(str(venv)), f"{name} came from {elsewhere[name]}"


@pytest.mark.slow
def test_editable_install_imports_from_the_repository_root(tmp_path):
    """The test environment's own install (scripts/setup.sh installs the checkout in editable mode)."""
    for cwd in (ROOT, tmp_path):
        found = _probe(sys.executable, cwd)
        assert found["editable"] == "True"
        assert found["igcam_engine.export"] == str(ROOT / "export" / "__init__.py")
        assert found["igcam_engine.zoo"] == str(ROOT / "zoo" / "__init__.py")
