"""`igcam evaluate`: are the maps any good? Faithfulness (deletion and insertion AUC, Average Drop, Increase in
Confidence), localization against ground-truth objects (EBPG, Bbox, pointing game, mIoU) and Adebayo et al.'s sanity
check, per image and aggregated with 95 % bootstrap intervals. docs/evaluation.md gives each formula and its source.

The model is the engine (a bundle run by ONNX Runtime) unless the caller passes another `Model` (the benchmarks pass
PyTorch eager to time the same metrics both ways); every perturbed image goes through `Model.probabilities` in
batches. Formulas: igcam_engine.evaluation.metrics; data: igcam_engine.evaluation.annotations.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from igcam_engine.backends import BackendOptions
from igcam_engine.errors import InputError, OptionError, UserError
from igcam_engine.evaluation import metrics
from igcam_engine.evaluation.annotations import read_annotations, shipped_set
from igcam_engine.images import fit, load_image, to_model_input
from igcam_engine.methods import INTEGRATED_GRADCAM, METHODS
from igcam_engine.options import DEFAULT_LIMITS, ExplainOptions, Limits
from igcam_engine.preprocess import black_input
from igcam_engine.targets import SemanticSegmentationTarget, class_probabilities
from igcam_engine.validators import choice, integer

PAPER_PRESET = "igcam-paper"  # IG-CAM with the paper's variant; "igcam" is the official one
METHOD_NAMES = (*METHODS, PAPER_PRESET)
DEFAULT_METHODS = ("igcam", PAPER_PRESET, "gradcam", "gradcam++")
SUBSTITUTES = ("black", "blur")
# metric -> (what it is, higher is better); the report's column order
METRICS = {
    "deletion": ("deletion AUC", False),
    "insertion": ("insertion AUC", True),
    "average_drop": ("Average Drop %", False),
    "increase": ("Increase in Confidence %", True),
    "ebpg": ("EBPG", True),
    "bbox": ("Bbox", True),
    "pointing": ("pointing game", True),
    "miou": ("mIoU (top 20 %)", True),
    "sanity": ("sanity: Spearman ρ to the randomized head", False),
}


@dataclass(frozen=True)
class Config:
    """One method as evaluated: its label in the report and explain's options."""

    label: str
    options: ExplainOptions


def configs(methods=DEFAULT_METHODS, steps=(50,)) -> list[Config]:
    """The evaluated configurations: each integrated preset ("igcam", the official variant, and "igcam-paper") at
    each of `steps` (ints or "auto"), the other methods once."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if not methods:
        raise OptionError(f"no methods given; accepted: {', '.join(METHOD_NAMES)}")
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise OptionError(f"unknown method(s) {unknown}; accepted: {', '.join(METHOD_NAMES)}")
    out = []
    for method in dict.fromkeys(methods):
        if method in (INTEGRATED_GRADCAM, PAPER_PRESET):
            variant = "paper" if method == PAPER_PRESET else "official"
            for s in dict.fromkeys(steps):
                options = ExplainOptions(method=INTEGRATED_GRADCAM, variant=variant, steps=s).checked()
                out.append(Config(f"igcam ({variant}, {'adaptive' if s == 'auto' else f'm={options.steps}'})", options))
        else:
            out.append(Config(method, ExplainOptions(method=method).checked()))
    return out


class Model:
    """What the evaluation needs of a model: its input, each image's confidence in a class (a classifier's
    probability; a segmenter's mean probability of the class over the object), maps at input resolution, and the
    same model with its head randomized (the sanity check)."""

    input_shape: tuple
    preprocess: dict | None
    num_classes: int
    labels: list | None

    def probabilities(self, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """[N, classes]: each image's confidence per class (`mask`, [H, W] at model input resolution: the object's
        pixels, which a segmenter's confidence is averaged over)."""
        raise NotImplementedError

    def explain(self, images: np.ndarray, targets: np.ndarray, config: Config, mask: np.ndarray | None = None
                ) -> np.ndarray:
        """Maps of the classes `targets` (a segmenter's over the object's pixels `mask`)."""
        raise NotImplementedError

    def randomized(self, directory: Path) -> "Model":
        """The model with its head randomized; `directory` (new, removed after the run) may hold its files."""
        raise NotImplementedError


class EngineModel(Model):
    """A bundle run by the engine; `rows_per_call` and `channels` (Score-CAM's and Ablation-CAM's) apply to every
    configuration."""

    def __init__(self, bundle, backend: BackendOptions | None = None, rows_per_call=None, channels=None,
                 limits: Limits = DEFAULT_LIMITS):
        from igcam_engine import Explainer

        self.bundle = Path(bundle)
        self.backend, self.rows_per_call, self.channels, self.limits = backend, rows_per_call, channels, limits
        self.explainer = Explainer(bundle, **asdict(backend or BackendOptions()), limits=limits)
        if self.explainer.task not in ("classification", "segmentation"):
            raise OptionError(f"igcam evaluate measures a classifier's or a segmenter's maps (its metrics read class "
                              f"probabilities); this bundle's task is '{self.explainer.task}'")
        self.input_shape = self.explainer.input_shape
        self.preprocess = self.explainer.preprocess
        self.num_classes = self.explainer.num_classes
        self.labels = self.explainer.manifest.labels

    def probabilities(self, images, mask=None):
        if self.explainer.task == "classification":
            return class_probabilities(self.explainer.predict(images))
        return segment_probabilities(self.explainer.manifest.outputs[0], self.explainer.model_outputs(images)[0],
                                     mask)

    def options_for(self, config: Config) -> ExplainOptions:
        """The configuration's options with this model's rows per call and channels, checked."""
        per_channel = config.options.chosen_method.per_channel
        return ExplainOptions.of(config.options, rows_per_call=self.rows_per_call,
                                 channels=self.channels if per_channel else None).checked(
            self.explainer.limits, self.explainer.manifest.target_layer.channels)

    def explain(self, images, targets, config, mask=None):
        if self.explainer.task == "segmentation":  # the class over the object's pixels
            targets = [SemanticSegmentationTarget(int(c), mask) for c in targets]
        return self.explainer.explain(images, targets, self.options_for(config))

    def randomized(self, directory):
        from igcam_engine.export.randomize import randomized_head

        copy = randomized_head(self.bundle, Path(directory) / "bundle")
        return EngineModel(copy, self.backend, self.rows_per_call, self.channels, self.limits)


def segment_probabilities(output, scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[N, classes]: each class's probability (softmax over the classes; one class: its sigmoid) averaged over the
    object's pixels `mask` ([H, W] of the model input, resized to the score map's grid by nearest neighbour)."""
    planes = np.asarray(scores, np.float64)
    planes = planes if output.layout == "NCHW" else np.moveaxis(planes, -1, 1)
    if planes.shape[1] == 1:
        probabilities = 1 / (1 + np.exp(-planes))
    else:
        e = np.exp(planes - planes.max(axis=1, keepdims=True))
        probabilities = e / e.sum(axis=1, keepdims=True)
    h, w = planes.shape[2:]
    rows = ((np.arange(h) + 0.5) * mask.shape[0] / h).astype(int)
    columns = ((np.arange(w) + 0.5) * mask.shape[1] / w).astype(int)
    inside = mask[rows][:, columns].astype(bool)
    if not inside.any():
        raise InputError("the object covers no pixel of the model's score map")
    return probabilities[:, :, inside].mean(axis=2)


def evaluate(bundle_or_model, data, *, methods=DEFAULT_METHODS, steps=(50,), perturbation_steps: int = 16,
             deletion: str = "black", insertion: str = "blur", sanity: bool = True, sanity_images: int | None = None,
             only_correct: bool = False, limit: int | None = None, keep_maps: int = 4,
             backend: BackendOptions | None = None, rows_per_call=None, channels=None, limits: Limits = DEFAULT_LIMITS,
             log=None, warn=None) -> dict:
    """Evaluates the methods on an annotated data set (a folder or manifest, see read_annotations; "shipped": the
    shipped localization set, built into a temporary folder). Returns the report: per image its target and metrics
    (or its error), per method each metric's mean with its 95 % bootstrap interval, the mean deletion and insertion
    curves, timings, and the maps of the first `keep_maps` images for the overlays. The sanity check runs on the
    first `sanity_images` evaluated images (None: all). `log(line)` hears of each image, `warn(line)` of each entry
    that cannot be evaluated."""
    integer(perturbation_steps, "perturbation_steps", 2, 1024)
    choice(deletion, "deletion substitute", SUBSTITUTES)
    choice(insertion, "insertion substitute", SUBSTITUTES)
    for name, value in (("limit", limit), ("sanity_images", sanity_images)):
        if value is not None:
            integer(value, name, 1)
    limits = limits.checked()
    evaluated = configs(methods, steps)
    model = bundle_or_model if isinstance(bundle_or_model, Model) else \
        EngineModel(bundle_or_model, backend, rows_per_call, channels, limits)
    if isinstance(model, EngineModel):
        for config in evaluated:  # before any image: a bad option is one error, not one per image
            model.options_for(config)
    log, warn = log or (lambda line: None), warn or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="igcam-evaluate-") as scratch:
        source = shipped_set(Path(scratch) / "shipped") if str(data) == "shipped" else data
        folder, entries = read_annotations(source, model.num_classes, model.labels)
        if limit is not None:
            entries = entries[:limit]
        random_model = model.randomized(Path(scratch) / "randomized") if sanity else None
        run = _Run(model, random_model, evaluated, perturbation_steps, deletion, insertion, only_correct, limits.pixels,
                   sanity_images)
        started = time.perf_counter()
        for n, entry in enumerate(entries):
            run.image(entry, keep=len(run.kept) < keep_maps)
            result = run.images[-1]
            if result.get("error"):
                warn(result["error"])
            else:
                log(f"[{n + 1}/{len(entries)}] {entry.file.name}: " + (
                    result.get("skipped") or f"class {result['target']} p={result['probability']:.2f}"))
        run.seconds["total"] = time.perf_counter() - started
    return run.report(str(data), folder, model, perturbation_steps, deletion, insertion)


def summary_table(summary: dict) -> list[str]:
    """Markdown rows of a report's summary: a method per row, each metric's mean and its 95 % interval (↑: higher
    is better; the percentages with one decimal)."""
    columns = [m for m in METRICS if any(s[m]["n"] for s in summary.values())]
    lines = ["| method | " + " | ".join(f"{METRICS[m][0]} {'↑' if METRICS[m][1] else '↓'}" for m in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for label, row in summary.items():
        cells = []
        for m in columns:
            s, digits = row[m], 1 if m in ("average_drop", "increase") else 3
            cells.append(f"{s['mean']:.{digits}f} [{s['low']:.{digits}f}, {s['high']:.{digits}f}]" if s["n"] else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


class _Run:
    """The state of one evaluation: per-image results, curves, timings."""

    def __init__(self, model, random_model, evaluated, steps, deletion, insertion, only_correct, max_pixels,
                 sanity_images):
        self.model, self.random_model, self.configs = model, random_model, evaluated
        self.sanity_left = sanity_images
        self.steps, self.deletion, self.insertion = steps, deletion, insertion
        self.only_correct, self.max_pixels = only_correct, max_pixels
        self.black = np.array(black_input(model.preprocess, model.input_shape[0]), np.float32)[:, None, None]
        self.images, self.kept = [], []
        self.curves = {c.label: {"deletion": [], "insertion": []} for c in evaluated}
        self.seconds = {"maps": 0.0, "perturbations": 0.0, "sanity": 0.0}

    def image(self, entry, keep: bool) -> None:
        record = {"file": str(entry.file.name), "where": entry.where}
        self.images.append(record)
        if entry.error:
            record["error"] = entry.error
            return
        try:
            picture = load_image(entry.file, self.max_pixels)
            mask = self._object_mask(entry, picture)
            x, shown = to_model_input(picture, self.model.input_shape, self.model.preprocess)
        except UserError as e:
            record["error"], record["kind"] = f"{entry.where}: {e}", e.kind
            return
        probabilities = self.model.probabilities(x[None], mask)[0]
        accepted = np.array(entry.classes)
        target = int(accepted[np.argmax(probabilities[accepted])])
        correct = int(np.argmax(probabilities)) in entry.classes
        record.update(classes=list(entry.classes), target=target, probability=float(probabilities[target]),
                      correct=correct, object_fraction=float(mask.mean()))
        if self.only_correct and not correct:
            record["skipped"] = f"misclassified (top class {int(np.argmax(probabilities))}), not evaluated"
            return
        maps = {}
        started = time.perf_counter()
        for config in self.configs:
            maps[config.label] = self.model.explain(x[None], np.array([target]), config, mask.astype(np.float32)
                                                    )[0].astype(np.float32)
        self.seconds["maps"] += time.perf_counter() - started
        record["metrics"] = {label: self._localization(saliency, mask) for label, saliency in maps.items()}
        self._perturbations(x, target, probabilities[target], maps, record, mask)
        if self.random_model is not None and (self.sanity_left is None or self.sanity_left > 0):
            self.sanity_left = None if self.sanity_left is None else self.sanity_left - 1
            started = time.perf_counter()
            for config in self.configs:
                randomized = self.random_model.explain(x[None], np.array([target]), config, mask.astype(np.float32))[0]
                record["metrics"][config.label]["sanity"] = metrics.spearman(maps[config.label], randomized)
            self.seconds["sanity"] += time.perf_counter() - started
        if keep:
            self.kept.append({"file": record["file"], "picture": shown, "mask": mask, "target": target, "maps": maps})

    def _object_mask(self, entry, picture) -> np.ndarray:
        """The entry's object at model input resolution, resized and cropped as the image is."""
        full = entry.object_mask(picture.size)
        policy = self.model.preprocess["resize"] if self.model.preprocess else "stretch"
        resized = np.asarray(fit(Image.fromarray(full.astype(np.uint8) * 255, "L"), self.model.input_shape[1:], policy))
        mask = resized > 127
        if not mask.any():
            raise InputError(f"the object is smaller than a pixel at the model's input size "
                            f"{self.model.input_shape[2]}x{self.model.input_shape[1]}")
        return mask

    def _localization(self, saliency, mask) -> dict:
        return {"ebpg": metrics.energy_inside(saliency, mask), "bbox": metrics.top_pixels_inside(saliency, mask),
                "pointing": metrics.pointing_hit(saliency, mask), "miou": metrics.top_fraction_iou(saliency, mask)}

    def _substitute(self, x, kind):
        return np.broadcast_to(self.black, x.shape) if kind == "black" else metrics.gaussian_blur(x)

    def _perturbations(self, x, target, full, maps, record, mask) -> None:
        """Deletion and insertion sequences and the map-multiplied image of every method: one batched call."""
        started = time.perf_counter()
        deleted, inserted = self._substitute(x, self.deletion), self._substitute(x, self.insertion)
        batch = []
        for saliency in maps.values():
            batch += [metrics.perturbation_sequence(x, deleted, saliency, self.steps, insertion=False),
                      metrics.perturbation_sequence(x, inserted, saliency, self.steps, insertion=True),
                      metrics.masked_by_map(x, self.black, saliency)[None]]
        probabilities = self.model.probabilities(np.concatenate(batch), mask)[:, target]
        size = self.steps + 1
        for n, label in enumerate(maps):
            block = probabilities[n * (2 * size + 1):(n + 1) * (2 * size + 1)]
            deletion_curve, insertion_curve, masked = block[:size], block[size:2 * size], block[-1]
            self.curves[label]["deletion"].append(deletion_curve)
            self.curves[label]["insertion"].append(insertion_curve)
            record["metrics"][label].update(
                deletion=metrics.curve_auc(deletion_curve), insertion=metrics.curve_auc(insertion_curve),
                average_drop=float(metrics.average_drop(full, masked)),
                increase=float(metrics.increase_in_confidence(full, masked)))
        self.seconds["perturbations"] += time.perf_counter() - started

    def report(self, data, folder, model, steps, deletion, insertion) -> dict:
        evaluated = [r for r in self.images if "metrics" in r]
        summary = {}
        for config in self.configs:
            summary[config.label] = {}
            for metric in METRICS:
                values = [r["metrics"][config.label][metric] for r in evaluated if metric in r["metrics"][config.label]]
                mean, low, high = metrics.bootstrap_interval(values)
                summary[config.label][metric] = {"mean": mean, "low": low, "high": high, "n": len(values)}
        return {
            "data": data, "folder": str(folder),
            "model": {"input_shape": list(model.input_shape), "num_classes": model.num_classes,
                      "bundle": str(getattr(model, "bundle", ""))},
            "options": {"methods": [c.label for c in self.configs], "perturbation_steps": steps,
                        "deletion_substitute": deletion, "insertion_substitute": insertion,
                        "only_correct": self.only_correct, "sanity": self.random_model is not None,
                        "bootstrap_resamples": metrics.BOOTSTRAP_RESAMPLES,
                        "pointing_tolerance_px": metrics.POINTING_TOLERANCE, "top_fraction": metrics.TOP_FRACTION},
            "counts": {"entries": len(self.images), "evaluated": len(evaluated),
                       "errors": sum(1 for r in self.images if r.get("error")),
                       "skipped": sum(1 for r in self.images if r.get("skipped"))},
            "summary": summary,
            "curves": {label: {kind: np.mean(c, axis=0).tolist() if c else [] for kind, c in curves.items()}
                       for label, curves in self.curves.items()},
            "seconds": self.seconds,
            "images": self.images,
            "kept": self.kept,
        }


__all__ = ["evaluate", "configs", "summary_table", "Config", "Model", "EngineModel", "METRICS", "METHOD_NAMES", "DEFAULT_METHODS"]
