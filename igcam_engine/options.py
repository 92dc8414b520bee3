"""The options of an explanation as one validated object, the bounds every front end shares, and the validators.

`ExplainOptions` holds what `Explainer.explain` takes besides images and targets; `checked()` is the one place each
option is checked, against `Limits` (the bounds: passes per map, channels, classes, memory, pixels) and, where it is
known, the target layer's channel count. The CLI, the HTTP service, batch records, the evaluation and the Triton
exporter build and store this object; text from a command line or a query string goes through `from_text`, so
every front end refuses the same value with the same line. docs/method.md defines each
option.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from igcam_engine.errors import LimitError, OptionError
from igcam_engine.methods import INTEGRATED_GRADCAM, METHOD_TABLE, METHODS, Method
from igcam_engine.quadrature import REFINEMENTS, RULES, check_rule, quadrature
from igcam_engine.validators import (
    choice,
    flag,
    flag_text,
    integer,
    integer_text,
    number,
    number_text,
    shown,
    steps_text,
    verbatim,
)

# variant -> (quadrature rule, subtract the baseline's activations)
VARIANTS = {"official": ("left", False), "paper": ("right", True)}
BASELINES = ("black", "zeros")
DEFAULT_TOLERANCE, DEFAULT_MAX_STEPS = 0.01, 129  # steps="auto"
DEFAULT_ROWS = 64  # interpolated images per engine call when rows_per_call is not given
# An interpolated image's memory in an engine call, in floats, as multiples of its image and of its activation at
# the target (the backbone's own intermediate tensors peak at a few tens of images' worth in common CNNs).
IMAGE_FACTOR, ACTIVATION_FACTOR = 32, 4


# ---------------------------------------------------------------- bounds


@dataclass(frozen=True)
class Limits:
    """The bounds every front end applies, each of which its owner may raise (CLI flags of the same names, the
    service's flags, Explainer's keyword arguments):

    - steps: passes along the path per map (fixed steps, and max_steps of steps="auto");
    - channels: Score-CAM's and Ablation-CAM's passes per image: None for all of the layer's channels, else at most
      this many (a request without `channels` then takes the top `channels` by activation mass);
    - top_k: classes explained per image (None: up to the model's classes);
    - memory: bytes one engine call may use (it caps the rows per call) and one call's maps may take;
    - pixels: an image's width x height, checked from its header before decoding."""

    steps: int = 1024
    channels: int | None = None
    top_k: int | None = None
    memory: int = 2 << 30
    pixels: int = 40_000_000

    def checked(self) -> "Limits":
        return Limits(
            steps=integer(self.steps, "step_limit", 1),
            channels=None if self.channels is None else integer(self.channels, "channel_limit", 1),
            top_k=None if self.top_k is None else integer(self.top_k, "top_k_limit", 1),
            memory=integer(self.memory, "memory_budget", 1),
            pixels=integer(self.pixels, "max_pixels", 1),
        )

    def rows_per_call(self, input_shape, layer_shape, held_elements: int = 0) -> int:
        """The most interpolated images one engine call may hold within the memory budget (the target layer's
        activations and the bundle's held tensors counted alike)."""
        per_row = 4 * (IMAGE_FACTOR * math.prod(input_shape)
                       + ACTIVATION_FACTOR * (math.prod(layer_shape) + held_elements))
        if per_row > self.memory:
            raise LimitError(f"one interpolated image of this model needs about {_mib(per_row)} in an engine call, "
                             f"more than the memory budget of {_mib(self.memory)} (memory_budget, --memory-budget "
                             "raises it)")
        return self.memory // per_row

    def check_maps(self, images: int, targets: int, input_size, layer_size, output_elements: int = 0) -> None:
        """Refuses, before anything is allocated, a call whose maps, and its targets' seeds (one row per image and
        target, `output_elements` floats each: the outputs' elements together), would not fit the memory budget."""
        needed = 4 * images * targets * (math.prod(input_size) + math.prod(layer_size) + output_elements)
        if needed > self.memory:
            raise LimitError(f"{images} image(s) x {targets} target(s) of maps and seeds need about {_mib(needed)}, "
                             f"more than the memory budget of {_mib(self.memory)}: explain fewer images or targets "
                             "per call (memory_budget, --memory-budget raises it)")


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------- the options


@dataclass(frozen=True)
class ExplainOptions:
    """How to explain: the method and its path. None means "the default for the other options" (a variant's rule
    and subtraction; steps="auto"'s tolerance and passes; every channel; the engine's rows per call)."""

    method: str = INTEGRATED_GRADCAM
    integrate: bool | None = None
    variant: str = "official"
    rule: str | None = None
    steps: int | str = 50
    tolerance: float | None = None
    max_steps: int | None = None
    baseline: object = "black"  # "black", "zeros", or an array [C, H, W], [1, C, H, W] or [B, C, H, W]
    subtract_baseline: bool | None = None
    channels: int | None = None
    normalize: bool = False
    rows_per_call: int | None = None

    @classmethod
    def of(cls, options: "ExplainOptions | None" = None, **overrides) -> "ExplainOptions":
        """`options` (or the defaults) with `overrides` (keyword arguments of the same names) applied."""
        if options is not None and not isinstance(options, ExplainOptions):
            raise OptionError(f"options must be an ExplainOptions, got {type(options).__name__}")
        if "batch_size" in overrides:  # the name rows_per_call had before
            if "rows_per_call" in overrides:
                raise OptionError("give rows_per_call or batch_size (its former name), not both")
            overrides["rows_per_call"] = overrides.pop("batch_size")
        unknown = sorted(set(overrides) - set(NAMES))
        if unknown:
            raise OptionError(f"unknown option(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(NAMES)}")
        return replace(options or cls(), **overrides)

    @classmethod
    def from_text(cls, texts: dict, base: "ExplainOptions | None" = None) -> "ExplainOptions":
        """Options from text values {name: text} (a command line's, a query string's), unchecked."""
        return cls.of(base, **{name: TEXT[name](text, name) if name in TEXT else text for name, text in texts.items()})

    def checked(self, limits: Limits = DEFAULT_LIMITS, layer_channels: int | None = None) -> "ExplainOptions":
        """Every option checked (against the limits, and the target layer's channels where known); the same
        options with their values normalized (ints, bools). Raises OptionError naming the option."""
        method = choice(self.method, "method", METHODS)
        integrate = None if self.integrate is None else flag(self.integrate, "integrate")
        integrated = _integrated(method, integrate)
        variant = choice(self.variant, "variant", tuple(VARIANTS))
        rule = None if self.rule is None else choice(self.rule, "rule", RULES, "quadrature rule")
        subtract = None if self.subtract_baseline is None else flag(self.subtract_baseline, "subtract_baseline")
        if isinstance(self.baseline, str):
            choice(self.baseline, "baseline", BASELINES)
        steps, tolerance, max_steps = self._path(integrated, rule, limits)
        return replace(self, method=method, integrate=integrate, variant=variant, rule=rule, steps=steps,
                       tolerance=tolerance, max_steps=max_steps, subtract_baseline=subtract,
                       channels=self._channels(method, limits, layer_channels),
                       normalize=flag(self.normalize, "normalize"),
                       rows_per_call=None if self.rows_per_call is None else integer(self.rows_per_call,
                                                                                     "rows_per_call", 1))

    def _path(self, integrated: bool, rule, limits: Limits):
        steps = self.steps
        if isinstance(steps, str) and steps == "auto":
            if not integrated:
                raise OptionError("steps='auto' refines a path integral: method must be 'igcam' or a gradient method "
                                  f"with integrate=True, got {self.method!r}"
                                  + ("" if self.integrate is None else f", integrate={self.integrate!r}"))
            if (rule or "trapezoid") not in REFINEMENTS:
                raise OptionError(f"steps='auto' refines {' or '.join(REFINEMENTS)} grids, not {rule!r}")
            tolerance = DEFAULT_TOLERANCE if self.tolerance is None else \
                number(self.tolerance, "tolerance", 0, 1, open_low=True, open_high=True)
            max_steps = DEFAULT_MAX_STEPS if self.max_steps is None else integer(self.max_steps, "max_steps", 2)
            _within_step_limit(max_steps, "max_steps", limits)
            return steps, tolerance, max_steps
        if self.tolerance is not None or self.max_steps is not None:
            raise OptionError("tolerance and max_steps are for steps='auto' (the refinement stops when the maps change "
                              f"by less than tolerance); steps is {self.steps!r}")
        try:
            steps = integer(steps, "steps", 1)
        except OptionError:
            raise OptionError(f"steps must be a positive integer or 'auto', got {shown(steps)}") from None
        if integrated:
            _within_step_limit(steps, "steps", limits)
            check_rule(rule or VARIANTS[self.variant][0], steps)
        return steps, None, None

    def _channels(self, method: str, limits: Limits, layer_channels):
        chosen = method_named(method)
        if self.channels is None:
            if chosen.per_channel and limits.channels is not None and (layer_channels or 0) > limits.channels:
                return limits.channels  # a bounded service: the channels of largest activation mass
            return None
        if not chosen.per_channel:
            raise OptionError(f"channels applies to scorecam and ablationcam (one pass per channel), not {method}")
        high = min((x for x in (layer_channels, limits.channels) if x is not None), default=None)
        what = "the target layer's channels" if high == layer_channels else "the channel limit"
        return integer(self.channels, "channels" if high is None else f"channels ({what})", 1, high)

    # What checked options mean: the method they choose, whether it runs along the path, and the path.

    @property
    def chosen_method(self) -> Method:
        return method_named(self.method)

    @property
    def integrated(self) -> bool:
        return _integrated(self.method, self.integrate)

    @property
    def adaptive(self) -> bool:
        return isinstance(self.steps, str) and self.steps == "auto"

    @property
    def subtract(self) -> bool:
        """Whether A(baseline) is subtracted: the variant's choice unless subtract_baseline says otherwise."""
        if not self.integrated:
            return False
        return VARIANTS[self.variant][1] if self.subtract_baseline is None else bool(self.subtract_baseline)

    @property
    def refinement_rule(self) -> str:
        return self.rule or "trapezoid"

    def nodes(self):
        """(alphas, weights) of a fixed path: the quadrature rule's (the variant's unless `rule`), or one node at
        alpha 1 for a method that is not integrated."""
        if not self.integrated:
            return np.ones(1), np.ones(1)
        return quadrature(self.rule or VARIANTS[self.variant][0], self.steps)

    def record(self) -> dict:
        """The options as JSON values (results files, batch records); an array baseline is recorded as such."""
        record = asdict(self)
        if not isinstance(self.baseline, str):
            record["baseline"] = "array"
        return record


NAMES = tuple(f.name for f in fields(ExplainOptions))
TEXT = {"method": verbatim, "integrate": flag_text, "variant": verbatim, "rule": verbatim, "steps": steps_text,
        "tolerance": number_text, "max_steps": integer_text, "baseline": verbatim, "subtract_baseline": flag_text,
        "channels": integer_text, "normalize": flag_text, "rows_per_call": integer_text}


def method_named(method: str) -> Method:
    """The Method of a method's name ("igcam" is Grad-CAM's, integrated)."""
    return METHOD_TABLE["gradcam" if method == INTEGRATED_GRADCAM else method]


def _integrated(method: str, integrate) -> bool:
    chosen = method_named(method)
    if method == INTEGRATED_GRADCAM:
        if integrate is not None and not integrate:
            raise OptionError("method 'igcam' is integrated Grad-CAM; for one pass use method='gradcam'")
        return True
    if integrate and not chosen.integrable:
        gradient_methods = ", ".join(m.name for m in METHOD_TABLE.values() if m.integrable)
        raise OptionError(f"integrate applies to the gradient methods ({gradient_methods}); {method} has no gradient "
                          "to integrate")
    return bool(integrate)


def _within_step_limit(steps: int, name: str, limits: Limits) -> None:
    if steps > limits.steps:
        raise OptionError(f"{name} {steps} is more than {limits.steps} passes per map, the step limit (step_limit; "
                          "--step-limit raises it)")
