"""Quadrature rules on [0, 1]: nodes alpha_i and weights w_i (summing to 1) for the path integral."""
from __future__ import annotations

import numpy as np

from igcam_engine.errors import UserError

RULES = ("left", "right", "midpoint", "trapezoid", "gauss-legendre")


def quadrature(rule: str, steps: int):
    """Returns (alphas, weights), float64 arrays of length `steps`."""
    if rule not in RULES:
        raise UserError(f"unknown quadrature rule '{rule}'; accepted: {', '.join(RULES)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    m = int(steps)
    if rule == "left":
        return np.arange(m) / m, np.full(m, 1 / m)
    if rule == "right":
        return np.arange(1, m + 1) / m, np.full(m, 1 / m)
    if rule == "midpoint":
        return (np.arange(m) + 0.5) / m, np.full(m, 1 / m)
    if rule == "trapezoid":
        if m < 2:
            raise UserError("the trapezoid rule needs steps >= 2")
        weights = np.full(m, 1 / (m - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, m), weights
    nodes, weights = np.polynomial.legendre.leggauss(m)
    return (nodes + 1) / 2, weights / 2
