"""ONNX Runtime's fused contrib ops (com.microsoft) are rewritten as the standard ops they fuse: each form gives
what ONNX Runtime's own kernel gives, and files its offline optimizer wrote export and match autograd."""
import copy
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from support.comparisons import assert_maps_match
from support.reference import top_classes

from igcam_engine import Explainer, UserError
from igcam_engine.export import from_onnx
from igcam_engine.export.contrib import unfused

sys.path.insert(0, str(Path(__file__).parent))
from test_export import reference_maps as resnet_reference  # noqa: E402
from test_export import small_resnet, torch_export  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 5, 8)).astype(np.float32)


def _run(model, feeds):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _model(node, inputs, initializers=(), outputs=("y",)):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])


def _vector(n, seed):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


CASES = {
    "Gelu": (helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft"), [("x", X.shape)], []),
    "BiasGelu": (helper.make_node("BiasGelu", ["x", "b"], ["y"], domain="com.microsoft"), [("x", X.shape)],
                 [("b", _vector(8, 1))]),
    "FastGelu": (helper.make_node("FastGelu", ["x", "b"], ["y"], domain="com.microsoft"), [("x", X.shape)],
                 [("b", _vector(8, 2))]),
    "QuickGelu": (helper.make_node("QuickGelu", ["x"], ["y"], domain="com.microsoft", alpha=1.5), [("x", X.shape)], []),
    "SkipLayerNormalization": (
        helper.make_node("SkipLayerNormalization", ["x", "s", "g", "beta", "bias"], ["y", "", "", "sum"],
                         domain="com.microsoft", epsilon=1e-5),
        [("x", X.shape), ("s", X.shape)], [("g", _vector(8, 3)), ("beta", _vector(8, 4)), ("bias", _vector(8, 5))]),
    "FusedMatMul": (helper.make_node("FusedMatMul", ["x", "w"], ["y"], domain="com.microsoft", alpha=0.5, transB=1),
                    [("x", X.shape)], [("w", RNG.standard_normal((3, 8)).astype(np.float32))]),
    "FusedConv": (helper.make_node("FusedConv", ["x4", "w", "b", "z"], ["y"], domain="com.microsoft",
                                   activation="LeakyRelu", activation_params=[0.2], pads=[1, 1, 1, 1]),
                  [("x4", (2, 5, 4, 2)), ("z", (2, 3, 4, 2))],
                  [("w", RNG.standard_normal((3, 5, 3, 3)).astype(np.float32)), ("b", _vector(3, 6))]),
}


@pytest.mark.parametrize("op", sorted(CASES))
def test_each_unfused_form_equals_onnx_runtimes_kernel(op):
    node, inputs, initializers = CASES[op]
    outputs = [o for o in node.output if o]
    model = _model(node, inputs, initializers, outputs)
    feeds = {name: RNG.standard_normal(shape).astype(np.float32) for name, shape in inputs}
    rewritten = unfused(copy.deepcopy(model))
    assert not any(n.domain == "com.microsoft" for n in rewritten.graph.node)
    for got, expected in zip(_run(rewritten, feeds), _run(model, feeds)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _optimized(path, out):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return out


def test_a_file_onnx_runtimes_optimizer_wrote_exports_and_matches_autograd(tmp_path):
    """FusedConv throughout the backbone (and contrib opset imports): the file exports and explains as the original."""
    model = small_resnet().eval()
    path = torch_export(model, tmp_path / "resnet.onnx", dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    optimized = _optimized(path, tmp_path / "resnet.opt.onnx")
    assert any(n.domain == "com.microsoft" for n in onnx.load(str(optimized)).graph.node)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    targets = top_classes(model, x)[:, 0]
    maps = Explainer(from_onnx(optimized, tmp_path / "bundle")).explain(x, targets, steps=4)
    assert_maps_match(maps, resnet_reference(model, "layer4", x, targets))


def test_an_unknown_contrib_op_on_the_differentiated_part_is_refused_naming_it(tmp_path):
    """A custom-domain op after the target: one line naming the op and its node."""
    model = small_resnet().eval()
    path = torch_export(model, tmp_path / "resnet.onnx", dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "n"}})
    graph = onnx.load(str(path))
    relu = [n for n in graph.graph.node if n.op_type == "Relu"][-1]
    relu.domain, relu.op_type, relu.name = "com.example", "MyRelu", "custom_relu"
    graph.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(graph, str(tmp_path / "custom.onnx"))
    tensor = [n for n in graph.graph.node if n.op_type == "Conv"][-1].output[0]
    with pytest.raises(UserError) as error:
        from_onnx(tmp_path / "custom.onnx", tmp_path / "bundle", tensor=tensor)
    assert "MyRelu" in str(error.value) and "\n" not in str(error.value)


def test_an_optimized_vision_transformer_exports_its_fused_attention_products(tmp_path):
    """FusedMatMul (q k^T with transB) on the differentiated part is unfused: the default target's maps match
    autograd with the reshape transform."""
    from support.reference import igcam_reference
    from test_layouts import SHAPE, STEPS, TinyViT, export_with_taps, tokens_to_grid

    from igcam_engine.quadrature import quadrature

    model = TinyViT(1).eval()
    path, _ = export_with_taps(model, tmp_path / "vit.onnx")
    optimized = _optimized(path, tmp_path / "vit.opt.onnx")
    assert any(n.op_type == "FusedMatMul" for n in onnx.load(str(optimized)).graph.node)
    x = np.random.default_rng(0).standard_normal((2, *SHAPE)).astype(np.float32)
    targets = top_classes(model, x)[:, 0]
    alphas, weights = quadrature("left", STEPS)
    expected = igcam_reference(model, "norm1.1", x, targets, alphas, weights, np.zeros((1, *SHAPE)), False,
                               reshape=tokens_to_grid(1))
    assert_maps_match(Explainer(from_onnx(optimized, tmp_path / "bundle")).explain(x, targets, steps=STEPS), expected)
