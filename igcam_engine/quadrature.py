"""Quadrature rules on [0, 1]: nodes alpha_i and weights w_i (summing to 1) for the path integral, and the nested
grids that steps="auto" refines."""
from __future__ import annotations

import numpy as np

from igcam_engine.errors import OptionError
from igcam_engine.validators import integer

RULES = ("left", "right", "midpoint", "trapezoid", "gauss-legendre")


def check_rule(rule: str, steps: int) -> None:
    """That `rule` is a rule and takes `steps` nodes (a positive integer; at least 2 for the trapezoid)."""
    if rule not in RULES:
        raise OptionError(f"unknown quadrature rule {rule!r}; accepted: {', '.join(RULES)}")
    integer(steps, "steps", 1)
    if rule == "trapezoid" and steps < 2:
        raise OptionError("the trapezoid rule needs steps >= 2")


def quadrature(rule: str, steps: int):
    """Returns (alphas, weights), float64 arrays of length `steps`."""
    check_rule(rule, steps)
    m = int(steps)
    if rule == "left":
        return np.arange(m) / m, np.full(m, 1 / m)
    if rule == "right":
        return np.arange(1, m + 1) / m, np.full(m, 1 / m)
    if rule == "midpoint":
        return (np.arange(m) + 0.5) / m, np.full(m, 1 / m)
    if rule == "trapezoid":
        weights = np.full(m, 1 / (m - 1))
        weights[[0, -1]] /= 2
        return np.linspace(0, 1, m), weights
    nodes, weights = np.polynomial.legendre.leggauss(m)
    return (nodes + 1) / 2, weights / 2


def _trapezoid_levels():
    """(new nodes, their weights, factor for the previous estimate): 2 nodes, then halving the spacing."""
    yield np.array([0.0, 1.0]), np.array([0.5, 0.5]), 0.0
    intervals = 1
    while True:
        yield (np.arange(intervals) + 0.5) / intervals, np.full(intervals, 0.5 / intervals), 0.5
        intervals *= 2


def _midpoint_levels():
    """One midpoint, then each cell split in three: the old midpoints stay nodes."""
    yield np.array([0.5]), np.array([1.0]), 0.0
    cells = 3
    while True:
        new = np.array([j for j in range(cells) if j % 3 != 1])
        yield (new + 0.5) / cells, np.full(len(new), 1.0 / cells), 1 / 3
        cells *= 3


# rule -> a generator of levels: each level's estimate is factor * previous + sum of the new nodes' weighted values,
# so that every pass already made is reused.
REFINEMENTS = {"trapezoid": _trapezoid_levels, "midpoint": _midpoint_levels}


def largest_change(old: np.ndarray, new: np.ndarray) -> float:
    """The largest change of any map (last two axes) relative to its range (a constant map's change counts 0)."""
    span = new.max(axis=(-2, -1)) - new.min(axis=(-2, -1))
    change = np.abs(new - old).max(axis=(-2, -1))
    return float(np.max(np.where(span > 0, change / np.where(span > 0, span, 1), 0)))
