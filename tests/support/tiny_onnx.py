"""A tiny classifier built with onnx.helper (conv, ReLU, strided conv, ReLU, pooling, Gemm, Softmax) and an
independent float64 numpy implementation of it: forward by loops, gradients by central finite differences, the
IG-CAM map by the contract's definition. No torch: the torch-free tier uses it."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPE = (3, 12, 10)
rng = np.random.default_rng(0)
W1, B1 = rng.standard_normal((4, 3, 3, 3)) * 0.5, rng.standard_normal(4) * 0.1
W2, B2 = rng.standard_normal((5, 4, 3, 3)) * 0.5, rng.standard_normal(5) * 0.1
W3, B3 = rng.standard_normal((6, 5)), rng.standard_normal(6) * 0.1


def build_model(path):
    init = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in dict(w1=W1, b1=B1, w2=W2, b2=B2, w3=W3, b3=B3).items()]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["feat"]),
        helper.make_node("Conv", ["feat", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *SHAPE])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["n", 6])], init,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7), path)


def conv(x, w, b, stride):
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    k, _, kh, kw = w.shape
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.empty((k, oh, ow))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw]
            out[:, i, j] = np.tensordot(w, patch, axes=3) + b
    return out


def feature(x):
    return np.maximum(conv(x, W1, B1, 1), 0)


def score(feat, target):
    pooled = np.maximum(conv(feat, W2, B2, 2), 0).mean(axis=(1, 2))
    return (W3 @ pooled + B3)[target]


def grad_fd(feat, target, eps=1e-6):
    grad = np.zeros_like(feat)
    for index in np.ndindex(feat.shape):
        up, down = feat.copy(), feat.copy()
        up[index] += eps
        down[index] -= eps
        grad[index] = (score(up, target) - score(down, target)) / (2 * eps)
    return grad


def bilinear(m, size):
    """Half-pixel bilinear with clamped edges, written out point by point."""
    h, w = m.shape
    out = np.empty(size)
    for y in range(size[0]):
        for x in range(size[1]):
            sy, sx = max((y + 0.5) * h / size[0] - 0.5, 0), max((x + 0.5) * w / size[1] - 0.5, 0)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = sy - y0, sx - x0
            top = m[y0, x0] * (1 - fx) + m[y0, x1] * fx
            bottom = m[y1, x0] * (1 - fx) + m[y1, x1] * fx
            out[y, x] = top * (1 - fy) + bottom * fy
    return out


def reference_map(image, target, alphas, weights, subtract):
    image = image.astype(np.float64)
    base = feature(np.zeros_like(image))
    total = 0
    for alpha, weight in zip(alphas, weights):
        feat = feature(alpha * image)
        g = grad_fd(feat, target).mean(axis=(1, 2))
        total = total + weight * np.maximum(np.tensordot(g, feat - base if subtract else feat, axes=1), 0)
    return bilinear(total, SHAPE[1:])
