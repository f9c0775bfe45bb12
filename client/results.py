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
    CONTENT_LENGTH,
    FINAL_SCORES,
    GATEKEEPER_APPLIED,
    N_TOKENS,
    NO_TIER_INDEX,
    RAW_WEIGHTED_AVERAGE,
    SCORES,
    SHORT_CONTENT_CAP_APPLIED,
    STAGE1_ESTIMATE,
    STAGE_USED,
    TIER,
    TRUNCATED,
    UNKNOWN_CONTENT_LENGTH,
    WEIGHTED_AVERAGE,
    WEIGHTED_SCORE,
)
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec

# The result schemas ``filterserve score --schema`` writes: filterserve's own (every field below), and
# exactly the fields the filters' production scorer returns (so its consumers switch without changes).
SCHEMAS = ("filterserve", "production")
# What a filter served without the hybrid stamps: every row went through the model, as production's
# stage-2 rows, and there is no stage-1 estimate (HybridScorer.score_batch's ``stage_used`` values are
# "stage1_low" and "stage2").
STAGE2 = "stage2"


@dataclass(frozen=True)
class FilterResult:
    """One article scored by one filter: the raw outputs and the filter's decision on them.

    ``scores`` and ``weighted_score`` are the model's raw outputs (what parity is checked on);
    ``final_scores``, ``weighted_average``, ``gatekeeper_applied``, ``tier`` and ``tier_description``
    are what the filter's consumers read (calibrated, clamped to 0–10, gated, normalized where the
    filter has a normalization; the tier is the first of the filter's ordered tiers that
    ``weighted_average`` reaches, else the production scorer's ``"low"`` / ``"No tier matched"``).
    ``raw_weighted_average`` is the calibrated raw average before the normalization (``weighted_average``
    itself when the filter has none), and the tier is the op-point on it (ADR-022, NM#280): the
    normalization ranks, it never moves the tier. ``content_length`` (None: not measured) and
    ``short_content_cap_applied`` are production's stamps (filter_base_scorer.py @4d17e75);
    ``normalization_method`` and ``version`` the consumer's. ``stage_used`` and ``stage1_estimate``
    are the hybrid's; a filter served without it answers ``"stage2"`` and None.
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
    content_length: int | None = None
    short_content_cap_applied: bool = False
    normalization_method: str = "none"
    version: str | None = None
    stage_used: str | None = STAGE2
    stage1_estimate: float | None = None

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, np.ndarray], spec: FilterSpec, model: str) -> FilterResult:
        """One article's outputs, named as the ensemble names them, checked before anyone reads them.

        ``spec`` is the served filter (its dimensions and tiers); ``model`` the model that answered,
        for the error message. An ensemble exported before tiers and normalization (no ``tier``,
        no ``raw_weighted_average`` output), or before the short-content cap (no ``content_length``),
        reads as having none of them.
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
            content_length=_length(int(first(CONTENT_LENGTH))) if CONTENT_LENGTH in outputs else None,
            short_content_cap_applied=bool(first(SHORT_CONTENT_CAP_APPLIED)) if SHORT_CONTENT_CAP_APPLIED in outputs else False,
            normalization_method=spec.normalization_method,
            version=spec.version,
            stage_used=_text(first(STAGE_USED)) if STAGE_USED in outputs else STAGE2,
            stage1_estimate=float(first(STAGE1_ESTIMATE)) if STAGE1_ESTIMATE in outputs else None,
        )
        bad = result.non_finite()
        if bad:  # JSON has no NaN or Infinity, and a NaN score would pass every comparison silently
            raise ClientError(f"the server returned a non-finite {bad[0]} ({bad[1]}); refusing to report this result")
        return result

    def non_finite(self) -> tuple[str, float] | None:
        """The first number that is NaN or infinite, as (field, value), or None."""
        fields = {**{f"scores.{d}": v for d, v in self.scores.items()}, "weighted_score": self.weighted_score,
                  **{f"final_scores.{d}": v for d, v in self.final_scores.items()}, "weighted_average": self.weighted_average,
                  "raw_weighted_average": self.raw_weighted_average,
                  **({} if self.stage1_estimate is None else {"stage1_estimate": self.stage1_estimate})}
        return next(((field, value) for field, value in fields.items() if not math.isfinite(value)), None)

    def as_dict(self, schema: str = "filterserve") -> dict[str, Any]:
        """The object ``filterserve score`` writes under the filter's name, in one of :data:`SCHEMAS`.

        ``production``: exactly the dict the production scorer returns for a scored article, in its
        order (:func:`production_fields`), its ``scores`` being the calibrated, clamped ones
        (filterserve's ``final_scores``).
        """
        if schema == "production":
            return production_fields(
                scores=dict(self.final_scores), weighted_average=self.weighted_average, tier=self.tier,
                tier_description=self.tier_description, gatekeeper_applied=self.gatekeeper_applied,
                content_length=self.content_length, short_content_cap_applied=self.short_content_cap_applied,
                stage_used=self.stage_used, stage1_estimate=self.stage1_estimate,
                raw_weighted_average=self.raw_weighted_average, normalization_method=self.normalization_method,
                version=self.version,
            )
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
            "content_length": self.content_length,
            "short_content_cap_applied": self.short_content_cap_applied,
            "normalization_method": self.normalization_method,
            "stage_used": self.stage_used,
            "stage1_estimate": self.stage1_estimate,
            "version": self.version,
        }


def _text(value: object) -> str:
    """A BYTES output's element as text (gRPC and HTTP both answer bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _length(value: int) -> int | None:
    return None if value == UNKNOWN_CONTENT_LENGTH else value


def production_fields(*, scores: dict[str, float] | None, weighted_average: float | None, tier: str | None,
                      tier_description: str | None, gatekeeper_applied: bool, content_length: int | None,
                      short_content_cap_applied: bool, stage_used: str | None, stage1_estimate: float | None,
                      raw_weighted_average: float | None, normalization_method: str, version: str | None,
                      passed_prefilter: bool = True, prefilter_reason: str | None = None) -> dict[str, Any]:
    """One result dict exactly as production returns it, keys in its order.

    ``FilterBaseScorer._create_empty_result`` (filter_base_scorer.py @4d17e75, lines 250-264) fixes
    the first nine keys and their order; ``HybridScorer.score_batch`` (hybrid_scorer.py, lines
    203-204, 262-263, 277-278) appends ``stage_used`` and ``stage1_estimate``; the consumer's
    ``ProductionScorer`` (NexusMind, not public: the three keys and their order as ADR-014 and the
    fitter's readers name them) adds ``raw_weighted_average``, ``normalization_method`` and
    ``version``, having replaced ``weighted_average`` with the normalized average. The prefilter keys
    are constant since the per-lens prefilters were deleted (NexusMind#284): an article that is
    scored passed, with no reason.
    """
    return {
        "passed_prefilter": passed_prefilter,
        "prefilter_reason": prefilter_reason,
        "scores": scores,
        "weighted_average": weighted_average,
        "tier": tier,
        "tier_description": tier_description,
        "gatekeeper_applied": gatekeeper_applied,
        "content_length": content_length,
        "short_content_cap_applied": short_content_cap_applied,
        "stage_used": stage_used,
        "stage1_estimate": stage1_estimate,
        "raw_weighted_average": raw_weighted_average,
        "normalization_method": normalization_method,
        "version": version,
    }


@dataclass(frozen=True)
class ScoreError:
    """Stands in for the :class:`FilterResult` of an item that failed, so a batch never aborts halfway."""

    index: int
    message: str
