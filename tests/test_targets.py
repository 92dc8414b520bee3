"""Targets beyond a class score (igcam_engine.targets): segmentation, detection, embeddings, binary and multi-label
classifiers, any linear functional; each against torch autograd in float64 of the same function of the model's
outputs (pytorch-grad-cam's definitions: SemanticSegmentationTarget, FasterRCNNBoxScoreTarget's score + IoU,
SimilarityToConceptTarget's cosine), with raw values compared."""
import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from support.comparisons import assert_maps_match
from support.reference import ReferencePath, contract_maps, randomized, unbatched

from igcam_engine import Explainer
from igcam_engine.detections import HEADS, decode, iou, iou_cotangent
from igcam_engine.errors import BundleError, InputError, ModelError, OptionError
from igcam_engine.export import from_onnx, from_torch
from igcam_engine.quadrature import quadrature
from igcam_engine.targets import (
    BinaryClassifierOutputTarget,
    BoxScoreTarget,
    ClassifierOutputTarget,
    LinearTarget,
    SemanticSegmentationTarget,
    SimilarityToConceptTarget,
    TargetChoice,
    from_json,
    targets_text,
)

SHAPE = (3, 24, 32)
STEPS = 4


def images(count=2, seed=0):
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


class Backbone(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, stride=2, padding=1), torch.nn.BatchNorm2d(width),
                                        torch.nn.ReLU())
        self.stage = torch.nn.Sequential(torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                         torch.nn.BatchNorm2d(2 * width), torch.nn.ReLU())

    def forward(self, x):
        return self.stage(self.stem(x))


class Segmenter(torch.nn.Module):
    """torchvision's segmenters' shape: {"out": scores [B, C, H, W]} upsampled to the input; `channels_last` gives
    [B, H, W, C]."""

    def __init__(self, classes=4, channels_last=False):
        super().__init__()
        self.backbone, self.classifier, self.channels_last = Backbone(), torch.nn.Conv2d(16, classes, 1), channels_last

    def forward(self, x):
        scores = F.interpolate(self.classifier(self.backbone(x)), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return {"out": scores.permute(0, 2, 3, 1) if self.channels_last else scores}


class YoloV8Head(torch.nn.Module):
    """An anchor-free head as ultralytics' exporter writes it: [B, 4 + C, A], boxes (cx, cy, w, h) in input pixels
    and class probabilities per grid cell."""

    def __init__(self, classes=3):
        super().__init__()
        self.backbone, self.box, self.cls = Backbone(), torch.nn.Conv2d(16, 4, 1), torch.nn.Conv2d(16, classes, 1)

    def forward(self, x):
        return self.head(x, self.backbone(x))

    def head(self, x, features):
        b, _, h, w = features.shape
        stride = x.shape[-1] / w
        ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        t = self.box(features)
        cx = (xs + torch.sigmoid(t[:, 0])) * stride
        cy = (ys + torch.sigmoid(t[:, 1])) * stride
        size = torch.exp(t[:, 2:4].clamp(-3, 3)) * stride * 2
        boxes = torch.stack([cx, cy, size[:, 0], size[:, 1]], dim=1).reshape(b, 4, h * w)
        return torch.cat([boxes, torch.sigmoid(self.cls(features)).reshape(b, -1, h * w)], dim=1)


class YoloV5Head(YoloV8Head):
    """[B, A, 5 + C]: boxes, objectness and class probabilities."""

    def __init__(self, classes=3):
        super().__init__(classes)
        self.objectness = torch.nn.Conv2d(16, 1, 1)

    def forward(self, x):
        features = self.backbone(x)
        v8 = self.head(x, features)
        objectness = torch.sigmoid(self.objectness(features)).flatten(2)
        return torch.cat([v8[:, :4], objectness, v8[:, 4:]], dim=1).transpose(1, 2)


class DetrHead(torch.nn.Module):
    """HuggingFace DETR's outputs: {"logits": [B, Q, C + 1], "pred_boxes": [B, Q, 4] (cx, cy, w, h) / size}."""

    def __init__(self, classes=3, queries=5):
        super().__init__()
        self.backbone = Backbone()
        self.queries = torch.nn.Linear(16 * 6 * 8, queries * 16)
        self.logits, self.boxes = torch.nn.Linear(16, classes + 1), torch.nn.Linear(16, 4)
        self.count = queries

    def forward(self, x):
        hidden = torch.relu(self.queries(self.backbone(x).flatten(1))).reshape(-1, self.count, 16)
        return {"logits": self.logits(hidden), "pred_boxes": torch.sigmoid(self.boxes(hidden))}


class Encoder(torch.nn.Module):
    """An embedding model: a vector per image."""

    def __init__(self, size=12):
        super().__init__()
        self.backbone, self.project = Backbone(), torch.nn.Linear(16, size)

    def forward(self, x):
        return self.project(self.backbone(x).mean(dim=(2, 3)))


class MultiLabel(Encoder):
    """Sigmoid multi-label scores (the Sigmoid in the model, as exported classifiers end)."""

    def forward(self, x):
        return torch.sigmoid(super().forward(x))


def export(make, path, seed=0, **kwargs):
    """(the model `make` builds, seeded and randomized, its bundle at backbone.stage)."""
    torch.manual_seed(seed)
    model = randomized(make()).eval()
    return model, from_torch(model, "backbone.stage", SHAPE, path, **kwargs)


def reference(model, targets, x, steps=STEPS, subtract=False):
    """float64 autograd of the contract with each image's target a function of its outputs (left rule, zero
    baseline): IG-CAM at `steps`, Grad-CAM at steps=None."""
    path = ReferencePath(model, "backbone.stage")
    alphas, weights = (np.ones(1), np.ones(1)) if steps is None else quadrature("left", steps)
    return contract_maps(path.point, x, targets, alphas, weights, np.zeros((1, *SHAPE), np.float32), subtract)


def torch_iou(box, reference):
    """torchvision.ops.box_iou's expression for one pair (x1, y1, x2, y2), in torch (so autograd differentiates it
    as it differentiates torchvision's)."""
    low, high = torch.max(box[:2], reference[:2]), torch.min(box[2:], reference[2:])
    wh = (high - low).clamp(min=0)
    inter = wh[0] * wh[1]
    area = (box[2] - box[0]) * (box[3] - box[1])
    return inter / (area + (reference[2] - reference[0]) * (reference[3] - reference[1]) - inter)


def corners(raw):
    cx, cy, w, h = raw
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


# ---------------------------------------------------------------- segmentation


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    return export(Segmenter, tmp_path_factory.mktemp("seg") / "bundle", seed=1)


def test_a_segmenter_exports_with_its_dict_output_and_task(segmenter):
    _, bundle = segmenter
    explainer = Explainer(bundle)
    output = explainer.manifest.outputs[0]
    assert (output.source, output.shape, output.layout) == ("out", (4, 24, 32), "NCHW")
    assert explainer.task == "segmentation" and explainer.num_classes == 4
    with pytest.raises(OptionError, match="predict gives a classifier's class scores; this bundle's task is"):
        explainer.predict(images(1))


@pytest.mark.parametrize("method,steps", [("igcam", STEPS), ("gradcam", None)])
def test_segmentation_with_a_given_mask_against_autograd(segmenter, method, steps):
    model, bundle = segmenter
    x = images()
    mask = np.zeros(SHAPE[1:], np.float32)
    mask[4:14, 6:20] = 1
    mask[16:, :5] = 0.5  # masks are weights: pytorch-grad-cam multiplies by them
    targets = [SemanticSegmentationTarget(1, mask), SemanticSegmentationTarget(2, mask)]
    got = Explainer(bundle).explain(x, targets, method=method, steps=steps or 50)
    expected = reference(model, [lambda out, c=t.category: (out["out"][c] * torch.from_numpy(mask)).sum()
                                 for t in targets], x, steps)
    assert_maps_match(got, expected)


def test_the_predicted_mask_is_the_default_and_resolved_per_image(segmenter):
    """No mask: where the model predicts the class in each image (argmax over the classes), as pytorch-grad-cam's
    segmentation tutorial builds its mask; class indices mean the same on a segmenter."""
    model, bundle = segmenter
    x = images()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x))["out"].argmax(dim=1).numpy()
    category = int(np.bincount(predicted.ravel()).argmax())
    explainer = Explainer(bundle)
    got = explainer.explain(x, SemanticSegmentationTarget(category), steps=STEPS)
    assert_maps_match(explainer.explain(x, category, steps=STEPS), got, 1e-6, 1e-6)
    expected = reference(model, [lambda out, m=torch.from_numpy((p == category).astype(np.float64)):
                                 (out["out"][category] * m).sum() for p in predicted], x)
    assert_maps_match(got, expected)
    absent = next(c for c in range(4) if not (predicted == c).any())
    with pytest.raises(InputError, match=f"class {absent} is predicted nowhere in this image: give a mask"):
        explainer.explain(x, absent, steps=STEPS)


def test_a_channels_last_score_map(tmp_path):
    model, bundle = export(lambda: Segmenter(channels_last=True), tmp_path / "bundle", seed=1)
    explainer = Explainer(bundle)
    assert explainer.manifest.outputs[0].layout == "NHWC"
    x = images()
    mask = (np.arange(24 * 32).reshape(24, 32) % 3 == 0).astype(np.float32)
    got = explainer.explain(x, SemanticSegmentationTarget(3, mask), steps=STEPS)
    expected = reference(model, [lambda out: (out["out"][..., 3] * torch.from_numpy(mask)).sum()] * 2, x)
    assert_maps_match(got, expected)


def test_score_map_layouts_that_the_dims_cannot_tell_are_refused(tmp_path):
    class Square(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.head = Backbone(), torch.nn.Conv2d(16, 6, 1)

        def forward(self, x):
            return self.head(self.backbone(x))  # [B, 6, 6, 6] for a 24 x 24 input

    with pytest.raises(ModelError, match=r"cannot tell whether the score map \[6, 6, 6\] is \[C, h, w\] or \[h, w, C\]"):
        from_torch(Square().eval(), "backbone.stage", (3, 24, 24), tmp_path / "b")
    bundle = from_torch(Square().eval(), "backbone.stage", (3, 24, 24), tmp_path / "b", output_layout="NCHW")
    assert Explainer(bundle).manifest.outputs[0].layout == "NCHW"


def test_segmentation_masks_are_checked(segmenter):
    _, bundle = segmenter
    explainer = Explainer(bundle)
    for target, message in (
        (SemanticSegmentationTarget(9), r"SemanticSegmentationTarget.category must be an integer in \[0, 3\]"),
        (SemanticSegmentationTarget(1, np.ones((5, 5))), r"mask is \[5, 5\]; it must be the score map's \[24, 32\]"),
        (SemanticSegmentationTarget(1, np.full((24, 32), np.nan)), "mask contains NaN"),
        (SemanticSegmentationTarget(1, "all"), "mask must be an array of numbers"),
        (ClassifierOutputTarget(1), r"ClassifierOutputTarget reads class scores \[classes\]; output 'out' is"),
        (BoxScoreTarget(0, 1), "BoxScoreTarget needs a detector's bundle"),
        (SemanticSegmentationTarget(1, output="aux"), "the bundle has no output 'aux'; its outputs: out"),
    ):
        with pytest.raises(OptionError, match=message):
            explainer.explain(images(1), target, steps=2)


# ---------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    return export(YoloV8Head, tmp_path_factory.mktemp("yolo") / "bundle", detector="yolov8")


def test_a_box_score_with_and_without_the_iou_term_against_autograd(yolo):
    """pytorch-grad-cam's FasterRCNNBoxScoreTarget scores a detection as its class score plus the IoU of the box
    predicted there with a reference box (here one off the detection's own, where the IoU is smooth: at its own box
    every maximum and minimum is a tie, test_the_iou_and_its_derivative_are_torchvisions)."""
    model, bundle = yolo
    explainer = Explainer(bundle)
    x = images()
    outputs = explainer.model_outputs(x)
    found = [_explained(model, x[n:n + 1], decode(HEADS["yolov8"], [o[n:n + 1] for o in outputs], SHAPE[1:],
                                                  score_threshold=0.0)) for n in range(2)]
    boxes = [(d.box[0] + 1.5, d.box[1] - 1.0, d.box[2] + 0.5, d.box[3] - 2.0) for d in found]
    for use_iou in (False, True):
        targets = [BoxScoreTarget(d.index, d.category, box, iou=use_iou) for d, box in zip(found, boxes)]
        for method, steps in (("igcam", STEPS), ("gradcam", None)):
            got = explainer.explain(x, targets, method=method, steps=steps or 50)
            expected = reference(model, [
                lambda out, d=d, box=box: out[4 + d.category, d.index] + (
                    torch_iou(corners(out[:4, d.index]), torch.tensor(box, dtype=torch.float64)) if use_iou else 0)
                for d, box in zip(found, boxes)], x, steps)
            assert_maps_match(got, expected)


def _explained(model, x, detections):
    """The first detection whose Grad-CAM map is not all clipped by the ReLU (a random head's often are)."""
    for d in detections:
        expected = reference(model, [lambda out: out[4 + d.category, d.index]], x, None)
        if np.abs(expected).max() > 1e-3:
            return d
    raise AssertionError("no detection with a map")


def test_detections_are_listed_and_chosen(yolo):
    _, bundle = yolo
    explainer = Explainer(bundle)
    x = images(1)
    outputs = explainer.model_outputs(x)
    found = decode(HEADS["yolov8"], outputs, SHAPE[1:], score_threshold=0.0)
    chosen = TargetChoice(top_k=2).checked(explainer.manifest).select(explainer.manifest, outputs)[0]
    above = [d for d in found if d.score > 0.25][:2]
    assert [(t.index, t.category) for t in chosen] == [(d.index, d.category) for d in above]
    assert all(t.box == d.box for t, d in zip(chosen, above))


def test_decoding_and_non_maximum_suppression():
    """Three boxes of class 0 (two overlapping), one of class 1 over the first: class-wise NMS keeps the best of
    the overlapping pair and the other class's box; below the threshold nothing."""
    raw = np.array([[10, 10, 10, 10, 0.9, 0.1],   # cx, cy, w, h, class 0, class 1
                    [11, 10, 10, 10, 0.8, 0.1],   # IoU 0.82 with the first: suppressed
                    [30, 30, 10, 10, 0.7, 0.0],
                    [10, 10, 10, 10, 0.0, 0.6],   # class 1 over the first: kept
                    [50, 50, 10, 10, 0.2, 0.1]])  # below 0.25
    outputs = [raw.T[None].astype(np.float32)]
    found = decode(HEADS["yolov8"], outputs, (64, 64))
    assert [(d.index, d.category) for d in found] == [(0, 0), (2, 0), (3, 1)]
    assert found[0].box == (5.0, 5.0, 15.0, 15.0) and found[0].score == pytest.approx(0.9)
    v5 = np.concatenate([raw[:, :4], np.ones((5, 1)), raw[:, 4:]], axis=1)[None].astype(np.float32)
    assert [(d.index, d.category) for d in decode(HEADS["yolov5"], [v5], (64, 64))] == [(0, 0), (2, 0), (3, 1)]


@pytest.mark.parametrize("box", [(2.0, 3.0, 12.0, 9.0), (5.0, 5.0, 15.0, 15.0), (4.0, 6.0, 15.0, 14.0),
                                 (20.0, 20.0, 30.0, 30.0)])
def test_the_iou_and_its_derivative_are_torchvisions(box):
    reference = torch.tensor([5.0, 5.0, 15.0, 15.0], dtype=torch.float64)
    wrt = torch.tensor(box, dtype=torch.float64, requires_grad=True)
    value = torch_iou(wrt, reference)
    value.backward()
    assert iou(np.array([box]), reference.numpy())[0] == pytest.approx(value.item(), abs=1e-12)
    np.testing.assert_allclose(iou_cotangent(np.array(box), reference.numpy()), wrt.grad.numpy(), atol=1e-12)


def test_a_yolov5_score_is_objectness_times_class(tmp_path):
    """Not linear in the outputs: its seed is computed from each interpolated image's outputs."""
    model, bundle = export(YoloV5Head, tmp_path / "bundle", detector="yolov5")
    x = images()
    targets = [BoxScoreTarget(7, 2), BoxScoreTarget(40, 0)]
    got = Explainer(bundle).explain(x, targets, steps=STEPS)
    expected = reference(model, [lambda out, t=t: out[t.index, 4] * out[t.index, 5 + t.category] for t in targets], x)
    assert_maps_match(got, expected)


@pytest.mark.parametrize("detector", ["detr", "rtdetr"])
def test_detr_queries_with_the_iou_term(tmp_path, detector):
    """Two outputs: the class logit at a query, and the IoU of its box (relative cx, cy, w, h scaled to pixels).
    DETR's last class is "no object" and its confidences a softmax; RT-DETR's logits are read through a sigmoid."""
    model, bundle = export(DetrHead, tmp_path / "bundle", detector=detector)
    explainer = Explainer(bundle)
    assert [o.source for o in explainer.manifest.outputs] == ["logits", "pred_boxes"]
    assert explainer.num_classes == (3 if detector == "detr" else 4)
    x = images()
    logits, boxes = (np.asarray(o, np.float64) for o in explainer.model_outputs(x[:1]))
    found = decode(HEADS[detector], [logits, boxes], SHAPE[1:], score_threshold=0.0, iou_threshold=1.0)
    confidences = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))[0, :, :-1] if detector == "detr" \
        else 1 / (1 + np.exp(-logits[0]))
    assert [(d.index, d.category) for d in found] == [
        (q, int(confidences[q].argmax())) for q in np.argsort(-confidences.max(axis=1), kind="stable")]
    assert found[0].score == pytest.approx(confidences.max(), rel=1e-6)
    box = [4.0, 3.0, 20.0, 18.0]
    targets = [BoxScoreTarget(1, 2, box, iou=True), BoxScoreTarget(3, 0, box, iou=True)]
    got = explainer.explain(x, targets, steps=STEPS)
    scale = torch.tensor([32.0, 24.0, 32.0, 24.0], dtype=torch.float64)
    expected = reference(model, [
        lambda out, t=t: out["logits"][t.index, t.category]
        + torch_iou(corners(out["pred_boxes"][t.index] * scale), torch.tensor(box, dtype=torch.float64))
        for t in targets], x)
    assert_maps_match(got, expected)


def test_in_graph_selection_is_refused_and_the_raw_head_explained(tmp_path):
    """A detector exported with its NMS: no gradient passes a selection; the export says which tensors to keep
    instead (the raw head), and keeping them works."""
    import onnx
    from onnx import TensorProto, helper

    torch.manual_seed(0)
    model = randomized(YoloV8Head()).eval()
    path = tmp_path / "yolo.onnx"
    torch.onnx.export(model, (torch.zeros(1, *SHAPE),), str(path), dynamo=False, input_names=["images"],
                      output_names=["raw"], dynamic_axes={"images": {0: "b"}, "raw": {0: "b"}})
    graph = onnx.load(str(path))
    graph.graph.node.extend([
        helper.make_node("Slice", ["raw", "zero", "four", "one"], ["cxcywh"], name="boxes_slice"),
        helper.make_node("Transpose", ["cxcywh"], ["boxes"], perm=[0, 2, 1], name="boxes"),
        helper.make_node("Slice", ["raw", "four", "seven", "one"], ["scores"], name="scores"),
        helper.make_node("NonMaxSuppression", ["boxes", "scores", "ten", "half", "half"], ["selected"],
                         center_point_box=1, name="nms"),
        helper.make_node("Gather", ["selected", "two"], ["box_index"], axis=1, name="box_index"),
        helper.make_node("Gather", ["raw", "box_index"], ["picked"], axis=2, name="pick"),
    ])
    graph.graph.initializer.extend(onnx.numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in (
        ("zero", [0], np.int64), ("four", [4], np.int64), ("seven", [7], np.int64), ("one", [1], np.int64),
        ("ten", [10], np.int64), ("half", [0.5], np.float32), ("two", 2, np.int64)))
    del graph.graph.output[:]
    graph.graph.output.append(helper.make_tensor_value_info("picked", TensorProto.FLOAT, None))
    onnx.save(graph, str(path))
    with pytest.raises(ModelError) as refused:
        from_onnx(path, tmp_path / "bundle", tensor="/backbone/stage/stage.2/Relu_output_0")
    message = str(refused.value)
    assert "NonMaxSuppression node 'nms'" in message and "outputs=['boxes', 'scores']" in message, message
    bundle = from_onnx(path, tmp_path / "bundle", outputs=["raw"], detector="yolov8",
                       tensor="/backbone/stage/stage.2/Relu_output_0")
    explainer = Explainer(bundle)
    assert explainer.task == "detection" and explainer.num_classes == 3
    x = images(1)
    target = BoxScoreTarget(5, 1)
    expected = reference(model, [lambda out: out[5, 5]], x)
    assert_maps_match(explainer.explain(x, target, steps=STEPS), expected)


# ---------------------------------------------------------------- embeddings, binary, multi-label, linear


def test_similarity_to_a_concept_along_the_path(tmp_path):
    """The cosine is not linear in the outputs: each interpolated image's seed comes from its own outputs."""
    model, bundle = export(Encoder, tmp_path / "bundle", task="embedding")
    explainer = Explainer(bundle)
    assert explainer.task == "embedding" and explainer.num_classes is None
    x = images()
    with torch.no_grad():
        concept = model(torch.from_numpy(images(1, seed=5)))[0].numpy().astype(np.float64)  # a real embedding
    got = explainer.explain(x, SimilarityToConceptTarget(concept), steps=6, variant="paper")  # right rule, A0 off

    def cosine(out):
        return F.cosine_similarity(out, torch.from_numpy(concept), dim=0)

    alphas, weights = quadrature("right", 6)
    expected = contract_maps(ReferencePath(model, "backbone.stage").point, x, [cosine, cosine], alphas, weights,
                             np.zeros((1, *SHAPE), np.float32), True)
    assert_maps_match(got, expected)
    with pytest.raises(OptionError, match="this bundle's task is 'embedding': it has no classes to choose"):
        TargetChoice().checked(explainer.manifest)
    with pytest.raises(OptionError, match="class indices name classes of a classifier or segmenter"):
        explainer.explain(x, 1)


def test_binary_and_multi_label_scores(tmp_path):
    """A single logit (pytorch-grad-cam's BinaryClassifierOutputTarget: +logit for category 1, -logit for 0), and a
    sigmoid multi-label output, whose Sigmoid is differentiated at its input as a Softmax is."""
    class Binary(Encoder):
        def __init__(self):
            super().__init__(size=1)

    model, bundle = export(Binary, tmp_path / "binary")
    x = images()
    got = Explainer(bundle).explain(x, [BinaryClassifierOutputTarget(1), BinaryClassifierOutputTarget(0)], steps=STEPS)
    assert_maps_match(got, reference(model, [lambda out: out[0], lambda out: -out[0]], x))

    model, bundle = export(MultiLabel, tmp_path / "multi")
    explainer = Explainer(bundle)
    assert explainer.manifest.outputs[0].before == "Sigmoid" and explainer.task == "classification"
    got = explainer.explain(x, [BinaryClassifierOutputTarget(1, index=4), ClassifierOutputTarget(7)], steps=STEPS)
    expected = reference(_without_sigmoid(model), [lambda out: out[4], lambda out: out[7]], x)
    assert_maps_match(got, expected)


def _without_sigmoid(model):
    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.project = model.backbone, model.project

        def forward(self, x):
            return Encoder.forward(self, x)

    return Logits().eval()


def test_a_linear_functional_of_any_output(segmenter):
    model, bundle = segmenter
    x = images()
    positions = [[0, 3, 4], [2, 10, 30], [2, 10, 31]]
    weights = [1.0, -0.5, 2.0]
    got = Explainer(bundle).explain(x, LinearTarget(indices=positions, weights=weights, output="out"), steps=STEPS)
    expected = reference(model, [lambda out: sum(w * out["out"][tuple(p)] for p, w in zip(positions, weights))] * 2, x)
    assert_maps_match(got, expected)
    dense = np.zeros((4, 24, 32), np.float32)
    for p, w in zip(positions, weights):
        dense[tuple(p)] = w
    assert_maps_match(Explainer(bundle).explain(x, LinearTarget(weights=dense), steps=STEPS), got, 1e-6, 1e-6)


# ---------------------------------------------------------------- the targets as data


@pytest.mark.parametrize("target", [
    ClassifierOutputTarget(3), BinaryClassifierOutputTarget(0, index=2, output="logits"),
    SemanticSegmentationTarget(2, [[0, 1], [1, 0]]), BoxScoreTarget(17, 1, [1.0, 2.0, 3.0, 4.0], iou=True),
    SimilarityToConceptTarget([0.5, -1.0]), LinearTarget(indices=[[0, 1]], weights=[2.0]),
])
def test_targets_are_plain_data_in_json(target):
    record = target.to_json()
    again = from_json(json.loads(json.dumps(record)))
    assert type(again) is type(target) and again.to_json() == record
    assert [t.to_json() for t in targets_text(json.dumps([record, record]))] == [record, record]


@pytest.mark.parametrize("text,message", [
    ("{", "the targets are not valid JSON"),
    ("[]", "the targets JSON lists no target"),
    ('{"kind": "pixel"}', "a target is an object {\"kind\": one of classifier, binary, segmentation"),
    ('{"kind": "classifier"}', "a classifier target needs 'category'"),
    ('{"kind": "classifier", "category": 1, "colour": 2}', "unknown field(s) 'colour' of a classifier target"),
    ('{"kind": "classifier", "category": 1, "output": 5}', "a target's output is an output's name"),
    ("[" * 100000 + "]" * 100000, "the targets are not valid JSON"),
])
def test_bad_target_json_is_one_line(text, message):
    with pytest.raises(OptionError) as error:
        targets_text(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_old_bundle_says_to_re_export(segmenter, tmp_path):
    import shutil

    _, bundle = segmenter
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 2
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"v2 is not supported; this igcam-engine reads igcam-bundle v3 \(re-export"):
        Explainer(old)


def test_a_host_with_onnx_runtime_alone_reproduces_a_segmentation_map(segmenter):
    """The bundle format's recipe (docs/bundle-format.md): the predicted mask from igcam.onnx's output at alpha 1,
    then explain.onnx with that mask as seed_0 at the class's plane; no igcam_engine code involved."""
    _, bundle = segmenter
    manifest = json.loads((bundle / "manifest.json").read_text())
    x = images(1)
    c, h, w = manifest["input"]["shape"]
    igcam = ort.InferenceSession(str(bundle / manifest["graphs"]["igcam"]["file"]), providers=["CPUExecutionProvider"])
    zero_seed = np.zeros((1, *manifest["outputs"][0]["shape"]), np.float32)
    (scores,) = igcam.run(["output_0"], {"images": x, "baseline": x, "alphas": np.ones(1, np.float32),
                                         "seed_0": zero_seed})
    category = int(np.bincount(scores[0].argmax(axis=0).ravel()).argmax())
    seed = np.zeros_like(zero_seed)
    seed[0, category] = scores[0].argmax(axis=0) == category
    alphas, weights = np.arange(8, dtype=np.float32) / 8, np.full(8, 1 / 8, np.float32)
    explain = ort.InferenceSession(str(bundle / manifest["graphs"]["explain"]["file"]),
                                   providers=["CPUExecutionProvider"])
    (maps,) = explain.run(["maps"], {"images": x, "baseline": np.zeros_like(x), "alphas": alphas, "weights": weights,
                                     "seed_0": seed, "subtract_baseline": np.zeros(1, np.float32)})
    expected = Explainer(bundle).explain(x, SemanticSegmentationTarget(category), steps=8, baseline="zeros")
    assert_maps_match(maps, expected, 1e-4, 1e-4)


# ---------------------------------------------------------------- the per-channel methods score by the target


def per_channel_reference(model, x, function, method):
    """Score-CAM or Ablation-CAM of one image in float64 torch for a target `function` of the model's output (as
    pytorch-grad-cam 1.5 defines them: Score-CAM's masks upsampled with corners aligned and min-max scaled, softmax
    of the target's scores; Ablation-CAM's channels set to 0, or far below the minimum, and the relative drop)."""
    reference = copy.deepcopy(model).double().eval()
    captured = []
    reference.backbone.stage.register_forward_hook(lambda m, i, o: captured.append(o))
    image = torch.from_numpy(x).double()[None]
    with torch.no_grad():
        original = function(unbatched(reference(image)))
        a = captured[0][0]
        if method == "scorecam":
            masks = F.interpolate(a[None], size=image.shape[-2:], mode="bilinear", align_corners=True)[0]
            low, high = masks.amin(dim=(1, 2), keepdim=True), masks.amax(dim=(1, 2), keepdim=True)
            masks = (masks - low) / (high - low + 1e-8)
            scores = torch.stack([function(unbatched(reference(image * m))) for m in masks])
            weights = torch.softmax(scores, dim=0)
        else:
            value = 0.0 if float(a.min()) == 0 else float(a.min()) - 1e7
            scores = []
            for k in range(len(a)):
                ablated = a.clone()
                ablated[k] = value
                handle = reference.backbone.stage.register_forward_hook(lambda m, i, o, v=ablated: v[None])
                scores.append(function(unbatched(reference(image))))
                handle.remove()
            weights = (original - torch.stack(scores)) / original
        cam = torch.relu((weights[:, None, None] * a).sum(0))
    return F.interpolate(cam[None, None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0].numpy()


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_score_cam_and_ablation_cam_score_by_the_target(segmenter, tmp_path, method):
    """A segmentation class over a mask, and a YOLOv5 detection's score (objectness x class, not linear)."""
    model, bundle = segmenter
    x = images()
    mask = np.zeros(SHAPE[1:], np.float32)
    mask[2:20, 4:28] = 1
    got = Explainer(bundle).explain(x, SemanticSegmentationTarget(2, mask), method=method)
    expected = np.stack([per_channel_reference(model, image, lambda out: (out["out"][2] * torch.from_numpy(mask)).sum(),
                                               method) for image in x])
    assert_maps_match(got, expected)
    model, bundle = export(YoloV5Head, tmp_path / "v5", detector="yolov5")
    got = Explainer(bundle).explain(x, BoxScoreTarget(7, 2), method=method)
    expected = np.stack([per_channel_reference(model, image, lambda out: out[7, 4] * out[7, 7], method)
                         for image in x])
    assert_maps_match(got, expected)


def test_the_notebook_path_and_triton_take_targets(segmenter, tmp_path):
    """explain_torch on a model returning a dict, with a segmentation target; a Triton repository of a segmenter
    takes the seeds of its output as an input (a classifier's takes class indices)."""
    from igcam_engine.export import triton_repository
    from igcam_engine.notebook import explain_torch

    model, bundle = segmenter
    x = images()
    mask = np.zeros(SHAPE[1:], np.float32)
    mask[5:15, 3:30] = 1
    target = SemanticSegmentationTarget(2, mask)
    got = explain_torch(model, "backbone.stage", x, target, steps=STEPS, cache_dir=tmp_path / "cache")
    assert_maps_match(got, reference(model, [lambda out: (out["out"][2] * torch.from_numpy(mask)).sum()] * 2, x))
    folder = triton_repository(bundle, tmp_path / "triton", steps=STEPS)
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == {"images", "seed_0"}
    seed = np.zeros((2, 4, *SHAPE[1:]), np.float32)
    seed[:, 2] = mask
    (maps,) = session.run(["maps"], {"images": x, "seed_0": seed})
    assert_maps_match(maps, Explainer(bundle).explain(x, target, steps=STEPS), 1e-4, 1e-4)
    assert 'name: "seed_0" data_type: TYPE_FP32 dims: [ 4, 24, 32 ]' in (folder / "config.pbtxt").read_text()
