"""Target layouts: channels-last stages and vision-transformer tokens (with class and distillation tokens before
the patch tokens), and targets that a skip connection bypasses, each against float64 autograd on the same tensor
rearranged to [K, h, w] as pytorch-grad-cam's reshape_transform does. No map may be silently wrong: every tensor
`layers` calls usable is checked, and what the graph cannot tell is refused."""
import contextlib
import copy
import io
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from support.comparisons import assert_maps_match, one_hot
from support.reference import contract_maps, igcam_reference, top_classes

from igcam_engine import Explainer, UserError
from igcam_engine.apps.cli import main
from igcam_engine.export import from_onnx, from_torch, layers
from igcam_engine.quadrature import quadrature

SHAPE = (3, 32, 32)
STEPS = 4


def images(count=2, seed=0):
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


class Tapped(torch.nn.Module):
    """A model whose forward records every intermediate tensor with the layout it is in (`taps`), so that the
    ONNX tensor of each can be found and its reference computed by autograd on exactly that tensor."""

    def tap(self, x, layout):
        self.taps.append((x, layout))
        return x

    def forward(self, x):
        self.taps = []
        return self.body(x)


class ChannelsLast(Tapped):
    """A convolutional stem, then ConvNeXt/Swin-like blocks on [B, h, w, K]: LayerNorm over the channels, a
    per-position MLP (Linear layers) inside a residual, a strided convolution between two stages."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(8), torch.nn.LayerNorm(16), torch.nn.LayerNorm(16)])
        self.fc1 = torch.nn.ModuleList([torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(16, 24, bias=False)])
        self.fc2 = torch.nn.ModuleList([torch.nn.Linear(12, 8, bias=False), torch.nn.Linear(24, 16, bias=False)])
        self.down = torch.nn.Conv2d(8, 16, 2, stride=2)
        self.head = torch.nn.Linear(16, 5)

    def block(self, x, i):
        y = self.tap(self.norms[i](x), "NHWC")
        y = self.tap(torch.relu(self.tap(self.fc1[i](y), "NHWC")), "NHWC")
        return self.tap(x + self.tap(self.fc2[i](y), "NHWC"), "NHWC")

    def body(self, x):
        x = self.tap(self.stem(x), "NCHW")  # [B, 8, 8, 8]
        x = self.tap(x.permute(0, 2, 3, 1), "NHWC")
        x = self.block(x, 0)
        x = self.tap(self.down(self.tap(x.permute(0, 3, 1, 2), "NCHW")), "NCHW")  # [B, 16, 4, 4]
        x = self.block(self.tap(x.permute(0, 2, 3, 1), "NHWC"), 1)
        x = self.tap(self.norms[2](x), "NHWC")
        return self.head(x.mean(dim=(1, 2)))


class TinyViT(Tapped):
    """A vision transformer: an 8x8-patch embedding (a 4x4 grid), `prefix` class/distillation tokens in front,
    position embeddings, pre-norm blocks of single-head attention and an MLP, a final norm and a head on the
    prefix tokens (averaged, as DeiT's distilled head)."""

    def __init__(self, prefix=1, depth=2, width=16):
        super().__init__()
        torch.manual_seed(1)
        self.prefix = prefix
        self.patches = torch.nn.Conv2d(3, width, 8, stride=8)
        self.tokens = torch.nn.Parameter(torch.randn(1, prefix, width))
        self.position = torch.nn.Parameter(torch.randn(1, prefix + 16, width) * 0.5)
        self.norm1 = torch.nn.ModuleList([torch.nn.LayerNorm(width) for _ in range(depth)])
        self.qkv = torch.nn.ModuleList([torch.nn.Linear(width, 3 * width) for _ in range(depth)])
        self.proj = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(depth)])
        self.norm2 = torch.nn.ModuleList([torch.nn.LayerNorm(width) for _ in range(depth)])
        self.mlp = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(),
                                                            torch.nn.Linear(2 * width, width)) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 5)

    def body(self, x):
        x = self.patches(x).flatten(2).transpose(1, 2)  # [B, 16, K]
        x = torch.cat([self.tokens.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        for i in range(len(self.norm1)):
            y = self.norm1[i](x)
            q, k, v = self.qkv[i](y).chunk(3, dim=-1)
            attention = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
            x = x + self.proj[i](attention @ v)
            x = x + self.mlp[i](self.norm2[i](x))
        x = self.norm(x)
        return self.head(x[:, :self.prefix].mean(dim=1))


def tokens_to_grid(prefix, grid=(4, 4)):
    """pytorch-grad-cam's reshape_transform for ViTs: drop the prefix tokens, tokens to a grid, channels first."""
    return lambda t: t[:, prefix:].reshape(len(t), *grid, t.shape[-1]).permute(0, 3, 1, 2)


def channels_first(layout):
    return (lambda t: t.permute(0, 3, 1, 2)) if layout == "NHWC" else (lambda t: t)


def export_with_taps(model, path):
    """The model's ONNX file (legacy exporter, dynamic batch) and the ONNX tensor of each tap, in tap order."""
    with torch.no_grad():
        model(torch.zeros(1, *SHAPE))
    count = len(model.taps)

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return (self.model(x), *[t for t, _ in self.model.taps])

    names = ["logits", *[f"tap_{i}" for i in range(count)]]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Outputs().eval(), (torch.zeros(1, *SHAPE),), str(path), dynamo=False, input_names=["x"],
                          output_names=names, dynamic_axes={n: {0: "batch"} for n in ["x", *names]})
    graph = onnx.load(str(path))
    producers = {o: n for n in graph.graph.node for o in n.output}
    tensors = []
    for name in names[1:]:
        while producers[name].op_type == "Identity":
            name = producers[name].input[0]
        tensors.append(name)
    del graph.graph.output[1:]
    onnx.save(graph, str(path))
    return path, tensors


def tap_reference(model, index, reshape, x, targets):
    """IG-CAM maps (left rule, STEPS, zero baseline) at tap `index` by float64 autograd."""
    reference = copy.deepcopy(model).double().eval()

    def point(image, base, alpha, target):
        z = (base + alpha * (image - base))[None].clone()
        score = reference(z)[0, target]
        tensor = reference.taps[index][0]
        (grad,) = torch.autograd.grad(score, tensor)
        return reshape(tensor.detach())[0], reshape(grad)[0]

    alphas, weights = quadrature("left", STEPS)
    return contract_maps(point, x, targets, alphas, weights, np.zeros((1, *SHAPE)), False)


def test_every_usable_target_of_a_channels_last_model_matches_autograd(tmp_path):
    """Every tensor `layers` calls usable is a tap whose layout it reads right, and its map matches autograd on
    that tensor: channels-last stages, the norm and MLP inside residual blocks (held skip paths), the strided
    convolution between stages."""
    model = ChannelsLast().eval()
    path, tensors = export_with_taps(model, tmp_path / "channels_last.onnx")
    known = {tensor: (index, layout) for index, (tensor, (_, layout)) in enumerate(zip(tensors, model.taps))}
    usable = [row for row in layers(path) if row["usable"] == "yes"]
    assert {row["tensor"] for row in usable} == set(known), "every tap is usable, nothing else is listed usable"
    x = images()
    targets = top_classes(model, x)[:, 0]
    held_seen = False
    for row in usable:
        index, layout = known[row["tensor"]]
        assert row["layout"] == layout, row
        bundle = from_onnx(path, tmp_path / f"b{index}", tensor=row["tensor"])
        manifest = json.loads((bundle / "manifest.json").read_text())
        held_seen |= bool(manifest["held"])
        maps = Explainer(bundle).explain(x, targets, steps=STEPS)
        assert_maps_match(maps, tap_reference(model, index, channels_first(layout), x, targets))
    assert held_seen, "some target inside a residual block must hold its skip path"


def test_the_pooled_norm_is_never_a_default_nor_usable(tmp_path):
    """After the mean over the grid a channels-last norm is [1, 1, K]: refused with the reason, never a default."""
    class Pooled(ChannelsLast):
        def body(self, x):
            x = self.stem(x).permute(0, 2, 3, 1)
            x = self.norms[0](x.mean(dim=(1, 2), keepdim=True))  # [B, 1, 1, 8]
            return x.flatten(1) @ self.fc1[0].weight.T[:, :5]

    model = Pooled().eval()
    path, _ = export_with_taps(model, tmp_path / "pooled.onnx")
    rows = {row["tensor"]: row for row in layers(path)}
    pooled = [row for row in rows.values() if row["op"] == "LayerNormalization"]
    assert pooled and pooled[0]["usable"].startswith("no (1x1 grid")
    bundle = from_onnx(path, tmp_path / "default")
    assert json.loads((bundle / "manifest.json").read_text())["target_layer"]["layout"] == "NHWC"
    with pytest.raises(UserError, match="1x1 grid"):
        from_onnx(path, tmp_path / "chosen", tensor=pooled[0]["tensor"])


@pytest.mark.parametrize("prefix", [1, 2], ids=["class token", "class and distillation tokens"])
def test_vision_transformer_maps_match_autograd_with_the_reshape_transform(tmp_path, prefix):
    """The default target is the last block's first norm; it and a block's output (inside and outside the
    residual) give autograd's maps with pytorch-grad-cam's reshape transform; the manifest records the layout."""
    model = TinyViT(prefix).eval()
    x = images()
    targets = top_classes(model, x)[:, 0]
    alphas, weights = quadrature("left", STEPS)
    reshape = tokens_to_grid(prefix)
    default = from_torch(model, "norm1.1", SHAPE, tmp_path / "norm1")
    layer = json.loads((default / "manifest.json").read_text())["target_layer"]
    assert (layer["layout"], layer["grid"], layer["prefix_tokens"]) == ("tokens", [4, 4], prefix)
    expected = igcam_reference(model, "norm1.1", x, targets, alphas, weights, np.zeros((1, *SHAPE)), False,
                               reshape=reshape)
    assert_maps_match(Explainer(default).explain(x, targets, steps=STEPS), expected)
    for name in ("mlp.0", "norm2.0"):
        bundle = from_torch(model, name, SHAPE, tmp_path / name)
        expected = igcam_reference(model, name, x, targets, alphas, weights, np.zeros((1, *SHAPE)), False,
                                   reshape=reshape)
        assert_maps_match(Explainer(bundle).explain(x, targets, steps=STEPS), expected)


def test_the_default_target_of_an_onnx_vision_transformer_is_the_last_blocks_first_norm(tmp_path):
    model = TinyViT(1).eval()
    path, tensors = export_with_taps(model, tmp_path / "vit.onnx")
    rows = [row for row in layers(path) if row["usable"] == "yes" and len(row["shape"]) == 2]
    norms = [row for row in rows if row["op"] == "LayerNormalization"]
    assert len(rows) > 30 and len(norms) == 5
    # the patch embedding's tokens before the class token joins them (their dims measured) have no prefix
    patches = [row for row in rows if row["shape"] == [16, 16]]
    assert len(patches) == 1 and patches[0]["prefix_tokens"] == 0 and patches[0]["grid"] == [4, 4]
    assert all(row["layout"] == "tokens" and row["grid"] == [4, 4] and row["prefix_tokens"] == 1
               for row in rows if row not in patches)
    attention = [row for row in layers(path) if row["shape"] == [17, 17]]
    assert attention and all(row["usable"].startswith("no (layout unclear") for row in attention)
    bundle = from_onnx(path, tmp_path / "default")
    assert json.loads((bundle / "manifest.json").read_text())["target_layer"]["tensor"] == norms[-3]["tensor"]


def test_ablation_on_tokens_holds_the_class_token(tmp_path):
    """Ablation-CAM on a token target ablates each channel of the patch tokens; the class token keeps its value:
    against a torch hook doing exactly that."""
    model = TinyViT(1).eval()
    bundle = from_torch(model, "norm1.1", SHAPE, tmp_path / "bundle")
    x = images(1)
    target = int(top_classes(model, x)[0, 0])
    model = copy.deepcopy(model).double()
    maps = Explainer(bundle).explain(x, target, method="ablationcam", normalize=False)
    captured = {}
    module = dict(model.named_modules())["norm1.1"]

    def run(ablate=None):
        def hook(m, args, out):
            captured["out"] = out.detach()
            if ablate is None:
                return out
            out = out.clone()
            patches = out[:, 1:]
            low = float(patches.min())
            patches[..., ablate] = 0.0 if low == 0 else low - 1e7
            return out
        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return float(model(torch.from_numpy(x).double())[0, target])
        finally:
            handle.remove()

    original = run()
    activations = tokens_to_grid(1)(captured["out"])[0]
    weights = torch.tensor([(original - run(k)) / original for k in range(activations.shape[0])], dtype=torch.float64)
    coarse = F.relu((weights[:, None, None] * activations).sum(0))
    expected = F.interpolate(coarse[None, None], size=SHAPE[1:], mode="bilinear", align_corners=False)[0, 0].numpy()
    assert_maps_match(maps[0], expected)


def test_a_layout_the_graph_cannot_tell_is_refused_and_can_be_stated(tmp_path):
    """A [B, 4, 4, 4] tensor made by a Reshape of a Linear layer's output into a cube: no op says which axis holds
    the channels. The export refuses naming the flags; stated, it exports and matches autograd."""
    class Cube(Tapped):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.fc = torch.nn.Linear(3 * 32 * 32, 64)
            self.head = torch.nn.Linear(64, 5)

        def body(self, x):
            cube = self.tap(torch.tanh(self.fc(x.flatten(1))).reshape(x.shape[0], 4, 4, 4), "NCHW")
            return self.head(cube.flatten(1) * 2)

    model = Cube().eval()
    path, tensors = export_with_taps(model, tmp_path / "cube.onnx")
    row = {r["tensor"]: r for r in layers(path)}[tensors[0]]
    assert row["usable"] == "no (layout unclear: state --layout)"
    with pytest.raises(UserError, match="--layout"):
        from_onnx(path, tmp_path / "refused", tensor=tensors[0])
    x = images()
    targets = top_classes(model, x)[:, 0]
    for layout in ("NCHW", "NHWC"):
        bundle = from_onnx(path, tmp_path / layout, tensor=tensors[0], layout=layout)
        assert_maps_match(Explainer(bundle).explain(x, targets, steps=STEPS),
                          tap_reference(model, 0, channels_first(layout), x, targets))


def test_stated_token_layouts_are_checked(tmp_path):
    model = TinyViT(1).eval()
    with pytest.raises(UserError, match="does not add up"):
        from_torch(model, "norm1.1", SHAPE, tmp_path / "a", grid=(4, 4), prefix_tokens=2)
    with pytest.raises(UserError, match="grid and prefix_tokens describe a token layout"):
        from_torch(model, "norm1.1", SHAPE, tmp_path / "b", layout="NHWC", grid=(4, 4))
    bundle = from_torch(model, "norm1.1", SHAPE, tmp_path / "c", layout="tokens", grid=(2, 8))
    assert json.loads((bundle / "manifest.json").read_text())["target_layer"]["grid"] == [2, 8]


def test_the_notebook_path_explains_a_vision_transformer_and_keeps_its_caches_bounded(tmp_path, monkeypatch):
    """explain_torch on a token layer needs no reshape_transform (maps equal autograd's with it); the weights are
    hashed once per model state (again after an in-place change); the bundle cache keeps IGCAM_CACHE_BUNDLES
    bundles, the least recently used evicted; an unknown option is refused before anything is exported."""
    from igcam_engine import notebook

    hashes = []
    original = notebook.model_key
    monkeypatch.setattr(notebook, "model_key", lambda *a, **k: hashes.append(a[1]) or original(*a, **k))
    monkeypatch.setenv("IGCAM_CACHE_BUNDLES", "1")
    model = TinyViT(1).eval()
    x = images()
    targets = top_classes(model, x)[:, 0]
    alphas, weights = quadrature("left", STEPS)
    maps = notebook.explain_torch(model, "norm1.1", x, targets, steps=STEPS, cache_dir=tmp_path)
    expected = igcam_reference(model, "norm1.1", x, targets, alphas, weights, np.zeros((1, *SHAPE)), False,
                               reshape=tokens_to_grid(1))
    assert_maps_match(maps, expected)
    np.testing.assert_array_equal(notebook.explain_torch(model, "norm1.1", x, targets, steps=STEPS,
                                                         cache_dir=tmp_path), maps)
    assert hashes == ["norm1.1"], "the second call on the same weights hashes nothing"
    notebook.explain_torch(model, "norm2.0", x, targets, steps=STEPS, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1, "one bundle kept: the least recently used was evicted"
    with torch.no_grad():
        model.head.weight.mul_(2)
    notebook.explain_torch(model, "norm2.0", x, targets, steps=STEPS, cache_dir=tmp_path)
    assert hashes == ["norm1.1", "norm2.0", "norm2.0"], "an in-place change of the weights is seen"
    with pytest.raises(UserError, match="unknown option"):
        notebook.explain_torch(model, "norm2.0", x, targets, stepz=3, cache_dir=tmp_path)


def test_show_cam_on_image_takes_pytorch_grad_cams_use_rgb_and_colormap():
    from igcam_engine.notebook import show_cam_on_image

    photo = np.random.default_rng(0).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    mask = np.linspace(0, 1, 80, dtype=np.float32).reshape(8, 10)
    rgb = show_cam_on_image(photo, mask, True, 2, image_weight=0.0)
    np.testing.assert_array_equal(show_cam_on_image(photo, mask, use_rgb=False, image_weight=0.0), rgb[..., ::-1])
    with pytest.raises(UserError, match="use_rgb must be"):
        show_cam_on_image(photo, mask, use_rgb="yes")


def test_a_resize_after_the_target_keeps_the_batch(tmp_path):
    """F.interpolate after the target: shape inference gives the Resize's output a fresh batch symbol (it once
    failed as "needs fixed dims 0.."); the batch is measured, the rule's same-size path holds, maps match."""
    class Upsampled(Tapped):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.conv1, self.conv2 = torch.nn.Conv2d(3, 5, 3, stride=4, padding=1), torch.nn.Conv2d(5, 6, 3, padding=1)
            self.head = torch.nn.Linear(6, 5)

        def body(self, x):
            x = self.tap(torch.relu(self.conv1(x)), "NCHW")
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            return self.head(torch.relu(self.conv2(x)).mean(dim=(2, 3)))

    model = Upsampled().eval()
    path, tensors = export_with_taps(model, tmp_path / "upsampled.onnx")
    x = images()
    targets = top_classes(model, x)[:, 0]
    maps = Explainer(from_onnx(path, tmp_path / "bundle", tensor=tensors[0])).explain(x, targets, steps=STEPS)
    assert_maps_match(maps, tap_reference(model, 0, channels_first("NCHW"), x, targets))


class TakesNHWC(Tapped):
    """A model whose input is [B, H, W, 3] (as every tf2onnx export and torch models that permute first): it
    permutes to channels first itself. `nchw` set: the same model fed [B, 3, H, W] (the reference's view)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(6, 5)
        self.nchw = False

    def body(self, x):
        x = x.permute(0, 2, 3, 1) if self.nchw else x
        x = self.tap(torch.relu(self.conv((x - 0.5).permute(0, 3, 1, 2))), "NCHW")
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("stated", [None, "NHWC"], ids=["read from the graph", "stated"])
def test_an_nhwc_input_is_handled_end_to_end(tmp_path, stated):
    """The bundle takes NCHW images (preprocessing, baselines, interpolation, overlays as for any model) and hands
    the model NHWC; the manifest says so; maps equal autograd's on the model fed NHWC."""
    model = TakesNHWC().eval()
    path = tmp_path / "nhwc.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 32, 32, 3),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    bundle = from_onnx(path, tmp_path / "bundle", input_layout=stated)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [3, 32, 32] and manifest["input"]["model_layout"] == "NHWC"
    model.nchw = True
    x = images()
    targets = top_classes(model, x)[:, 0]
    assert_maps_match(Explainer(bundle).explain(x, targets, steps=STEPS),
                      tap_reference(model, 0, channels_first("NCHW"), x, targets))


def test_an_input_whose_layout_cannot_be_told_is_refused(tmp_path):
    """[B, 3, 8, 3]: no op reads it in a telling way and both dims could be colours."""
    weights = numpy_helper.from_array(np.ones((3 * 8 * 3, 2), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["y"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])], [weights])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    with pytest.raises(UserError, match="--input-layout"):
        from_onnx(tmp_path / "m.onnx", tmp_path / "bundle")


def explain_graph_maps(bundle, x, targets, alphas, weights):
    """The maps of the bundle's one-graph form, explain.onnx, run by ONNX Runtime itself (zero baseline)."""
    import onnxruntime as ort

    explain = ort.InferenceSession(str(bundle / "explain.onnx"), providers=["CPUExecutionProvider"])
    classes = json.loads((bundle / "manifest.json").read_text())["task"]["classes"]
    return explain.run(["maps"], {"images": x, "baseline": np.zeros((1, *SHAPE), np.float32),
                                  "alphas": alphas.astype(np.float32), "weights": weights.astype(np.float32),
                                  "seed_0": one_hot(targets, classes), "subtract_baseline": np.zeros(1, np.float32)})[0]

def test_shape_arithmetic_the_head_and_the_part_after_the_target_share_is_computed_apart(tmp_path):
    """torch's exporter computes `x.shape[0]` once and every Expand to the batch reads it: before and after the
    target (as HuggingFace's ViT does). The one-graph forms, which hold both parts, once had two nodes writing
    one tensor ("not in SSA form"); and the explain graph's part before the target runs on more rows than the part
    after it, so the tail computes the batch from its own rows."""
    class Reshaped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(5)
            self.conv1, self.conv2 = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Conv2d(4, 6, 3, padding=1)
            self.head = torch.nn.Linear(6 * 16 * 16, 5)
            self.before, self.after = torch.nn.Parameter(torch.randn(1, 4, 1, 1)), torch.nn.Parameter(torch.randn(1, 6, 1, 1))

        def forward(self, x):
            b = x.shape[0]
            h = torch.relu(self.conv1(x) + self.before.expand(b, -1, 16, 16))
            return self.head(torch.relu(self.conv2(h) * self.after.expand(b, -1, 16, 16)).reshape(b, -1))

    model = Reshaped().eval()
    x = images()
    targets = top_classes(model, x)[:, 0]
    bundle = from_torch(model, "conv2", SHAPE, tmp_path / "bundle")
    alphas, weights = quadrature("left", STEPS)
    expected = igcam_reference(model, "conv2", x, targets, alphas, weights, np.zeros((1, *SHAPE)), False)
    assert_maps_match(Explainer(bundle).explain(x, targets, steps=STEPS), expected)
    assert_maps_match(explain_graph_maps(bundle, x, targets, alphas, weights), expected)


def test_constants_and_subgraphs_the_head_and_the_tail_share_keep_their_values(tmp_path):
    """A Constant (ReduceMean's axes) and an If whose branches read an outer Constant, each read before and after
    the target: the tail computes its own copies, and the rules must still find the axes (once "axes must be a
    constant") and the If's branches must read the tail's copy (once a graph reading a tensor nothing computes)."""
    rng = np.random.default_rng(7)
    w, fc = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((4, 5))
    branch = [helper.make_graph([helper.make_node("Identity", ["offset"], [f"out_{n}"])], n, [],
                                [helper.make_tensor_value_info(f"out_{n}", TensorProto.FLOAT, [])]) for n in "ab"]
    nodes = [helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([2, 3], np.int64))),
             helper.make_node("Constant", [], ["offset"], value=numpy_helper.from_array(np.array(0.5, np.float32))),
             helper.make_node("If", ["flag"], ["shift"], then_branch=branch[0], else_branch=branch[1]),
             helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["conv", "axes"], ["mean"], keepdims=1),
             helper.make_node("Sub", ["conv", "mean"], ["centred"]), helper.make_node("Add", ["centred", "shift"], ["z"]),
             helper.make_node("Relu", ["z"], ["act"]), helper.make_node("ReduceMean", ["act", "axes"], ["pooled"], keepdims=0),
             helper.make_node("Add", ["pooled", "shift"], ["shifted"]), helper.make_node("MatMul", ["shifted", "fc"], ["y"])]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(w.astype(np.float32), "w"),
                               numpy_helper.from_array(fc.astype(np.float32), "fc"),
                               numpy_helper.from_array(np.array(True), "flag")])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)

    class Mirror(torch.nn.Module):  # the reference: the same computation in torch
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.conv.weight.data = torch.from_numpy(w)
            self.act, self.fc = torch.nn.ReLU(), torch.nn.Parameter(torch.from_numpy(fc))

        def forward(self, x):
            c = self.conv(x.to(self.fc.dtype))
            return (self.act(c - c.mean((2, 3), keepdim=True) + 0.5).mean((2, 3)) + 0.5) @ self.fc

    reference = Mirror().eval()
    x = images()
    targets = top_classes(reference, x)[:, 0]
    alphas, weights = quadrature("left", STEPS)
    expected = igcam_reference(reference, "act", x, targets, alphas, weights, np.zeros((1, *SHAPE)), False)
    bundle = from_onnx(path, tmp_path / "bundle", tensor="act")
    assert_maps_match(Explainer(bundle).explain(x, targets, steps=STEPS), expected)
    assert_maps_match(explain_graph_maps(bundle, x, targets, alphas, weights), expected)


class WithMask(torch.nn.Module):
    """An image and two inputs that are constants in deployment: a per-image channel mask [B, 6] and a scale [1]
    (as a transformer's attention mask of ones)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.nn.Conv2d(6, 6, 3, padding=1)
        self.act1, self.head = torch.nn.ReLU(), torch.nn.Linear(6, 5)

    def forward(self, x, mask, scale):  # the target is act1's output: the part after it takes both constants
        h = self.act1(self.conv1(x)) * mask[:, :, None, None]
        return self.head(torch.relu(self.conv2(h) * scale).mean(dim=(2, 3)))


def test_a_second_input_is_fixed_at_export_or_refused_in_one_line(tmp_path):
    model = WithMask().eval()
    path = tmp_path / "masked.onnx"
    x = images()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(x), torch.ones(2, 6), torch.ones(1)), str(path),
                          input_names=["x", "mask", "scale"], output_names=["y"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "mask": {0: "batch"}, "y": {0: "batch"}})
    for call in (lambda: layers(path), lambda: from_onnx(path, tmp_path / "refused")):
        with pytest.raises(UserError, match="fixed_inputs=") as error:
            call()
        assert "\n" not in str(error.value)
    for bad in ({"nothing": 1}, {"mask": float("nan")}, {"mask": 1e40}, {"x": 1}, "mask=1"):
        with pytest.raises(UserError):
            from_onnx(path, tmp_path / "refused", fixed_inputs=bad)
    assert not (tmp_path / "refused").exists()

    fixed = {"mask": 0.5, "scale": 2}
    bundle = from_onnx(path, tmp_path / "bundle", tensor=next(r["tensor"] for r in layers(path, fixed_inputs=fixed)
                                                               if r["op"] == "Relu"), fixed_inputs=fixed)
    assert json.loads((bundle / "manifest.json").read_text())["input"]["fixed_inputs"] == fixed

    class Fixed(torch.nn.Module):  # the reference: the module with the same constants
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, z):
            return self.inner(z, torch.full((len(z), 6), 0.5, dtype=z.dtype), torch.full((1,), 2.0, dtype=z.dtype))

    reference = Fixed().eval()
    targets = top_classes(reference, x)[:, 0]
    alphas, weights = quadrature("left", STEPS)
    expected = igcam_reference(reference, "inner.act1", x, targets, alphas, weights, np.zeros((1, *SHAPE)), False)
    assert_maps_match(Explainer(bundle).explain(x, targets, steps=STEPS), expected)
    assert main(["export", "--onnx", str(path), "-o", str(tmp_path / "cli"), "--fix-input", "mask=0.5",
                 "--fix-input", "scale=2", "--tensor", json.loads((bundle / "manifest.json").read_text())[
                     "target_layer"]["tensor"]]) == 0
    assert_maps_match(Explainer(tmp_path / "cli").explain(x, targets, steps=STEPS), expected)
    assert main(["export", "--onnx", str(path), "-o", str(tmp_path / "cli-bad"), "--fix-input", "mask"]) == 2
