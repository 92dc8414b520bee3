"""The Triton model repository: config.pbtxt must match model.onnx exactly, and the model must give the engine's
maps for a batch."""
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support.comparisons import assert_maps_match

from igcam_engine import Explainer, UserError, zoo
from igcam_engine.apps.cli import main
from igcam_engine.export import from_torch, triton_repository

ONNX_TO_TRITON = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}


def parse_pbtxt(text):
    """A small protobuf text-format reader (messages, repeated fields, scalars): enough for config.pbtxt."""
    tokens = re.findall(r'"[^"]*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', text)
    position = 0

    def value():
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[position] != "]":
                items.append(value())
                if tokens[position] == ",":
                    position += 1
            position += 1
            return items
        return token.strip('"') if token.startswith('"') else (int(token) if re.fullmatch(r"-?\d+", token) else token)

    def message(end):
        nonlocal position
        fields = {}
        while position < len(tokens) and tokens[position] != end:
            key = tokens[position]
            position += 1
            if tokens[position] == ":":
                position += 1
            fields.setdefault(key, []).append(value())
        position += 1
        return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}

    return message(None)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.mobilenet_v2(num_classes=10, width_mult=0.25).eval()
    return from_torch(model, "features.18", (3, 64, 80), tmp_path_factory.mktemp("triton"), preprocess="imagenet")


@pytest.mark.parametrize("tensorrt", ["off", "fp16"])
def test_config_matches_the_model_exactly(bundle, tmp_path, tensorrt):
    folder = triton_repository(bundle, tmp_path, steps=6, max_batch_size=4, tensorrt=tensorrt)
    config = parse_pbtxt((folder / "config.pbtxt").read_text())
    model = onnx.load(str(folder / "1" / "model.onnx"))
    assert config["name"] == folder.name and config["backend"] == "onnxruntime" and config["max_batch_size"] == 4
    graph = {i.name: i for i in list(model.graph.input) + list(model.graph.output)}
    entries = config["input"] + config["output"]
    assert {e["name"] for e in entries} == set(graph)
    for entry in entries:
        tensor = graph[entry["name"]].type.tensor_type
        assert entry["data_type"] == ONNX_TO_TRITON[tensor.elem_type]
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        assert dims[0] == -1, "the first dim must be the dynamic batch"
        # Triton's per-item shape (after an optional reshape) is the graph's shape without the batch dim
        assert dims[1:] == (entry["reshape"]["shape"] if "reshape" in entry else entry["dims"])
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] > 0
    accelerators = config.get("optimization")
    if tensorrt == "off":
        assert accelerators is None
    else:
        (trt,) = accelerators["execution_accelerators"]["gpu_execution_accelerator"]
        assert trt["name"] == "tensorrt" and {"key": "precision_mode", "value": "FP16"} in trt["parameters"]


@pytest.mark.parametrize("variant", ["official", "paper"])
def test_triton_model_gives_the_engines_maps(bundle, tmp_path, variant):
    folder = triton_repository(bundle, tmp_path, steps=6, variant=variant)
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == {"images", "targets"}
    images = np.random.default_rng(0).standard_normal((3, 3, 64, 80)).astype(np.float32)
    explainer = Explainer(bundle)
    targets = explainer.predict(images).argmax(axis=1)
    (maps,) = session.run(["maps"], {"images": images, "targets": targets})
    assert_maps_match(maps, explainer.explain(images, targets, steps=6, variant=variant), 1e-4, 1e-4)


def test_cli_writes_a_repository_from_any_onnx_file(tmp_path):
    onnx_path = tmp_path / "plain.onnx"
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), str(onnx_path), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    code = main(["export", "--onnx", str(onnx_path), "-o", str(tmp_path / "bundle"), "--triton-repo",
                 str(tmp_path / "repo"), "--triton-steps", "4", "--triton-tensorrt", "fp32"])
    assert code == 0
    folder = tmp_path / "repo" / "igcam_explain"
    assert (folder / "1" / "model.onnx").is_file() and (folder / "1" / "weights.bin").is_file()
    assert 'value: "FP32"' in (folder / "config.pbtxt").read_text()


def test_bad_repository_options(bundle, tmp_path):
    with pytest.raises(UserError, match="max_batch_size must be a positive integer"):
        triton_repository(bundle, tmp_path, max_batch_size=0)
    with pytest.raises(UserError, match="tensorrt must be one of"):
        triton_repository(bundle, tmp_path, tensorrt="int8")
    with pytest.raises(UserError, match="unknown variant"):
        triton_repository(bundle, tmp_path, variant="fast")
