"""`igcam batch`: explain every image of a folder with Ray Data, on this machine or on a Ray cluster.

Each Ray actor holds one Explainer and explains a batch of files per engine call; every image gets the files
`igcam explain` writes (overlays, raw maps) plus <stem>.json, written last: an image whose record exists is done,
so a rerun resumes where the last one stopped. A file that cannot be read or explained is reported, with the
reason, in failures.json, <stem>.failed.json and at the end, and does not stop the others; reruns skip it unless
asked to retry failures.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from igcam_engine.errors import UserError
from igcam_engine.images import MAX_PIXELS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
METHOD_OPTIONS = ("method", "integrate", "channels", "variant", "rule", "steps")  # the record's options explain() takes


class ExplainFiles:
    """A Ray Data actor: one Explainer, one engine call per batch of files."""

    def __init__(self, bundle: str, output: str, options: dict, providers, max_pixels: int):
        from igcam_engine import Explainer

        self.explainer = Explainer(bundle, providers=providers)
        self.output, self.options, self.max_pixels = Path(output), options, max_pixels

    def __call__(self, batch: dict) -> dict:
        from igcam_engine.apps.outputs import write_explanation
        from igcam_engine.images import load_image, to_model_input

        paths = [str(p) for p in batch["path"]]
        status, messages, loaded = ["ok"] * len(paths), [""] * len(paths), []
        for index, path in enumerate(paths):
            try:
                picture = load_image(path, self.max_pixels)
                loaded.append((index, picture, *to_model_input(picture, self.explainer.input_shape,
                                                                 self.explainer.preprocess)))
            except UserError as e:
                status[index], messages[index] = "failed", str(e)
        if loaded:
            images = np.stack([item[2] for item in loaded])
            try:
                scores = self.explainer.predict(images)
                target, top_k = self.options["target"], self.options["top_k"] or 1
                targets = (np.full((len(loaded), 1), target) if target is not None
                           else np.argsort(-scores, axis=1)[:, :top_k])
                method_options = {key: self.options[key] for key in METHOD_OPTIONS}
                maps = self.explainer.explain(images, targets, **method_options)
            except UserError as e:
                for index, *_ in loaded:
                    status[index], messages[index] = "failed", str(e)
                loaded = []
            for row, (index, picture, _, shown) in enumerate(loaded):
                stem = Path(paths[index]).stem
                entry = {"image": paths[index], "options": self.options,
                         **write_explanation(self.output, stem, picture, shown, maps[row], targets[row], scores[row],
                                             self.explainer)}
                record = self.output / f"{stem}.json"
                temporary = record.with_suffix(".json.part")
                temporary.write_text(json.dumps(entry, indent=2) + "\n")
                os.replace(temporary, record)  # the record appears whole, and only once the maps exist
        return {"path": np.array(paths), "status": np.array(status), "message": np.array(messages)}


def pending(input_dir: Path, output_dir: Path, options: dict, retry_failed: bool = False):
    """(images still to explain, images done, images that failed before) in a folder (top level, by suffix). An
    image is done when its record exists and was made with the same options; otherwise it is explained again."""
    if not input_dir.is_dir():
        raise UserError(f"input folder '{input_dir}' does not exist or is not a folder")
    if output_dir.exists() and output_dir.resolve() == input_dir.resolve():
        raise UserError(f"the output folder is the input folder '{input_dir}': the overlays written would be "
                        "explained on the next run; choose another output folder")
    images = sorted(p for p in input_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    stems = [p.stem for p in images]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    if duplicates:
        raise UserError(f"several images share a name ({', '.join(duplicates)}): outputs are named by it; rename them")
    done = [p for p in images if _recorded(output_dir / f"{p.stem}.json", options)]
    failed = [p for p in images if not retry_failed and _recorded(output_dir / f"{p.stem}.failed.json", options)]
    return [p for p in images if p not in done and p not in failed], done, failed


def _recorded(record: Path, options: dict) -> bool:
    """Whether a record exists for these options (a record that cannot be read counts as absent)."""
    try:
        return json.loads(record.read_text()).get("options") == options
    except (OSError, ValueError, AttributeError):
        return False


def run_batch(bundle, input_dir, output_dir, *, address=None, actors=1, batch_size=8, steps=50, method="igcam",
              integrate=None, channels=None, variant="official", rule=None, target=None, top_k=None, providers=None,
              retry_failed=False, max_pixels=MAX_PIXELS) -> dict:
    from igcam_engine.apps.cluster import start_ray, stop_ray
    from igcam_engine.apps.outputs import prepare_output
    from igcam_engine.bundle import load_manifest
    from igcam_engine.explainer import path_nodes
    from igcam_engine.methods import check_channels

    manifest = load_manifest(bundle)
    row = path_nodes(method, variant, rule, steps, integrate=integrate)[0]  # one error, not one per file
    check_channels(channels, row, manifest["target_layer"]["shape"][0])
    if target is not None and not 0 <= target < manifest["num_classes"]:
        raise UserError(f"--target must be in [0, {manifest['num_classes'] - 1}], got {target}")
    options = {"method": method, "integrate": integrate, "channels": channels, "variant": variant, "rule": rule,
               "steps": steps, "target": target, "top_k": top_k}
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    todo, done, failed_before = pending(input_dir, output_dir, options, retry_failed)
    summary = {"explained": 0, "already_done": len(done), "failed_before": [str(p) for p in failed_before],
               "failed": []}
    if not todo:
        return summary
    prepare_output(output_dir)
    ray = start_ray(address, "scale")
    try:
        dataset = ray.data.from_items([{"path": str(p.resolve())} for p in todo]).map_batches(
            ExplainFiles, fn_constructor_args=(str(Path(bundle).resolve()), str(output_dir.resolve()), options,
                                               providers, max_pixels),
            batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1, batch_format="numpy")
        for row in dataset.iter_rows():
            if row["status"] == "ok":
                summary["explained"] += 1
            else:
                summary["failed"].append({"image": str(row["path"]), "error": str(row["message"])})
    finally:
        stop_ray(ray)
    for failure in summary["failed"]:
        (output_dir / f"{Path(failure['image']).stem}.failed.json").write_text(
            json.dumps({**failure, "options": options}, indent=2) + "\n")
    if summary["failed"]:
        (output_dir / "failures.json").write_text(json.dumps(summary["failed"], indent=2) + "\n")
    return summary
