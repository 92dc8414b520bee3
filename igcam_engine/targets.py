"""What an explanation differentiates: a target is a scalar function of one image's model outputs, and the engine
computes the gradient of the outputs with the target's cotangent of them (its "seed", a vector-Jacobian product).

Targets are plain data (frozen dataclasses that serialize to JSON, named as pytorch-grad-cam names its targets so
that its users recognize them; docs/targets.md lists each with its JSON form and cost):

- ClassifierOutputTarget(category): a class score of an output [classes] (the logits: a final Softmax, LogSoftmax or
  Sigmoid is differentiated at its input);
- BinaryClassifierOutputTarget(category, index=0): +score (category 1) or -score (category 0) of a binary
  classifier's logit, or of label `index` of a sigmoid multi-label output;
- SemanticSegmentationTarget(category, mask=None): sum(scores[category] * mask) over a score map; no mask: the
  pixels where the model predicts the category in the explained image (resolved from its outputs);
- BoxScoreTarget(index, category, box=None, iou=False): a detection's score, the class's at the anchor or query that
  produced it (igcam_engine.detections), plus the IoU of the box there with `box` when `iou` (pytorch-grad-cam's
  FasterRCNNBoxScoreTarget adds the same term);
- SimilarityToConceptTarget(embedding): the cosine similarity of an output vector with a concept embedding (not
  linear in the outputs: its seed is computed from each interpolated image's outputs);
- LinearTarget(weights=None, indices=None): any linear functional of one output, by dense weights or by indices.

`output` (every target's last field) names the model output read, None for the bundle's first one. A front end's
choice (one class, the top k, the predicted one, or targets given explicitly) becomes per image a list of targets
in TargetChoice, by the bundle's task.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields, replace
from typing import ClassVar

import numpy as np

from igcam_engine.bundle import map_classes
from igcam_engine.detections import HEADS, Detection, corners_cotangent, decode, iou, iou_cotangent
from igcam_engine.errors import InputError, OptionError
from igcam_engine.options import DEFAULT_LIMITS, Limits
from igcam_engine.validators import class_indices, flag, integer, integer_text, shown

MAX_TARGET_JSON = 64 << 20  # characters of a targets JSON text
MAX_VALUES = 1 << 24  # numbers in one target's array (a mask, an embedding, weights)


class Target:
    """The interface every target kind implements; see the module's docstring for the kinds."""

    kind: ClassVar[str] = ""

    def bound(self, manifest) -> "Target":
        """The target checked against a bundle (its output exists and has the shape it reads, indices in range),
        with its arrays as float32 numpy arrays of the right shape."""
        raise NotImplementedError

    def linear(self, manifest) -> bool:
        """Whether its seed is the same whatever the outputs (else it is computed from each row's outputs)."""
        return True

    @property
    def needs_image(self) -> bool:
        """Whether it must first see the explained image's own outputs (see `resolved`)."""
        return False

    def resolved(self, manifest, outputs: list) -> "Target":
        """The target for one image, given that image's outputs (each without the batch)."""
        return self

    def seeds(self, manifest, outputs: list | None = None) -> list:
        """Per kept output (graph order), the cotangent of the target (the output's dims), or None for zero;
        `outputs` is one row's outputs, needed only when the target is not linear."""
        raise NotImplementedError

    def score(self, manifest, outputs: list) -> np.ndarray:
        """[R]: the target's value for rows of outputs (each [R, ...])."""
        raise NotImplementedError

    @property
    def slug(self) -> str:
        """A short name for files: class285, box17.class0, concept, ..."""
        raise NotImplementedError

    def describe(self, manifest) -> str:
        """A human-readable name (with the class's label where the bundle has labels)."""
        return self.slug

    def to_json(self) -> dict:
        """The JSON form: {"kind": ..., fields...} (arrays as nested lists)."""
        record = {"kind": self.kind}
        for item in fields(self):
            value = getattr(self, item.name)
            if value is not None:
                record[item.name] = value.tolist() if isinstance(value, np.ndarray) else value
        return record


def _spec(manifest, output, what: str):
    try:
        return manifest.output(output)
    except OptionError as e:
        raise OptionError(f"{what}: {e}") from None


def _category(value, classes: int, what: str) -> int:
    return integer(value, f"{what}.category", 0, classes - 1)


def _array(value, name: str, ndim: int | None = None, dtype=np.float32) -> np.ndarray:
    """A finite array (float32 unless `dtype` says) from numbers (lists, numpy, a torch tensor), of `ndim` dims
    when given."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, np.float64)
    except (ValueError, TypeError):
        raise OptionError(f"{name} must be an array of numbers, got {shown(value)}") from None
    if ndim is not None and array.ndim != ndim:
        raise OptionError(f"{name} must have {ndim} dims, got shape {list(array.shape)}")
    if array.size > MAX_VALUES:
        raise OptionError(f"{name} holds {array.size} numbers, at most {MAX_VALUES}")
    if not np.isfinite(array).all():
        raise OptionError(f"{name} contains NaN or infinite values")
    return array.astype(dtype)


def _one_hot(shape, position, value: float = 1.0) -> np.ndarray:
    seed = np.zeros(shape, np.float32)
    seed[position] = value
    return seed


def _only(manifest, spec, seed) -> list:
    """Seeds for all outputs: `seed` for output `spec`, None (zero) for the others."""
    return [seed if o.name == spec.name else None for o in manifest.outputs]


def _label(manifest, category: int) -> str:
    return manifest.labels[category] if manifest.labels and category < len(manifest.labels) else str(category)


@dataclass(frozen=True, eq=False)
class ClassifierOutputTarget(Target):
    """Class `category`'s score of an output of class scores [classes]."""

    category: int
    output: str | None = None
    kind: ClassVar[str] = "classifier"

    def bound(self, manifest):
        spec = _spec(manifest, self.output, "ClassifierOutputTarget")
        if len(spec.shape) != 1:
            raise OptionError(f"ClassifierOutputTarget reads class scores [classes]; output '{spec.source}' is "
                              f"{list(spec.shape)} (a score map takes SemanticSegmentationTarget, see docs/targets.md)")
        return replace(self, category=_category(self.category, spec.shape[0], "ClassifierOutputTarget"))

    def seeds(self, manifest, outputs=None):
        spec = manifest.output(self.output)
        return _only(manifest, spec, _one_hot(spec.shape, self.category))

    def score(self, manifest, outputs):
        return outputs[manifest.output(self.output).index][:, self.category]

    @property
    def slug(self):
        return f"class{self.category}"

    def describe(self, manifest):
        return f"class {self.category} '{_label(manifest, self.category)}'"


@dataclass(frozen=True, eq=False)
class BinaryClassifierOutputTarget(Target):
    """+logit (category 1) or -logit (category 0) of a binary classifier's output [1] (or [] per image), or of
    label `index` of a multi-label output [labels]: pytorch-grad-cam's BinaryClassifierOutputTarget."""

    category: int
    index: int = 0
    output: str | None = None
    kind: ClassVar[str] = "binary"

    def bound(self, manifest):
        spec = _spec(manifest, self.output, "BinaryClassifierOutputTarget")
        if len(spec.shape) > 1:
            raise OptionError(f"BinaryClassifierOutputTarget reads a logit [1] or logits [labels]; output "
                              f"'{spec.source}' is {list(spec.shape)}")
        size = spec.shape[0] if spec.shape else 1
        return replace(self, category=integer(self.category, "BinaryClassifierOutputTarget.category", 0, 1),
                       index=integer(self.index, "BinaryClassifierOutputTarget.index", 0, size - 1))

    @property
    def sign(self) -> float:
        return 1.0 if self.category == 1 else -1.0

    def seeds(self, manifest, outputs=None):
        spec = manifest.output(self.output)
        return _only(manifest, spec, _one_hot(spec.shape, (self.index,) if spec.shape else (), self.sign))

    def score(self, manifest, outputs):
        values = outputs[manifest.output(self.output).index]
        return self.sign * values.reshape(len(values), -1)[:, self.index]

    @property
    def slug(self):
        return f"label{self.index}.{'present' if self.category else 'absent'}"


@dataclass(frozen=True, eq=False)
class SemanticSegmentationTarget(Target):
    """sum(scores[category] * mask) over a score map [C, h, w] (or [h, w, C]); `mask` [h, w] (or the model input's
    [H, W], resized by nearest neighbour), None: where the model predicts `category` in the explained image (the
    class of highest score; for a single-class map, a score above 0, a logit)."""

    category: int
    mask: object = None
    output: str | None = None
    kind: ClassVar[str] = "segmentation"

    def bound(self, manifest):
        spec = _spec(manifest, self.output, "SemanticSegmentationTarget")
        if spec.layout is None:
            raise OptionError(f"SemanticSegmentationTarget reads a score map [C, h, w] or [h, w, C]; output "
                              f"'{spec.source}' is {list(spec.shape)} with no score-map layout (export with "
                              "output_layout=..., CLI --output-layout)")
        classes, size = map_classes(spec.shape, spec.layout), _map_size(spec)
        category = _category(self.category, classes, "SemanticSegmentationTarget")
        if self.mask is None:
            return replace(self, category=category)
        mask = _array(self.mask, "SemanticSegmentationTarget.mask", 2)
        if mask.shape != size:
            if mask.shape != tuple(manifest.input.shape[1:]):
                raise OptionError(f"SemanticSegmentationTarget.mask is {list(mask.shape)}; it must be the score map's "
                                  f"{list(size)} or the model input's {list(manifest.input.shape[1:])}")
            rows = (np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]
            columns = (np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]
            mask = mask[rows.astype(int)][:, columns.astype(int)]
        return replace(self, category=category, mask=mask)

    @property
    def needs_image(self):
        return self.mask is None

    def resolved(self, manifest, outputs):
        if self.mask is not None:
            return self
        spec = manifest.output(self.output)
        mask = predicted_masks(spec, outputs[spec.index][None])[0] == self.category
        if not mask.any():
            raise InputError(f"class {self.category} is predicted nowhere in this image: give a mask "
                             "(SemanticSegmentationTarget(category, mask), CLI --mask) or another class")
        return replace(self, mask=mask.astype(np.float32))

    def seeds(self, manifest, outputs=None):
        spec = manifest.output(self.output)
        seed = np.zeros(spec.shape, np.float32)
        if spec.layout == "NCHW":
            seed[self.category] = self.mask
        else:
            seed[..., self.category] = self.mask
        return _only(manifest, spec, seed)

    def score(self, manifest, outputs):
        spec = manifest.output(self.output)
        values = outputs[spec.index]
        plane = values[:, self.category] if spec.layout == "NCHW" else values[..., self.category]
        return (plane * self.mask).sum(axis=(1, 2))

    @property
    def slug(self):
        return f"class{self.category}"

    def describe(self, manifest):
        return f"class {self.category} '{_label(manifest, self.category)}'"


def _map_size(spec) -> tuple:
    return tuple(spec.shape[1:]) if spec.layout == "NCHW" else tuple(spec.shape[:2])


def predicted_masks(spec, values: np.ndarray) -> np.ndarray:
    """[B, h, w] int: the predicted class per pixel of score maps [B, ...] (one class: 0 where its score is above
    0, -1 elsewhere)."""
    scores = values if spec.layout == "NCHW" else np.moveaxis(values, -1, 1)
    if scores.shape[1] == 1:
        return np.where(scores[:, 0] > 0, 0, -1)
    return scores.argmax(axis=1)


@dataclass(frozen=True, eq=False)
class BoxScoreTarget(Target):
    """A detection's score: class `category`'s at anchor (or query) `index` of the bundle's detection head, plus,
    with `iou`, the IoU of the box the head gives there with `box` (x1, y1, x2, y2 in input pixels; by default the
    detection's own box), as pytorch-grad-cam's FasterRCNNBoxScoreTarget adds it."""

    index: int
    category: int
    box: object = None
    iou: bool = False
    output: str | None = None  # the head reads the bundle's first outputs; None is the only value accepted
    kind: ClassVar[str] = "box"

    @classmethod
    def of(cls, detection: Detection, iou: bool = False) -> "BoxScoreTarget":
        return cls(detection.index, detection.category, list(detection.box), iou)

    def bound(self, manifest):
        head = _head(manifest, "BoxScoreTarget")
        shapes = [o.shape for o in manifest.outputs]
        if self.output is not None:
            raise OptionError("BoxScoreTarget reads the bundle's detection head; give no output")
        box = None if self.box is None else tuple(float(v) for v in _array(self.box, "BoxScoreTarget.box", 1,
                                                                           np.float64))
        if box is not None and len(box) != 4:
            raise OptionError(f"BoxScoreTarget.box must be 4 numbers x1, y1, x2, y2, got {len(box)}")
        use_iou = flag(self.iou, "BoxScoreTarget.iou")
        if use_iou and box is None:
            raise OptionError("BoxScoreTarget with iou needs the reference box (box=[x1, y1, x2, y2])")
        if use_iou and head.box_location(0) is None:
            raise OptionError(f"BoxScoreTarget's IoU term reads boxes linear in the outputs; a {head.name} head's "
                              "are not (give iou=false)")
        return replace(self, index=integer(self.index, "BoxScoreTarget.index", 0, head.anchors(shapes) - 1),
                       category=_category(self.category, manifest.task.classes, "BoxScoreTarget"), box=box,
                       iou=use_iou)

    def linear(self, manifest):
        return HEADS[manifest.task.detector].linear and not self.iou

    def seeds(self, manifest, outputs=None):
        head = HEADS[manifest.task.detector]
        shapes = [o.shape for o in manifest.outputs]
        seeds = head.score_seed(outputs, self.index, self.category, shapes)
        seeds += [None] * (len(manifest.outputs) - len(seeds))
        if self.iou:
            where, positions = head.box_location(self.index)
            raw = np.array([outputs[where][p] for p in positions], np.float64)
            scale = head.box_scale(manifest.input.shape[1:])
            d_raw = corners_cotangent(iou_cotangent(_corners(raw * scale), self.box), scale)
            seed = seeds[where] if seeds[where] is not None else np.zeros(shapes[where], np.float32)
            for position, value in zip(positions, d_raw):
                seed[position] += value
            seeds[where] = seed
        return seeds

    def score(self, manifest, outputs):
        head = HEADS[manifest.task.detector]
        value = np.asarray(head.score(outputs, self.index, self.category), np.float64)
        if self.iou:
            value = value + iou(head.boxes(outputs, manifest.input.shape[1:])[:, self.index], self.box)
        return value

    @property
    def slug(self):
        return f"box{self.index}.class{self.category}"

    def describe(self, manifest):
        return f"detection at {self.index}, class {self.category} '{_label(manifest, self.category)}'"


def _corners(raw: np.ndarray) -> np.ndarray:
    cx, cy, w, h = raw
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def _head(manifest, what: str):
    if manifest.task.kind != "detection":
        raise OptionError(f"{what} needs a detector's bundle (task 'detection'); this bundle's task is "
                          f"'{manifest.task.kind}' (export with task='detection', detector=..., CLI --task, --detector)")
    return HEADS[manifest.task.detector]


@dataclass(frozen=True, eq=False)
class SimilarityToConceptTarget(Target):
    """The cosine similarity of an output (flattened) with a concept `embedding` of the same size."""

    embedding: object
    output: str | None = None
    kind: ClassVar[str] = "similarity"

    def linear(self, manifest):
        return False

    def bound(self, manifest):
        spec = _spec(manifest, self.output, "SimilarityToConceptTarget")
        embedding = _array(self.embedding, "SimilarityToConceptTarget.embedding", 1)
        if embedding.size != spec.size:
            raise OptionError(f"SimilarityToConceptTarget.embedding has {embedding.size} values; output "
                              f"'{spec.source}' has {spec.size}")
        if not np.any(embedding):
            raise OptionError("SimilarityToConceptTarget.embedding is all zeros: no direction to compare with")
        return replace(self, embedding=embedding)

    def seeds(self, manifest, outputs=None):
        spec = manifest.output(self.output)
        o = np.asarray(outputs[spec.index], np.float64).ravel()
        e = np.asarray(self.embedding, np.float64)
        norm_o, norm_e = np.linalg.norm(o), np.linalg.norm(e)
        if norm_o == 0:
            return _only(manifest, spec, np.zeros(spec.shape, np.float32))
        cosine = o @ e / (norm_o * norm_e)
        seed = e / (norm_o * norm_e) - cosine * o / norm_o ** 2
        return _only(manifest, spec, seed.reshape(spec.shape).astype(np.float32))

    def score(self, manifest, outputs):
        values = np.asarray(outputs[manifest.output(self.output).index], np.float64)
        values = values.reshape(len(values), -1)
        e = np.asarray(self.embedding, np.float64)
        norms = np.linalg.norm(values, axis=1) * np.linalg.norm(e)
        return np.where(norms > 0, values @ e / np.where(norms > 0, norms, 1), 0)

    @property
    def slug(self):
        return "concept"

    def describe(self, manifest):
        return f"cosine similarity with a concept ({self.embedding.size} values)"


@dataclass(frozen=True, eq=False)
class LinearTarget(Target):
    """sum(weights * output): `weights` dense, shaped like the output, or `indices` (a list of positions, each a
    list of the output's dims) with one weight each (`weights`, default 1)."""

    weights: object = None
    indices: object = None
    output: str | None = None
    kind: ClassVar[str] = "linear"

    def bound(self, manifest):
        spec = _spec(manifest, self.output, "LinearTarget")
        if self.indices is None:
            if self.weights is None:
                raise OptionError("LinearTarget needs weights (shaped like the output) or indices")
            weights = _array(self.weights, "LinearTarget.weights")
            if weights.shape != spec.shape:
                raise OptionError(f"LinearTarget.weights is {list(weights.shape)}; output '{spec.source}' is "
                                  f"{list(spec.shape)}")
            return replace(self, weights=weights)
        try:
            indices = np.asarray(self.indices)
        except ValueError:
            indices = np.asarray([], object)
        if indices.dtype.kind not in "iu" or indices.ndim != 2 or indices.shape[1] != len(spec.shape) \
                or not 1 <= len(indices) <= MAX_VALUES:
            raise OptionError(f"LinearTarget.indices must be a list of positions, each {len(spec.shape)} integers "
                              f"(output '{spec.source}' is {list(spec.shape)}), got {shown(self.indices)}")
        if ((indices < 0) | (indices >= np.array(spec.shape))).any():
            raise OptionError(f"LinearTarget.indices must lie in output '{spec.source}' {list(spec.shape)}")
        weights = np.ones(len(indices), np.float32) if self.weights is None else _array(self.weights,
                                                                                       "LinearTarget.weights", 1)
        if len(weights) != len(indices):
            raise OptionError(f"LinearTarget has {len(indices)} indices and {len(weights)} weights")
        return replace(self, indices=indices.astype(np.int64), weights=weights)

    def _dense(self, spec) -> np.ndarray:
        if self.indices is None:
            return self.weights
        dense = np.zeros(spec.shape, np.float32)
        np.add.at(dense, tuple(self.indices.T), self.weights)
        return dense

    def seeds(self, manifest, outputs=None):
        spec = manifest.output(self.output)
        return _only(manifest, spec, self._dense(spec))

    def score(self, manifest, outputs):
        spec = manifest.output(self.output)
        values = outputs[spec.index]
        return (values.reshape(len(values), -1).astype(np.float64) @ self._dense(spec).ravel()).astype(np.float64)

    @property
    def slug(self):
        return "linear"


KINDS = {kind.kind: kind for kind in (ClassifierOutputTarget, BinaryClassifierOutputTarget, SemanticSegmentationTarget,
                                      BoxScoreTarget, SimilarityToConceptTarget, LinearTarget)}


def from_json(record) -> Target:
    """A target from its JSON form ({"kind": ..., fields...}); one line naming what is wrong."""
    if not isinstance(record, dict) or record.get("kind") not in KINDS:
        raise OptionError(f"a target is an object {{\"kind\": one of {', '.join(KINDS)}, ...}}, got {shown(record)}")
    kind = KINDS[record["kind"]]
    names = [f.name for f in fields(kind)]
    unknown = sorted(set(record) - {"kind", *names})
    if unknown:
        raise OptionError(f"unknown field(s) {', '.join(map(repr, unknown))} of a {record['kind']} target; accepted: "
                          f"{', '.join(names)}")
    required = [f.name for f in fields(kind) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in record]
    if missing:
        raise OptionError(f"a {record['kind']} target needs {', '.join(map(repr, missing))}")
    output = record.get("output")
    if output is not None and not isinstance(output, str):
        raise OptionError(f"a target's output is an output's name, got {shown(output)}")
    return kind(**{name: value for name, value in record.items() if name != "kind"})


def targets_text(text: str) -> list[Target]:
    """Targets from JSON text: one object, or a list of them."""
    if not isinstance(text, str) or len(text) > MAX_TARGET_JSON:
        raise OptionError(f"targets JSON must be text of at most {MAX_TARGET_JSON} characters")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise OptionError(f"the targets are not valid JSON: {str(e)[:120]}") from None
    records = value if isinstance(value, list) else [value]
    if not records:
        raise OptionError("the targets JSON lists no target")
    return [from_json(record) for record in records]


# ---------------------------------------------------------------- choosing targets


@dataclass(frozen=True)
class TargetChoice:
    """`target`: one class for every image; `top_k`: each image's k best (classes, detections, or the classes that
    cover the most pixels of a segmentation); `targets`: these targets for every image; none: each image's best one
    (the predicted class, the largest predicted class, the most confident detection)."""

    target: int | None = None
    top_k: int | None = None
    targets: tuple | None = None

    @classmethod
    def from_text(cls, target: str | None = None, top_k: str | None = None) -> "TargetChoice":
        """`target` as text: a class index, or JSON (one target object or a list of them)."""
        if isinstance(target, str) and target.lstrip()[:1] in ("{", "["):
            return cls(None, None if top_k is None else integer_text(top_k, "top_k"), tuple(targets_text(target)))
        return cls(None if target is None else integer_text(target, "target"),
                   None if top_k is None else integer_text(top_k, "top_k"))

    def checked(self, manifest, limits: Limits = DEFAULT_LIMITS) -> "TargetChoice":
        if (self.target is not None or self.targets is not None) and self.top_k is not None:
            raise OptionError("give target or top_k, not both")
        if self.target is not None and self.targets is not None:
            raise OptionError("give a class (target) or targets, not both")
        task = manifest.task
        if self.targets is not None:
            targets = tuple(self.targets) if isinstance(self.targets, (list, tuple)) else (self.targets,)
            if not targets or not all(isinstance(t, Target) for t in targets):
                raise OptionError("targets must be a list of igcam_engine.targets target objects")
            if limits.top_k is not None and len(targets) > limits.top_k:
                raise OptionError(f"{len(targets)} targets per image, more than the top_k limit {limits.top_k}")
            return TargetChoice(targets=tuple(t.bound(manifest) for t in targets))
        if task.classes is None:
            raise OptionError(f"this bundle's task is '{task.kind}': it has no classes to choose and no default "
                              "target; give targets (docs/targets.md), e.g. {\"kind\": \"similarity\", "
                              "\"embedding\": [...]}")
        if self.target is not None:
            return TargetChoice(int(class_indices(self.target, task.classes, "target")))
        if self.top_k is not None:
            high = task.classes if limits.top_k is None else min(task.classes, limits.top_k)
            return TargetChoice(None, integer(self.top_k, "top_k", 1, high))
        return self

    @property
    def count(self) -> int:
        """Targets per image at most."""
        return len(self.targets) if self.targets is not None else self.top_k or 1

    def select(self, manifest, outputs: list) -> list[list[Target]]:
        """Per image its targets, resolved for it (a checked choice; `outputs`: the images' outputs, each
        [B, ...]). Classes and explicit targets give every image as many; detections and segmentation classes are
        at most top_k per image (those there are)."""
        images = len(outputs[0])
        if self.targets is not None:
            return [[t.resolved(manifest, [o[n] for o in outputs]) if t.needs_image else t for t in self.targets]
                    for n in range(images)]
        task = manifest.task
        choose = {"classification": _classes, "segmentation": _segments, "detection": _detections}[task.kind]
        return [choose(self, manifest, [o[n] for o in outputs]) for n in range(images)]

    def record(self) -> dict:
        return {"target": self.target, "top_k": self.top_k,
                "targets": None if self.targets is None else [t.to_json() for t in self.targets]}


def _classes(choice: TargetChoice, manifest, outputs: list) -> list:
    if choice.target is not None:
        return [ClassifierOutputTarget(choice.target)]
    order = np.argsort(-np.asarray(outputs[0]), kind="stable")[:choice.count]
    return [ClassifierOutputTarget(int(c)) for c in order]


def _segments(choice: TargetChoice, manifest, outputs: list) -> list:
    spec = manifest.outputs[0]
    if choice.target is not None:
        return [SemanticSegmentationTarget(choice.target).resolved(manifest, outputs)]
    predicted = predicted_masks(spec, outputs[0][None])[0]
    areas = np.bincount(predicted[predicted >= 0].ravel(), minlength=map_classes(spec.shape, spec.layout))
    order = [int(c) for c in np.argsort(-areas, kind="stable")[:choice.count] if areas[c] > 0]
    if not order:
        raise InputError("the model predicts no class anywhere in this image: name a class and a mask")
    return [SemanticSegmentationTarget(c).resolved(manifest, outputs) for c in order]


def _detections(choice: TargetChoice, manifest, outputs: list) -> list:
    found = decode(HEADS[manifest.task.detector], [o[None] for o in outputs], manifest.input.shape[1:])
    if choice.target is not None:
        found = [d for d in found if d.category == choice.target]
    if not found:
        what = f" of class {choice.target}" if choice.target is not None else ""
        raise InputError(f"no detection{what} scores above the threshold in this image; give a target (docs/targets.md)")
    return [BoxScoreTarget.of(d).bound(manifest) for d in found[:choice.count]]


def targets_of(value, batch: int, manifest, limits: Limits = DEFAULT_LIMITS):
    """(per image its targets [B][T], neither bound nor resolved; whether they were given per image as [B, T]) from what
    Explainer.explain takes: class indices (an int, one per image, or [B, T]; classes of a classification output,
    or the classes whose predicted masks a segmentation explains), or targets (one for every image, one per image,
    or a list of T per image)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        value = value.detach().cpu().numpy()
    if isinstance(value, Target) or (isinstance(value, (list, tuple)) and value and any(
            isinstance(v, Target) or (isinstance(v, (list, tuple)) and any(isinstance(w, Target) for w in v))
            for v in value)):
        return _target_objects(value, batch, manifest, limits)
    try:
        array = np.asarray(value)
    except ValueError:  # a ragged nested list
        raise OptionError("targets of shape [B, T] need the same number of classes T for every image") from None
    if array.dtype.kind not in "iu" or array.ndim > 2:
        raise OptionError(f"targets must be class indices (an int, one per image or [B, T]) or target objects "
                          f"(igcam_engine.targets), got {value!r}"[:200])
    if manifest.task.kind not in ("classification", "segmentation"):
        raise OptionError(f"class indices name classes of a classifier or segmenter; this bundle's task is "
                          f"'{manifest.task.kind}': give target objects (docs/targets.md)")
    multi = array.ndim == 2
    if array.ndim == 0:
        array = np.full((batch, 1), array)
    elif len(array) != batch:
        raise OptionError(f"got targets for {len(array)} images, but {batch} images")
    array = array.reshape(batch, -1)
    if array.size == 0:
        raise OptionError("no targets given: each image needs at least one class")
    _check_count(array.shape[1], manifest.task.classes, limits, "classes")
    array = class_indices(array, manifest.task.classes, "targets")
    make = ClassifierOutputTarget if manifest.task.kind == "classification" else SemanticSegmentationTarget
    return [[make(int(c)) for c in row] for row in array], multi


def _check_count(count: int, classes, limits: Limits, what: str = "targets") -> None:
    most = limits.top_k if classes is None else classes if limits.top_k is None else min(limits.top_k, classes)
    if most is not None and count > most:
        raise OptionError(f"targets: {count} {what} per image, more than {most} (the model's classes, or the top_k "
                          "limit)")


def _target_objects(value, batch: int, manifest, limits: Limits):
    if isinstance(value, Target):
        grid, multi = [[value]] * batch, False
    elif all(isinstance(v, Target) for v in value):
        if len(value) != batch:
            raise OptionError(f"got {len(value)} targets for {batch} images: give one per image, or a list of "
                              "targets per image")
        grid, multi = [[v] for v in value], False
    elif all(isinstance(v, (list, tuple)) and v and all(isinstance(w, Target) for w in v) for v in value):
        if len(value) != batch:
            raise OptionError(f"got targets for {len(value)} images, but {batch} images")
        grid, multi = [list(v) for v in value], True
        if len({len(v) for v in grid}) != 1:
            raise OptionError("targets of shape [B, T] need the same number of targets T for every image")
    else:
        raise OptionError("targets must be a target, one per image, or a list of targets per image (each an "
                          "igcam_engine.targets target)")
    _check_count(len(grid[0]), None, limits)
    return grid, multi


def bound_grid(grid: list, manifest) -> list:
    """Every target of [B][T] bound to the bundle (a target object shared by several images, once)."""
    bound = {}
    return [[bound[id(t)] if id(t) in bound else bound.setdefault(id(t), t.bound(manifest)) for t in row]
            for row in grid]


def class_probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of class scores (`Explainer.predict`'s logits), in float64."""
    scores = np.asarray(scores, np.float64)
    exponentials = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)
