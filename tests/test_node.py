"""explain.onnx from a non-Python host: examples/node/explain.js (npm onnxruntime-node, ONNX Runtime's C++ core)
against the Python engine on the very input tensor the Node program built."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from support.comparisons import assert_maps_match

from igcam_engine import Explainer, zoo
from igcam_engine.data import sample_images
from igcam_engine.export import from_torch
from igcam_engine.images import load_image, to_model_input

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"
READY = shutil.which("node") is not None and (EXAMPLE / "node_modules" / "onnxruntime-node").is_dir()
# In CI the Node check must run: scripts/test.sh installs the example's packages, so a missing set-up is a failure.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not READY and not os.environ.get("CI"), reason="node or "
                                                   "examples/node/node_modules missing (scripts/test.sh installs them)")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.efficientnet_b0_style(num_classes=10, width_mult=0.25).eval()
    return from_torch(model, "features.7", (3, 96, 128), tmp_path_factory.mktemp("node"), preprocess="imagenet")


@pytest.mark.parametrize("variant,steps", [("official", 6), ("paper", 5)])
def test_node_maps_equal_python_maps(bundle, tmp_path, variant, steps):
    assert READY, "node and examples/node/node_modules are required in CI"
    explainer = Explainer(bundle)
    photo = sample_images()[0]
    target = int(explainer.predict(to_model_input(load_image(photo), explainer.input_shape, explainer.preprocess)[0])
                 .argmax())
    out = tmp_path / "chelsea"
    subprocess.run(["node", str(EXAMPLE / "explain.js"), str(bundle), str(photo), str(target), str(out), str(steps),
                    variant], check=True, capture_output=True, text=True, timeout=120)
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta == {"shape": [96, 128], "target": target, "steps": steps, "variant": variant}
    node_map = np.fromfile(f"{out}.map.f32", np.float32).reshape(1, 96, 128)
    node_input = np.fromfile(f"{out}.input.f32", np.float32).reshape(1, 3, 96, 128)
    expected = explainer.explain(node_input, target, steps=steps, variant=variant)
    assert_maps_match(node_map, expected, normalized_tolerance=1e-4, raw_tolerance=1e-4)


def test_node_rejects_a_bad_target(bundle, tmp_path):
    assert READY, "node and examples/node/node_modules are required in CI"
    result = subprocess.run(["node", str(EXAMPLE / "explain.js"), str(bundle), str(sample_images()[0]), "99",
                             str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "target must be in [0, 9]" in result.stderr
