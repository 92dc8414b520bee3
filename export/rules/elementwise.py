"""Rules of elementwise ops: activations, arithmetic with broadcasting, variadic Sum/Mean/Min/Max, Where, and the
softmax family (whose reductions run along one axis)."""
from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto

from .helpers import unbroadcast
from .table import rule

F32 = np.float32


def _rest(n):
    """None for every input after the first (bounds, slopes, exponents: not differentiated)."""
    return [None] * (len(n.inputs) - 1)


@rule("Identity", "Dropout")
def identity(b, n, dy):
    return [dy[0]] + _rest(n)


@rule("Cast")
def cast(b, n, dy):
    # Only a floating-point input is differentiated (see autodiff); its cotangent takes the input's type back.
    return [b.Cast(dy[0], to=b.elem_type(n.inputs[0]))]


@rule("Relu")
def relu(b, n, dy):
    return [b.Where(b.Greater(n.inputs[0], F32(0)), dy[0], F32(0))]


@rule("LeakyRelu")
def leaky_relu(b, n, dy):
    alpha = F32(n.attrs.get("alpha", 0.01))
    return [b.Where(b.Greater(n.inputs[0], F32(0)), dy[0], b.Mul(dy[0], alpha))]


@rule("PRelu")
def prelu(b, n, dy):
    x, slope = n.inputs
    return [b.Where(b.Greater(x, F32(0)), dy[0], b.Mul(dy[0], slope)), None]


@rule("Elu")
def elu(b, n, dy):
    # below 0: y = alpha (e^x - 1), so dy/dx = y + alpha
    alpha = F32(n.attrs.get("alpha", 1.0))
    return [b.Where(b.Greater(n.inputs[0], F32(0)), dy[0], b.Mul(dy[0], b.Add(n.outputs[0], alpha)))]


@rule("Selu")
def selu(b, n, dy):
    alpha = F32(n.attrs.get("alpha", 1.67326319217681884765625))
    gamma = F32(n.attrs.get("gamma", 1.05070102214813232421875))
    below = b.Mul(dy[0], b.Add(n.outputs[0], F32(alpha * gamma)))
    return [b.Where(b.Greater(n.inputs[0], F32(0)), b.Mul(dy[0], gamma), below)]


@rule("Celu")
def celu(b, n, dy):
    alpha = F32(n.attrs.get("alpha", 1.0))
    x = n.inputs[0]
    return [b.Where(b.Greater(x, F32(0)), dy[0], b.Mul(dy[0], b.Exp(b.Div(x, alpha))))]


@rule("Clip")
def clip(b, n, dy):
    # The gradient flows strictly inside (min, max), as torch's hardtanh/relu6 backward; absent bounds are open.
    x = n.inputs[0]
    low = n.inputs[1] if len(n.inputs) > 1 and n.inputs[1] else None
    high = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2] else None
    inside = [b.Greater(x, low)] if low is not None else []
    inside += [b.Less(x, high)] if high is not None else []
    if not inside:
        return [dy[0]] + _rest(n)
    mask = inside[0] if len(inside) == 1 else b.And(*inside)
    return [b.Where(mask, dy[0], F32(0))] + _rest(n)


@rule("Sigmoid")
def sigmoid(b, n, dy):
    y = n.outputs[0]
    return [b.Mul(dy[0], b.Mul(y, b.Sub(F32(1), y)))]


@rule("HardSigmoid")
def hard_sigmoid(b, n, dy):
    alpha, beta = F32(n.attrs.get("alpha", 0.2)), F32(n.attrs.get("beta", 0.5))
    z = b.Add(b.Mul(n.inputs[0], alpha), beta)
    inside = b.And(b.Greater(z, F32(0)), b.Less(z, F32(1)))
    return [b.Where(inside, b.Mul(dy[0], alpha), F32(0))]


@rule("HardSwish")
def hard_swish(b, n, dy):
    # d/dx x*relu6(x+3)/6 = 0 below -3, x/3 + 1/2 on [-3, 3], 1 above 3 (torch's boundaries).
    x = n.inputs[0]
    slope = b.Add(b.Div(x, F32(3)), F32(0.5))
    slope = b.Where(b.Less(x, F32(-3)), F32(0), b.Where(b.Greater(x, F32(3)), F32(1), slope))
    return [b.Mul(dy[0], slope)]


@rule("Tanh")
def tanh(b, n, dy):
    y = n.outputs[0]
    return [b.Mul(dy[0], b.Sub(F32(1), b.Mul(y, y)))]


@rule("Exp")
def exp(b, n, dy):
    return [b.Mul(dy[0], n.outputs[0])]


@rule("Log")
def log(b, n, dy):
    return [b.Div(dy[0], n.inputs[0])]


@rule("Sqrt")
def sqrt(b, n, dy):
    return [b.Div(b.Mul(dy[0], F32(0.5)), n.outputs[0])]


@rule("Reciprocal")
def reciprocal(b, n, dy):
    y = n.outputs[0]
    return [b.Neg(b.Mul(dy[0], b.Mul(y, y)))]


@rule("Neg")
def neg(b, n, dy):
    return [b.Neg(dy[0])]


@rule("Abs")
def absolute(b, n, dy):
    return [b.Mul(dy[0], b.Sign(n.inputs[0]))]  # 0 at 0, as torch


@rule("Softsign")
def softsign(b, n, dy):
    denominator = b.Add(F32(1), b.Abs(n.inputs[0]))
    return [b.Div(dy[0], b.Mul(denominator, denominator))]


@rule("Erf")
def erf(b, n, dy):
    x = n.inputs[0]
    return [b.Mul(dy[0], b.Mul(F32(2 / math.sqrt(math.pi)), b.Exp(b.Neg(b.Mul(x, x)))))]


@rule("Gelu")
def gelu(b, n, dy):
    x = n.inputs[0]
    if n.attrs.get("approximate", "none") == "tanh":
        # y = x/2 (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)
        c = F32(math.sqrt(2 / math.pi))
        t = b.Tanh(b.Mul(c, b.Add(x, b.Mul(F32(0.044715), b.Mul(x, b.Mul(x, x))))))
        du = b.Mul(c, b.Add(F32(1), b.Mul(F32(3 * 0.044715), b.Mul(x, x))))
        slope = b.Add(b.Mul(F32(0.5), b.Add(F32(1), t)), b.Mul(b.Mul(F32(0.5), x), b.Mul(b.Sub(F32(1), b.Mul(t, t)), du)))
    else:
        # y = x Phi(x): Phi(x) + x phi(x)
        cdf = b.Mul(F32(0.5), b.Add(F32(1), b.Erf(b.Mul(x, F32(1 / math.sqrt(2))))))
        pdf = b.Mul(F32(1 / math.sqrt(2 * math.pi)), b.Exp(b.Mul(F32(-0.5), b.Mul(x, x))))
        slope = b.Add(cdf, b.Mul(x, pdf))
    return [b.Mul(dy[0], slope)]


@rule("Softplus")
def softplus(b, n, dy):
    return [b.Mul(dy[0], b.Sigmoid(n.inputs[0]))]


@rule("Mish")
def mish(b, n, dy):
    # y = x tanh(softplus(x)): tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)
    x = n.inputs[0]
    t = b.Tanh(b.Softplus(x))
    return [b.Mul(dy[0], b.Add(t, b.Mul(b.Mul(x, b.Sub(F32(1), b.Mul(t, t))), b.Sigmoid(x))))]


@rule("Pow")
def power(b, n, dy):
    # d/dx x^e = e x^(e - 1); the exponent itself is not differentiated.
    x, exponent = n.inputs
    e = b.constant(exponent)
    e = F32(e) if e is not None else b.Cast(exponent, to=TensorProto.FLOAT)
    minus_one = F32(e - 1) if not isinstance(e, str) else b.Sub(e, F32(1))
    return [b.Mul(dy[0], b.Mul(e, b.Pow(x, minus_one))), None]


@rule("Add")
def add(b, n, dy):
    return [unbroadcast(b, dy[0], x, b.shape(n.outputs[0])) for x in n.inputs]


@rule("Sub")
def sub(b, n, dy):
    y_shape = b.shape(n.outputs[0])
    return [unbroadcast(b, dy[0], n.inputs[0], y_shape), unbroadcast(b, b.Neg(dy[0]), n.inputs[1], y_shape)]


@rule("Mul")
def mul(b, n, dy):
    x, y = n.inputs
    y_shape = b.shape(n.outputs[0])
    return [unbroadcast(b, b.Mul(dy[0], y), x, y_shape), unbroadcast(b, b.Mul(dy[0], x), y, y_shape)]


@rule("Div")
def div(b, n, dy):
    x, y = n.inputs
    y_shape = b.shape(n.outputs[0])
    dx = unbroadcast(b, b.Div(dy[0], y), x, y_shape)
    dy_ = unbroadcast(b, b.Neg(b.Div(b.Mul(dy[0], n.outputs[0]), y)), y, y_shape)
    return [dx, dy_]


@rule("Sum", "Mean")
def variadic_sum(b, n, dy):
    grad = dy[0] if n.op_type == "Sum" else b.Div(dy[0], F32(len(n.inputs)))
    return [unbroadcast(b, grad, x, b.shape(n.outputs[0])) for x in n.inputs]


@rule("Max", "Min")
def variadic_extremum(b, n, dy):
    # The cotangent goes to the inputs equal to the result, split evenly on ties (as torch.maximum/minimum).
    y, y_shape = n.outputs[0], b.shape(n.outputs[0])
    hits = [b.Cast(b.Equal(x, y), to=TensorProto.FLOAT) for x in n.inputs]
    count = b.Sum(*hits) if len(hits) > 1 else None
    return [unbroadcast(b, b.Mul(dy[0], hit if count is None else b.Div(hit, count)), x, y_shape)
            for x, hit in zip(n.inputs, hits)]


@rule("Where")
def where(b, n, dy):
    condition, x, y = n.inputs
    out = b.shape(n.outputs[0])
    return [None, unbroadcast(b, b.Where(condition, dy[0], F32(0)), x, out),
            unbroadcast(b, b.Where(condition, F32(0), dy[0]), y, out)]


@rule("Softmax")
def softmax(b, n, dy):
    y, axis = n.outputs[0], [n.attrs.get("axis", -1)]
    return [b.Mul(y, b.Sub(dy[0], b.ReduceSum(b.Mul(dy[0], y), axis, keepdims=1)))]


@rule("LogSoftmax")
def log_softmax(b, n, dy):
    y, axis = n.outputs[0], [n.attrs.get("axis", -1)]
    return [b.Sub(dy[0], b.Mul(b.Exp(y), b.ReduceSum(dy[0], axis, keepdims=1)))]
