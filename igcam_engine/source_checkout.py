"""Importing the exporter, kernels, benchmarks and model zoo from a source checkout.

The repository keeps them beside this folder (export/, kernels/, benchmarks/, zoo/); the wheel installs them
inside it (igcam_engine/export/, ...). When Python imports igcam_engine from a checkout — an editable install, or
any install while the working directory is the repository root, where the checkout's igcam_engine/ shadows the
installed package — this finder maps igcam_engine.<name> to <root>/<name>, so the import paths are the same
either way.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SIBLINGS = ("export", "kernels", "benchmarks", "zoo")


class SiblingFinder(importlib.abc.MetaPathFinder):
    """Finds igcam_engine.<sibling> in the checkout's <root>/<sibling>/ (submodules then follow its __path__)."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != __package__ or name not in SIBLINGS:
            return None
        init = self.root / name / "__init__.py"
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def install(package_dir: str) -> None:
    """Installs the finder when the package was imported from a checkout (not from a wheel, whose package folder
    holds the siblings itself)."""
    package_dir = Path(package_dir)
    root = package_dir.parent
    if (package_dir / "export").is_dir() or not (root / "pyproject.toml").is_file():
        return
    if not all((root / name / "__init__.py").is_file() for name in SIBLINGS):
        return
    if not any(isinstance(finder, SiblingFinder) and finder.root == root for finder in sys.meta_path):
        sys.meta_path.insert(0, SiblingFinder(root))
