"""Engine maps (ONNX Runtime, CPU) against the torch-autograd float64 reference of the contract."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from support.comparisons import assert_maps_match, one_hot
from support.reference import igcam_reference, randomized, top_classes

from igcam_engine import Explainer, UserError, zoo
from igcam_engine.export import from_onnx, from_torch
from igcam_engine.quadrature import quadrature

IMAGENET_BLACK = -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225])

# name -> (factory, layer, input shape, preprocess)
MODELS = {
    "resnet50-layer3": (lambda: zoo.resnet50(num_classes=10, width=8), "layer3", (3, 64, 80), "imagenet"),
    "resnet50-layer4": (lambda: zoo.resnet50(num_classes=10, width=8), "layer4", (3, 64, 80), None),
    "vgg16-features.29": (lambda: zoo.vgg16(num_classes=10, width=8, hidden=32), "features.29", (3, 224, 224), None),
    "mobilenet_v2": (lambda: zoo.mobilenet_v2(num_classes=10, width_mult=0.25), "features.18", (3, 64, 80), None),
    "efficientnet": (lambda: zoo.efficientnet_b0_style(num_classes=10, width_mult=0.25), "features.7", (3, 64, 80), None),
    "densenet": (
        lambda: zoo.densenet121_style(num_classes=10, growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16),
        "features.norm5", (3, 64, 80), None,
    ),
}


_BUNDLES = {}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    def get(name):
        if name not in _BUNDLES:
            factory, layer, shape, preprocess = MODELS[name]
            torch.manual_seed(0)
            model = randomized(factory())
            path = from_torch(model, layer, shape, tmp_path_factory.mktemp(name), preprocess=preprocess)
            _BUNDLES[name] = (model, layer, shape, preprocess, Explainer(path), path)
        return _BUNDLES[name]

    return get


def inputs(shape, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def black(shape, preprocess):
    value = IMAGENET_BLACK if preprocess == "imagenet" else np.zeros(3)
    return np.broadcast_to(value[:, None, None], shape)[None]


def reference(bundle_entry, images, targets, rule, steps, subtract, baseline=None):
    """The float64 torch maps for a bundle's model (baseline: the black picture unless given)."""
    model, layer, shape, preprocess, _, _ = bundle_entry
    alphas, weights = quadrature(rule, steps) if rule else (np.ones(1), np.ones(1))
    base = black(shape, preprocess) if baseline is None else baseline
    return igcam_reference(model, layer, images, targets, alphas, weights, base, subtract)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("variant", ["official", "paper"])
def test_presets_match_reference(bundle, name, variant):
    entry = bundle(name)
    images = inputs(entry[2])
    targets = top_classes(entry[0], images)[:, 0]
    maps = entry[4].explain(images, targets, variant=variant, steps=8)
    rule, subtract = {"official": ("left", False), "paper": ("right", True)}[variant]
    assert maps.dtype == np.float32
    assert_maps_match(maps, reference(entry, images, targets, rule, 8, subtract))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradcam_matches_reference(bundle, name):
    entry = bundle(name)
    images = inputs(entry[2], seed=1)
    targets = top_classes(entry[0], images, k=2)[:, 1]  # the runner-up class: a class other than the top works too
    maps = entry[4].explain(images, targets, method="gradcam")
    assert_maps_match(maps, reference(entry, images, targets, None, 1, False))


@pytest.mark.parametrize("rule", ["left", "right", "midpoint", "trapezoid", "gauss-legendre"])
def test_every_rule_matches_reference(bundle, rule):
    entry = bundle("resnet50-layer3")
    images = inputs(entry[2], seed=2)
    targets = top_classes(entry[0], images)[:, 0]
    maps = entry[4].explain(images, targets, rule=rule, steps=5, subtract_baseline=True, baseline="zeros")
    expected = reference(entry, images, targets, rule, 5, True, np.zeros((1, *entry[2])))
    assert_maps_match(maps, expected)


@pytest.mark.parametrize("form", ["[B,C,H,W] per image", "[C,H,W]", "[1,C,H,W]"])
def test_array_baselines(bundle, form):
    entry = bundle("mobilenet_v2")
    shape = entry[2]
    images = inputs(shape, seed=3)
    targets = top_classes(entry[0], images)[:, 0]
    per_image = inputs(shape, seed=4) * 0.3
    baseline = {"[B,C,H,W] per image": per_image, "[C,H,W]": per_image[0], "[1,C,H,W]": per_image[:1]}[form]
    maps = entry[4].explain(images, targets, variant="paper", steps=4, baseline=baseline)
    expected = reference(entry, images, targets, "right", 4, True, baseline if baseline.ndim == 4 else baseline[None])
    assert_maps_match(maps, expected)


def test_normalize_option(bundle):
    """normalize=True: each map min-max scaled to [0, 1], i.e. the reference's maps normalized."""
    entry = bundle("efficientnet")
    images = inputs(entry[2], seed=12)
    targets = top_classes(entry[0], images)[:, 0]
    maps = entry[4].explain(images, targets, steps=6, normalize=True)
    expected = reference(entry, images, targets, "left", 6, False)
    low = expected.min(axis=(1, 2), keepdims=True)
    assert_maps_match(maps, (expected - low) / (expected.max(axis=(1, 2), keepdims=True) - low))
    assert maps.min() == 0 and np.allclose(maps.max(axis=(1, 2)), 1)


def test_custom_preprocess_black_baseline(tmp_path):
    """A preprocess dict with its own mean/std: the black baseline is the black picture after it (-mean/std)."""
    torch.manual_seed(0)
    model = randomized(zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1)))
    shape = (3, 64, 64)
    spec = {"resize": "crop", "scale": 1 / 255, "mean": [0.2, 0.5, 0.7], "std": [0.5, 0.25, 0.125]}
    explainer = Explainer(from_torch(model, "layer4", shape, tmp_path, preprocess=spec))
    images = inputs(shape, seed=13)
    targets = top_classes(model, images)[:, 0]
    maps = explainer.explain(images, targets, variant="paper", steps=5)
    black_picture = (-np.array(spec["mean"]) / np.array(spec["std"]))[None, :, None, None] * np.ones((1, *shape))
    alphas, weights = quadrature("right", 5)
    assert_maps_match(maps, igcam_reference(model, "layer4", images, targets, alphas, weights, black_picture, True))


def test_several_targets_per_image(bundle):
    _, _, shape, _, explainer, _ = bundle("efficientnet")
    images = inputs(shape, batch=3, seed=5)
    targets = np.array([[1, 2], [3, 4], [5, 1]])
    maps = explainer.explain(images, targets, variant="paper", steps=4)
    assert maps.shape == (3, 2, *shape[1:])
    for t in range(2):
        single = explainer.explain(images, targets[:, t], variant="paper", steps=4)
        np.testing.assert_allclose(maps[:, t], single, rtol=1e-5, atol=1e-6 * np.abs(single).max())


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_maps_do_not_depend_on_batch_size(bundle, batch_size):
    _, _, shape, _, explainer, _ = bundle("densenet")
    images = inputs(shape, batch=3, seed=6)
    reference = explainer.explain(images, [1, 2, 3], steps=6, variant="paper", batch_size=6)
    maps = explainer.explain(images, [1, 2, 3], steps=6, variant="paper", batch_size=batch_size)
    np.testing.assert_allclose(maps, reference, rtol=1e-4, atol=1e-5 * np.abs(reference).max())


def test_single_image_and_int_target(bundle):
    _, _, shape, _, explainer, _ = bundle("resnet50-layer4")
    image = inputs(shape)[0]
    maps = explainer.explain(image, 4, steps=3)
    np.testing.assert_allclose(maps, explainer.explain(image[None], [4], steps=3))
    assert maps.shape == (1, *shape[1:])


def test_explain_graph_matches_reference(bundle):
    """explain.onnx (for hosts without Python) against the reference, both presets."""
    model, layer, shape, preprocess, _, path = bundle("resnet50-layer3")
    session = ort.InferenceSession(str(path / "explain.onnx"), providers=["CPUExecutionProvider"])
    images = inputs(shape, seed=7)
    top = top_classes(model, images, k=2)
    targets = np.array([top[0, 0], top[1, 0] if top[1, 0] != top[0, 0] else top[1, 1]])  # two classes: each image
    base = black(shape, preprocess).astype(np.float32)                                      # its own seed
    for rule, subtract in (("left", False), ("right", True)):
        alphas, weights = quadrature(rule, 6)
        (maps,) = session.run(None, {
            "images": images, "baseline": base, "alphas": alphas.astype(np.float32),
            "weights": weights.astype(np.float32), "seed_0": one_hot(targets, 10),
            "subtract_baseline": np.array([float(subtract)], np.float32),
        })
        assert_maps_match(maps, igcam_reference(model, layer, images, targets, alphas, weights, base, subtract))


def test_gradient_at_engine_activations(bundle):
    """igcam.onnx's dA against torch autograd evaluated at the very activations the engine computed, so that a
    near-tie in a max-pool window cannot flip between float32 and float64."""
    model, layer, shape, _, _, path = bundle("vgg16-features.29")
    session = ort.InferenceSession(str(path / "igcam.onnx"), providers=["CPUExecutionProvider"])
    images, targets = inputs(shape, seed=8), np.array([1, 8])
    alphas = np.array([0.25, 1.0], np.float32)
    activations, grads, logits = session.run(None, {
        "images": images, "baseline": np.zeros((1, *shape), np.float32), "alphas": alphas,
        "seed_0": one_hot(targets, 10),
    })
    module = dict(model.named_modules())[layer]
    given = torch.tensor(activations, dtype=torch.float64, requires_grad=True)
    handle = module.register_forward_hook(lambda m, i, o: given)
    try:
        double = model.double()
        scores = double(torch.zeros((len(given), *shape), dtype=torch.float64))
    finally:
        handle.remove()
        model.float()
    row_targets = np.repeat(targets, len(alphas))
    scores[np.arange(len(row_targets)), row_targets].sum().backward()
    np.testing.assert_allclose(logits, scores.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads, given.grad.numpy(), rtol=1e-4, atol=1e-6 * given.grad.abs().max().item())


def test_softmax_output_is_differentiated_at_its_input(tmp_path):
    torch.manual_seed(0)
    model = randomized(zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1)))
    with_softmax = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    shape = (3, 64, 64)
    explainer = Explainer(from_torch(with_softmax, "0.layer4", shape, tmp_path))
    images = inputs(shape)
    targets = top_classes(model, images)[:, 0]
    maps = explainer.explain(images, targets, steps=4)
    alphas, weights = quadrature("left", 4)
    assert_maps_match(maps, igcam_reference(model, "layer4", images, targets, alphas, weights, np.zeros((1, *shape)), False))


def test_from_onnx_on_a_plain_torch_export(tmp_path):
    """A model exported by torch's own TorchScript exporter (not ours), target picked by the default rule."""
    torch.manual_seed(0)
    model = randomized(zoo.resnet50(num_classes=10, width=8, layers=(1, 1, 1, 1)))
    shape = (3, 64, 96)
    onnx_path = tmp_path / "plain.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.zeros(1, *shape),), str(onnx_path), input_names=["x"], output_names=["scores"],
            dynamic_axes={"x": {0: "n"}, "scores": {0: "n"}}, dynamo=False,
        )
    explainer = Explainer(from_onnx(onnx_path, tmp_path / "bundle"))
    images = inputs(shape)
    targets = top_classes(model, images)[:, 0]
    maps = explainer.explain(images, targets, variant="paper", steps=4)
    alphas, weights = quadrature("right", 4)
    assert_maps_match(maps, igcam_reference(model, "layer4", images, targets, alphas, weights, np.zeros((1, *shape)), True))


def test_predict_matches_torch(bundle):
    model, _, shape, _, explainer, _ = bundle("mobilenet_v2")
    images = inputs(shape, seed=9)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(explainer.predict(images), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(targets=10), r"class indices in \[0, 9\]"),
        (dict(targets=[1]), "targets for 1 images"),
        (dict(targets=1.5), "targets must be"),
        (dict(targets=1, steps=0), "steps must be a positive integer"),
        (dict(targets=1, rule="simpson"), "unknown quadrature rule"),
        (dict(targets=1, variant="fast"), "unknown variant"),
        (dict(targets=1, method="lime"), "unknown method"),
        (dict(targets=1, baseline="white"), "unknown baseline"),
        (dict(targets=1, baseline=np.zeros((3, 5, 5))), "baseline array must be"),
        (dict(targets=1, batch_size=0), "rows_per_call must be a positive integer"),
        (dict(targets=1, rule="trapezoid", steps=1), "trapezoid rule needs steps >= 2"),
    ],
)
def test_bad_arguments_say_what_is_accepted(bundle, kwargs, message):
    _, _, shape, _, explainer, _ = bundle("resnet50-layer4")
    with pytest.raises(UserError, match=message):
        explainer.explain(inputs(shape), **kwargs)


def test_bad_images_say_what_is_accepted(bundle):
    _, _, shape, _, explainer, _ = bundle("resnet50-layer4")
    with pytest.raises(UserError, match=r"images must be \[B, 3, 64, 80\]"):
        explainer.explain(np.zeros((2, 3, 64, 64), np.float32), 1)
    with pytest.raises(UserError, match="NaN"):
        explainer.explain(np.full((1, *shape), np.nan, np.float32), 1)


def test_bundle_manifest_and_graphs(bundle):
    import json

    import onnx

    from igcam_engine.bundle import sha256

    _, _, shape, _, _, path = bundle("resnet50-layer3")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "igcam-bundle" and manifest["format_version"] == 3
    assert manifest["held"] == []
    assert manifest["input"] == {"name": "images", "shape": list(shape), "layout": "NCHW", "dtype": "float32",
                                 "model_layout": "NCHW", "fixed_inputs": {}}
    assert manifest["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert manifest["target_layer"]["name"] == "layer3" and manifest["target_layer"]["shape"] == [128, 4, 5]
    assert manifest["target_layer"]["layout"] == "NCHW" and manifest["target_layer"]["grid"] == [4, 5]
    assert manifest["task"] == {"kind": "classification", "detector": None, "classes": 10}
    assert manifest["outputs"] == [{"name": "output_0", "source": "output", "tensor": "output", "before": None,
                                    "shape": [10], "layout": None}]
    for entry in list(manifest["graphs"].values()) + [manifest["weights"]]:
        assert sha256(path / entry["file"]) == entry["sha256"]
    for name in ("forward", "gradient", "igcam", "explain"):
        onnx.checker.check_model(str(path / f"{name}.onnx"), full_check=True)
    # every large tensor is stored once in weights.bin, and the graphs that use it point at the same bytes
    places = {}
    for name in ("forward", "gradient", "igcam", "explain"):
        for tensor in onnx.load(str(path / f"{name}.onnx"), load_external_data=False).graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in tensor.external_data}
                places.setdefault(tensor.name, set()).add((int(info["offset"]), int(info["length"])))
    assert all(len(p) == 1 for p in places.values())
    assert any(name.startswith("model.layer1") for name in places)
    unique = {p for ps in places.values() for p in ps}
    assert (path / "weights.bin").stat().st_size <= sum(length + 4096 for _, length in unique)


def test_explain_from_several_threads(bundle):
    from concurrent.futures import ThreadPoolExecutor

    _, _, shape, _, explainer, _ = bundle("mobilenet_v2")
    jobs = [(inputs(shape, seed=s), [s % 10, (s + 3) % 10]) for s in range(6)]
    sequential = [explainer.explain(x, t, steps=4, variant="paper") for x, t in jobs]
    fresh = Explainer(bundle("mobilenet_v2")[5])  # its baseline cache starts empty: threads race to fill it
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: fresh.explain(job[0], job[1], steps=4, variant="paper"), jobs))
    for a, b in zip(sequential, threaded):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())


@pytest.mark.parametrize("rule,expected_passes", [("trapezoid", [2, 3, 5, 9, 17]), ("midpoint", [1, 3, 9, 27])])
def test_adaptive_refinement_matches_reference(bundle, rule, expected_passes):
    """Each level reuses the earlier passes; the result is the plain rule at the final node count."""
    model, layer, shape, preprocess, explainer, _ = bundle("resnet50-layer3")
    images = inputs(shape, seed=11)
    targets = top_classes(model, images)[:, 0]
    result = explainer.explain_adaptive(images, targets, rule=rule, tolerance=1e-4, max_steps=30, variant="paper")
    assert result.passes == expected_passes[-1] and not result.converged
    alphas, weights = quadrature(rule, result.passes)
    expected = igcam_reference(model, layer, images, targets, alphas, weights, black(shape, preprocess), True)
    assert_maps_match(result.maps, expected)
    loose = explainer.explain_adaptive(images, targets, rule=rule, tolerance=0.3, variant="paper")
    assert loose.converged and loose.change <= 0.3 and loose.passes in expected_passes[1:]
    np.testing.assert_allclose(explainer.explain(images, targets, steps="auto", tolerance=0.3, rule=rule,
                                                 variant="paper"), loose.maps)


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps="auto", rule="left"), "refines trapezoid or midpoint grids"),
    (dict(steps="auto", tolerance=0), r"tolerance must be a number in \(0, 1\)"),
    (dict(steps="auto", max_steps=1), "max_steps must be an integer >= 2"),
    (dict(steps="auto", method="gradcam"), "method must be 'igcam'"),
])
def test_adaptive_bad_arguments(bundle, kwargs, message):
    _, _, shape, _, explainer, _ = bundle("resnet50-layer4")
    with pytest.raises(UserError, match=message):
        explainer.explain(inputs(shape), 1, **kwargs)
