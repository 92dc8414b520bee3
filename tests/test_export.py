"""The exporters on models as users bring them: batches fixed at export, a Softmax followed by copies, shapes read
after the target, unnamed nodes, ops without a rule, and exports that must never leave a broken bundle behind."""
import contextlib
import hashlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from support.comparisons import assert_maps_match
from support.reference import igcam_reference, randomized, top_classes

from igcam_engine import Explainer, UserError, zoo
from igcam_engine.export import from_onnx, from_torch, layers
from igcam_engine.export.graphs import prepare
from igcam_engine.quadrature import quadrature

SHAPE = (3, 64, 64)


def torch_export(model, path, **options):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, *SHAPE),), str(path), **options)
    return path


def images(count=3, seed=0):
    return np.random.default_rng(seed).standard_normal((count, *SHAPE)).astype(np.float32)


def small_resnet():
    torch.manual_seed(0)
    return randomized(zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1)))


def reference_maps(model, layer, x, targets, steps=4):
    alphas, weights = quadrature("left", steps)
    return igcam_reference(model, layer, x, targets, alphas, weights, np.zeros((1, *SHAPE)), False)


@pytest.mark.parametrize("exporter", ["dynamo (torch's default)", "legacy (TorchScript)"])
def test_a_batch_fixed_at_export_is_made_dynamic(tmp_path, exporter):
    """torch.onnx.export(model, (x,), path) with no dynamic axes writes batch 1 into the input and into a Reshape;
    the bundle runs any batch and gives the model's maps."""
    model = small_resnet()
    path = torch_export(model, tmp_path / "static.onnx", dynamo=exporter.startswith("dynamo"))
    original = onnx.load(str(path))
    assert original.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    prepared = prepare(original)
    assert prepared.fixed_batch == 1
    assert bool(prepared.batch_rewrites) == exporter.startswith("dynamo")  # the legacy one writes Flatten
    explainer = Explainer(from_onnx(path, tmp_path / "bundle"))
    x = images()
    targets = top_classes(model, x)[:, 0]
    assert_maps_match(explainer.explain(x, targets, steps=4), reference_maps(model, "layer4", x, targets))
    with torch.no_grad():
        np.testing.assert_allclose(explainer.predict(x), model(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-4)


def onnx_classifier(tail, initializers, batch=None, output="logits", name="tiny"):
    """x [batch, 3, 16, 16] -> Conv -> Relu 'feat' -> `tail` nodes -> `output`."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((4, 3, 3, 3)) * 0.5, "b1": rng.standard_normal(4) * 0.1, **initializers}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["feat"], name="relu1")] + tail
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch or "n", 3, 16, 16])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f" else np.int64), k)
         for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def tree_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_a_batch_that_cannot_be_freed_is_refused_in_one_line_and_leaves_nothing(tmp_path):
    """A constant [1, 2] concatenated with the features keeps the batch at 1: the export says so, names the way out,
    writes nothing, and an existing bundle at that path survives."""
    rng = np.random.default_rng(1)
    tail = [helper.make_node("GlobalAveragePool", ["feat"], ["pooled"], name="pool"),
            helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten"),
            helper.make_node("Concat", ["flat", "extra"], ["joined"], axis=1, name="join_extra"),
            helper.make_node("Gemm", ["joined", "w2", "b2"], ["logits"], transB=1, name="fc")]
    fixed = onnx_classifier(tail, {"flat_shape": np.array([1, 4]), "extra": np.zeros((1, 2)),
                                   "w2": rng.standard_normal((5, 6)), "b2": np.zeros(5)}, batch=1)
    path = tmp_path / "fixed.onnx"
    onnx.save(fixed, str(path))
    out = tmp_path / "bundle"
    with pytest.raises(UserError) as refused:
        from_onnx(path, out)
    message = str(refused.value)
    assert "batch fixed at 1" in message and "re-export it with a dynamic batch" in message
    assert "'flatten'" in message and "\n" not in message
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["fixed.onnx"]

    good = tmp_path / "good.onnx"
    onnx.save(onnx_classifier([helper.make_node("GlobalAveragePool", ["feat"], ["pooled"], name="pool"),
                               helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
                               helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1, name="fc")],
                              {"w2": rng.standard_normal((5, 4)), "b2": np.zeros(5)}), str(good))
    from_onnx(good, out)
    before = tree_digest(out)
    with pytest.raises(UserError, match="batch fixed at 1"):
        from_onnx(path, out)
    assert tree_digest(out) == before, "a failed export replaced the bundle"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "fixed.onnx", "good.onnx"]


def test_softmax_then_identity_is_explained_on_its_logits(tmp_path):
    """A model ending Softmax -> Identity (as PaddleOCR's classifier does): the logits, not the probabilities,
    are differentiated and predicted, and the manifest says which tensor that is."""
    model = small_resnet()
    path = torch_export(torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval(), tmp_path / "softmax.onnx",
                        dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    with_identity = onnx.load(str(path))
    probabilities = with_identity.graph.output[0].name
    with_identity.graph.node.append(helper.make_node("Identity", [probabilities], ["scores"], name="copy_out"))
    with_identity.graph.output[0].name = "scores"
    onnx.save(with_identity, str(path))
    explainer = Explainer(from_onnx(path, tmp_path / "bundle"))
    assert explainer.manifest.outputs[0].before == "Softmax" and explainer.manifest.outputs[0].source == "scores"
    x = images()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(explainer.predict(x), logits, rtol=1e-4, atol=1e-4)
    targets = logits.argmax(axis=1)
    assert_maps_match(explainer.explain(x, targets, steps=4), reference_maps(model, "layer4", x, targets))


class ReadsTheInputShape(torch.nn.Module):
    """Like timm's ConvNeXt head: the classifier reshapes with a size read from the input's shape."""

    def __init__(self):
        super().__init__()
        self.features = small_resnet()
        self.features.fc = torch.nn.Identity()
        self.head = torch.nn.Linear(256, 10)

    def forward(self, x):
        pooled = self.features(x)
        return self.head(pooled.reshape(x.shape[0], -1))


def test_shapes_read_after_the_target_do_not_bypass_it(tmp_path):
    """The legacy exporter turns x.shape[0] into Shape(x) -> Gather -> Concat -> Reshape after the target: only
    the input's shape reaches the tail, so the target still separates the input from the logits."""
    torch.manual_seed(0)
    model = ReadsTheInputShape().eval()
    onnx_path = torch_export(model, tmp_path / "reads_shape.onnx", dynamo=False, input_names=["x"],
                             dynamic_axes={"x": {0: "n"}})
    graph = onnx.load(str(onnx_path)).graph
    assert any(n.op_type == "Shape" and n.input[0] == "x" for n in graph.node), "the case must read x's shape"
    last_stage = [row for row in layers(onnx_path) if row["shape"] == [256, 2, 2]][-1]
    assert last_stage["cut"]
    x = images()
    targets = top_classes(model, x)[:, 0]
    expected = reference_maps(model, "features.layer4", x, targets)
    assert_maps_match(Explainer(from_onnx(onnx_path, tmp_path / "from_onnx")).explain(x, targets, steps=4), expected)
    explainer = Explainer(from_torch(model, "features.layer4", SHAPE, tmp_path / "from_torch"))
    assert_maps_match(explainer.explain(x, targets, steps=4), expected)


def test_every_node_gets_a_name():
    nameless = onnx_classifier([helper.make_node("GlobalAveragePool", ["feat"], ["pooled"]),
                                helper.make_node("Flatten", ["pooled"], ["flat"]),
                                helper.make_node("Gemm", ["flat", "w2", "b2"], ["logits"], transB=1)],
                               {"w2": np.ones((5, 4)), "b2": np.zeros(5)})
    names = [node.name for node in prepare(nameless).model.graph.node]
    assert all(names) and len(set(names)) == len(names)


def test_an_op_without_a_rule_is_named_with_a_later_target_that_works(tmp_path):
    rng = np.random.default_rng(2)
    tail = [helper.make_node("Round", ["feat"], ["rounded"], name="my_round"),
            helper.make_node("Conv", ["rounded", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
            helper.make_node("Relu", ["c2"], ["late"], name="relu2"),
            helper.make_node("GlobalAveragePool", ["late"], ["pooled"], name="pool"),
            helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
            helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], transB=1, name="fc")]
    path = tmp_path / "round.onnx"
    onnx.save(onnx_classifier(tail, {"w2": rng.standard_normal((6, 4, 3, 3)), "b2": np.zeros(6),
                                     "w3": rng.standard_normal((5, 6)), "b3": np.zeros(5)}), str(path))
    with pytest.raises(UserError) as refused:
        from_onnx(path, tmp_path / "bundle", tensor="feat")
    message = str(refused.value)
    assert "Round (node 'my_round')" in message and "differentiated part" in message
    # the first later tensor whose tail has every rule: Round's own output (Round then runs before the target)
    assert "a later target avoids them: tensor 'rounded' [4, 16, 16]" in message and "\n" not in message
    assert not (tmp_path / "bundle").exists()
    from_onnx(path, tmp_path / "bundle", tensor="rounded")


def test_from_torch_leaves_the_model_as_it_was(tmp_path):
    model = small_resnet().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    from_torch(model, "layer4", SHAPE, tmp_path / "bundle")
    assert all(module.training for module in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(module._forward_hooks for module in model.modules())


class SpecialisesTheBatch(torch.nn.Module):
    """Code that turns the batch into a Python int: torch.export cannot keep it dynamic."""

    def __init__(self):
        super().__init__()
        self.features = small_resnet()
        self.features.fc = torch.nn.Identity()
        self.head = torch.nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.features(x).reshape(int(x.shape[0]), -1))


def test_from_torch_frees_a_batch_the_code_fixes(tmp_path):
    """torch.export refuses the dynamic batch; the model is exported as traced (batch 2) and the batch freed."""
    torch.manual_seed(0)
    model = SpecialisesTheBatch().eval()
    explainer = Explainer(from_torch(model, "features.layer4", SHAPE, tmp_path / "bundle"))
    x = images()
    targets = top_classes(model, x)[:, 0]
    assert_maps_match(explainer.explain(x, targets, steps=4), reference_maps(model, "features.layer4", x, targets))
