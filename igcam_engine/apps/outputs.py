"""The files an explanation leaves behind, shared by `igcam explain` and `igcam batch`: per target an overlay
(<name>.<target>.png: class285, box17.class0, concept, ...; a detection's box drawn) and the raw map
(<name>.<target>.npy, float32 H x W), and a summary entry; and the checks made on the output folder before any
model runs."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from igcam_engine.detections import HEADS, decode
from igcam_engine.errors import OptionError, UserError
from igcam_engine.images import overlay_on_photo
from igcam_engine.targets import (
    BoxScoreTarget,
    ClassifierOutputTarget,
    SemanticSegmentationTarget,
    class_probabilities,
    predicted_masks,
)


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


def prediction(explainer, outputs: list) -> dict:
    """What the model says of one image (its outputs, each without the batch), by the bundle's task: a classifier's
    predicted class and probability (and its top 5), a segmenter's classes by the share of pixels predicted, a detector's
    detections; nothing for embeddings and plain outputs."""
    manifest, task = explainer.manifest, explainer.task
    if task == "classification":
        scores = outputs[0]
        probabilities = class_probabilities(scores)
        order = [int(c) for c in np.argsort(-scores, kind="stable")[:5]]
        return {"predicted": order[0], "label": explainer.label(order[0]), "probability": float(probabilities[order[0]]),
                "top": [{"class": c, "label": explainer.label(c), "probability": float(probabilities[c])}
                        for c in order]}
    if task == "segmentation":
        predicted = predicted_masks(manifest.outputs[0], outputs[0][None])[0]
        areas = np.bincount(predicted[predicted >= 0].ravel(), minlength=manifest.num_classes) / predicted.size
        return {"classes": [{"class": int(c), "label": explainer.label(int(c)), "share": round(float(areas[c]), 6)}
                            for c in np.argsort(-areas, kind="stable")[:5] if areas[c] > 0]}
    if task == "detection":
        found = decode(HEADS[manifest.task.detector], [o[None] for o in outputs], manifest.input.shape[1:])
        return {"detections": [d.record(manifest.labels) for d in found]}
    return {}


SHOWN_VALUES = 64  # a target's arrays up to this size are written out in results, larger ones summarised


def map_entry(target, explainer, outputs: list) -> dict:
    """A map's summary: its target (JSON, its large arrays summarised), what the target names, its score and, for a
    classifier's class, its probability."""
    record = target.to_json()
    for name, value in vars(target).items():  # a mask, an embedding, dense weights: summarised, not repeated
        if isinstance(value, np.ndarray) and value.size > SHOWN_VALUES:
            record[name] = (f"{int(np.count_nonzero(value))} of {value.size} pixels" if name == "mask"
                            else f"{value.size} values")
    entry = {"target": record, "name": target.describe(explainer.manifest),
             "score": float(target.score(explainer.manifest, [o[None] for o in outputs])[0])}
    if isinstance(target, (ClassifierOutputTarget, SemanticSegmentationTarget, BoxScoreTarget)) \
            and explainer.num_classes and target.output is None:
        entry["label"] = explainer.label(target.category)
    if explainer.task == "classification" and isinstance(target, ClassifierOutputTarget) and target.output is None:
        entry["probability"] = float(class_probabilities(outputs[0])[target.category])
    return entry


def render_explanation(name: str, picture, shown, maps, targets, outputs, explainer, folder: str):
    """(the summary entry of one image: the model's prediction and per target its files, named under `folder`;
    {file name: bytes} of its overlays and raw maps). `targets`: the image's (igcam_engine.targets), one per map;
    `outputs`: its model outputs (each without the batch). The bytes are written by the caller: into a local folder
    (write_explanation), or wherever `igcam batch` keeps its output."""
    import io

    entry = {**prediction(explainer, outputs), "precision": explainer.precision, "maps": []}
    files = {}
    for target, heatmap in zip(targets, maps):
        png, npy = f"{name}.{target.slug}.png", f"{name}.{target.slug}.npy"
        boxes = [(target.box, target.describe(explainer.manifest))] if getattr(target, "box", None) is not None else []
        buffer = io.BytesIO()
        overlay_on_photo(picture, shown, heatmap, explainer.preprocess, boxes).save(buffer, format="PNG")
        files[png] = buffer.getvalue()
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(heatmap, np.float32))
        files[npy] = buffer.getvalue()
        entry["maps"].append({**map_entry(target, explainer, outputs), "overlay": f"{folder}/{png}",
                              "map": f"{folder}/{npy}"})
    return entry, files


def write_explanation(output: Path, name: str, picture, shown, maps, targets, outputs, explainer) -> dict:
    """Writes the overlays and maps of one image into the folder `output`; returns its summary entry."""
    entry, files = render_explanation(name, picture, shown, maps, targets, outputs, explainer, str(output))
    for file, data in files.items():
        (output / file).write_bytes(data)
    return entry


def explain_images(explainer, images: np.ndarray, choice, options) -> list:
    """Per image of a batch (model input [B, C, H, W]), (its targets, its maps [T, H, W], its outputs (each
    without the batch)) or the UserError that stopped it: the outputs in one engine call, each image's targets
    chosen by `choice` (a checked TargetChoice), then one explain call per group of images with as many targets (a
    detector's top k may find fewer)."""
    results: list = [None] * len(images)
    try:
        outputs = explainer.model_outputs(images)
    except UserError as e:
        return [e] * len(images)
    chosen = {}
    for n in range(len(images)):
        try:
            chosen[n] = choice.select(explainer.manifest, [o[n:n + 1] for o in outputs])[0]
        except UserError as e:
            results[n] = e
    groups: dict = {}
    for n, targets in chosen.items():
        groups.setdefault(len(targets), []).append(n)
    for members in groups.values():
        try:
            maps = explainer.explain(images[members], [chosen[n] for n in members], options)
        except UserError as e:  # e.g. maps that overflow float32: the whole group was asked the same
            for n in members:
                results[n] = e
            continue
        for position, n in enumerate(members):
            results[n] = (chosen[n], maps[position], [o[n] for o in outputs])
    return results
