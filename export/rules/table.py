"""The registry of gradient rules: `@rule("Op")` files a function under the ONNX op types it differentiates."""
from __future__ import annotations

RULES = {}


def rule(*op_types):
    def register(fn):
        for op_type in op_types:
            RULES[op_type] = fn
        return fn

    return register
