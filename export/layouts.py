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
SEARCH_NODES = 256  # how far the walk looks around the tensor


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


def infer(model, tensor: str, shape: list, stated: LayoutChoice = LayoutChoice()) -> Layout:
    """The layout of `tensor` (its dims after the batch: `shape`), from the graph and what the user stated."""
    dims = list(shape)
    if stated.layout == "tokens" or (stated.layout is None and len(dims) == 2):
        return _tokens(model, tensor, dims, stated)
    if len(dims) != 3:
        raise ModelError(f"target tensor '{tensor}' is {['batch', *dims]}: a target is [batch, K, h, w], "
                         "[batch, h, w, K] or tokens [batch, N, K]")
    kind = stated.layout or _vote(model, tensor, 4)
    if kind is None:
        raise UnclearLayout(_settle(tensor, ["batch", *dims]))
    layout = Layout("NCHW", dims[0], tuple(dims[1:])) if kind == "NCHW" else Layout("NHWC", dims[2], tuple(dims[:2]))
    return _not_pooled(tensor, dims, layout)


def _not_pooled(tensor, dims, layout: Layout) -> Layout:
    if math.prod(layout.grid) == 1:
        raise Pooled(f"target tensor '{tensor}' {['batch', *dims]} has a 1x1 grid (after global pooling): its map "
                         "would be one constant pixel; choose a tensor before the pooling (see `igcam layers`)")
    return layout


def _tokens(model, tensor: str, dims: list, stated: LayoutChoice) -> Layout:
    if len(dims) != 2:
        raise OptionError(f"layout='tokens' needs a tensor [batch, N, K]; '{tensor}' is {['batch', *dims]}")
    count, channels = dims
    if stated.layout is None and _vote(model, tensor, 3) != "NHWC":
        raise UnclearLayout(_settle(tensor, ["batch", *dims], " (no LayerNormalization or Linear layer over its last "
                                         "axis says it is tokens [batch, N, K])"))
    grid = stated.grid
    if grid is None:
        grids = {g for g in _patch_grids(model, tensor) | _reshaped_grids(model, tensor, count, channels)
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


def _vote(model, tensor: str, rank: int) -> str | None:
    """'NCHW' or 'NHWC' where every op around `tensor` that tells agrees, else None."""
    producers, consumers = _producers_and_consumers(model.graph)
    constants = {i.name for i in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    ranks = _ranks(model)
    votes, seen, stack = set(), set(), [tensor]
    while stack and len(seen) < SEARCH_NODES:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is not None:
            vote = _producer_vote(node, constants, ranks)
            if vote:
                votes.add(vote)
            elif node.op_type in KEEP_LAYOUT:
                stack.extend(x for x in node.input if x and x not in constants and ranks.get(x) == rank)
        for consumer in consumers.get(name, []):
            vote = _consumer_vote(consumer, name, constants)
            if vote:
                votes.add(vote)
            elif consumer.op_type in KEEP_LAYOUT:
                stack.extend(o for o in consumer.output if ranks.get(o) == rank)
                stack.extend(x for x in consumer.input if x and x not in constants and ranks.get(x) == rank)
    return votes.pop() if len(votes) == 1 else None


def _last_axis(node, rank_of_input) -> bool:
    axis = _attr(node, "axis", -1)
    return axis == -1 or (rank_of_input is not None and axis == rank_of_input - 1)


def _producer_vote(node, constants, ranks) -> str | None:
    op = node.op_type
    if op in CHANNELS_FIRST_OPS:
        return "NCHW"
    if op == "Transpose":
        return _transpose_vote(_attr(node, "perm", None), produced=True)
    if op in ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"):
        return "NHWC" if _last_axis(node, ranks.get(node.input[0])) else None
    if op in ("MatMul", "FusedMatMul", "Gemm") and len(node.input) > 1 and node.input[1] in constants:
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


def _patch_grids(model, tensor: str) -> set:
    """The spatial sizes (h, w) of the channels-first 4-D tensors made by convolutions before `tensor`: where a
    vision transformer's patch tokens come from."""
    producers, _ = _producers_and_consumers(model.graph)
    shapes = _shapes(model)
    grids, seen, stack = set(), set(), [tensor]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None:
            continue
        if node.op_type in ("Conv", "FusedConv"):
            shape = shapes.get(node.output[0])
            if shape and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
                grids.add(tuple(shape[2:]))
            continue  # the nearest convolution on each path
        stack.extend(x for x in node.input if x)
    return grids


def _reshaped_grids(model, tensor: str, count: int, channels: int) -> set:
    """The grids (h, w) of the channels-last tensors [B, h, w, K] with h*w = `count` that a Reshape turns into
    `tensor`'s tokens or makes of them (through ops whose output keeps the tokens' shape): a Swin block flattens
    its grid to tokens around its second norm and MLP, and shapes them back after."""
    producers, consumers = _producers_and_consumers(model.graph)
    shapes = _shapes(model)
    grids, seen, stack = set(), set(), [tensor]

    def grid_of(name):
        shape = shapes.get(name)
        if shape and len(shape) == 4 and shape[3] == channels and all(isinstance(d, int) for d in shape[1:3]) \
                and shape[1] * shape[2] == count:
            grids.add((shape[1], shape[2]))

    while stack and len(seen) < SEARCH_NODES:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is not None:
            if node.op_type == "Reshape":
                grid_of(node.input[0])
            else:  # through ops whose output has the tokens' shape: norms, residual adds, elementwise ops
                stack.extend(x for x in node.input if x and shapes.get(x) == shapes.get(name))
        for consumer in consumers.get(name, []):
            if consumer.op_type == "Reshape" and consumer.input[0] == name:
                grid_of(consumer.output[0])
            else:
                stack.extend(o for o in consumer.output if shapes.get(o) == shapes.get(name))
    return grids


def _attr(node, name, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return list(attribute.ints) if attribute.ints else attribute.i
    return default


def _producers_and_consumers(graph):
    producers, consumers = {}, {}
    for node in graph.node:
        for out in node.output:
            producers[out] = node
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    return producers, consumers


def _shapes(model) -> dict:
    shapes = {}
    for info in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if info.type.tensor_type.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None
                                 for d in info.type.tensor_type.shape.dim]
    return shapes


def _ranks(model) -> dict:
    return {name: len(shape) for name, shape in _shapes(model).items()}


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
