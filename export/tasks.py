"""What a model is for, read at export from its outputs (and its exporter's metadata) or stated: the bundle's
`task` (igcam_engine.bundle.TASKS) and each score map's layout.

- classification: one output [classes] (the default for a vector output; an embedding model is stated);
- segmentation: one output [C, h, w] or [h, w, C] whose grid is the input's at one stride (the layout read from the
  dims, or stated where both readings fit);
- detection: a dense head of a format of igcam_engine.detections, stated (detector=...) or read from ultralytics'
  metadata (task "detect");
- embedding: stated; outputs: anything else (targets are given explicitly).
"""
from __future__ import annotations

import ast

import onnx

from igcam_engine.bundle import TASKS, task_classes
from igcam_engine.detections import HEADS
from igcam_engine.errors import ModelError, OptionError
from igcam_engine.validators import choice

MAX_METADATA = 1 << 20  # characters of a metadata value read (ultralytics' class names)


def output_layout(shape: list, input_size, stated: str | None = None) -> str | None:
    """A score map's layout: "NCHW" when [C, h, w], "NHWC" when [h, w, C], where (h, w) is the input's grid at one
    stride (or upsampled to it); None for an output of another rank. A stated layout must fit; where both readings
    fit, the export refuses unless one is stated."""
    if len(shape) != 3:
        if stated is not None:
            raise OptionError(f"output_layout applies to a score map [C, h, w] or [h, w, C]; the output is {shape}")
        return None
    fits = {"NCHW": _grid(shape[1:], input_size), "NHWC": _grid(shape[:2], input_size)}
    if stated is not None:
        stated = choice(stated, "output_layout", ("NCHW", "NHWC"))
        if not fits[stated]:
            raise OptionError(f"output_layout {stated} reads {shape} as a grid that is not the input's {list(input_size)} "
                              "at one stride")
        return stated
    found = [layout for layout, fit in fits.items() if fit]
    if len(found) == 1:
        return found[0]
    if not found:
        return None
    raise ModelError(f"cannot tell whether the score map {shape} is [C, h, w] or [h, w, C]; state it: "
                     "output_layout='NCHW' or 'NHWC' (CLI --output-layout)")


def _grid(size, input_size) -> bool:
    """Whether (h, w) is the input's (H, W) divided (or multiplied) by one factor, rounding as strided layers do."""
    (h, w), (height, width) = size, input_size
    if h <= 1 or w <= 1:
        return False
    stride_h, stride_w = height / h, width / w
    return abs(stride_h - stride_w) <= 0.5 * max(stride_h, stride_w) / min(h, w) or (h, w) == (height, width)


def metadata(model: onnx.ModelProto) -> dict:
    """What ultralytics' exporter records (task, class names), or paddle2onnx's rapid* models (class names), read
    as untrusted text."""
    props = {p.key: p.value for p in model.metadata_props if len(p.value) <= MAX_METADATA}
    found = {}
    if props.get("task") in ("detect", "segment", "classify", "pose", "obb"):
        found["task"] = props["task"]
    try:
        names = ast.literal_eval(props["names"]) if "names" in props else None
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        names = None
    if isinstance(names, dict) and names and all(isinstance(k, int) for k in names) \
            and sorted(names) == list(range(len(names))):
        found["labels"] = [str(names[i]) for i in range(len(names))]
    elif props.get("character"):  # paddle2onnx models of the rapid* packages: class names one per line
        found["labels"] = props["character"].splitlines()
    return found


def task_of(outputs: list, input_size, meta: dict, task: str | None, detector: str | None,
            stated_layout: str | None) -> tuple[dict, list]:
    """(the manifest's task {kind, detector, classes}, each output's layout) for the kept outputs (Output), the
    exporter's metadata and what the user stated."""
    if task is not None:
        task = choice(task, "task", TASKS)
    if detector is not None:
        detector = choice(detector, "detector", tuple(HEADS))
        if task not in (None, "detection"):
            raise OptionError(f"detector applies to task 'detection', not '{task}'")
        task = "detection"
    if task is None and meta.get("task") == "detect":
        task, detector = "detection", "yolov8"
    first = outputs[0]
    layouts = [output_layout(o.shape, input_size, stated_layout if o is first else None) for o in outputs]
    if task is None:
        if len(outputs) == 1 and len(first.shape) == 1:
            task = "classification"
        elif len(outputs) == 1 and layouts[0] is not None:
            task = "segmentation"
        else:
            task = "outputs"
    if task == "detection" and detector is None:
        raise OptionError(f"task 'detection' needs the head's format: detector= one of {', '.join(HEADS)}")
    classes = task_classes(task, detector, [o.shape for o in outputs], layouts[0])
    if task == "classification" and classes is None:
        raise ModelError(f"a classifier's first output is class scores [classes]; '{first.source}' is "
                         f"{first.shape} (task='outputs' explains any output with explicit targets)")
    if task == "segmentation" and classes is None:
        raise ModelError(f"a segmenter's first output is a score map [C, h, w] or [h, w, C] on the input's grid; "
                         f"'{first.source}' is {first.shape} (state output_layout=..., CLI --output-layout)")
    if task == "detection" and classes is None:
        raise ModelError(f"the outputs {[o.shape for o in outputs]} are not a {detector} head's "
                         "(docs/targets.md#detectors): keep its raw outputs (outputs=[...]) or name another format")
    return {"kind": task, "detector": detector, "classes": classes}, layouts
