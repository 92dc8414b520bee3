"""The command line's shared pieces: a command's shape, a parser whose errors are one line, and the option groups
every command spells and means the same way.

Values are read as text and converted by the core's validators (igcam_engine.options), so that `--steps 0` here and
`steps=0` in a request to the service are refused with the same line. The groups:

- targets: --target C|JSON|@FILE | --top-k K (neither: the model's best: its predicted class, its largest predicted
  class, its most confident detection), --mask FILE for a segmentation class;
- method: --method, --integrate, --channels, --variant, --rule, --steps N|auto, --tolerance, --max-steps,
  --baseline, --subtract-baseline, --normalize, --rows-per-call (interpolated images per engine call);
- backend: --providers (default auto everywhere), --precision, --fp16, --tf32, --engine-cache, --device-id;
- limits: --max-pixels, --step-limit, --memory-budget (the service adds --channel-limit and --top-k-limit).
"""
from __future__ import annotations

import argparse
import os
import stat
import sys
from dataclasses import dataclass
from typing import Callable

from igcam_engine.backends import BackendOptions, providers_text
from igcam_engine.errors import NotFound, OptionError
from igcam_engine.methods import METHODS
from igcam_engine.options import BASELINES, DEFAULT_LIMITS, VARIANTS, ExplainOptions, Limits
from igcam_engine.quadrature import RULES
from igcam_engine.targets import TargetChoice
from igcam_engine.validators import integer, integer_text


@dataclass(frozen=True)
class Command:
    """One `igcam` command: its name and help, the function adding its arguments, and the one running it (returns
    the exit status, None for 0)."""

    name: str
    help: str
    arguments: Callable
    run: Callable
    description: str | None = None


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (and where to look), not the usage block first."""

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def positive(text: str, name: str = "value") -> int:
    return integer(integer_text(text, name), name, 1)


MAX_TARGETS_FILE = 64 << 20


def add_target_arguments(parser, mask: bool = False) -> None:
    group = parser.add_argument_group("targets (docs/targets.md)")  # one or the other: TargetChoice says so
    group.add_argument("--target", metavar="C|JSON|@FILE", help="a class to explain, or targets as JSON (an object "
                       "or a list: {\"kind\": \"segmentation\", \"category\": 15}, ...), or @FILE holding that JSON "
                       "(default: the model's best: the predicted class, the largest predicted class, the most "
                       "confident detection)")
    group.add_argument("--top-k", metavar="K", help="explain the K best (classes, detections, segmentation classes "
                       "by area)")
    if mask:
        group.add_argument("--mask", metavar="FILE", help="with --target C on a segmenter: the pixels of class C to "
                           "explain, an image (non-zero pixels; resized as the photo is); default: where the model "
                           "predicts C")


def target_choice(args) -> TargetChoice:
    text = args.target
    if isinstance(text, str) and text.startswith("@"):
        text = read_text_file(text[1:], "the targets file", MAX_TARGETS_FILE)
        if text.lstrip()[:1] not in ("{", "["):
            raise OptionError(f"the targets file '{args.target[1:]}' must hold a JSON object or list of targets")
    return TargetChoice.from_text(text, args.top_k)


def read_text_file(path: str, what: str, limit: int) -> str:
    """A small UTF-8 text file given on the command line: a regular file of at most `limit` bytes."""
    try:
        status = os.stat(path)
        if not stat.S_ISREG(status.st_mode):
            raise OptionError(f"{what} '{path}' is not a regular file")
        if status.st_size > limit:
            raise OptionError(f"{what} '{path}' is {status.st_size} bytes, at most {limit}")
        with open(path, encoding="utf-8") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        raise NotFound(f"no such file: {what} '{path}'") from None
    except (OSError, UnicodeDecodeError) as e:
        raise OptionError(f"cannot read {what} '{path}': {getattr(e, 'strerror', None) or e}") from None


def add_method_arguments(parser, steps_default: str = "50") -> None:
    group = parser.add_argument_group("method (docs/method.md)")
    group.add_argument("--method", default="igcam", metavar="M",
                       help=f"{', '.join(METHODS)} (default: igcam, integrated Grad-CAM)")
    group.add_argument("--integrate", action="store_true", help="average a gradient method's step maps over the "
                       "IG-CAM path (--steps, --variant, --rule apply): integrated Grad-CAM++, LayerCAM, ...")
    group.add_argument("--channels", metavar="N", help="scorecam, ablationcam: only the N channels of largest "
                       "activation mass (one pass each; default: all)")
    group.add_argument("--variant", default="official", metavar="V", help=f"{', '.join(VARIANTS)}: official is the "
                       "left rule without baseline subtraction, paper the right rule with it (default: official)")
    group.add_argument("--rule", metavar="R", help=f"quadrature rule, overriding the variant's: {', '.join(RULES)}")
    group.add_argument("--steps", default=steps_default, metavar="N|auto", help="points on the path, or auto to "
                       f"refine until the maps settle (default: {steps_default})")
    group.add_argument("--tolerance", metavar="T", help="--steps auto: largest change accepted, relative to each map's "
                       "range (default: 0.01)")
    group.add_argument("--max-steps", metavar="N", help="--steps auto: passes at most (default: 129)")
    group.add_argument("--baseline", default="black", metavar="B", help=f"{', '.join(BASELINES)} (default: black)")
    group.add_argument("--subtract-baseline", metavar="yes|no", help="subtract the baseline's activations (default: "
                       "the variant's choice)")
    group.add_argument("--normalize", action="store_true", help="min-max scale each map to [0, 1]")
    group.add_argument("--rows-per-call", metavar="N", help="interpolated images per engine call (default: 64, "
                       "bounded by --memory-budget); the maps do not depend on it")


def explain_options(args) -> ExplainOptions:
    """The method group's values as ExplainOptions (unchecked: the command checks them against its bundle)."""
    texts = {"method": args.method, "variant": args.variant, "rule": args.rule, "steps": args.steps,
             "tolerance": args.tolerance, "max_steps": args.max_steps, "baseline": args.baseline,
             "channels": args.channels, "subtract_baseline": args.subtract_baseline,
             "rows_per_call": args.rows_per_call}
    options = ExplainOptions.from_text({name: text for name, text in texts.items() if text is not None})
    return ExplainOptions.of(options, integrate=True if args.integrate else None, normalize=args.normalize)


def add_backend_arguments(parser) -> None:
    group = parser.add_argument_group("backend (docs/gpu.md, docs/precision.md)")
    group.add_argument("--providers", default="auto", metavar="P", help="auto (the best available), cpu, cuda, "
                       "tensorrt, openvino (OpenVINO's runtime on the CPU), or ONNX Runtime provider names, comma "
                       "separated (default: auto)")
    group.add_argument("--precision", metavar="f32|bf16", help="--providers openvino: f32 (the default, exact maps) "
                       "or bf16 (faster where the CPU has bf16 instructions; maps within a few %%)")
    group.add_argument("--fp16", action="store_true", help="TensorRT: build fp16 engines")
    group.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 tensor cores (faster; maps within about "
                       "1e-2 of float32's)")
    group.add_argument("--engine-cache", metavar="DIR", help="TensorRT engine cache (default: ~/.cache/igcam/tensorrt)")
    group.add_argument("--device-id", default="0", metavar="N", help="the GPU to use (default: 0)")


def backend_options(args) -> BackendOptions:
    """The backend group's values, checked."""
    return BackendOptions(providers_text(args.providers), args.precision, args.fp16, args.tf32, args.engine_cache,
                          None, integer_text(args.device_id, "device_id")).checked()


def add_limit_arguments(parser, defaults: Limits = DEFAULT_LIMITS, service: bool = False) -> None:
    group = parser.add_argument_group("limits (docs/security.md)")
    group.add_argument("--max-pixels", default=str(defaults.pixels), metavar="N",
                       help=f"refuse images of more pixels (default: {defaults.pixels})")
    group.add_argument("--step-limit", default=str(defaults.steps), metavar="N",
                       help=f"refuse more passes per map than this (default: {defaults.steps})")
    group.add_argument("--memory-budget", default=str(defaults.memory), metavar="BYTES",
                       help=f"bytes one engine call and one call's maps may use (default: {defaults.memory})")
    if service:
        group.add_argument("--channel-limit", default=str(defaults.channels), metavar="N",
                           help="Score-CAM, Ablation-CAM: passes per image at most; a request without channels takes "
                                f"the N of largest activation mass (default: {defaults.channels})")
        group.add_argument("--top-k-limit", default=str(defaults.top_k), metavar="K",
                           help=f"classes per request at most (default: {defaults.top_k})")


def limits(args, defaults: Limits = DEFAULT_LIMITS) -> Limits:
    """The limits group's values, checked."""
    values = Limits(steps=integer_text(args.step_limit, "step_limit"), memory=integer_text(args.memory_budget,
                                                                                         "memory_budget"),
                    pixels=integer_text(args.max_pixels, "max_pixels"), channels=defaults.channels, top_k=defaults.top_k)
    if hasattr(args, "channel_limit"):
        values = Limits(values.steps, integer_text(args.channel_limit, "channel_limit"),
                        integer_text(args.top_k_limit, "top_k_limit"), values.memory, values.pixels)
    return values.checked()
