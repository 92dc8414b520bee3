"""`igcam export` and `igcam layers`: a PyTorch module or an ONNX model into a bundle, and the layers that can be
its target (and the outputs it keeps). The work is the exporter's (igcam_engine.export); this module reads the
command line."""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path

from igcam_engine.apps.arguments import Command, positive
from igcam_engine.errors import InputError, ModelError, NotFound, OptionError, Unavailable
from igcam_engine.options import ExplainOptions
from igcam_engine.validators import integer_text, number_text, steps_text


def export_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--torch", metavar="MODULE:FACTORY", help="a Python callable returning a torch.nn.Module")
    source.add_argument("--onnx", metavar="FILE", help="an ONNX model (one NCHW or NHWC float image input)")
    parser.add_argument("--layer", help="target module path for --torch, as in named_modules() (e.g. layer4)")
    parser.add_argument("--tensor", help="target activation tensor for --onnx (default: see `igcam layers`)")
    parser.add_argument("--input-shape", metavar="C,H,W", help="model input shape (required for --torch)")
    parser.add_argument("--input-layout", default="auto", metavar="auto|NCHW|NHWC", help="the ONNX model's image "
                        "input (default: read from the graph; the bundle takes NCHW images either way)")
    parser.add_argument("--layout", default="auto", metavar="auto|NCHW|NHWC|tokens", help="the target's layout "
                        "(default: read from the graph; the export refuses when it cannot tell)")
    parser.add_argument("--grid", metavar="HxW", help="rows and columns of a token target's patch tokens")
    parser.add_argument("--prefix-tokens", metavar="N", help="class, distillation and register tokens before a "
                        "token target's patch tokens")
    _fix_input_argument(parser)
    _purpose_arguments(parser)
    parser.add_argument("--preprocess", default="none", help="'imagenet', 'none', or a JSON dict/file with resize "
                        "(stretch|crop), scale, mean, std (default: none)")
    parser.add_argument("--labels", metavar="FILE", help="class names, one per line")
    parser.add_argument("-o", "--output", required=True, metavar="BUNDLE", help="bundle directory to write")
    parser.add_argument("--verbose", action="store_true", help="on a failure inside torch's exporter, print its full "
                        "report")
    triton = parser.add_argument_group("Triton model repository (explain.onnx with the quadrature fixed)")
    triton.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository here")
    triton.add_argument("--triton-steps", default="50", metavar="N", help="interpolation steps (default: 50)")
    triton.add_argument("--triton-variant", default="official", metavar="V", help="official or paper (default: "
                        "official)")
    triton.add_argument("--triton-rule", metavar="R", help="quadrature rule (default: the variant's)")
    triton.add_argument("--triton-max-batch", default="8", metavar="N", help="max_batch_size (default: 8)")
    triton.add_argument("--triton-tensorrt", default="off", metavar="off|fp32|fp16",
                        help="TensorRT accelerator for Triton's onnxruntime backend (default: off)")


def export(args) -> None:
    exporter = _exporter()
    labels = None
    if args.labels:
        try:
            labels = [line.strip() for line in Path(args.labels).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read the labels file '{args.labels}': {getattr(e, 'strerror', None) or e}"
                             ) from None
    preprocess, shape = _preprocess(args.preprocess), _shape(args.input_shape)
    triton = None
    if args.triton_repo:  # checked before the slow export, not after
        triton = ExplainOptions(steps=steps_text(args.triton_steps, "--triton-steps"), variant=args.triton_variant,
                                rule=args.triton_rule).checked()
        max_batch = positive(args.triton_max_batch, "--triton-max-batch")
    layout = {"layout": args.layout, "grid": _grid(args.grid),
              "prefix_tokens": None if args.prefix_tokens is None else integer_text(args.prefix_tokens)}
    started = time.perf_counter()
    if args.torch:
        if not args.layer or not shape:
            raise OptionError("--torch needs --layer NAME and --input-shape C,H,W")
        if args.input_layout != "auto":
            raise OptionError("--input-layout is for --onnx; a PyTorch model takes NCHW images")
        if args.fix_input:
            raise OptionError("--fix-input is for --onnx; a PyTorch model takes one image")
        path = exporter.from_torch(_torch_factory(args.torch), args.layer, shape, args.output, preprocess=preprocess,
                                   labels=labels, **layout, **_purpose(args))
    else:
        if args.layer:
            raise OptionError("--layer is for --torch; with --onnx name the activation with --tensor")
        path = exporter.from_onnx(args.onnx, args.output, tensor=args.tensor, preprocess=preprocess,
                                  input_shape=shape, labels=labels, input_layout=args.input_layout,
                                  fixed_inputs=_fixed_inputs(args.fix_input), **layout, **_purpose(args))
    manifest = json.loads((path / "manifest.json").read_text())
    layer, task = manifest["target_layer"], manifest["task"]
    kind = task["kind"] + (f" ({task['detector']})" if task["detector"] else "") + (
        f", {task['classes']} classes" if task["classes"] else "")
    outputs = ", ".join(f"{o['source']} {o['shape']}" for o in manifest["outputs"])
    print(f"wrote bundle {path} (target '{layer['name']}' {layer['tensor_shape']}, {layer['layout']} "
          f"{layer['grid'][0]}x{layer['grid'][1]}; {kind}; outputs {outputs}) "
          f"in {time.perf_counter() - started:.1f} s")
    if triton is not None:
        folder = exporter.triton_repository(path, args.triton_repo, options=triton, max_batch_size=max_batch,
                                            tensorrt=args.triton_tensorrt)
        print(f"wrote Triton model {folder} (serve with: tritonserver --model-repository {args.triton_repo})")


def layers_arguments(parser) -> None:
    parser.add_argument("onnx", nargs="?", metavar="FILE", help="an ONNX model: lists its activation tensors and their layouts")
    parser.add_argument("--torch", metavar="MODULE:FACTORY", help="a PyTorch model: lists module paths")
    parser.add_argument("--input-shape", metavar="C,H,W")
    parser.add_argument("--outputs", metavar="NAME,...", help="an ONNX model's outputs to keep (default: all): "
                        "which tensors they depend on decides what can be a target")
    _fix_input_argument(parser)


def _purpose_arguments(parser) -> None:
    group = parser.add_argument_group("outputs and task (docs/targets.md)")
    group.add_argument("--outputs", metavar="NAME,...", help="the model outputs to keep, comma separated (default: "
                       "all; an ONNX model's tensor may be named, e.g. a detector's raw head before its in-graph NMS)")
    group.add_argument("--task", metavar="T", help="classification, segmentation, detection, embedding or outputs "
                       "(default: read from the outputs)")
    group.add_argument("--detector", metavar="F", help="a detection head's format: yolov8, yolov5, detr, rtdetr "
                       "(implies --task detection)")
    group.add_argument("--output-layout", metavar="NCHW|NHWC", help="a score map's layout, where its dims do not "
                                                                    "tell")


def _purpose(args) -> dict:
    return {"outputs": None if args.outputs is None else [o.strip() for o in args.outputs.split(",")],
            "task": args.task, "detector": args.detector, "output_layout": args.output_layout}


def _fix_input_argument(parser) -> None:
    parser.add_argument("--fix-input", action="append", default=[], metavar="NAME=VALUE", help="fill the ONNX "
                        "model's input NAME (not the image: an attention mask, a flag) with the constant VALUE; "
                        "repeatable")


def _fixed_inputs(texts: list) -> dict:
    """--fix-input NAME=VALUE, repeated: {name: number} (the numbers checked by the exporter)."""
    fixed = {}
    for text in texts:
        name, equals, value = text.partition("=")
        if not equals or not name or name in fixed:
            raise OptionError(f"--fix-input must be NAME=VALUE, each name once (e.g. attention_mask=1), got "
                              f"{text!r:.80}")
        fixed[name] = number_text(value)
    return fixed


def layers(args) -> None:
    exporter = _exporter()
    shape = _shape(args.input_shape)
    if args.torch:
        if not shape:
            raise OptionError("--torch needs --input-shape C,H,W to report output shapes")
        if args.fix_input:
            raise OptionError("--fix-input is for an ONNX model; a PyTorch model takes one image")
        found = exporter.torch_layers(_torch_factory(args.torch), shape)  # before any output: an error is one line
        print(f"{'module':40s} {'type':24s} {'output':20s} --layer?")
        for layer in found:
            print(f"{layer['module']:40s} {layer['type']:24s} {str(layer['shape']):20s} "
                  f"{exporter.usability(layer['shape'], layer['calls'])}")
        return
    if not args.onnx:
        raise OptionError("give an ONNX file or --torch MODULE:FACTORY")
    fixed = _fixed_inputs(args.fix_input)
    outputs = None if args.outputs is None else [o.strip() for o in args.outputs.split(",")]
    found = exporter.layers(args.onnx, shape, fixed_inputs=fixed, outputs=outputs)
    kept = exporter.outputs_of(args.onnx, shape, fixed_inputs=fixed)
    print(f"{'tensor':48s} {'op':20s} {'shape':18s} {'layout':22s} --tensor?")
    for layer in found:
        print(f"{layer['tensor']:48s} {layer['op']:20s} {str(layer['shape']):18s} {_layout_text(layer):22s} "
              f"{layer['usable']}")
    print(f"\n{'output (--outputs)':48s} {'differentiated tensor':40s} shape")
    for output in kept:
        before = f" (before its {output['before']})" if output["before"] else ""
        print(f"{output['output']:48s} {output['tensor'] + before:40s} {output['shape']}")


def _layout_text(layer: dict) -> str:
    if layer["layout"] is None:
        return "?"
    grid = f"{layer['grid'][0]}x{layer['grid'][1]}"
    prefix = f" +{layer['prefix_tokens']}" if layer["prefix_tokens"] else ""
    return f"{layer['layout']} {grid}{prefix}"


def _grid(text):
    """--grid HxW: two positive integers (checked by the exporter)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise OptionError(f"--grid must be HxW (e.g. 14x14), got {text!r:.80}")
    return tuple(integer_text(p) for p in parts)


def _exporter():
    """igcam_engine.export, or a one-line error naming the install that provides what it lacks."""
    try:
        from igcam_engine import export
    except ModuleNotFoundError as e:
        raise Unavailable(str(e)) from None
    return export


def _shape(text):
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise OptionError(f"--input-shape expects C,H,W like 3,224,224, got '{text}'") from None
    if len(shape) != 3 or min(shape) < 1 or max(shape) > 1 << 16:
        raise OptionError(f"--input-shape expects three positive integers C,H,W (at most 65536), got '{text}'")
    return shape


def _torch_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise OptionError(f"--torch expects MODULE:FACTORY (e.g. mymodels:resnet50), got '{spec}'")
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except ImportError as e:
        raise NotFound(f"cannot import module '{module_name}': {e}") from None
    except AttributeError:
        raise NotFound(f"module '{module_name}' has no attribute '{attribute}'") from None
    import torch

    try:
        model = factory if isinstance(factory, torch.nn.Module) else factory()
    except Exception as e:  # the user's factory: report its failure in one line
        raise ModelError(f"{spec}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{spec} must be (or return) a torch.nn.Module, got {type(model).__name__}")
    return model


def _preprocess(text: str):
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise OptionError(f"--preprocess is not valid JSON: {e}") from None
    if text.endswith(".json"):
        try:
            return json.loads(Path(text).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise OptionError(f"cannot read --preprocess file '{text}': {getattr(e, 'strerror', None) or e}") from None
    return text


COMMANDS = (
    Command("export", "turn a PyTorch module or an ONNX model into a bundle", export_arguments, export),
    Command("layers", "list a model's outputs and the candidate target layers", layers_arguments, layers),
)
