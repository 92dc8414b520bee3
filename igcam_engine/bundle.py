"""The bundle on disk: a directory with manifest.json, the ONNX graphs and one shared weights file.

Graphs (all with a dynamic batch; H, W fixed at export; the kept model outputs are output_0, output_1, ... and
the cotangent of output_i, the "seed" a target makes, is seed_i, shaped like it):
- forward.onnx   (images [N,C,H,W], baseline [Nb,C,H,W], alphas [M]) -> activations [N*M,K,h,w], held_i
                 rows are image-major: row n*M + i holds baseline + alphas[i] * (images[n] - baseline).
- gradient.onnx  (activations [R,K,h,w], held_i, seed_index [R] int64, seed_i [S,...]) -> activation_grad
                 [R,K,h,w] (the vector-Jacobian product of the outputs with row r's seeds seed_i[seed_index[r]]),
                 output_i [R,...]
- igcam.onnx     (images, baseline, alphas, seed_i [N,...]) -> activations, activation_grad, output_i (both above in
                 one; image n's seeds for each of its rows)
- explain.onnx   (images, baseline, alphas, weights [M], seed_i [N,...], subtract_baseline [1]) -> maps [N,H,W]

A bundle may come from anywhere: the manifest is checked field by field before anything it names is opened, every
file it names must be a plain name inside the bundle (no separator, no "..", no link leading out), and sizes are
bounded before anything is allocated from them (see LIMITS).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from igcam_engine import validators
from igcam_engine.detections import HEADS
from igcam_engine.errors import BundleError, NotFound, OptionError, UserError
from igcam_engine.preprocess import resolve_preprocess

FORMAT = "igcam-bundle"
FORMAT_VERSION = 3  # 3: every kept output and its seed (a vector-Jacobian product), the task; 2: layouts, held
READABLE_VERSIONS = (3,)  # versions 1 and 2 took class indices, not seeds: re-export
LAYOUTS = ("NCHW", "NHWC", "tokens")
OUTPUT_LAYOUTS = ("NCHW", "NHWC")  # a score map's: classes first or last
MAX_HELD = 32
MAX_OUTPUTS = 16
# What a bundle's model is for: it decides the default targets and how results are shown (docs/targets.md).
TASKS = ("classification", "segmentation", "detection", "embedding", "outputs")
CLASS_TASKS = ("classification", "segmentation", "detection")  # the tasks whose targets choose among classes
DETECTORS = tuple(HEADS)
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
GRAPHS = ("forward", "gradient", "igcam", "explain")
# Bounds on what a manifest may ask for (a model outside them is not a CNN classifier this engine serves).
LIMITS = {
    "manifest_bytes": 16 << 20,
    "channels": 64,  # image channels
    "side": 16384,  # image height and width
    "input_elements": 64 << 20,  # C * H * W
    "activation_elements": 64 << 20,  # K * h * w, and the held tensors' elements per row together
    "output_elements": 64 << 20,  # the outputs' elements per row together
    "classes": 1 << 20,
}
SCORE_OPS = (None, "Softmax", "LogSoftmax", "Sigmoid")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # C, H, W
    layout: str = "NCHW"
    dtype: str = "float32"


@dataclass(frozen=True)
class TargetLayer:
    name: str  # as the user named it (a module path, or the ONNX tensor)
    tensor: str  # the ONNX tensor
    shape: tuple  # K, h, w: the canonical form the graphs give the runtime
    layout: str = "NCHW"  # the tensor's own layout (LAYOUTS)
    prefix_tokens: int = 0  # tokens before the patch tokens (layout "tokens")

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> tuple:
        return self.shape[1:]


@dataclass(frozen=True)
class HeldTensor:
    """A tensor the gradient graph takes besides the activations, held at the forward graph's value: graph
    input/output `name`, [rows, *shape]; `tensor` the model's tensor, or None for the target's prefix tokens."""

    name: str
    tensor: str | None
    shape: tuple


@dataclass(frozen=True)
class OutputSpec:
    """A model output the bundle keeps: graph output `name` (output_<i>; its seed is seed_<i>), the model's `source`
    tensor as users name it, the differentiated `tensor`, the op `before` the model's own output (Softmax,
    LogSoftmax, Sigmoid: the scores before it are differentiated) or None, its dims after the batch and, for a
    score map [C, h, w] or [h, w, C], its `layout` (NCHW: classes first; NHWC: classes last)."""

    name: str
    source: str
    tensor: str
    before: str | None
    shape: tuple
    layout: str | None = None

    @property
    def index(self) -> int:
        """Its place among the bundle's outputs."""
        return int(self.name.split("_")[1])

    @property
    def seed(self) -> str:
        return f"seed_{self.index}"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Task:
    """What the model is for: `kind` (TASKS), the detection head's format (`detector`, DETECTORS) and the number
    of classes the targets choose among (None for embeddings and plain outputs)."""

    kind: str = "classification"
    detector: str | None = None
    classes: int | None = None


@dataclass(frozen=True)
class FileEntry:
    file: str  # a plain name inside the bundle
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest, every field checked (see load_manifest); `root` is the bundle's folder."""

    root: Path
    input: InputSpec
    preprocess: dict | None
    target_layer: TargetLayer
    outputs: tuple  # OutputSpec, in graph order
    task: Task
    labels: tuple | None
    opset: int | None
    graphs: dict  # graph name -> FileEntry
    weights: FileEntry
    held: tuple = ()  # HeldTensor, in graph input order

    @property
    def num_classes(self) -> int | None:
        return self.task.classes

    def output(self, source: str | None) -> OutputSpec:
        """The kept output the user names (its model tensor or its graph name), or the first for None."""
        if source is None:
            return self.outputs[0]
        for output in self.outputs:
            if source in (output.source, output.name):
                return output
        raise OptionError(f"the bundle has no output {source!r:.80}; its outputs: "
                          f"{', '.join(o.source for o in self.outputs)}")

    @property
    def output_elements(self) -> int:
        """Elements per row of the outputs together."""
        return sum(o.size for o in self.outputs)

    @property
    def held_elements(self) -> int:
        """Elements per row of the held tensors together."""
        return sum(math.prod(h.shape) for h in self.held)

    def graph_path(self, graph: str) -> str:
        return str(self.root / self.graphs[graph].file)

    @property
    def files(self) -> list[str]:
        """Every file of the bundle, manifest first."""
        return list(dict.fromkeys([MANIFEST, self.weights.file, *(entry.file for entry in self.graphs.values())]))


def load_manifest(bundle, verify: bool = True) -> Manifest:
    """Reads and checks a bundle's manifest; with `verify`, every file's sha256 must match."""
    if isinstance(bundle, Manifest):
        return bundle
    if not isinstance(bundle, (str, os.PathLike)) or not str(bundle):
        raise BundleError(f"a bundle is a folder's path (str or os.PathLike), got {bundle!r:.80}")
    root = Path(bundle)
    path = root / MANIFEST
    try:
        if not path.is_file():
            raise NotFound(f"'{bundle}' is not a bundle: no {MANIFEST} (create one with `igcam export`)")
        size = path.stat().st_size
        if size > LIMITS["manifest_bytes"]:
            raise BundleError(f"{path} is {size} bytes; a manifest is at most {LIMITS['manifest_bytes']}")
        text = path.read_text(encoding="utf-8")
    except OSError as e:  # a link loop, a folder without read permission
        raise BundleError(f"cannot read '{path}': {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise BundleError(f"{path} nests its JSON too deeply to be a manifest") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    try:
        known = manifest.get("format") == FORMAT and validators.integer(version, "format_version", 1,
                                                                         FORMAT_VERSION) in READABLE_VERSIONS
    except OptionError:  # true, 1.0, "1"
        known = False
    if not known:
        raise BundleError(
            f"{path}: bundle format {manifest.get('format')!r} v{version!r} is not supported; "
            f"this igcam-engine reads {FORMAT} v{FORMAT_VERSION} (re-export the model with igcam export)"
        )
    checked = _checked(manifest, root, f"bundle '{bundle}'")
    for entry in [checked.graphs[g] for g in GRAPHS] + [checked.weights]:
        file = _inside(root, entry.file, bundle)
        if verify and sha256(file) != entry.sha256:
            raise BundleError(f"bundle '{bundle}' is corrupted: {entry.file} does not match its sha256 in the manifest")
    _no_link_out(root, bundle)
    return checked


def _checked(manifest: dict, root: Path, where: str) -> Manifest:
    """The manifest's fields, each checked for type, range and consistency; one error naming the field."""
    def fail(field, expected, value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise BundleError(f"{where}: manifest field '{field}' must be {expected}, got {shown}")

    def get(container, key, field):
        if not isinstance(container, dict) or key not in container:
            raise BundleError(f"{where}: manifest field '{field}' is missing")
        return container[key]

    def integer(value, field, low, high):
        try:
            return validators.integer(value, field, low, high)
        except OptionError:
            fail(field, f"an integer in [{low}, {high}]", value)

    def text(value, field):
        if not isinstance(value, str) or not value:
            fail(field, "a non-empty string", value)
        return value

    def dims(value, field, what):
        if not isinstance(value, list) or len(value) != 3:
            fail(field, f"a list [{what}]", value)
        first = integer(value[0], f"{field}[0]", 1, LIMITS["channels"] if what == "C, H, W" else 1 << 20)
        rest = [integer(v, f"{field}[{i + 1}]", 1, LIMITS["side"]) for i, v in enumerate(value[1:])]
        return [first, *rest]

    image = get(manifest, "input", "input")
    shape = dims(get(image, "shape", "input.shape"), "input.shape", "C, H, W")
    if math.prod(shape) > LIMITS["input_elements"]:
        fail("input.shape", f"at most {LIMITS['input_elements']} elements", shape)
    if get(image, "layout", "input.layout") != "NCHW":
        fail("input.layout", "'NCHW'", image["layout"])
    if get(image, "dtype", "input.dtype") != "float32":
        fail("input.dtype", "'float32'", image["dtype"])
    text(get(image, "name", "input.name"), "input.name")
    layer = get(manifest, "target_layer", "target_layer")
    activation = dims(get(layer, "shape", "target_layer.shape"), "target_layer.shape", "K, h, w")
    if math.prod(activation) > LIMITS["activation_elements"]:
        fail("target_layer.shape", f"at most {LIMITS['activation_elements']} elements", activation)
    kind = layer.get("layout", "NCHW")
    if kind not in LAYOUTS:
        fail("target_layer.layout", f"one of {list(LAYOUTS)}", kind)
    prefix = integer(layer.get("prefix_tokens", 0), "target_layer.prefix_tokens", 0, 64)
    if prefix and kind != "tokens":
        fail("target_layer.prefix_tokens", "0 unless the layout is 'tokens'", prefix)
    held = _held(manifest.get("held", []), prefix, activation, fail, integer, text)
    outputs = _outputs(get(manifest, "outputs", "outputs"), fail, integer, text)
    task = _task(get(manifest, "task", "task"), outputs, fail, integer)
    labels = get(manifest, "labels", "labels")
    if labels is not None and (task.classes is None or not isinstance(labels, list) or len(labels) != task.classes
                               or not all(isinstance(label, str) for label in labels)):
        fail("labels", f"null or a list of {task.classes} strings (one per class)" if task.classes else "null",
             labels)
    preprocess = get(manifest, "preprocess", "preprocess")
    try:
        preprocess = None if preprocess is None else resolve_preprocess(preprocess, channels=shape[0], strict=True)
    except UserError as e:
        raise BundleError(f"{where}: manifest field 'preprocess': {e}") from None
    graphs = get(manifest, "graphs", "graphs")
    files = {name: _file_entry(get(graphs, name, f"graphs.{name}"), f"graphs.{name}", fail) for name in GRAPHS}
    weights = _file_entry(get(manifest, "weights", "weights"), "weights", fail)
    opset = manifest.get("opset")
    if opset is not None:
        integer(opset, "opset", 1, 1000)
    return Manifest(root=root, input=InputSpec(image["name"], tuple(shape)), preprocess=preprocess,
                    target_layer=TargetLayer(str(layer.get("name", "")), str(layer.get("tensor", "")), tuple(activation),
                                             kind, prefix),
                    outputs=outputs, task=task, labels=None if labels is None else tuple(labels), opset=opset,
                    graphs=files, weights=weights, held=held)


def _outputs(entries, fail, integer, text) -> tuple:
    """The kept outputs: output_0, output_1, ... in order, each [rows, fixed dims], their elements per row bounded
    together."""
    outputs = []
    for field, entry, shape in _per_row(entries, "outputs", "output", (1, MAX_OUTPUTS), "source, tensor, before, "
                                        "shape, layout", LIMITS["output_elements"], fail, integer):
        if entry.get("before") not in SCORE_OPS:
            fail(f"{field}.before", "null, 'Softmax', 'LogSoftmax' or 'Sigmoid'", entry.get("before"))
        layout = entry.get("layout")
        if layout is not None and (layout not in OUTPUT_LAYOUTS or len(shape) != 3):
            fail(f"{field}.layout", f"null, or one of {list(OUTPUT_LAYOUTS)} for a score map of 3 dims", layout)
        outputs.append(OutputSpec(entry["name"], text(entry.get("source"), f"{field}.source"),
                                  text(entry.get("tensor"), f"{field}.tensor"), entry["before"], shape, layout))
    sources = [o.source for o in outputs]
    if len(set(sources)) != len(sources):
        fail("outputs", "outputs with distinct sources", sources)
    return tuple(outputs)


def _task(entry, outputs: tuple, fail, integer) -> Task:
    """The task, consistent with the outputs it reads (see igcam_engine.detections for the detectors' heads)."""
    if not isinstance(entry, dict) or entry.get("kind") not in TASKS:
        fail("task.kind", f"one of {list(TASKS)}", entry.get("kind") if isinstance(entry, dict) else entry)
    kind, first = entry["kind"], outputs[0]
    detector = entry.get("detector")
    if (detector is not None) != (kind == "detection") or (detector is not None and detector not in DETECTORS):
        fail("task.detector", f"one of {list(DETECTORS)} for a detection task, else null", detector)
    expected = task_classes(kind, detector, [o.shape for o in outputs], first.layout)
    if kind in CLASS_TASKS and expected is None:
        fail("task", f"outputs that a {kind} task reads ({kind}: see docs/bundle-format.md)", entry)
    classes = entry.get("classes")
    if kind in CLASS_TASKS and integer(classes, "task.classes", 1, LIMITS["classes"]) != expected:
        fail("task.classes", f"{expected} (what the outputs hold)", classes)
    if kind not in CLASS_TASKS and classes is not None:
        fail("task.classes", "null for embeddings and plain outputs", classes)
    return Task(kind, detector, expected)


def map_classes(shape, layout: str) -> int:
    """The classes of a score map [C, h, w] (layout NCHW) or [h, w, C] (NHWC)."""
    return shape[0] if layout == "NCHW" else shape[-1]


def task_classes(kind: str, detector: str | None, shapes: list, first_layout: str | None) -> int | None:
    """The classes a task's outputs hold (their dims after the batch, the first one's score-map layout): a
    classifier's [classes], a segmenter's score map, a detection head's (igcam_engine.detections); None where the
    outputs are not that task's, and for embeddings and plain outputs."""
    if kind == "classification":
        return shapes[0][0] if len(shapes[0]) == 1 else None
    if kind == "segmentation":
        return map_classes(shapes[0], first_layout) if first_layout else None
    if kind == "detection" and detector:
        return HEADS[detector].classes(shapes)
    return None


def _per_row(entries, kind: str, prefix: str, count: tuple, fields: str, elements: int, fail, integer):
    """(field, entry, shape) of each of a manifest's per-row tensors (`kind`: held, outputs): a list of `count`
    (least, most) objects named prefix_0, prefix_1, ... in order, each with its dims after the rows, their elements
    per row at most `elements` together."""
    least, most = count
    if not isinstance(entries, list) or not least <= len(entries) <= most:
        fail(kind, f"a list of {least} to {most} {{name, {fields}}}", entries)
    total = 0
    for index, entry in enumerate(entries):
        field = f"{kind}[{index}]"
        if not isinstance(entry, dict) or entry.get("name") != f"{prefix}_{index}":
            fail(field, f"{{name: '{prefix}_{index}', {fields}}}", entry)
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) > 8:
            fail(f"{field}.shape", "a list of at most 8 dims", shape)
        shape = tuple(integer(d, f"{field}.shape[{i}]", 1, 1 << 24) for i, d in enumerate(shape))
        total += math.prod(shape)
        if total > elements:
            fail(kind, f"at most {elements} elements per row together", entries)
        yield field, entry, shape


def _held(entries, prefix: int, activation, fail, integer, text) -> tuple:
    """The held tensors: inputs held_0, held_1, ... in order, each [rows, fixed dims], their elements per row
    bounded together; the prefix tokens [P, K] among them exactly when the layout has P > 0."""
    held = []
    for field, entry, shape in _per_row(entries, "held", "held", (0, MAX_HELD), "tensor, shape",
                                        LIMITS["activation_elements"], fail, integer):
        tensor = entry.get("tensor")
        if tensor is not None:
            text(tensor, f"{field}.tensor")
        held.append(HeldTensor(entry["name"], tensor, shape))
    prefixes = [h for h in held if h.tensor is None]
    if len(prefixes) != (1 if prefix else 0) or (prefixes and list(prefixes[0].shape) != [prefix, activation[0]]):
        fail("held", f"one entry with tensor null and shape [{prefix}, {activation[0]}] (the prefix tokens) exactly "
             "when target_layer.prefix_tokens > 0", entries)
    return tuple(held)


def _file_entry(entry, field, fail) -> FileEntry:
    if not isinstance(entry, dict):
        fail(field, "{file, sha256}", entry)
    name = entry.get("file")
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or os.path.isabs(name):
        fail(f"{field}.file", "a plain file name inside the bundle (no separator, no '..')", name)
    if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
        fail(f"{field}.sha256", "64 lowercase hexadecimal digits", entry.get("sha256"))
    return FileEntry(name, entry["sha256"])


def _inside(root: Path, name: str, bundle) -> Path:
    """The bundle's file `name`, which must be a regular file that stays inside the bundle once links resolve."""
    file = root / name
    try:
        if not file.is_file():
            raise BundleError(f"bundle '{bundle}' is incomplete: {name} is missing")
        inside = root.resolve() in file.resolve(strict=True).parents
    except (OSError, RuntimeError) as e:  # a link loop
        raise BundleError(f"bundle '{bundle}': {name} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if not inside:
        raise BundleError(f"bundle '{bundle}': {name} is a link that leads out of the bundle; a bundle's files are "
                        "regular files inside it")
    return file


def _no_link_out(root: Path, bundle) -> None:
    """No entry of the bundle's directory may be a link leading out of it (ONNX external data could name one)."""
    inside = root.resolve()
    for entry in root.iterdir():
        if not entry.is_symlink():
            continue
        try:
            leads_out = inside not in entry.resolve(strict=True).parents
        except (OSError, RuntimeError):  # a dangling link or a loop: it leads nowhere inside the bundle
            leads_out = True
        if leads_out:
            raise BundleError(f"bundle '{bundle}': {entry.name} is a link that leads out of the bundle; a bundle's files "
                            "are regular files inside it")
