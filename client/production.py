"""A drop-in for the filters' production scorer, answered by a served filter.

The consuming service loads each filter folder's ``HybridScorer`` subclass and calls
``score_article(article, skip_prefilter=False)`` and ``score_batch(articles, batch_size=16,
skip_prefilter=False)`` (veen-systems/llm-distillery ``filters/common/hybrid_scorer.py`` @4d17e75,
lines 141-158 and 161-165), then its ``ProductionScorer`` wrapper normalizes. :class:`HybridScorer`
here takes the same calls and returns the same dicts, keys in the same order
(:func:`~filterserve.client.results.production_fields`), from a filter served by Triton: a consumer
switches by constructing this class with the server's address instead of the folder's class.

What production does with an article it cannot score is kept: a record that is not a dict, lacks a
``title`` or ``content`` key or has an empty one gets production's "Invalid article: ..." result
(``passed_prefilter`` false, no scores) in its place, and the batch goes on. A title or content
that production would still format but the server refuses (not a string, only whitespace), and a
server that cannot answer, raise :class:`~filterserve.client.errors.ClientError`: production would
have scored them, and a made-up result would be silently wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from filterserve.client.errors import ClientError
from filterserve.client.filter_client import FilterClient
from filterserve.client.results import ScoreError, production_fields

# HybridScorer.score_batch's default (its stage-2 batch size): here, the requests in flight at once.
BATCH_SIZE = 16


def invalid_reason(article: object) -> str | None:
    """Why ``FilterBaseScorer._validate_article`` (filter_base_scorer.py @4d17e75, lines 236-248)
    refuses the article, in its words; None when it accepts it."""
    if not isinstance(article, dict):
        return f"article must be dict, got {type(article).__name__}"
    for key in ("title", "content"):
        if key not in article:
            return f"article must contain '{key}' key"
    for key in ("title", "content"):
        if not article.get(key):
            return f"article '{key}' cannot be empty"
    return None


class HybridScorer:
    """``score_article`` / ``score_batch`` as the filter folder's hybrid scorer, on a served filter.

    ``url``, ``protocol``, ``model`` and ``connection`` are :class:`FilterClient`'s (``model`` names the
    filter when the server serves several).
    """

    def __init__(self, url: str, protocol: Any = None, model: str | None = None, **connection: Any) -> None:
        self.client = FilterClient(url, protocol, model, **connection)

    @property
    def DIMENSION_NAMES(self) -> list[str]:  # noqa: N802 - production's attribute names
        return list(self.client.spec.dimensions)

    @property
    def DIMENSION_WEIGHTS(self) -> dict[str, float]:  # noqa: N802
        return dict(zip(self.client.spec.dimensions, self.client.spec.weights))

    @property
    def TIER_THRESHOLDS(self) -> list[tuple[str, float, str]]:  # noqa: N802
        return [(t.name, t.threshold, t.description) for t in self.client.spec.tiers]

    def score_article(self, article: dict[str, Any], skip_prefilter: bool = False) -> dict[str, Any]:
        """One article's result dict; ``skip_prefilter`` is accepted and has nothing to skip (the
        per-lens prefilters were deleted, NexusMind#284)."""
        return self.score_batch([article], skip_prefilter=skip_prefilter)[0]

    def score_batch(
        self, articles: Sequence[dict[str, Any]], batch_size: int = BATCH_SIZE, skip_prefilter: bool = False
    ) -> list[dict[str, Any]]:
        """One result dict per article, in order; ``batch_size`` requests are in flight at once."""
        if batch_size <= 0:
            raise ClientError(f"batch_size must be positive, got {batch_size}")
        results: list[dict[str, Any] | None] = [None] * len(articles)
        valid = []
        for index, article in enumerate(articles):
            reason = invalid_reason(article)
            if reason is None:
                valid.append(index)
            else:
                results[index] = self._invalid(reason)
        scored = self.client.score_many([articles[i] for i in valid], concurrency=batch_size)
        for index, result in zip(valid, scored, strict=True):
            if isinstance(result, ScoreError):
                raise ClientError(f"article {index}: {result.message}")
            results[index] = result.as_dict("production")
        return [r for r in results if r is not None]  # every entry is filled: the invalid ones, then the scored

    def _invalid(self, reason: str) -> dict[str, Any]:
        """``HybridScorer.score_batch``'s result for an article it cannot validate (lines 199-205):
        the empty result, never stamped with a length, and the consumer's fields without an average."""
        spec = self.client.spec
        return production_fields(
            passed_prefilter=False, prefilter_reason=f"Invalid article: {reason}", scores=None, weighted_average=None,
            tier=None, tier_description=None, gatekeeper_applied=False, content_length=None,
            short_content_cap_applied=False, stage_used=None, stage1_estimate=None, raw_weighted_average=None,
            normalization_method=spec.normalization_method, version=spec.version,
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HybridScorer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
