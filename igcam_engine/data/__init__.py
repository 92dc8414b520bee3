"""Data shipped with the package: sample photos, the ImageNet class names, and the localization set's photo, textures
and hand-checked boxes (localization/, read by igcam_engine.evaluation.annotations); sources and licences in
ATTRIBUTION.md."""
from __future__ import annotations

import csv
import io
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


def localization_dir() -> Path:
    """The localization set's folder: its boxes, photo and textures."""
    return Path(str(resources.files(__name__))) / "localization"


def localization_photos() -> list[dict]:
    """The localization set's photos (the samples and camera.png) with their hand-checked box: rows of
    localization/boxes.csv (file, class, x0, y0, x1, y1), `file` made a path."""
    rows = list(csv.DictReader(io.StringIO((localization_dir() / "boxes.csv").read_text())))
    return [{**row, "file": localization_dir().parent / row["file"]} for row in rows]
