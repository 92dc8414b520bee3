"""The validators every option goes through: each returns the value normalized (an int, a float, a bool) or raises
OptionError in one line naming the option, what it got and what is accepted. The *_text forms read the same values
from text (command lines, query strings, form fields), so that every front end refuses a value with the same line."""
from __future__ import annotations

import math
import re

import numpy as np

from igcam_engine.errors import OptionError


def integer(value, name: str, low: int | None = None, high: int | None = None) -> int:
    """An int (numpy's too), never a bool, within [low, high]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or \
            (low is not None and value < low) or (high is not None and value > high):
        raise OptionError(f"{name} must be {_integer_range(low, high)}, got {shown(value)}")
    return int(value)


def number(value, name: str, low: float | None = None, high: float | None = None, *, open_low: bool = False,
           open_high: bool = False) -> float:
    """A finite real number, never a bool, within its bounds (open or closed)."""
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating)) \
        and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if open_low else value >= low
    if ok and high is not None:
        ok = value < high if open_high else value <= high
    if not ok and low is None and high is None:
        raise OptionError(f"{name} must be a finite number, got {shown(value)}")
    if not ok:
        interval = f"{'(' if open_low else '['}{'-inf' if low is None else low:g}, " \
                   f"{'inf' if high is None else high:g}{')' if open_high else ']'}"
        raise OptionError(f"{name} must be a number in {interval}, got {shown(value)}")
    return float(value)


def flag(value, name: str) -> bool:
    """A yes/no option: a bool, or 0 or 1 (a string such as "false" would otherwise read as true)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise OptionError(f"{name} must be true or false (or 1/0), got {shown(value)}")


def parameter_text(value, name: str) -> str:
    """A protocol's JSON parameter (a string, a number or a boolean) as the text the *_text forms read."""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    raise OptionError(f"parameter '{name}' must be a string, number or boolean, got {type(value).__name__}")


def choice(value, name: str, accepted, what: str | None = None) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise OptionError(f"unknown {what or name} {shown(value)}; accepted: {', '.join(accepted)}")
    return value


def class_indices(values, classes: int, name: str) -> np.ndarray:
    """Class indices (an int or any integer array) within [0, classes): the one range check of every target."""
    array = np.asarray(values)
    what = "a class index" if array.ndim == 0 else "class indices"
    if array.dtype.kind not in "iu":
        raise OptionError(f"{name} must be {what} (integers) in [0, {classes - 1}], got {shown(values)}")
    wrong = array[(array < 0) | (array >= classes)]
    if wrong.size:
        raise OptionError(f"{name} must be {what} in [0, {classes - 1}], got {int(wrong.flat[0])}")
    return array.astype(np.int64)


def _integer_range(low, high) -> str:
    if low is not None and high is not None:
        return f"an integer in [{low}, {high}]"
    if low == 1:
        return "a positive integer"
    return "an integer" + (f" >= {low}" if low is not None else "") + (f" <= {high}" if high is not None else "")


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_INTEGER_TEXT = re.compile(r"[+-]?\d{1,30}")

# The *_text readers convert what they recognize and hand anything else on unchanged, so that the validator then
# refuses it with the same line as the same value given to the API ("steps must be ..., got 'many'").


def integer_text(text, name: str = ""):
    """An integer's text as an int (up to 30 digits); anything else unchanged."""
    if isinstance(text, str) and _INTEGER_TEXT.fullmatch(text.strip()):
        return int(text)
    return text


def number_text(text, name: str = ""):
    """A number's text as a float ("nan" and "inf" too, for the validator to refuse); anything else unchanged."""
    try:
        return float(text) if isinstance(text, str) else text
    except ValueError:
        return text


def flag_text(text, name: str = ""):
    """1/0, true/false, yes/no (any case) as a bool; anything else unchanged."""
    lowered = text.strip().lower() if isinstance(text, str) else None
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    return text


def steps_text(text, name: str = "steps"):
    """"auto", or an integer's text as an int; anything else unchanged."""
    if isinstance(text, str) and text.strip() == "auto":
        return "auto"
    return integer_text(text, name)


def verbatim(text, name):
    """A text option read as it is (names: a method, a rule, a baseline)."""
    return text
