"""The result schema: what one filter says about one article, read from the ensemble's outputs.

This is the one place that maps the served outputs (``filterserve.contract``) to the fields that
``FilterClient`` returns and ``filterserve score`` writes: a new field is added here, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from filterserve.client.errors import ClientError
from filterserve.contract import (
    FINAL_SCORES,
    GATEKEEPER_APPLIED,
    N_TOKENS,
    NO_TIER_INDEX,
    RAW_WEIGHTED_AVERAGE,
    SCORES,
    TIER,
    TRUNCATED,
    WEIGHTED_AVERAGE,
    WEIGHTED_SCORE,
)
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec

# The result schemas ``filterserve score --schema`` writes: filterserve's own (every field below), and
# exactly the fields the filters' production scorer returns (so its consumers switch without changes).
SCHEMAS = ("filterserve", "production")


@dataclass(frozen=True)
class FilterResult:
    """One article scored by one filter: the raw outputs and the filter's decision on them.

    ``scores`` and ``weighted_score`` are the model's raw outputs (what parity is checked on);
    ``final_scores``, ``weighted_average``, ``gatekeeper_applied``, ``tier`` and ``tier_description``
    are what the filter's consumers read (calibrated, clamped to 0–10, gated, normalized where the
    filter has a normalization; the tier is the first of the filter's ordered tiers that
    ``weighted_average`` reaches, else the production scorer's ``"low"`` / ``"No tier matched"``).
    ``raw_weighted_average`` is the average before the normalization (``weighted_average`` itself
    when the filter has none, which ``normalized`` says).
    """

    scores: dict[str, float]
    weighted_score: float
    final_scores: dict[str, float]
    weighted_average: float
    gatekeeper_applied: bool
    # Tokens the model read, and whether the model read less than the article (it ran past
    # max_length, or was cut to its head and tail).
    n_tokens: int
    truncated: bool
    raw_weighted_average: float
    tier: str
    tier_description: str
    normalized: bool

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, np.ndarray], spec: FilterSpec, model: str) -> FilterResult:
        """One article's outputs, named as the ensemble names them, checked before anyone reads them.

        ``spec`` is the served filter (its dimensions and tiers); ``model`` the model that answered,
        for the error message. An ensemble exported before tiers and normalization (no ``tier``,
        no ``raw_weighted_average`` output) reads as having neither.
        """
        dimensions = spec.dimensions
        raw, final = outputs[SCORES].reshape(-1), outputs[FINAL_SCORES].reshape(-1)
        if raw.shape[0] != len(dimensions) or final.shape[0] != len(dimensions):
            raise ClientError(f"model {model} returned {raw.shape[0]} scores for {len(dimensions)} dimensions")

        def first(name: str) -> Any:
            return np.asarray(outputs[name]).reshape(-1)[0]

        try:
            tier = spec.tier(int(first(TIER)) if TIER in outputs else NO_TIER_INDEX)
        except FilterServeError as exc:
            raise ClientError(f"model {model}: {exc}") from None
        result = cls(
            scores=dict(zip(dimensions, map(float, raw))),
            weighted_score=float(first(WEIGHTED_SCORE)),
            final_scores=dict(zip(dimensions, map(float, final))),
            weighted_average=float(first(WEIGHTED_AVERAGE)),
            gatekeeper_applied=bool(first(GATEKEEPER_APPLIED)),
            n_tokens=int(first(N_TOKENS)),
            truncated=bool(first(TRUNCATED)),
            raw_weighted_average=float(first(RAW_WEIGHTED_AVERAGE if RAW_WEIGHTED_AVERAGE in outputs else WEIGHTED_AVERAGE)),
            tier=tier.name,
            tier_description=tier.description,
            normalized=spec.normalization is not None,
        )
        bad = result.non_finite()
        if bad:  # JSON has no NaN or Infinity, and a NaN score would pass every comparison silently
            raise ClientError(f"the server returned a non-finite {bad[0]} ({bad[1]}); refusing to report this result")
        return result

    def non_finite(self) -> tuple[str, float] | None:
        """The first number that is NaN or infinite, as (field, value), or None."""
        fields = {**{f"scores.{d}": v for d, v in self.scores.items()}, "weighted_score": self.weighted_score,
                  **{f"final_scores.{d}": v for d, v in self.final_scores.items()}, "weighted_average": self.weighted_average,
                  "raw_weighted_average": self.raw_weighted_average}
        return next(((field, value) for field, value in fields.items() if not math.isfinite(value)), None)

    def as_dict(self, schema: str = "filterserve") -> dict[str, Any]:
        """The object ``filterserve score`` writes under the filter's name, in one of :data:`SCHEMAS`.

        ``production``: exactly the production scorer's fields (``filter_base_scorer.py``, plus the
        consuming service's ``raw_weighted_average`` where the filter normalizes), its ``scores``
        being the calibrated, clamped ones (filterserve's ``final_scores``).
        """
        if schema == "production":
            produced = {
                "scores": dict(self.final_scores),
                "weighted_average": self.weighted_average,
                "tier": self.tier,
                "tier_description": self.tier_description,
                "gatekeeper_applied": self.gatekeeper_applied,
            }
            return {**produced, "raw_weighted_average": self.raw_weighted_average} if self.normalized else produced
        if schema != "filterserve":
            raise ClientError(f"unknown result schema {schema!r}; choose from {', '.join(SCHEMAS)}")
        return {
            "scores": dict(self.scores),
            "weighted_score": self.weighted_score,
            "final_scores": dict(self.final_scores),
            "weighted_average": self.weighted_average,
            "raw_weighted_average": self.raw_weighted_average,
            "tier": self.tier,
            "tier_description": self.tier_description,
            "gatekeeper_applied": self.gatekeeper_applied,
            "n_tokens": self.n_tokens,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class ScoreError:
    """Stands in for the :class:`FilterResult` of an item that failed, so a batch never aborts halfway."""

    index: int
    message: str
