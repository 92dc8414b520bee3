"""Run by the Keras virtualenv's Python (tests/corpus/test_keras.py starts it; it imports nothing of the engine):
builds a Keras application with `weights=None`, calibrates its batch norms on the given images, converts it to
ONNX with tf2onnx as a TensorFlow user would, and writes what the test compares the engine's maps with: the
activation of `layer` and the gradient of each candidate class's logit with respect to it, by TensorFlow's
GradientTape in float64 (and float32) at each path point alpha * image (the zero baseline).

    python keras_reference.py REQUEST.json  ->  writes the ONNX file and the .npz the request names
"""
import json
import sys

import keras
import numpy as np
import tensorflow as tf
import tf2onnx

VARIANCE_FLOOR = 1e-3  # as subjects.calibrated: a nearly constant channel would make the network ill-conditioned


def build(name: str, size: int, floatx: str, weights=None, logits=False):
    """The application, seeded; with `weights` copied in; ending with its logits or, as deployed, their softmax."""
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(floatx)
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, input_shape=(size, size, 3),
                                               classifier_activation=None if logits else "softmax")
    if weights is not None:
        model.set_weights([w.astype(floatx) for w in weights])
    return model


def calibrate(model, images: np.ndarray) -> None:
    """Moving statistics of every batch norm set to the statistics of `images` (one training-mode pass with
    momentum 0: each norm sees its input normalized by the norms before it, as at inference afterwards)."""
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    for norm in norms:
        norm.momentum = 0.0
    model(images, training=True)
    for norm in norms:
        norm.moving_variance.assign(np.maximum(norm.moving_variance.numpy(), VARIANCE_FLOOR))


def points(model, layer: str, images, classes, alphas):
    """(activations [images, alphas, K, h, w], gradients [images, classes, alphas, K, h, w]) of `layer`'s output,
    rearranged from channels-last to [K, h, w]; `classes` [images, candidates]."""
    head = keras.Model(model.inputs, model.get_layer(layer).output)
    tail = keras.Model(model.get_layer(layer).output, model.outputs)
    activations, gradients = [], []
    for image, candidates in zip(images, classes):
        per_alpha, grads = [], []
        for alpha in alphas:
            a = head(tf.constant(alpha * image[None]))
            per_alpha.append(np.transpose(a.numpy()[0], (2, 0, 1)))
            row = []
            for c in candidates:
                with tf.GradientTape() as tape:
                    tape.watch(a)
                    score = tail(a)[0, int(c)]
                row.append(np.transpose(tape.gradient(score, a).numpy()[0], (2, 0, 1)))
            grads.append(row)
        activations.append(per_alpha)
        gradients.append(np.swapaxes(np.array(grads), 0, 1))
    return np.array(activations), np.array(gradients)


def main(request_path: str) -> None:
    request = json.loads(open(request_path).read())
    inputs = np.load(request["inputs"])
    images, calibration = inputs["images"], inputs["calibration"]  # channels-last, model space
    size, layer, alphas = request["size"], request["layer"], request["alphas"]
    model = build(request["model"], size, "float32")
    calibrate(model, calibration)
    spec = (tf.TensorSpec((None, size, size, 3), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec)
    with open(request["onnx"], "wb") as f:
        f.write(proto.SerializeToString())
    weights = model.get_weights()
    # The references end with the logits: the engine explains the input of the ONNX file's final Softmax.
    exact, single = (build(request["model"], size, floatx, weights, logits=True) for floatx in ("float64", "float32"))
    logits = single(images).numpy()
    classes = np.argsort(-logits, axis=1)[:, :request["candidates"]]
    a64, g64 = points(exact, layer, images.astype(np.float64), classes, alphas)
    a32, g32 = points(single, layer, images, classes, alphas)
    np.savez(request["out"], classes=classes, activations=a64, gradients=g64, activations32=a32, gradients32=g32,
             logits=logits, onnx_tensors=_layer_tensors(proto, layer))
    print(json.dumps({"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__}))


def _layer_tensors(proto, layer: str) -> np.ndarray:
    """The ONNX tensors tf2onnx made for `layer`'s ops, in graph order (its output is the last)."""
    return np.array([o for n in proto.graph.node for o in n.output if f"/{layer}/" in o or f"/{layer}_1/" in o])


if __name__ == "__main__":
    main(sys.argv[1])
