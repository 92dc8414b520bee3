"""Which classes to explain, chosen from a model's class scores: one class given, the k highest-scoring ones, or
(neither) the predicted class. The one place where a front end's target choice becomes targets [B, T]."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from igcam_engine.errors import OptionError
from igcam_engine.options import DEFAULT_LIMITS, Limits
from igcam_engine.validators import class_indices, integer, integer_text


@dataclass(frozen=True)
class TargetChoice:
    """`target`: one class for every image; `top_k`: each image's k highest-scoring classes; neither: each image's
    predicted class."""

    target: int | None = None
    top_k: int | None = None

    @classmethod
    def from_text(cls, target: str | None = None, top_k: str | None = None) -> "TargetChoice":
        return cls(None if target is None else integer_text(target, "target"),
                   None if top_k is None else integer_text(top_k, "top_k"))

    def checked(self, classes: int, limits: Limits = DEFAULT_LIMITS) -> "TargetChoice":
        if self.target is not None and self.top_k is not None:
            raise OptionError("give target or top_k, not both")
        if self.target is not None:
            return TargetChoice(int(class_indices(self.target, classes, "target")), None)
        if self.top_k is not None:
            high = classes if limits.top_k is None else min(classes, limits.top_k)
            return TargetChoice(None, integer(self.top_k, "top_k", 1, high))
        return self

    @property
    def count(self) -> int:
        """Classes per image."""
        return self.top_k or 1

    def select(self, scores: np.ndarray) -> np.ndarray:
        """Targets [B, T] for class scores [B, classes] (a checked choice)."""
        if self.target is not None:
            return np.full((len(scores), 1), self.target, np.int64)
        return np.argsort(-np.asarray(scores), axis=1, kind="stable")[:, :self.count].astype(np.int64)

    def record(self) -> dict:
        return asdict(self)


def class_probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of class scores (`Explainer.predict`'s logits), in float64."""
    scores = np.asarray(scores, np.float64)
    exponentials = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)
