"""`igcam demo`: pretrained EfficientNet-Lite0 (real ImageNet weights) explains the sample photos shipped here."""
from __future__ import annotations

from pathlib import Path

from igcam_engine.apps.arguments import Command
from igcam_engine.apps.explain import explain_files
from igcam_engine.bundle import load_manifest
from igcam_engine.data import imagenet_labels, sample_images
from igcam_engine.errors import Unavailable, UserError, install_hint
from igcam_engine.options import ExplainOptions
from igcam_engine.validators import steps_text

DEMO_LAYER = "_head_act"  # the activation after the last convolution, before global pooling (7x7 at 224x224)


def demo_bundle(directory: Path) -> Path:
    """Exports EfficientNet-Lite0 into `directory` once; later runs reuse the bundle."""
    try:
        load_manifest(directory)
        return directory
    except UserError:
        pass
    try:
        from igcam_engine.export import from_torch
        from igcam_engine.zoo import EFFICIENTNET_LITE0_PREPROCESS, efficientnet_lite0
    except ImportError as e:
        raise Unavailable(f"the demo exports a PyTorch model: {install_hint('export,demo')} ({e})") from None
    try:
        model = efficientnet_lite0(pretrained=True)
    except RuntimeError as e:  # the weights' package is missing
        raise Unavailable(str(e)) from None
    print(f"exporting EfficientNet-Lite0 (target layer '{DEMO_LAYER}') to {directory} ...")
    return from_torch(model, DEMO_LAYER, (3, 224, 224), directory,
                      preprocess=EFFICIENTNET_LITE0_PREPROCESS, labels=imagenet_labels())


def run_demo(output: Path, steps=50) -> list[dict]:
    output = Path(output)
    options = ExplainOptions(steps=steps).checked()  # before the export, not after
    bundle = demo_bundle(output / "efficientnet-lite0.bundle")
    results = explain_files(bundle, sample_images(), output, options)
    print(f"\nOverlays (PNG) and raw maps (.npy) are in {output.resolve()}/ ; summary in {output / 'results.json'}")
    return results


def arguments(parser) -> None:
    parser.add_argument("-o", "--output", default="igcam-demo", metavar="DIR",
                        help="output directory (default: ./igcam-demo)")
    parser.add_argument("--steps", default="50", metavar="N|auto", help="points on the path, or auto (default: 50)")


def run(args) -> None:
    run_demo(Path(args.output), steps=steps_text(args.steps))


COMMANDS = (Command("demo", "explain the sample photos with pretrained EfficientNet-Lite0", arguments, run),)
