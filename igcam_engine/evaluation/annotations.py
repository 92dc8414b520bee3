"""Annotated images for `igcam evaluate`: a folder with a CSV or COCO-style JSON manifest (docs/evaluation.md,
format), read as untrusted input, and the shipped localization set built from the package's photos.

Every problem with one entry (a box outside its image, an unknown class, a missing or unreadable file, a file name
leading out of the folder) is that entry's one-line error; the other entries are still evaluated. Problems with the
manifest as a whole (unreadable, no header, too large) are one error for the whole run.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from igcam_engine.data import localization_dir, localization_photos
from igcam_engine.errors import InputError, LimitError, NotFound, OptionError, UserError
from igcam_engine.images import load_image
from igcam_engine.validators import class_indices

MANIFEST_NAMES = ("manifest.csv", "annotations.json")
MAX_MANIFEST_BYTES = 64 << 20
MAX_ENTRIES = 100_000
CSV_COLUMNS = ("file", "class", "x0", "y0", "x1", "y1")


@dataclass
class Entry:
    """One image and one class to explain, with its object: boxes (x0, y0, x1, y1 in the file's pixels, x1 and y1
    exclusive) and/or mask files (non-zero pixels are the object). `classes` are the accepted class indices (the
    explained target is the most probable of them); `error` is set when the entry cannot be evaluated."""

    file: Path
    where: str  # "manifest.csv line 3", for messages
    classes: tuple = ()
    boxes: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    error: str | None = None

    def object_mask(self, size) -> np.ndarray:
        """The object as bool [height, width] of the image file (size = (width, height)); checks the boxes and
        masks against that size."""
        width, height = size
        mask = np.zeros((height, width), bool)
        for x0, y0, x1, y1 in self.boxes:
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise InputError(f"box ({x0}, {y0}, {x1}, {y1}) does not lie inside the {width}x{height} "
                                "image; boxes are x0,y0,x1,y1 pixels with 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height")
            mask[int(np.floor(y0)):int(np.ceil(y1)), int(np.floor(x0)):int(np.ceil(x1))] = True
        for path in self.masks:
            picture = load_image(path)
            if picture.size != (width, height):
                raise InputError(f"mask '{path.name}' is {picture.width}x{picture.height}, its image "
                                f"{width}x{height}; a mask has its image's size")
            mask |= np.asarray(picture).max(axis=2) > 0
        if not mask.any():
            raise InputError("the object mask is empty (a mask needs non-zero pixels)")
        return mask


def read_annotations(source, num_classes: int, labels=None) -> tuple[Path, list[Entry]]:
    """(the data folder, its entries) from a folder holding manifest.csv or annotations.json, or from such a file
    (image names are relative to the folder the manifest is in)."""
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise OptionError(f"annotated data is a folder or manifest path, got {source!r:.80}")
    source = Path(source)
    if source.is_dir():
        found = [source / name for name in MANIFEST_NAMES if (source / name).is_file()]
        if not found:
            raise NotFound(f"'{source}' has no {' or '.join(MANIFEST_NAMES)}: see docs/evaluation.md for the format")
        manifest = found[0]
    elif source.is_file():
        manifest = source
    else:
        raise NotFound(f"no such data folder or manifest: '{source}'")
    if manifest.stat().st_size > MAX_MANIFEST_BYTES:
        raise LimitError(f"'{manifest}' is {manifest.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"'{manifest}' is not UTF-8 text") from None
    classes = _ClassNames(num_classes, labels)
    folder = manifest.parent
    if manifest.suffix.lower() == ".json":
        entries = _coco_entries(text, manifest.name, folder, classes)
    elif manifest.suffix.lower() == ".csv":
        entries = _csv_entries(text, manifest.name, folder, classes)
    else:
        raise InputError(f"'{manifest}': a manifest is a .csv or a COCO-style .json file")
    if not entries:
        raise InputError(f"'{manifest}' lists no images")
    if len(entries) > MAX_ENTRIES:
        raise LimitError(f"'{manifest}' lists {len(entries)} entries, more than {MAX_ENTRIES}")
    return folder, entries


class _ClassNames:
    """Class indices from manifest values: an integer index, or a label of the bundle (exact name)."""

    def __init__(self, num_classes: int, labels):
        self.num_classes = num_classes
        self.by_name = {} if not labels else {name: i for i, name in reversed(list(enumerate(labels)))}

    def parse(self, value) -> tuple:
        found = []
        for part in str(value).split("|"):
            part = part.strip()
            if part.lstrip("-").isdigit():
                index = int(class_indices(int(part), self.num_classes, "class"))
            elif part in self.by_name:
                index = self.by_name[part]
            else:
                raise InputError(f"unknown class {part!r}: give a class index in [0, {self.num_classes - 1}] or one of "
                                "the bundle's labels (several separated by '|')")
            found.append(index)
        return tuple(dict.fromkeys(found))


def _inside(folder: Path, name, where: str) -> Path:
    """The file `name` inside `folder`: relative, no '..', no link leading out."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise InputError(f"{where}: a file name must be a non-empty string, got {name!r}")
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise InputError(f"{where}: file '{name}' must be a path relative to the data folder, without '..'")
    path = folder / relative
    try:
        resolved, root = path.resolve(), folder.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a link loop
        raise InputError(f"{where}: cannot resolve '{name}': {getattr(e, 'strerror', None) or e}") from None
    if root not in resolved.parents:
        raise InputError(f"{where}: file '{name}' leads out of the data folder (a link?)")
    return path


def _number(value, what: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {what} must be a number, got {value!r}") from None
    if not np.isfinite(number):
        raise InputError(f"{where}: {what} must be finite, got {value!r}")
    return number


def _grouped(rows) -> list[Entry]:
    """Rows of (file, classes, box, mask, where, error) -> one entry per (file, classes), boxes and masks merged."""
    entries, index = [], {}
    for file, classes, box, mask, where, error in rows:
        if error is not None:
            entries.append(Entry(file=file or Path("?"), where=where, error=error))
            continue
        key = (file, classes)
        if key not in index:
            index[key] = len(entries)
            entries.append(Entry(file=file, where=where, classes=classes))
        entry = entries[index[key]]
        if box is not None:
            entry.boxes.append(box)
        if mask is not None:
            entry.masks.append(mask)
    return entries


def _csv_entries(text: str, name: str, folder: Path, classes: _ClassNames) -> list[Entry]:
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if "file" not in header or "class" not in header or not (set(CSV_COLUMNS[2:]) <= set(header) or "mask" in header):
        raise InputError(f"'{name}' needs a header with file,class and either x0,y0,x1,y1 (a box) or mask (a mask "
                        f"image) columns; got {header}")
    rows = []
    for line, row in enumerate(reader, start=2):
        where = f"{name} line {line}"
        file = None
        try:
            file = _inside(folder, row.get("file"), where)
            accepted = _with_where(classes.parse, row.get("class"), where)
            has_box = any((row.get(c) or "").strip() for c in CSV_COLUMNS[2:])
            box = tuple(_number(row.get(c), c, where) for c in CSV_COLUMNS[2:]) if has_box else None
            mask = _inside(folder, row["mask"], where) if (row.get("mask") or "").strip() else None
            if box is None and mask is None:
                raise InputError(f"{where}: give a box (x0,y0,x1,y1) or a mask file")
            rows.append((file, accepted, box, mask, where, None))
        except UserError as e:
            rows.append((file, (), None, None, where, str(e)))
    return _grouped(rows)


def _coco_entries(text: str, name: str, folder: Path, classes: _ClassNames) -> list[Entry]:
    """COCO-style: images [{id, file_name}], annotations [{image_id, category_id, bbox [x, y, w, h]}], optional
    categories [{id, name}]: a category whose name is a bundle label means that class, else its id is the class
    index."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"'{name}' is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"'{name}' nests its JSON too deeply to be an annotation file") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list) \
            or not isinstance(document.get("annotations"), list):
        raise InputError(f"'{name}' must be a JSON object with lists 'images' and 'annotations' (COCO style)")
    names = {}
    for category in document.get("categories") or []:
        if isinstance(category, dict) and isinstance(category.get("id"), (int, str)):
            names[category["id"]] = category.get("name")
    images = {}
    for n, image in enumerate(document["images"]):
        if isinstance(image, dict) and isinstance(image.get("id"), (int, str)):
            images[image["id"]] = image.get("file_name")
    rows = []
    for n, annotation in enumerate(document["annotations"]):
        where = f"{name} annotation {n}"
        file = None
        try:
            if not isinstance(annotation, dict):
                raise InputError(f"{where}: an annotation is an object with image_id, category_id and bbox")
            image_id = annotation.get("image_id")
            if not isinstance(image_id, (int, str)) or image_id not in images:
                raise InputError(f"{where}: image_id {image_id!r} is not among the images")
            file = _inside(folder, images[image_id], where)
            category = annotation.get("category_id")
            label = names.get(category) if isinstance(category, (int, str)) else None
            accepted = _with_where(classes.parse, label if isinstance(label, str) and label in classes.by_name else category, where)
            bbox = annotation.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise InputError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
            x, y, w, h = (_number(v, "bbox", where) for v in bbox)
            rows.append((file, accepted, (x, y, x + w, y + h), None, where, None))
        except UserError as e:
            rows.append((file, (), None, None, where, str(e)))
    return _grouped(rows)


def _with_where(parse, value, where):
    try:
        return parse(value)
    except UserError as e:
        raise InputError(f"{where}: {e}") from None


# The shipped set: photos of the package with hand-checked boxes (data/localization/boxes.csv), and composites of
# their objects pasted at random places and scales on the package's textures, the boxes known by construction.
COMPOSITE_SIZE = 320
TEXTURES = ("grass.png", "gravel.png", "brick.png")


def shipped_set(directory, composites: int = 240, seed: int = 0) -> Path:
    """Writes the shipped localization set into `directory` (the photos, `composites` composites, manifest.csv) and
    returns it; an existing complete set with the same parameters is reused."""
    directory = Path(directory)
    stamp = directory / "built.json"
    wanted = {"composites": composites, "seed": seed, "size": COMPOSITE_SIZE}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    photos = localization_photos()
    rows = []
    objects = []
    for photo in photos:
        source = Image.open(photo["file"]).convert("RGB")
        target = f"photo-{photo['file'].stem}.png"
        source.save(directory / target)
        box = tuple(int(photo[c]) for c in CSV_COLUMNS[2:])
        rows.append((target, photo["class"], box))
        objects.append((source.crop(box), photo["class"]))
    textures = [Image.open(localization_dir() / name).convert("RGB") for name in TEXTURES]
    rng = np.random.default_rng(seed)
    for n in range(composites):
        crop, accepted = objects[n % len(objects)]
        texture = textures[(n // len(objects)) % len(textures)]
        left, top = (int(rng.integers(0, texture.width - COMPOSITE_SIZE + 1)),
                     int(rng.integers(0, texture.height - COMPOSITE_SIZE + 1)))
        canvas = texture.crop((left, top, left + COMPOSITE_SIZE, top + COMPOSITE_SIZE))
        scale = rng.uniform(0.45, 0.9) * COMPOSITE_SIZE / max(crop.size)
        size = (max(8, round(crop.width * scale)), max(8, round(crop.height * scale)))
        piece = crop.resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            piece = piece.transpose(Image.FLIP_LEFT_RIGHT)
        x, y = int(rng.integers(0, COMPOSITE_SIZE - size[0] + 1)), int(rng.integers(0, COMPOSITE_SIZE - size[1] + 1))
        canvas.paste(piece, (x, y))
        target = f"composite-{n:04d}.png"
        canvas.save(directory / target)
        rows.append((target, accepted, (x, y, x + size[0], y + size[1])))
    with open(directory / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        writer.writerows([file, accepted, *box] for file, accepted, box in rows)
    stamp.write_text(json.dumps(wanted))
    return directory
