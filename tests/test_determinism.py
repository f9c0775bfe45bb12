"""Same article, same score (issue 27): a served fp32 filter's answer for an article does not depend
on what it was batched with, the padding, the concurrency, the protocol or the order.

The filters' production system saw one article move by up to 0.162 with batch composition alone;
here every way of sending 117 articles is held to 1e-4 of the article scored alone, with the same
tier and gatekeeper verdict.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import MIXED_ARTICLES, export_into

from filterserve.benchmarks.articles import articles_of_lengths, realistic_lengths
from filterserve.benchmarks.determinism import WAYS, divergence, score_every_way
from filterserve.contract import DETERMINISM_TOLERANCE
from filterserve.data import sample_articles
from filterserve.filters import UPLIFTING_V4, Breakpoints

REALISTIC = 100


@pytest.fixture(scope="module")
def articles(reference) -> list[tuple[str, str]]:
    """Multilingual, snippet to far past max_length (MIXED_ARTICLES), the demo's, and a realistic mix of lengths."""
    shipped = [(a["title"], a["content"]) for a in sample_articles()]
    drawn = articles_of_lengths(reference.tokenizer, UPLIFTING_V4, realistic_lengths(REALISTIC, seed=27), seed=27)
    return MIXED_ARTICLES + shipped + drawn


@pytest.fixture(scope="module")
def spread(reference, articles):
    """Uplifting v4 with a calibration that maps each dimension's 5th–95th percentile of the stand-in's
    raw scores (on every fourth article: the reference runs one text at a time) onto 0–10. Random
    weights score near 0, so without it every verdict would be the same and "no verdict changed"
    would hold vacuously."""
    raw = reference([UPLIFTING_V4.input_text(*a) for a in articles[::4]])
    low, high = np.percentile(raw, 5, axis=0), np.percentile(raw, 95, axis=0)
    calibration = tuple((dim, Breakpoints((float(lo), float(hi)), (0.0, 10.0)))
                        for dim, lo, hi in zip(UPLIFTING_V4.dimensions, low, high))
    return replace(UPLIFTING_V4, calibration=calibration)


@pytest.fixture(scope="module")
def exported(standin, spread, tmp_path_factory):
    """The stand-in at fp32 with the spreading calibration; conftest's ``server`` serves it."""
    repo = tmp_path_factory.mktemp("determinism") / "repo"
    return repo, export_into(repo, standin, spread)


def test_an_article_scores_the_same_however_it_is_sent(server, spread, articles):
    runs = score_every_way(server, spread.name, articles)
    alone = runs[0]
    assert alone.way == WAYS[0] and len(articles) >= 100
    # The verdicts go both ways, and the articles reach the padded lengths they should, so a flip could show.
    assert {r.tier for r in alone.results} >= {t.name for t in spread.tiers}
    assert 0 < sum(r.gatekeeper_applied for r in alone.results) < len(articles)
    assert {r.truncated for r in alone.results} == {True, False}
    by_name = {run.way.name: run for run in runs}
    # Mixed batches padded every row to its request's longest; at concurrency 16 the batcher joined requests.
    assert by_name["mixed batches of 16, shuffled, gRPC"].computed_tokens > 1.5 * alone.computed_tokens
    for name in ("shuffled, concurrency 16, gRPC", "shuffled, concurrency 16, HTTP"):
        assert by_name[name].runs < by_name[name].requests, f"{name}: no two requests were batched together"
    for run in runs[1:]:
        found = divergence(alone.results, run.results)
        assert found.max_delta <= DETERMINISM_TOLERANCE, f"{run.way.name}: {found}"
        assert found.tier_flips == 0 and found.gatekeeper_flips == 0, f"{run.way.name}: {found}"


def test_dynamic_int8_runs_each_row_alone_at_its_own_length(exported, reference, articles, tmp_path):
    """ONNX Runtime's dynamic int8 quantizes activations with one scale per run, padding included:
    batched, a row's scores move with its neighbours. The stand-in backend runs such a model's rows
    alone, cut to their own tokens (``own_rows``), which gives each row exactly its unpadded score."""
    import onnxruntime as ort

    from filterserve.contract import PER_RUN_SCALED_PRECISIONS, TOKEN_INPUTS
    from filterserve.export.quantize import quantize_int8
    from filterserve.model_repository.runtime.tensor_backend import own_rows

    repo, manifest = exported
    int8 = tmp_path / "model.onnx"
    quantize_int8(repo / manifest["tensor_models"]["fp32"] / "1" / "model.onnx", int8)
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    ids = [reference.tokenizer(UPLIFTING_V4.input_text(*a), truncation=True, max_length=512)["input_ids"] for a in articles[:6]]
    width = max(map(len, ids)) + 16  # padded past the longest row, as a bucket or a mixed batch pads it
    input_ids = np.full((len(ids), width), reference.tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, tokens in enumerate(ids):
        input_ids[row, : len(tokens)], mask[row, : len(tokens)] = tokens, 1
    feeds = dict(zip(TOKEN_INPUTS, (input_ids, mask)))

    alone = np.concatenate([session.run(["logits"], dict(zip(TOKEN_INPUTS, (np.array([t]), np.ones((1, len(t)), np.int64)))))[0]
                            for t in ids])
    batched = session.run(["logits"], feeds)[0]
    assert "int8" in PER_RUN_SCALED_PRECISIONS
    assert np.abs(batched - alone).max() > DETERMINISM_TOLERANCE, "the cause: batched, the scales are the batch's"
    pieces = own_rows(feeds)
    assert [p[TOKEN_INPUTS[0]].shape for p in pieces] == [(1, len(t)) for t in ids]
    assert np.array_equal(np.concatenate([session.run(["logits"], p)[0] for p in pieces]), alone)


def test_bench_determinism_reports_every_precision_beside_production(exported, tmp_path):
    import json

    from filterserve.benchmarks.determinism import PRODUCTION_FLIP_SHARE, PRODUCTION_MAX_DELTA
    from filterserve.cli import main

    repo, _ = exported
    assert main(["bench", "determinism", "--model-repository", str(repo), "--articles", "16", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["determinism.json", "determinism.md", "determinism.png"]
    report = json.loads((tmp_path / "determinism.json").read_text())
    assert report["articles"] == 16 + 8  # and the demo's eight
    assert report["production"]["max_delta"] == PRODUCTION_MAX_DELTA == 0.162
    assert tuple(report["production"]["flip_share"]) == PRODUCTION_FLIP_SHARE and report["production"]["source"]
    assert list(report["precisions"]) == ["fp32"] and {"fp16", "int8", "ov_int8"} <= set(report["not_run"])
    fp32 = report["precisions"]["fp32"]
    assert list(fp32["ways"]) == [way.name for way in WAYS]
    assert fp32["tier_flips"] == fp32["gatekeeper_flips"] == fp32["flipped_share"] == 0
    assert max(fp32["max_score_delta"], fp32["max_average_delta"]) <= DETERMINISM_TOLERANCE
    markdown = (tmp_path / "determinism.md").read_text()
    assert 0 <= fp32["near_threshold"] <= report["articles"]
    assert "| production (its own boxes) | 0.162 |" in markdown and "7–9%" in markdown and "## fp32" in markdown


def test_near_threshold_counts_what_production_noise_could_flip():
    from filterserve.benchmarks.determinism import near_threshold
    from filterserve.client import FilterResult

    def result(average: float, collective_benefit: float) -> FilterResult:
        final = dict.fromkeys(UPLIFTING_V4.dimensions, 6.0) | {"collective_benefit": collective_benefit}
        return FilterResult(final, 0.0, final, average, False, 10, False, average, "connection", "", False)

    assert near_threshold(result(4.1, 6.0), UPLIFTING_V4, 0.162)  # connection starts at 4.0
    assert near_threshold(result(5.5, 5.1), UPLIFTING_V4, 0.162)  # the gatekeeper caps below 5
    assert not near_threshold(result(5.5, 6.0), UPLIFTING_V4, 0.162)
    assert not near_threshold(result(0.1, 6.0), UPLIFTING_V4, 0.162), "the 0.0 tier catches everything: nothing to flip"
