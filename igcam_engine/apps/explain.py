"""`igcam explain`: image files -> per image and target an overlay and a raw map, plus results.json.

An image that cannot be read or explained is reported (one line on stderr and an entry with its error in
results.json) and the others are still explained; the options are checked, and the output folder prepared, before
the model runs."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from igcam_engine import Explainer
from igcam_engine.apps.arguments import (
    Command,
    add_backend_arguments,
    add_limit_arguments,
    add_method_arguments,
    add_target_arguments,
    backend_options,
    explain_options,
    limits,
    target_choice,
)
from igcam_engine.apps.outputs import prepare_output, unique_names, write_explanation
from igcam_engine.backends import BackendOptions
from igcam_engine.bundle import load_manifest
from igcam_engine.errors import OptionError, UserError
from igcam_engine.images import load_image, load_mask, to_model_input
from igcam_engine.options import DEFAULT_LIMITS, ExplainOptions, Limits
from igcam_engine.targets import SemanticSegmentationTarget, TargetChoice


class Progress:
    """A progress bar on stderr when it is a terminal; `say` prints a result line on stdout without gluing it to
    the bar."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.done = total, label, 0
        self.shown = sys.stderr.isatty()

    def _draw(self):
        if self.shown:
            filled = int(30 * self.done / max(self.total, 1))
            print(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}", end="",
                  file=sys.stderr, flush=True)

    def _clear(self):
        if self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)

    def say(self, line: str, error: bool = False):
        self._clear()
        print(line, file=sys.stderr if error else sys.stdout, flush=True)
        self._draw()

    def step(self):
        self.done += 1
        self._draw()

    def close(self):
        self._clear()


def explain_files(bundle, image_paths, output, options: ExplainOptions | None = None,
                  targets: TargetChoice | None = None, *, backend: BackendOptions | None = None,
                  limits: Limits = DEFAULT_LIMITS, placement: bool = False, mask=None) -> list[dict]:
    """Explains image files with a bundle; writes <name>.<target>.png overlays, .npy raw maps and results.json
    (an entry per image: its prediction and maps, or its error). `mask`: an image file of the pixels of the class
    `targets.target` (a segmenter's) to explain. Everything is checked, and the output folder prepared, before the
    model runs."""
    limits = limits.checked()
    manifest = load_manifest(bundle)
    options = (options or ExplainOptions()).checked(limits, manifest.target_layer.channels)
    targets = _with_mask(targets or TargetChoice(), mask, manifest, limits)
    targets = targets.checked(manifest, limits)
    explainer = Explainer(manifest, **asdict(backend or BackendOptions()), limits=limits)
    output = prepare_output(output)
    if placement:
        for graph, by_provider in explainer.placement().items():
            for provider, ops in by_provider.items():
                print(f"{graph}.onnx on {provider}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
    results, progress = [], Progress(len(image_paths), "explaining")
    try:
        for path, name in zip(image_paths, unique_names(image_paths)):
            try:
                entry = _explain_one(explainer, path, name, output, options, targets)
            except UserError as e:
                results.append({"image": str(path), "error": str(e), "kind": e.kind})
                progress.say(f"igcam: error: {e}", error=True)
            else:
                results.append(entry)
                progress.say(f"{path}: {_said(entry)}"
                             + ", ".join(f"map of {m['name']} ({_score(m)}) -> {m['overlay']}"
                                         for m in entry["maps"])
                             + f" [{entry['seconds']:.2f} s, {entry['passes']} passes]")
            progress.step()
    finally:
        progress.close()
        (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _with_mask(targets: TargetChoice, mask, manifest, limits: Limits) -> TargetChoice:
    """--mask FILE with --target C: the target SemanticSegmentationTarget(C, the mask as the model sees it)."""
    if mask is None:
        return targets
    if targets.target is None or manifest.task.kind != "segmentation":
        raise OptionError("--mask goes with --target C (a class) on a segmenter's bundle")
    pixels = load_mask(mask, manifest.input.shape, manifest.preprocess, limits.pixels)
    return TargetChoice(targets=(SemanticSegmentationTarget(targets.target, pixels),))


def _explain_one(explainer, path, name, output, options, targets) -> dict:
    """One image's files and summary entry."""
    picture = load_image(path, explainer.limits.pixels)
    image, shown = to_model_input(picture, explainer.input_shape, explainer.preprocess)
    started = time.perf_counter()
    outputs = explainer.model_outputs(image[None])
    chosen = targets.select(explainer.manifest, outputs)[0]
    result = explainer.explanation(image[None], [chosen], options)
    elapsed = time.perf_counter() - started
    return {"image": str(path), "seconds": elapsed, "passes": result.passes, "options": options.record(),
            **write_explanation(output, name, picture, shown, result.maps[0], chosen, [o[0] for o in outputs],
                                explainer)}


def _score(entry: dict) -> str:
    return f"p={entry['probability']:.2f}" if "probability" in entry else f"score {entry['score']:.3g}"


def _said(entry: dict) -> str:
    """The prediction of a results entry, in a few words."""
    if "predicted" in entry:
        return f"predicted {entry['predicted']} '{entry['label']}' (p={entry['probability']:.2f}); "
    if "detections" in entry:
        return f"{len(entry['detections'])} detection(s); "
    if "classes" in entry:
        return "predicted " + ", ".join(f"'{c['label']}' {c['share']:.0%}" for c in entry["classes"][:3]) + "; "
    return ""


def arguments(parser) -> None:
    parser.add_argument("bundle", help="bundle directory (from `igcam export`)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    add_target_arguments(parser, mask=True)
    add_method_arguments(parser)
    add_backend_arguments(parser)
    add_limit_arguments(parser)
    parser.add_argument("--placement", action="store_true", help="print which nodes run on which provider")


def run(args) -> int:
    results = explain_files(args.bundle, [Path(p) for p in args.images], args.output, explain_options(args),
                            target_choice(args), backend=backend_options(args), limits=limits(args),
                            placement=args.placement, mask=args.mask)
    return 2 if any("error" in entry for entry in results) else 0


COMMANDS = (Command("explain", "write maps and overlays for images", arguments, run),)
