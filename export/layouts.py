"""The layout of a target tensor: which of its dims are the channels and which the spatial grid.

A target may be NCHW `[B, K, h, w]` (convolutional stages), channels-last `[B, h, w, K]` (Swin stages, the norms of
ConvNeXt blocks, TensorFlow models) or tokens `[B, N, K]` with `prefix` tokens (class, distillation, register
tokens) before the `h*w` patch tokens in row-major order (vision transformers). The bundle's graphs always hand the
runtime the canonical `[B, K, h, w]` form (`canonical`) and rebuild the tensor from it (`native`), so every method,
on the host and in the fused kernel, reads one layout.

`infer` reads the layout from the graph and never guesses: the ops around the tensor (through ops that keep a
layout: elementwise ops, Concat, Resize, ...) vote -- convolutions, pools and batch norms for channels first,
LayerNormalization over the last axis, a Linear layer (MatMul by a weight matrix) and Transposes for channels
last -- and a token grid comes from the patch-embedding convolution before the tensor, or from the channels-last
grid a Reshape makes the tokens of (or of them: Swin's blocks). No vote, or votes that
disagree, and the export refuses in one line naming the flags that settle it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from igcam_engine.errors import ModelError, OptionError
from igcam_engine.validators import choice, integer

from .builder import GraphBuilder

LAYOUTS = ("NCHW", "NHWC", "tokens")
MAX_PREFIX_TOKENS = 64  # class, distillation and register tokens: a handful; more is not a patch-token layout
CHANNELS_FIRST_OPS = {
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv", "BatchNormalization",
    "InstanceNormalization", "LRN", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "MaxRoiPool", "DepthToSpace", "SpaceToDepth",
}
# Ops whose (data) output has the layout of their (data) inputs.
KEEP_LAYOUT = {
    "Identity", "Dropout", "Cast", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "FastGelu",
    "BiasGelu", "QuickGelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Softplus", "Softsign", "Mish", "Erf",
    "Clip", "Abs", "Neg", "Sqrt", "Exp", "Log", "Reciprocal", "Pow", "Add", "Sub", "Mul", "Div", "Max", "Min",
    "Sum", "Mean", "Where", "Concat", "Split", "Slice", "Pad", "Resize", "Upsample",
}
SEARCH_NODES = 256  # how far the walks look around the tensor
PATCH_SEARCH_NODES = 1 << 16  # how far back the patch embedding may be: every block of a deep transformer


class UnclearLayout(ModelError):
    """The graph does not tell the target's layout for sure: the user states it."""


class Pooled(ModelError):
    """The target's grid is 1x1: its map would be one constant pixel."""


@dataclass(frozen=True)
class LayoutChoice:
    """What the user stated about the target's layout (None: infer it)."""

    layout: str | None = None
    grid: tuple | None = None  # h, w of the patch tokens
    prefix_tokens: int | None = None

    @classmethod
    def of(cls, layout=None, grid=None, prefix_tokens=None) -> "LayoutChoice":
        layout = None if layout in (None, "auto") else choice(layout, "layout", LAYOUTS)
        if grid is not None:
            if isinstance(grid, str) or not hasattr(grid, "__len__") or len(grid) != 2:
                raise OptionError(f"grid must be (h, w), the patch tokens' rows and columns, got {grid!r:.80}")
            grid = tuple(integer(g, f"grid[{i}]", 1, 1 << 14) for i, g in enumerate(grid))
        if prefix_tokens is not None:
            prefix_tokens = integer(prefix_tokens, "prefix_tokens", 0, MAX_PREFIX_TOKENS)
        if (grid is not None or prefix_tokens is not None) and layout not in (None, "tokens"):
            raise OptionError(f"grid and prefix_tokens describe a token layout; layout is {layout!r}")
        return cls(layout, grid, prefix_tokens)


@dataclass(frozen=True)
class Layout:
    """A target tensor's layout: `kind` (one of LAYOUTS), channels K, grid (h, w), prefix tokens."""

    kind: str
    channels: int
    grid: tuple
    prefix: int = 0

    @property
    def canonical_shape(self) -> list:
        return [self.channels, *self.grid]

    def record(self) -> dict:
        return {"layout": self.kind, "grid": list(self.grid), "prefix_tokens": self.prefix}


def _settle(tensor: str, shape, extra: str = "") -> str:
    return (f"cannot tell the layout of target tensor '{tensor}' {shape}{extra}; state it: layout='NCHW', 'NHWC' or "
            "'tokens' (with grid=(h, w) and prefix_tokens=N for tokens; CLI --layout, --grid HxW, --prefix-tokens)")


@dataclass(frozen=True)
class TensorIndex:
    """What the layout walks read of a model, indexed once (`igcam layers` infers every tensor's layout)."""

    producers: dict
    consumers: dict
    constants: set
    shapes: dict

    @classmethod
    def of(cls, model) -> "TensorIndex":
        producers, consumers = {}, {}
        for node in model.graph.node:
            for out in node.output:
                producers[out] = node
            for x in node.input:
                consumers.setdefault(x, []).append(node)
        constants = {i.name for i in model.graph.initializer} | {
            n.output[0] for n in model.graph.node if n.op_type == "Constant"}
        shapes = {}
        for info in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
            if info.type.tensor_type.HasField("shape"):
                shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None
                                     for d in info.type.tensor_type.shape.dim]
        return cls(producers, consumers, constants, shapes)

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)


def walk(start: str, step, limit: int = SEARCH_NODES) -> None:
    """Visits tensors from `start` depth first, each once and at most `limit` of them: `step(name)` does what the
    walk is for and returns the tensors to visit next. Every walk is bounded: the ops that tell a layout are near
    the tensor, and a graph of a million nodes costs what a small one does."""
    seen, stack = set(), [start]
    while stack and len(seen) < limit:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(step(name))


def infer(index: TensorIndex, tensor: str, shape: list, stated: LayoutChoice = LayoutChoice()) -> Layout:
    """The layout of `tensor` (its dims after the batch: `shape`), from the graph and what the user stated."""
    dims = list(shape)
    if stated.layout == "tokens" or (stated.layout is None and len(dims) == 2):
        return _tokens(index, tensor, dims, stated)
    if len(dims) != 3:
        raise ModelError(f"target tensor '{tensor}' is {['batch', *dims]}: a target is [batch, K, h, w], "
                         "[batch, h, w, K] or tokens [batch, N, K]")
    kind = stated.layout or _vote(index, tensor, 4)
    if kind is None:
        raise UnclearLayout(_settle(tensor, ["batch", *dims]))
    layout = Layout("NCHW", dims[0], tuple(dims[1:])) if kind == "NCHW" else Layout("NHWC", dims[2], tuple(dims[:2]))
    return _not_pooled(tensor, dims, layout)


def _not_pooled(tensor, dims, layout: Layout) -> Layout:
    if math.prod(layout.grid) == 1:
        raise Pooled(f"target tensor '{tensor}' {['batch', *dims]} has a 1x1 grid (after global pooling): its map "
                         "would be one constant pixel; choose a tensor before the pooling (see `igcam layers`)")
    return layout


def _tokens(index: TensorIndex, tensor: str, dims: list, stated: LayoutChoice) -> Layout:
    if len(dims) != 2:
        raise OptionError(f"layout='tokens' needs a tensor [batch, N, K]; '{tensor}' is {['batch', *dims]}")
    count, channels = dims
    if stated.layout is None and _vote(index, tensor, 3) != "NHWC":
        raise UnclearLayout(_settle(tensor, ["batch", *dims], " (no LayerNormalization or Linear layer over its last "
                                         "axis says it is tokens [batch, N, K])"))
    grid = stated.grid
    if grid is None:
        grids = {g for g in _patch_grids(index, tensor) | _reshaped_grids(index, tensor, count, channels)
                 if math.prod(g) <= count <= math.prod(g) + MAX_PREFIX_TOKENS
                 and (stated.prefix_tokens is None or math.prod(g) + stated.prefix_tokens == count)}
        if len(grids) != 1:
            found = f" (patch grids before it: {sorted(grids)})" if grids else " (no patch-embedding convolution before it)"
            raise UnclearLayout(_settle(tensor, ["batch", *dims], found))
        grid = grids.pop()
    prefix = count - math.prod(grid)
    if prefix < 0 or (stated.prefix_tokens is not None and stated.prefix_tokens != prefix):
        raise OptionError(f"target tensor '{tensor}' has {count} tokens; grid {grid[0]}x{grid[1]} with "
                          f"{stated.prefix_tokens if stated.prefix_tokens is not None else prefix} prefix token(s) "
                          f"does not add up to that")
    if prefix > MAX_PREFIX_TOKENS:
        raise OptionError(f"target tensor '{tensor}': grid {grid[0]}x{grid[1]} leaves {prefix} prefix tokens of "
                          f"{count}; at most {MAX_PREFIX_TOKENS} are (class, distillation, register tokens)")
    return _not_pooled(tensor, dims, Layout("tokens", channels, tuple(grid), prefix))


def _vote(index: TensorIndex, tensor: str, rank: int) -> str | None:
    """'NCHW' or 'NHWC' where every op around `tensor` that tells agrees, else None."""
    votes = set()

    def step(name):
        node, near = index.producers.get(name), []
        if node is not None:
            vote = _producer_vote(node, index)
            if vote:
                votes.add(vote)
            elif node.op_type in KEEP_LAYOUT:
                near.extend(x for x in node.input if x and x not in index.constants and index.rank(x) == rank)
        for consumer in index.consumers.get(name, []):
            vote = _consumer_vote(consumer, name, index.constants)
            if vote:
                votes.add(vote)
            elif consumer.op_type in KEEP_LAYOUT:
                near.extend(o for o in consumer.output if index.rank(o) == rank)
                near.extend(x for x in consumer.input if x and x not in index.constants and index.rank(x) == rank)
        return near

    walk(tensor, step)
    return votes.pop() if len(votes) == 1 else None


def _last_axis(node, rank_of_input) -> bool:
    axis = _attr(node, "axis", -1)
    return axis == -1 or (rank_of_input is not None and axis == rank_of_input - 1)


def _producer_vote(node, index: TensorIndex) -> str | None:
    op = node.op_type
    if op in CHANNELS_FIRST_OPS:
        return "NCHW"
    if op == "Transpose":
        return _transpose_vote(_attr(node, "perm", None), produced=True)
    if op in ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"):
        return "NHWC" if _last_axis(node, index.rank(node.input[0])) else None
    if op in ("MatMul", "FusedMatMul", "Gemm") and len(node.input) > 1 and node.input[1] in index.constants:
        return "NHWC"
    return None


def _consumer_vote(node, name, constants) -> str | None:
    op = node.op_type
    if op in CHANNELS_FIRST_OPS and node.input[0] == name:
        return "NCHW"
    if op == "Transpose":
        return _transpose_vote(_attr(node, "perm", None), produced=False)
    if op in ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization") and node.input[0] == name:
        return "NHWC" if _attr(node, "axis", -1) in (-1, None) else None
    if op in ("MatMul", "FusedMatMul", "Gemm") and node.input[0] == name and len(node.input) > 1 \
            and node.input[1] in constants:
        return "NHWC"
    return None


def _transpose_vote(perm, produced: bool) -> str | None:
    """A Transpose that makes channels last ([0, 2, 3, 1]) produces a channels-last tensor and consumes a
    channels-first one; its inverse ([0, 3, 1, 2]) the other way round. [0, 2, 1] swaps tokens and channels either
    way: it tells nothing."""
    perm = list(perm) if isinstance(perm, list) else None
    if perm == [0, 2, 3, 1]:
        return "NHWC" if produced else "NCHW"
    if perm == [0, 3, 1, 2]:
        return "NCHW" if produced else "NHWC"
    return None


def _patch_grids(index: TensorIndex, tensor: str) -> set:
    """The spatial sizes (h, w) of the channels-first 4-D tensors made by convolutions before `tensor`: where a
    vision transformer's patch tokens come from."""
    grids = set()

    def step(name):
        node = index.producers.get(name)
        if node is None:
            return []
        if node.op_type in ("Conv", "FusedConv"):
            shape = index.shapes.get(node.output[0])
            if shape and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
                grids.add(tuple(shape[2:]))
            return []  # the nearest convolution on each path
        return [x for x in node.input if x and x not in index.constants]

    walk(tensor, step, PATCH_SEARCH_NODES)
    return grids


def _reshaped_grids(index: TensorIndex, tensor: str, count: int, channels: int) -> set:
    """The grids (h, w) of the channels-last tensors [B, h, w, K] with h*w = `count` that a Reshape turns into
    `tensor`'s tokens or makes of them (through ops whose output keeps the tokens' shape): a Swin block flattens
    its grid to tokens around its second norm and MLP, and shapes them back after."""
    shapes, grids = index.shapes, set()

    def grid_of(name):
        shape = shapes.get(name)
        if shape and len(shape) == 4 and shape[3] == channels and all(isinstance(d, int) for d in shape[1:3]) \
                and shape[1] * shape[2] == count:
            grids.add((shape[1], shape[2]))

    def step(name):
        node, near = index.producers.get(name), []
        if node is not None:
            if node.op_type == "Reshape":
                grid_of(node.input[0])
            else:  # through ops whose output has the tokens' shape: norms, residual adds, elementwise ops
                near.extend(x for x in node.input if x and shapes.get(x) == shapes.get(name))
        for consumer in index.consumers.get(name, []):
            if consumer.op_type == "Reshape" and consumer.input[0] == name:
                grid_of(consumer.output[0])
            else:
                near.extend(o for o in consumer.output if shapes.get(o) == shapes.get(name))
        return near

    walk(tensor, step)
    return grids


def feeds_attention(index: TensorIndex, tensor: str) -> bool:
    """Whether a product of two computed tensors (attention's q k^T or its weights times v) follows `tensor`
    before the next LayerNormalization."""
    found = []

    def step(name):
        near = []
        for node in index.consumers.get(name, []):
            if node.op_type == "LayerNormalization":
                continue
            if node.op_type in ("MatMul", "Einsum") and not any(x in index.constants for x in node.input):
                found.append(node)
                return []
            near.extend(node.output)
        return near

    walk(tensor, step)
    return bool(found)


def _attr(node, name, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return list(attribute.ints) if attribute.ints else attribute.i
    return default


# ---------------------------------------------------------------- graph pieces


def canonical(b: GraphBuilder, layout: Layout, tensor: str) -> tuple[str, str | None]:
    """(the tensor as [rows, K, h, w], its prefix tokens [rows, P, K] or None), appended to `b`."""
    if layout.kind == "NCHW":
        return b.Identity(tensor), None
    if layout.kind == "NHWC":
        return b.Transpose(tensor, perm=[0, 3, 1, 2]), None
    end = np.iinfo(np.int64).max
    patches = b.Slice(tensor, [layout.prefix], [end], [1]) if layout.prefix else tensor
    grid = b.Reshape(patches, [0, *layout.grid, layout.channels])
    prefix = b.Slice(tensor, [0], [layout.prefix], [1]) if layout.prefix else None
    return b.Transpose(grid, perm=[0, 3, 1, 2]), prefix


def native(b: GraphBuilder, layout: Layout, activations: str, prefix: str | None, batch: str) -> str:
    """The target tensor in its own layout, rebuilt from the canonical activations (and the prefix tokens); the
    shapes of what it makes are declared to `b` (the gradient rules read them), with `batch` as the first dim."""
    k, (h, w) = layout.channels, layout.grid
    b.declare(activations, (batch, k, h, w))
    if layout.kind == "NCHW":
        return b.declare(b.Identity(activations), (batch, k, h, w))
    channels_last = b.declare(b.Transpose(activations, perm=[0, 2, 3, 1]), (batch, h, w, k))
    if layout.kind == "NHWC":
        return channels_last
    patches = b.declare(b.Reshape(channels_last, [0, h * w, k]), (batch, h * w, k))
    if prefix is None:
        return patches
    b.declare(prefix, (batch, layout.prefix, k))
    return b.declare(b.Concat(prefix, patches, axis=1), (batch, layout.prefix + h * w, k))
