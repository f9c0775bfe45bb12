"""The drop-in scorer, served: production's dicts from a filter with the short-content cap and a
normalization, against ``filterserve score --schema production`` and production's rules.

The stand-in uplifting filter is exported with a short-content cap and a percentile normalization,
so the served decision reads the content length the tokenizer step measured (or the one a record's
``text`` field gives), caps, tiers on the raw average and normalizes; every dict is checked against
production's rules re-applied to its own calibrated scores (filter_base_scorer.py @4d17e75).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import MIXED_ARTICLES, export_into
from helpers import PRODUCTION_KEYS

from filterserve.client.production import HybridScorer
from filterserve.contract import SERVED_TOLERANCE
from filterserve.filters import UPLIFTING_V4, Breakpoints, Normalization, ShortContent

pytestmark = pytest.mark.slow

SPEC = replace(
    UPLIFTING_V4, name="uplifting_rules",
    short_content=ShortContent(cap=0.5, min_chars=60.0),
    normalization=Normalization("percentile", points=Breakpoints((0.0, 4.0, 10.0), (0.0, 8.0, 10.0))),
)


@pytest.fixture(scope="module")
def exported(standin, tmp_path_factory):
    repo = tmp_path_factory.mktemp("rules") / "repo"
    return repo, export_into(repo, standin, SPEC)


def _articles() -> list[dict]:
    articles = [{"id": i, "title": t, "content": c} for i, (t, c) in enumerate(MIXED_ARTICLES)]
    # Production measures a record's text field before its content (BasePreFilter.content_length).
    articles.append({"id": "text", "title": "Short", "content": "Yes.", "text": "A longer text field " * 10})
    return articles


def _as_production(result: dict, content_length: int) -> None:
    """Production's rules re-applied to the dict's own calibrated scores: gatekeeper, cap, op-point tier, normalization."""
    scores = result["scores"]
    average = sum(scores[d] * w for d, w in zip(SPEC.dimensions, SPEC.weights)) / sum(SPEC.weights)
    gate = SPEC.gatekeepers[0]
    if scores[gate.dimension] < gate.below and not all(scores[d] >= t for d, t in gate.unless) and average > gate.cap:
        average = gate.cap
    capped = content_length < SPEC.short_content.min_chars and average > SPEC.short_content.cap
    average = SPEC.short_content.cap if capped else average
    tier = next(t for t in SPEC.tiers if average >= t.threshold)
    assert result["content_length"] == content_length
    assert result["short_content_cap_applied"] == capped
    assert result["raw_weighted_average"] == pytest.approx(average, abs=1e-5)
    assert (result["tier"], result["tier_description"]) == (tier.name, tier.description)
    assert result["weighted_average"] == pytest.approx(float(np.interp(average, SPEC.normalization.points.x,
                                                                       SPEC.normalization.points.y)), abs=1e-4)


def test_the_drop_in_returns_production_dicts_as_the_production_schema_writes_them(server, tmp_path):
    articles = _articles()
    with HybridScorer(server.grpc_url, model=SPEC.name) as scorer:
        got = scorer.score_batch(articles, batch_size=4)
        single = scorer.score_article(articles[0])
        assert scorer.TIER_THRESHOLDS == [(t.name, t.threshold, t.description) for t in SPEC.tiers]
    source = tmp_path / "articles.jsonl"
    source.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in articles), encoding="utf-8")
    written = subprocess.run([sys.executable, "-m", "filterserve.cli", "score", str(source), "--url", server.grpc_url,
                              "--filter", SPEC.name, "--schema", "production"],
                             capture_output=True, text=True, encoding="utf-8", timeout=120, check=True)
    schema = [json.loads(line)[SPEC.name] for line in written.stdout.splitlines()]
    assert len(got) == len(schema) == len(articles)
    for article, mine, theirs in zip(articles, got, schema, strict=True):
        assert list(mine) == list(theirs) == list(PRODUCTION_KEYS)
        assert mine == theirs, article["id"]  # the same server's numbers, through JSON and back
        assert (mine["passed_prefilter"], mine["prefilter_reason"], mine["stage_used"], mine["stage1_estimate"]) == (
            True, None, "stage2", None)
        assert (mine["normalization_method"], mine["version"]) == ("percentile", "4.0")
        assert isinstance(mine["content_length"], int) and isinstance(mine["tier"], str)
        _as_production(mine, len(article.get("text") or article["content"]))
    # Alone, the article is padded to its own length: its numbers agree within the served tolerance.
    assert {k: v for k, v in single.items() if k not in ("scores", "weighted_average", "raw_weighted_average")} == {
        k: v for k, v in got[0].items() if k not in ("scores", "weighted_average", "raw_weighted_average")}
    assert single["scores"] == pytest.approx(got[0]["scores"], abs=SERVED_TOLERANCE)
    assert any(r["short_content_cap_applied"] for r in got)  # the cap is exercised, not only allowed
    assert got[-1]["content_length"] == 200 and not got[-1]["short_content_cap_applied"]


def test_an_article_production_cannot_validate_gets_its_invalid_result(server):
    bad = [["not a dict"], {"content": "x"}, {"title": "T"}, {"title": "", "content": "x"}, {"title": "T", "content": None}]
    with HybridScorer(server.grpc_url, model=SPEC.name) as scorer:
        got = scorer.score_batch([*bad, {"title": "Fine", "content": "A whole sentence of content."}])
    reasons = [r["prefilter_reason"] for r in got[:-1]]
    assert reasons == ["Invalid article: article must be dict, got list", "Invalid article: article must contain 'title' key",
                       "Invalid article: article must contain 'content' key", "Invalid article: article 'title' cannot be empty",
                       "Invalid article: article 'content' cannot be empty"]
    empty = ("scores", "weighted_average", "tier", "content_length", "stage_used", "stage1_estimate")
    for result in got[:-1]:
        assert list(result) == list(PRODUCTION_KEYS)
        assert result["passed_prefilter"] is False
        assert {k: result[k] for k in empty} == dict.fromkeys(empty)
    assert got[-1]["passed_prefilter"] is True and got[-1]["stage_used"] == "stage2"
