"""The decision graph against production's current rules, re-implemented here from its sources.

veen-systems/llm-distillery ``filters/common/filter_base_scorer.py`` @4d17e75 (``_process_raw_scores``
lines 313-344: calibrate, clamp, weighted sum, gatekeeper, ``_apply_short_content_cap`` lines 278-301,
``_assign_tier`` lines 305-309 on that average) and ``filters/common/hybrid_scorer.py`` @4d17e75 (the
stage-1 branch, lines 239-264: the probe's clamped scores, the short-content cap, no gatekeeper, the
tier), then the consumer's normalization of ``weighted_average`` (ADR-014), which since NM#280 no
longer moves the tier (ADR-022). The graph runs under ONNX Runtime as the server's decision step
runs it; every case sits on an edge: the cap's length and value, the op-point, the gatekeeper on
and off, normalization on and off.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from filterserve.contract import (
    CONTENT_LENGTH,
    CONTENT_LENGTH_INPUT,
    FINAL_SCORES,
    GATEKEEPER_APPLIED,
    LOGITS,
    RAW_WEIGHTED_AVERAGE,
    SCREENED,
    SHORT_CONTENT_CAP_APPLIED,
    TIER,
    UNKNOWN_CONTENT_LENGTH,
    WEIGHTED_AVERAGE,
)
from filterserve.filters import Breakpoints, FilterSpec, Gatekeeper, Normalization, ShortContent, Tier
from filterserve.model_repository.decision import decision_graph

DIMS = ("impact", "evidence", "reach")
TIERS = (Tier("high", 7.0, "Strong"), Tier("medium", 4.0, "Some"), Tier("low", 0.0, "Little"))
SPEC = FilterSpec(
    name="current", dimensions=DIMS, weights=(0.5, 0.25, 0.25), tiers=TIERS,
    gatekeepers=(Gatekeeper("evidence", below=3.0, cap=3.42),),
    calibration=(("impact", Breakpoints((0.0, 10.0), (0.0, 8.0))),),
    short_content=ShortContent(cap=2.0, min_chars=300.0),
    normalization=Normalization("percentile", points=Breakpoints((4.0, 6.0, 10.0), (0.0, 5.0, 10.0))),
)


def production(spec: FilterSpec, raw: list[float], content_length: int | None, screened: bool) -> dict:
    """One row as production scores it: FilterBaseScorer (stage 2) or HybridScorer's stage-1 branch
    (``screened``), then the consumer's normalization. ``content_length`` None: never stamped."""
    result = {GATEKEEPER_APPLIED: False, SHORT_CONTENT_CAP_APPLIED: False}
    calibration = dict(spec.calibration)
    if not screened:  # apply_calibration: np.interp per calibrated dimension
        raw = [float(np.interp(r, calibration[d].x, calibration[d].y)) if d in calibration else r
               for d, r in zip(spec.dimensions, raw)]
    scores = {d: float(max(0.0, min(10.0, r))) for d, r in zip(spec.dimensions, raw)}
    result[FINAL_SCORES] = [scores[d] for d in spec.dimensions]
    average = sum(scores[d] * w for d, w in zip(spec.dimensions, spec.weights))
    if not screened:  # the stage-1 branch applies no gatekeeper
        for gate in spec.gatekeepers:
            if scores[gate.dimension] < gate.below and average > gate.cap:
                average, result[GATEKEEPER_APPLIED] = gate.cap, True
    rule = spec.short_content
    if rule is not None and content_length is not None and content_length < rule.min_chars and average > rule.cap:
        average, result[SHORT_CONTENT_CAP_APPLIED] = rule.cap, True
    result[RAW_WEIGHTED_AVERAGE] = average
    result[TIER] = next((t.name for t in spec.tiers if average >= t.threshold), "low")
    normalization = spec.normalization
    if normalization is None:
        result[WEIGHTED_AVERAGE] = average
    elif normalization.method == "percentile":
        result[WEIGHTED_AVERAGE] = float(np.interp(average, normalization.points.x, normalization.points.y))
    else:
        result[WEIGHTED_AVERAGE] = min(10.0, average * normalization.score_scale_factor)
    return result


def served(spec: FilterSpec, rows: list[tuple[list[float], int | None, bool]]) -> list[dict]:
    session = ort.InferenceSession(decision_graph(spec).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {
        LOGITS: np.array([raw for raw, _, _ in rows], dtype=np.float32),
        CONTENT_LENGTH_INPUT: np.array([[UNKNOWN_CONTENT_LENGTH if n is None else n] for _, n, _ in rows], dtype=np.int32),
        SCREENED: np.array([[s] for _, _, s in rows], dtype=bool),
    }
    names = [FINAL_SCORES, WEIGHTED_AVERAGE, RAW_WEIGHTED_AVERAGE, GATEKEEPER_APPLIED, SHORT_CONTENT_CAP_APPLIED, TIER, CONTENT_LENGTH]
    out = dict(zip(names, session.run(names, feeds)))
    np.testing.assert_array_equal(out[CONTENT_LENGTH], feeds[CONTENT_LENGTH_INPUT])  # answered as read
    return [{FINAL_SCORES: out[FINAL_SCORES][i].tolist(), WEIGHTED_AVERAGE: float(out[WEIGHTED_AVERAGE][i, 0]),
             RAW_WEIGHTED_AVERAGE: float(out[RAW_WEIGHTED_AVERAGE][i, 0]), GATEKEEPER_APPLIED: bool(out[GATEKEEPER_APPLIED][i, 0]),
             SHORT_CONTENT_CAP_APPLIED: bool(out[SHORT_CONTENT_CAP_APPLIED][i, 0]), TIER: spec.tier(int(out[TIER][i, 0])).name}
            for i in range(len(rows))]


def assert_as_production(spec: FilterSpec, rows: list[tuple[list[float], int | None, bool]]) -> list[dict]:
    expected = [production(spec, list(raw), n, s) for raw, n, s in rows]
    got = served(spec, rows)
    for i, (want, have) in enumerate(zip(expected, got)):
        for key in (GATEKEEPER_APPLIED, SHORT_CONTENT_CAP_APPLIED, TIER):
            assert have[key] == want[key], (i, key, have, want)
        for key in (FINAL_SCORES, WEIGHTED_AVERAGE, RAW_WEIGHTED_AVERAGE):
            np.testing.assert_allclose(have[key], want[key], atol=1e-5, err_msg=f"row {i} {key}")
    return got


def test_the_short_content_cap_at_its_length_and_value_edges():
    # impact 10 → calibrated 8; average .5·8 + .25·6 + .25·6 = 7 (high) unless the cap lowers it.
    high = [10.0, 6.0, 6.0]
    rows = [(high, 299, False), (high, 300, False), (high, 0, False), (high, None, False), (high, 5000, False),
            ([2.5, 4.0, 0.0], 10, False),   # average exactly 2.0: not above the cap, not reported
            ([2.5, 4.0, 0.04], 10, False)]  # 2.01: capped to 2.0
    got = assert_as_production(SPEC, rows)
    assert [r[SHORT_CONTENT_CAP_APPLIED] for r in got] == [True, False, True, False, False, False, True]
    assert [r[TIER] for r in got] == ["low", "high", "low", "high", "high", "low", "low"]


def test_the_tier_is_the_op_point_on_the_raw_average_never_the_normalized_one():
    # Raw 4.0 is medium although it normalizes to 0.0; 3.99 is low; 7.0 high although normalized 6.25.
    rows = [([5.0, 4.0, 4.0], None, False),          # 0.5·4 + 0.25·4 + 0.25·4 = 4.0
            ([5.0, 3.98, 3.98], None, False),        # 3.99
            ([10.0, 6.0, 6.0], None, False)]         # 7.0
    got = assert_as_production(SPEC, rows)
    assert [r[TIER] for r in got] == ["medium", "low", "high"]
    assert got[0][WEIGHTED_AVERAGE] == pytest.approx(0.0) and got[2][WEIGHTED_AVERAGE] == pytest.approx(6.25)


def test_screened_rows_take_neither_calibration_nor_the_gatekeeper_but_the_cap_and_the_tier():
    low_evidence = [9.0, 1.0, 9.0]  # evidence 1 < 3 gates a model row to 3.42
    rows = [(low_evidence, None, False), (low_evidence, None, True), (low_evidence, 100, True), ([-3.0, 11.0, 5.0], None, True)]
    got = assert_as_production(SPEC, rows)
    assert [r[GATEKEEPER_APPLIED] for r in got] == [True, False, False, False]
    assert got[1][FINAL_SCORES][0] == pytest.approx(9.0)  # the probe's impact, not calibrated to 7.2
    assert got[1][RAW_WEIGHTED_AVERAGE] == pytest.approx(0.5 * 9 + 0.25 * 1 + 0.25 * 9)
    assert got[2][SHORT_CONTENT_CAP_APPLIED] and got[2][TIER] == "low"
    assert got[3][FINAL_SCORES] == pytest.approx([0.0, 10.0, 5.0])  # clamped, as EmbeddingStage clamps


@pytest.mark.parametrize("normalization", [
    None, Normalization("linear", score_scale_factor=1.25),
    Normalization("percentile", points=Breakpoints((4.0, 6.0, 10.0), (0.0, 5.0, 10.0))),
])
@pytest.mark.parametrize("short_content", [None, ShortContent(cap=2.0, min_chars=300.0)])
def test_every_combination_matches_production(normalization, short_content):
    from dataclasses import replace

    spec = replace(SPEC, normalization=normalization, short_content=short_content)
    rng = np.random.default_rng(7)
    rows = [(list(map(float, rng.uniform(-2, 12, 3).round(2))), int(n) if n >= 0 else None, bool(s))
            for n, s in zip(rng.integers(-1, 600, 40), rng.integers(0, 2, 40))]
    got = assert_as_production(spec, rows)
    if short_content is None:
        assert not any(r[SHORT_CONTENT_CAP_APPLIED] for r in got)
    assert spec.normalization_method == {None: "none", "linear": "scale_factor", "percentile": "percentile"}[
        normalization and normalization.method]
