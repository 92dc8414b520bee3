"""Data shipped with the package: sample photos, the ImageNet class names, and the localisation set's photo, textures
and hand-checked boxes (localisation/, read by igcam_engine.evaluate.annotations); sources and licences in
ATTRIBUTION.md."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg")


def sample_images() -> list[Path]:
    """The sample photos (scikit-image's chelsea, coffee, rocket), sorted by name."""
    folder = resources.files(__name__) / "samples"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, index = class."""
    return (resources.files(__name__) / "imagenet_labels.txt").read_text().splitlines()
