"""`igcam evaluate`: runs igcam_engine.evaluation and writes its report into a folder: results.json (options, per
image metrics or errors, per method means with 95 % intervals, mean curves, timings), report.md (the table),
curves.png (mean deletion and insertion curves) and overlays.png (a grid: images x methods). The files are written
under temporary names and renamed when complete, so a failed run leaves no half-written report."""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np

from igcam_engine.apps.arguments import Command, add_backend_arguments, add_limit_arguments, backend_options, limits
from igcam_engine.apps.outputs import prepare_output
from igcam_engine.errors import InputError
from igcam_engine.evaluation import DEFAULT_METHODS, METHOD_NAMES, evaluate, summary_table
from igcam_engine.images import overlay
from igcam_engine.validators import integer_text, steps_text


def run_evaluation(bundle, data, output, log=print, **options) -> dict:
    """Evaluates and writes the report; progress on stdout, each entry that cannot be evaluated on stderr."""
    output = prepare_output(output)
    report = evaluate(bundle, data, log=log, warn=lambda line: print(f"igcam evaluate: {line}", file=sys.stderr), **options)
    if report["counts"]["evaluated"] == 0:
        raise InputError(f"no image of '{data}' could be evaluated ({report['counts']['errors']} errors, "
                        f"{report['counts']['skipped']} skipped); see the lines above")
    kept = report.pop("kept")
    _atomic(output / "results.json", (json.dumps(report, indent=1) + "\n").encode())
    _atomic(output / "report.md", (markdown(report) + "\n").encode())
    written = ["results.json", "report.md"]
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        log("igcam evaluate: matplotlib is not installed, so no plots (pip install 'igcam-engine[evaluate]')")
    else:
        _plot_curves(report, output / "curves.png")
        _plot_overlays(kept, output / "overlays.png")
        written += ["curves.png", "overlays.png"]
    log(markdown(report))
    log(f"\n{report['counts']['evaluated']} images evaluated, {report['counts']['skipped']} skipped, "
        f"{report['counts']['errors']} errors in {report['seconds']['total']:.1f} s; wrote {', '.join(written)} "
        f"in {output}/")
    return report


def _atomic(path: Path, data: bytes) -> None:
    """Writes a report file whole: under a temporary name, renamed when complete. (Not storage.Location.write,
    which needs pyarrow: the report is written by the torch-free install too.)"""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def markdown(report: dict) -> str:
    """The table: one row per method, each metric's mean and its 95 % bootstrap interval (↑: higher is better)."""
    lines = summary_table(report["summary"])
    counts = report["counts"]
    sanity_n = max((s["sanity"]["n"] for s in report["summary"].values()), default=0)
    lines += ["", f"{counts['evaluated']} images ({counts['skipped']} skipped, {counts['errors']} errors); "
              f"{report['options']['perturbation_steps']} perturbation steps, deletion to "
              f"{report['options']['deletion_substitute']}, insertion from {report['options']['insertion_substitute']}; "
              f"sanity on {sanity_n} images; 95 % percentile bootstrap intervals over images "
              f"({report['options']['bootstrap_resamples']} resamples)."]
    return "\n".join(lines)


def _save_figure(figure, path: Path, dpi: int) -> None:
    """The figure as PNG, written whole as every report file."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    _atomic(path, buffer.getvalue())


def _plot_curves(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for label, curves in report["curves"].items():
            curve = curves[kind]
            if curve:
                auc = report["summary"][label][kind]["mean"]
                ax.plot(np.linspace(0, 1, len(curve)), curve, label=f"{label} ({auc:.3f})")
        ax.set_xlabel(f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}")
        ax.set_ylabel("mean class probability")
        ax.set_title(f"{kind} (AUC {'↓' if kind == 'deletion' else '↑'})")
        ax.legend(fontsize=7)
    _save_figure(figure, path, dpi=110)


def _plot_overlays(kept: list, path: Path) -> None:
    import matplotlib.pyplot as plt

    if not kept:
        return
    labels = list(kept[0]["maps"])
    figure, axes = plt.subplots(len(kept), len(labels), figsize=(2 * len(labels), 2.1 * len(kept)), squeeze=False)
    for r, (row, image) in enumerate(zip(axes, kept)):
        for c, (ax, label) in enumerate(zip(row, labels)):
            ax.imshow(overlay(image["picture"], image["maps"][label]))
            ax.contour(image["mask"], levels=[0.5], colors="white", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{image['file']}\nclass {image['target']}", fontsize=7)
            if r == 0:
                ax.set_title(label, fontsize=7)
    _save_figure(figure, path, dpi=100)


def arguments(parser) -> None:
    parser.add_argument("bundle", help="bundle directory (from `igcam export`)")
    parser.add_argument("data", help="a folder with manifest.csv or annotations.json (COCO style), such a file, or "
                        "'shipped' (the shipped localization set)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="report folder")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, among {', '.join(METHOD_NAMES)} (default: %(default)s)")
    parser.add_argument("--steps", default="50", metavar="N|auto,...",
                        help="m of the integrated methods, comma-separated integers or auto (default: 50)")
    parser.add_argument("--perturbation-steps", default="16", metavar="N",
                        help="deletion/insertion: points of each curve after the first (default: 16)")
    parser.add_argument("--deletion", default="black", metavar="black|blur", help="deleted pixels become (default: black)")
    parser.add_argument("--insertion", default="blur", metavar="black|blur", help="insertion starts from (default: blur)")
    parser.add_argument("--no-sanity", action="store_true", help="skip the randomized-head sanity check")
    parser.add_argument("--sanity-images", metavar="N", help="sanity check on the first N images only")
    parser.add_argument("--only-correct", action="store_true", help="evaluate only images the model classifies "
                        "correctly (top class among the annotated ones)")
    parser.add_argument("--limit", metavar="N", help="the first N entries of the manifest only")
    parser.add_argument("--channels", metavar="N", help="scorecam, ablationcam: the N channels of largest activation "
                        "mass (default: all)")
    parser.add_argument("--rows-per-call", metavar="N", help="interpolated images per engine call (default: 64)")
    add_backend_arguments(parser)
    add_limit_arguments(parser)


def run(args) -> None:
    def count(text):
        return None if text is None else integer_text(text)

    run_evaluation(args.bundle, args.data, Path(args.output), methods=args.methods,
                   steps=tuple(steps_text(part.strip(), "--steps") for part in args.steps.split(",")),
                   perturbation_steps=integer_text(args.perturbation_steps),
                   deletion=args.deletion, insertion=args.insertion, sanity=not args.no_sanity,
                   sanity_images=count(args.sanity_images), only_correct=args.only_correct, limit=count(args.limit),
                   channels=count(args.channels), rows_per_call=count(args.rows_per_call), backend=backend_options(args),
                   limits=limits(args))


COMMANDS = (Command(
    "evaluate", "faithfulness, localization and sanity metrics of the methods on annotated images", arguments, run,
    description="Deletion/insertion AUC, Average Drop, Increase in Confidence, EBPG, Bbox, pointing game, mIoU and "
    "the randomized-head sanity check, per image and with 95 % bootstrap intervals (docs/evaluation.md)."),)
