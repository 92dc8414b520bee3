"""The `igcam` command: export, layers, explain, evaluate, bench, serve, batch, demo.

User errors (bad arguments, unreadable files, unsupported models) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from igcam_engine.errors import UserError
from igcam_engine.evaluate import DEFAULT_METHODS as EVALUATE_DEFAULTS
from igcam_engine.evaluate import METHOD_NAMES as EVALUATE_METHODS
from igcam_engine.explainer import VARIANTS
from igcam_engine.images import MAX_PIXELS
from igcam_engine.methods import METHODS
from igcam_engine.quadrature import RULES


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
    except UserError as e:
        if getattr(args, "verbose", False) and e.__cause__ is not None:
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"igcam: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code or 0


def _parser() -> argparse.ArgumentParser:
    from igcam_engine.benchmarks import EXTRA_STUDIES, LATENCY_MODELS, METHOD_MODELS, PRECISION_MODELS, QUADRATURE_STEPS, STUDIES

    parser = argparse.ArgumentParser(prog="igcam", description="Integrated Grad-CAM with ONNX Runtime.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    export = commands.add_parser("export", help="turn a PyTorch module or an ONNX classifier into a bundle")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--torch", metavar="MODULE:FACTORY", help="a Python callable returning a torch.nn.Module")
    source.add_argument("--onnx", metavar="FILE", help="an ONNX classifier (one NCHW float input, logits output)")
    export.add_argument("--layer", help="target module path for --torch, as in named_modules() (e.g. layer4)")
    export.add_argument("--tensor", help="target activation tensor for --onnx (default: see `igcam layers`)")
    export.add_argument("--input-shape", type=_shape, metavar="C,H,W", help="model input shape (required for --torch)")
    export.add_argument("--preprocess", default="none", help="'imagenet', 'none', or a JSON dict/file "
                        "with resize (stretch|crop), scale, mean, std (default: none)")
    export.add_argument("--labels", type=Path, metavar="FILE", help="class names, one per line")
    export.add_argument("-o", "--output", required=True, type=Path, metavar="BUNDLE", help="bundle directory to write")
    export.add_argument("--verbose", action="store_true", help="on a failure inside torch's exporter, print its full "
                        "report")
    triton = export.add_argument_group("Triton model repository (explain.onnx with the quadrature fixed)")
    triton.add_argument("--triton-repo", type=Path, metavar="DIR", help="also write a Triton model repository here")
    triton.add_argument("--triton-steps", type=int, default=50, help="interpolation steps (default: 50)")
    triton.add_argument("--triton-variant", choices=list(VARIANTS), default="official")
    triton.add_argument("--triton-rule", choices=RULES, help="quadrature rule (default: the variant's)")
    triton.add_argument("--triton-max-batch", type=int, default=8, help="max_batch_size (default: 8)")
    triton.add_argument("--triton-tensorrt", choices=["off", "fp32", "fp16"], default="off",
                        help="TensorRT accelerator for Triton's onnxruntime backend (default: off)")
    export.set_defaults(run=_export)

    layers = commands.add_parser("layers", help="list the candidate target layers of a model")
    layers.add_argument("onnx", nargs="?", metavar="FILE", help="an ONNX model: lists its 4-D activation tensors")
    layers.add_argument("--torch", metavar="MODULE:FACTORY", help="a PyTorch model: lists module paths")
    layers.add_argument("--input-shape", type=_shape, metavar="C,H,W")
    layers.set_defaults(run=_layers)

    explain = commands.add_parser("explain", help="write maps and overlays for images")
    explain.add_argument("bundle", type=Path, help="bundle directory (from `igcam export`)")
    explain.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    target = explain.add_mutually_exclusive_group()
    target.add_argument("--target", type=int, metavar="C", help="class to explain (default: the predicted class)")
    target.add_argument("--top-k", type=int, metavar="K", help="explain the K highest-scoring classes")
    _add_method_options(explain)
    explain.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="output directory")
    explain.set_defaults(run=_explain)

    evaluate = commands.add_parser(
        "evaluate", help="faithfulness, localisation and sanity metrics of the methods on annotated images",
        description="Deletion/insertion AUC, Average Drop, Increase in Confidence, EBPG, Bbox, pointing game, mIoU "
        "and the randomised-head sanity check, per image and with 95 % bootstrap intervals (README \"Evaluation\").")
    evaluate.add_argument("bundle", type=Path, help="bundle directory (from `igcam export`)")
    evaluate.add_argument("data", help="a folder with manifest.csv or annotations.json (COCO style), such a file, or "
                          "'shipped' (the shipped localisation set)")
    evaluate.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="report folder")
    evaluate.add_argument("--methods", default=",".join(EVALUATE_DEFAULTS),
                          help=f"comma-separated, among {', '.join(EVALUATE_METHODS)} (default: %(default)s)")
    evaluate.add_argument("--steps", default="50", type=_steps_list,
                          help="m of the integrated methods, comma-separated integers or auto (default: 50)")
    evaluate.add_argument("--perturbation-steps", type=_positive, default=16,
                          help="deletion/insertion: points of each curve after the first (default: 16)")
    evaluate.add_argument("--deletion", choices=("black", "blur"), default="black", help="deleted pixels become (default: black)")
    evaluate.add_argument("--insertion", choices=("black", "blur"), default="blur", help="insertion starts from (default: blur)")
    evaluate.add_argument("--no-sanity", action="store_true", help="skip the randomised-head sanity check")
    evaluate.add_argument("--sanity-images", type=_positive, metavar="N", help="sanity check on the first N images only")
    evaluate.add_argument("--only-correct", action="store_true", help="evaluate only images the model classifies "
                          "correctly (top class among the annotated ones)")
    evaluate.add_argument("--limit", type=_positive, metavar="N", help="the first N entries of the manifest only")
    evaluate.add_argument("--channels", type=_positive, metavar="N", help="scorecam, ablationcam: the N channels of "
                          "largest activation mass (default: all)")
    evaluate.add_argument("--batch-size", type=_positive, help="interpolated images per engine call")
    evaluate.add_argument("--providers", type=_providers, default="cpu", help="engine providers (default: cpu)")
    evaluate.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, metavar="N",
                          help=f"refuse images of more pixels (default: {MAX_PIXELS})")
    evaluate.set_defaults(run=_evaluate)

    bench = commands.add_parser(
        "bench", help="measure the engine against PyTorch recipes and ONNX Runtime; the quadrature study",
        description="Measures, in one run on this machine: latency (floor, ONNX Runtime forward-only, the engine "
        "at several m, tuned and official PyTorch, Grad-CAM, peak memory, latency vs images), the quadrature study "
        "(error vs passes per rule against Gauss-Legendre 256), adaptive steps, and several targets per image. "
        "Writes KIND.json (every sample), KIND.md (tables) and KIND.png (plots) into the output directory. "
        "`igcam bench all -o benchmarks/results` reproduces every table of benchmarks/RESULTS.md.")
    bench.add_argument("kind", choices=[*STUDIES, *EXTRA_STUDIES, "all"],
                       help=f"a study, or all ({', '.join(STUDIES)}; methods needs grad-cam, precision openvino)")
    bench.add_argument("--models", help=f"latency, methods, precision: comma-separated models among "
                       f"{', '.join(dict.fromkeys([*LATENCY_MODELS, *PRECISION_MODELS]))} (default: all latency models "
                       f"for latency; {', '.join(METHOD_MODELS)} for methods; {', '.join(PRECISION_MODELS)} for precision)")
    bench.add_argument("--steps", default="8,16,32,50", help="latency: engine steps to time (default: 8,16,32,50)")
    bench.add_argument("--peer-steps", type=int, default=32, help="latency, precision: m for the peers and ratios "
                       "(default: 32)")
    bench.add_argument("--batches", default="1,2,4", help="latency: image counts for latency vs images")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (default: 5)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    bench.add_argument("--reference-steps", type=int, default=256, help="quadrature: Gauss-Legendre reference nodes")
    bench.add_argument("--quadrature-steps", default=",".join(map(str, QUADRATURE_STEPS)))
    bench.add_argument("--providers", type=_providers, default="cpu", help="engine providers (default: cpu)")
    bench.add_argument("--small", action="store_true", help="narrow random-weight models: a quick set-up check")
    bench.add_argument("-o", "--output", type=Path, default=Path("benchmarks/results"), metavar="DIR")
    bench.set_defaults(run=_bench)

    serve = commands.add_parser("serve", help="serve explanations over HTTP (Ray Serve, dynamic batching)")
    serve.add_argument("bundle", type=Path, nargs="?", help="bundle directory (from `igcam export`)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--replicas", type=int, default=1, help="engine replicas (default: 1)")
    serve.add_argument("--max-batch", type=int, default=8, help="images per engine call at most (default: 8)")
    serve.add_argument("--batch-wait-ms", type=float, default=10.0,
                       help="how long a request waits for others to batch with (default: 10)")
    serve.add_argument("--providers", type=_providers, default="auto",
                       help="auto, cpu, cuda, tensorrt or openvino (default: auto)")
    _add_precision(serve)
    _add_cluster_options(serve, "ray://HOST:PORT (Ray Client)")
    serve.add_argument("--name", default="igcam", help="the Serve application's name (default: igcam; its health "
                       "check is NAME-health)")
    serve.add_argument("--route-prefix", default="/", help="where the application's paths start (default: /)")
    serve.add_argument("--stop", action="store_true", help="remove the application NAME from the cluster at "
                       "--address (after an igcam serve that could not clean up) and exit")
    serve.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, metavar="N",
                       help=f"refuse images of more pixels with 413 (default: {MAX_PIXELS})")
    serve.set_defaults(run=_serve)

    batch = commands.add_parser("batch", help="explain every image of a folder with Ray Data (resumable)")
    batch.add_argument("bundle", type=Path, help="bundle directory (from `igcam export`)")
    batch.add_argument("input", metavar="INPUT", help="folder of images (top level): a path, or a URI (s3://, gs://, "
                       "abfs://, hdfs://, file://)")
    batch.add_argument("-o", "--output", required=True, metavar="OUTPUT", help="output folder: a path or a URI")
    _add_cluster_options(batch, "")
    batch.add_argument("--actors", type=int, help="Explainer actors at most (default: one per CPU of the cluster)")
    batch.add_argument("--batch-size", type=int, default=8, help="images per engine call (default: 8)")
    target = batch.add_mutually_exclusive_group()
    target.add_argument("--target", type=int, metavar="C", help="class to explain (default: the predicted class)")
    target.add_argument("--top-k", type=int, metavar="K", help="explain the K highest-scoring classes")
    _add_method_choice(batch)
    batch.add_argument("--variant", choices=list(VARIANTS), default="official")
    batch.add_argument("--rule", choices=RULES)
    batch.add_argument("--steps", type=int, default=50)
    batch.add_argument("--providers", type=_providers, default="cpu", help="cpu, cuda, tensorrt or openvino (default: cpu)")
    _add_precision(batch)
    batch.add_argument("--retry-failed", action="store_true", help="try again the images that failed before")
    batch.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, metavar="N",
                       help=f"refuse images of more pixels (default: {MAX_PIXELS})")
    batch.set_defaults(run=_batch)

    demo = commands.add_parser("demo", help="explain the sample photos with pretrained EfficientNet-Lite0")
    demo.add_argument("-o", "--output", type=Path, default=Path("igcam-demo"), metavar="DIR",
                      help="output directory (default: ./igcam-demo)")
    demo.add_argument("--steps", type=int, default=50, help="interpolation steps (default: 50)")
    demo.set_defaults(run=_demo)
    return parser


def _add_cluster_options(parser, client: str):
    parser.add_argument("--address", help="join a Ray cluster: auto (this machine is a node), HOST:PORT (the GCS "
                        f"address){', ' + client if client else ''}; default: start a Ray of its own on this machine, "
                        "on loopback, whatever RAY_ADDRESS says")
    parser.add_argument("--runtime-env", metavar="JSON", help="Ray runtime environment for the actors or replicas, a "
                        "JSON object or @FILE (e.g. '{\"pip\": [\"onnxruntime\"]}'); see README \"Cluster\"")


def _add_method_choice(parser):
    parser.add_argument("--method", choices=METHODS, default="igcam",
                        help="CAM method (default: igcam, integrated Grad-CAM; see README \"Methods\")")
    parser.add_argument("--integrate", action="store_true", help="average a gradient method's step maps over the "
                        "IG-CAM path (--steps, --variant, --rule apply): integrated Grad-CAM++, LayerCAM, ...")
    parser.add_argument("--channels", type=_positive, metavar="N", help="scorecam, ablationcam: only the N channels "
                        "of largest activation mass (one pass each; default: all)")


def _add_method_options(parser):
    _add_method_choice(parser)
    parser.add_argument("--variant", choices=list(VARIANTS), default="official",
                        help="official: left rule, no baseline subtraction; paper: right rule with subtraction")
    parser.add_argument("--rule", choices=RULES, help="quadrature rule (overrides the variant's)")
    parser.add_argument("--steps", type=_steps, default=50,
                        help="number of interpolation points, or 'auto' to refine until the maps settle (default: 50)")
    parser.add_argument("--tolerance", type=float, help="with --steps auto: largest change accepted, "
                        "relative to each map's range (default: 0.01)")
    parser.add_argument("--max-pixels", type=_positive, default=MAX_PIXELS, metavar="N",
                        help=f"refuse images of more pixels (default: {MAX_PIXELS})")
    parser.add_argument("--baseline", choices=["black", "zeros"], default="black")
    parser.add_argument("--batch-size", type=int, help="interpolated images per ONNX Runtime call")
    parser.add_argument("--providers", type=_providers, default="auto",
                        help="auto (best available), cpu, cuda, tensorrt, openvino (OpenVINO's runtime on the CPU), "
                             "or ONNX Runtime provider names, comma separated (default: auto)")
    _add_precision(parser)
    parser.add_argument("--fp16", action="store_true", help="TensorRT: build fp16 engines")
    parser.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 tensor cores (faster; maps within "
                        "about 1e-2 of float32's, see README)")
    parser.add_argument("--engine-cache", type=Path, metavar="DIR", help="TensorRT engine cache directory "
                        "(default: ~/.cache/igcam/tensorrt)")
    parser.add_argument("--placement", action="store_true", help="print which nodes run on which provider")


def _add_precision(parser):
    parser.add_argument("--precision", choices=["f32", "bf16"], help="--providers openvino: f32 (the default, exact "
                        "maps) or bf16 (faster where the CPU has bf16 instructions; maps within a few %%, see README)")


def _providers(text: str):
    """--providers: "auto" -> None (the best available); comma-separated ONNX Runtime names -> a list; else the
    short name (cpu, cuda, tensorrt) as given."""
    if text == "auto":
        return None
    if "," in text or text.endswith("ExecutionProvider"):
        return text.split(",")
    return text


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return value


def _steps(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got '{text}'") from None


def _shape(text: str):
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W like 3,224,224, got '{text}'") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive ints C,H,W, got '{text}'")
    return shape


def _torch_factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UserError(f"--torch expects MODULE:FACTORY (e.g. mymodels:resnet50), got '{spec}'")
    sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except ImportError as e:
        raise UserError(f"cannot import module '{module_name}': {e}") from None
    except AttributeError:
        raise UserError(f"module '{module_name}' has no attribute '{attribute}'") from None
    import torch

    try:
        model = factory if isinstance(factory, torch.nn.Module) else factory()
    except Exception as e:  # the user's factory: report its failure in one line
        raise UserError(f"{spec}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{spec} must be (or return) a torch.nn.Module, got {type(model).__name__}")
    return model


def _preprocess_arg(text: str):
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"--preprocess is not valid JSON: {e}") from None
    if text.endswith(".json"):
        try:
            return json.loads(Path(text).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read --preprocess file '{text}': {e}") from None
    return text


def _exporter():
    """igcam_engine.export, or a one-line error naming the install that provides what it lacks."""
    try:
        from igcam_engine import export
    except ModuleNotFoundError as e:
        raise UserError(str(e)) from None
    return export


def _export(args):
    export = _exporter()

    labels = None
    if args.labels:
        try:
            labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UserError(f"cannot read labels file: {e}") from None
    preprocess = _preprocess_arg(args.preprocess)
    started = time.perf_counter()
    if args.torch:
        if not args.layer or not args.input_shape:
            raise UserError("--torch needs --layer NAME and --input-shape C,H,W")
        path = export.from_torch(_torch_factory(args.torch), args.layer, args.input_shape, args.output,
                                 preprocess=preprocess, labels=labels)
    else:
        if args.layer:
            raise UserError("--layer is for --torch; with --onnx name the activation with --tensor")
        path = export.from_onnx(args.onnx, args.output, tensor=args.tensor, preprocess=preprocess,
                                input_shape=args.input_shape, labels=labels)
    manifest = json.loads((path / "manifest.json").read_text())
    layer = manifest["target_layer"]
    print(f"wrote bundle {path} (target '{layer['name']}' {layer['shape']}, {manifest['num_classes']} classes) "
          f"in {time.perf_counter() - started:.1f} s")
    if args.triton_repo:
        folder = export.triton_repository(path, args.triton_repo, steps=args.triton_steps, rule=args.triton_rule,
                                          variant=args.triton_variant, max_batch_size=args.triton_max_batch,
                                          tensorrt=args.triton_tensorrt)
        print(f"wrote Triton model {folder} (serve with: tritonserver --model-repository {args.triton_repo})")


def _layers(args):
    if args.torch:
        if not args.input_shape:
            raise UserError("--torch needs --input-shape C,H,W to report output shapes")
        rows = _torch_layers(_torch_factory(args.torch), args.input_shape)
        print(f"{'module':40s} {'type':24s} {'output':20s} --layer?")
        for name, kind, shape, calls in rows:
            print(f"{name:40s} {kind:24s} {str(shape):20s} {_usable(shape, calls=calls)}")
        return
    if not args.onnx:
        raise UserError("give an ONNX file or --torch MODULE:FACTORY")
    layers = _exporter().layers
    print(f"{'tensor':48s} {'op':20s} {'shape':18s} --tensor?")
    for row in layers(args.onnx, args.input_shape):
        print(f"{row['tensor']:48s} {row['op']:20s} {str(row['shape']):18s} {_usable(row['shape'], cut=row['cut'])}")


def _usable(shape, cut=True, calls=1) -> str:
    """Whether a layer can be the target, and why not."""
    if calls != 1:
        return f"no (runs {calls} times per forward pass)"
    if not cut:
        return "no (bypassed by a skip path)"
    if shape[1] * shape[2] == 1:
        return "no (1x1: after global pooling, a map of one pixel)"
    return "yes"


def _torch_layers(model, input_shape):
    """(module path, type, output shape, calls per forward pass) for every module producing a 4-D tensor, once each
    (a reused module reports the number of times it ran). The model is run in eval mode and handed back as it was."""
    import torch

    found, handles = {}, []

    def record(module, args, output, name):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            kind, shape, calls = found.get(name, (type(module).__name__, list(output.shape[1:]), 0))
            found[name] = (kind, shape, calls + 1)

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(
                lambda module, args, output, name=name: record(module, args, output, name)))
    modes = {module: module.training for module in model.modules()}
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as e:  # the user's model: its failure in one line
        raise UserError(f"the model fails on an input of shape [1, {', '.join(map(str, input_shape))}]: "
                        f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    return [(name, kind, shape, calls) for name, (kind, shape, calls) in found.items()]


def _explain(args):
    from igcam_engine.apps.explain import explain_files

    if args.tolerance is not None and args.steps != "auto":
        raise UserError("--tolerance is for --steps auto (the refinement stops when maps change by less)")
    results = explain_files(args.bundle, args.images, args.output, target=args.target, top_k=args.top_k, method=args.method,
                  integrate=args.integrate or None, channels=args.channels,
                  variant=args.variant, rule=args.rule, steps=args.steps, baseline=args.baseline,
                  batch_size=args.batch_size, providers=args.providers, precision=args.precision, fp16=args.fp16, tf32=args.tf32,
                  engine_cache=args.engine_cache, placement=args.placement,
                  tolerance=0.01 if args.tolerance is None else args.tolerance, max_pixels=args.max_pixels)
    return 2 if any("error" in entry for entry in results) else 0


def _evaluate(args):
    from igcam_engine.apps.evaluate import run_evaluation

    run_evaluation(args.bundle, args.data, args.output, methods=args.methods, steps=args.steps,
                   perturbation_steps=args.perturbation_steps, deletion=args.deletion, insertion=args.insertion,
                   sanity=not args.no_sanity, sanity_images=args.sanity_images, only_correct=args.only_correct,
                   limit=args.limit, channels=args.channels, batch_size=args.batch_size, providers=args.providers,
                   max_pixels=args.max_pixels)


def _steps_list(text: str) -> tuple:
    values = []
    for part in text.split(","):
        part = part.strip()
        if part == "auto":
            values.append(part)
        elif part.isdigit() and int(part) >= 1:
            values.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"steps are positive integers or auto, comma-separated; got '{text}'")
    return tuple(values)


def _ints(text: str, option: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{option} expects comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} values must be positive, got '{text}'")
    return values


def _bench(args):
    try:
        from igcam_engine import benchmarks
    except ImportError as e:
        raise UserError(f"igcam bench needs the export extra (torch): pip install 'igcam-engine[export,bench]' ({e})") from None
    if args.repeats < 1 or args.warmup < 0:
        raise UserError("--repeats must be >= 1 and --warmup >= 0")
    models = tuple(args.models.split(",")) if args.models else None
    known = dict.fromkeys([*benchmarks.LATENCY_MODELS, *benchmarks.PRECISION_MODELS])
    unknown = [m for m in models or () if m not in known]
    if unknown:
        raise UserError(f"unknown model(s) {unknown}; choose from {', '.join(known)}")
    kinds = benchmarks.STUDIES if args.kind == "all" else (args.kind,)
    tables = benchmarks.run(
        kinds, args.output, models=models, steps=_ints(args.steps, "--steps"), peer_steps=args.peer_steps,
        batches=_ints(args.batches, "--batches"), repeats=args.repeats, warmup=args.warmup, providers=args.providers,
        small=args.small, quadrature_steps=_ints(args.quadrature_steps, "--quadrature-steps"),
        reference_steps=args.reference_steps)
    if args.kind == "all":
        (args.output / "tables.md").write_text("\n".join(tables))
    print(f"results in {args.output}/")


def _serve(args):
    from igcam_engine.apps.cluster import parse_runtime_env
    from igcam_engine.apps.serve import run_server, stop_application

    if args.stop:
        removed = stop_application(args.address, args.name)
        print(f"removed {', '.join(removed)}" if removed else f"no application '{args.name}' is running there")
        return
    if args.bundle is None:
        raise UserError("give the bundle to serve (or --stop with --address to remove a running one)")
    if args.replicas < 1 or args.max_batch < 1 or args.batch_wait_ms < 0:
        raise UserError("--replicas and --max-batch must be >= 1, --batch-wait-ms >= 0")
    run_server(str(args.bundle), args.host, args.port, replicas=args.replicas, max_batch=args.max_batch,
               batch_wait_ms=args.batch_wait_ms, providers=args.providers, precision=args.precision, address=args.address,
               max_pixels=args.max_pixels, name=args.name, route_prefix=args.route_prefix,
               runtime_env=parse_runtime_env(args.runtime_env))


def _batch(args):
    from igcam_engine.apps.batch import run_batch
    from igcam_engine.apps.cluster import parse_runtime_env

    if (args.actors is not None and args.actors < 1) or args.batch_size < 1 or (args.top_k is not None and args.top_k < 1):
        raise UserError("--actors, --batch-size and --top-k must be >= 1")
    summary = run_batch(args.bundle, args.input, args.output, address=args.address, actors=args.actors,
                        runtime_env=parse_runtime_env(args.runtime_env),
                        batch_size=args.batch_size, steps=args.steps, method=args.method,
                        integrate=args.integrate or None, channels=args.channels, variant=args.variant,
                        rule=args.rule, target=args.target, top_k=args.top_k, providers=args.providers,
                        precision=args.precision,
                        retry_failed=args.retry_failed, max_pixels=args.max_pixels)
    print(f"{summary['explained']} explained, {summary['already_done']} already done, "
          f"{len(summary['failed'])} failed; outputs in {summary['output']}/")
    if summary["nodes"]:
        print("explained on " + ", ".join(f"{node}: {count}" for node, count in summary["nodes"].items()))
    if summary["failed_before"]:
        print(f"{len(summary['failed_before'])} image(s) failed in an earlier run and were skipped "
              "(--retry-failed tries them again)")
    for failure in summary["failed"]:
        print(f"failed: {failure['image']}: {failure['error']}", file=sys.stderr)
    if summary["failed"]:
        print(f"failures listed in {summary['output']}/failures.json", file=sys.stderr)
        sys.exit(1)


def _demo(args):
    from igcam_engine.apps.demo import run_demo

    run_demo(args.output, steps=args.steps)


if __name__ == "__main__":
    sys.exit(main())
