"""The files an explanation leaves behind, shared by `igcam explain` and `igcam batch`: per class an overlay
(<stem>.class<C>.png) and the raw map (<stem>.class<C>.npy, float32 H x W), and a summary entry."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from igcam_engine.images import overlay_on_photo, save_png


def class_probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of class scores."""
    exponentials = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def write_explanation(output: Path, stem: str, picture, shown, maps, targets, scores, explainer) -> dict:
    """Writes the overlays and maps of one image; returns its summary (prediction, probability, files)."""
    order = np.argsort(-scores)
    probabilities = class_probabilities(scores)
    entry = {"predicted": int(order[0]), "label": explainer.label(int(order[0])),
             "probability": float(probabilities[order[0]]), "maps": []}
    for class_index, heatmap in zip(targets, maps):
        class_index = int(class_index)
        png = save_png(overlay_on_photo(picture, shown, heatmap, explainer.preprocess),
                       output / f"{stem}.class{class_index}.png")
        np.save(output / f"{stem}.class{class_index}.npy", heatmap)
        entry["maps"].append({"target": class_index, "label": explainer.label(class_index), "overlay": str(png),
                              "map": str(output / f"{stem}.class{class_index}.npy")})
    return entry
