"""The files an explanation leaves behind, shared by `igcam explain` and `igcam batch`: per class an overlay
(<name>.class<C>.png) and the raw map (<name>.class<C>.npy, float32 H x W), and a summary entry; and the checks
made on the output folder before any model runs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from igcam_engine.errors import OptionError
from igcam_engine.images import overlay_on_photo
from igcam_engine.targets import class_probabilities


def prepare_output(output) -> Path:
    """The output folder, created if needed; one line when it cannot be (a file, under a file, not writable)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise OptionError(f"output '{output}' exists and is not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OptionError(f"cannot create the output folder '{output}': {e.strerror or e}") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise OptionError(f"the output folder '{output}' is not writable")
    return output


def unique_names(paths) -> list[str]:
    """An output name per input file: its stem, with -2, -3... where stems collide (never another input's stem)."""
    stems = [Path(p).stem for p in paths]
    reserved, taken, names = set(stems), set(), []
    for stem in stems:
        name, counter = stem, 2
        while name in taken or (name != stem and name in reserved):
            name, counter = f"{stem}-{counter}", counter + 1
        taken.add(name)
        names.append(name)
    return names


def render_explanation(name: str, picture, shown, maps, targets, scores, explainer, folder: str):
    """(the summary entry of one image: prediction, probability and per class its files, named under `folder`;
    {file name: bytes} of its overlays and raw maps). The bytes are written by the caller: into a local folder
    (write_explanation), or wherever `igcam batch` keeps its output."""
    import io

    order = np.argsort(-scores)
    probabilities = class_probabilities(scores)
    entry = {"predicted": int(order[0]), "label": explainer.label(int(order[0])),
             "probability": float(probabilities[order[0]]), "precision": explainer.precision, "maps": []}
    files = {}
    for class_index, heatmap in zip(targets, maps):
        class_index = int(class_index)
        png, npy = f"{name}.class{class_index}.png", f"{name}.class{class_index}.npy"
        buffer = io.BytesIO()
        overlay_on_photo(picture, shown, heatmap, explainer.preprocess).save(buffer, format="PNG")
        files[png] = buffer.getvalue()
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(heatmap, np.float32))
        files[npy] = buffer.getvalue()
        entry["maps"].append({"target": class_index, "label": explainer.label(class_index),
                              "probability": float(probabilities[class_index]), "overlay": f"{folder}/{png}",
                              "map": f"{folder}/{npy}"})
    return entry, files


def write_explanation(output: Path, name: str, picture, shown, maps, targets, scores, explainer) -> dict:
    """Writes the overlays and maps of one image into the folder `output`; returns its summary entry."""
    entry, files = render_explanation(name, picture, shown, maps, targets, scores, explainer, str(output))
    for file, data in files.items():
        (output / file).write_bytes(data)
    return entry
