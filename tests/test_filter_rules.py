"""The production scorer's rulebook in the decision graph, on hand-computed cases: several
gatekeepers, ordered tiers (and the "no tier matched" fallback), the consuming service's
normalization (percentile lookup and linear scale factor), and calibration files in the nested
format the production filters ship.

The graph runs in ONNX Runtime exactly as the server's decision step runs it. Weights and values
are chosen exactly representable in binary, so averages that sit on a threshold really do.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import model_rows

from filterserve.contract import (
    FINAL_SCORES,
    GATEKEEPER_APPLIED,
    NO_TIER_INDEX,
    RAW_WEIGHTED_AVERAGE,
    TIER,
    WEIGHTED_AVERAGE,
)
from filterserve.errors import FilterServeError
from filterserve.filter_loader import load_filter
from filterserve.filters import (
    NO_TIER,
    UPLIFTING_V4,
    Breakpoints,
    FilterSpec,
    Gatekeeper,
    HeadTail,
    Normalization,
    Tier,
)
from filterserve.model_repository.decision import decision_graph

TIERS = (Tier("high", 7.0, "strong"), Tier("medium", 4.0, "some"), Tier("low", 0.0, "little"))
TWO_GATES = FilterSpec(
    name="two_gates",
    dimensions=("a", "b", "c"),
    weights=(0.5, 0.25, 0.25),
    gatekeepers=(Gatekeeper("a", below=3.0, cap=3.0), Gatekeeper("b", below=5.0, cap=4.5)),
    tiers=TIERS,
)


def run(spec: FilterSpec, rows: list[list[float]]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(decision_graph(spec).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [FINAL_SCORES, WEIGHTED_AVERAGE, GATEKEEPER_APPLIED, RAW_WEIGHTED_AVERAGE, TIER]
    out = session.run(names, model_rows(np.asarray(rows, dtype=np.float32)))
    got = dict(zip(names, out))
    assert got[TIER].dtype == np.int32
    return {name: value[:, 0] if value.shape[1] == 1 else value for name, value in got.items()}


def test_several_gatekeepers_cap_at_the_lowest_cap_that_applies():
    got = run(TWO_GATES, [
        [8, 8, 8],  # no rule holds: 4 + 2 + 2 = 8
        [2, 8, 8],  # a 2 < 3: 1 + 2 + 2 = 5 → 3
        [8, 4, 8],  # b 4 < 5: 4 + 1 + 2 = 7 → 4.5
        [2, 4, 8],  # both hold: 1 + 1 + 2 = 4 → min(3, 4.5) = 3
        [2, 2, 2],  # both hold, but 2 is under both caps: not applied
        [4, 4, 2],  # b holds: 2 + 1 + 0.5 = 3.5, under 4.5: not applied
        [3, 5, 9],  # a 3 and b 5 are not below their thresholds: 1.5 + 1.25 + 2.25 = 5
    ])
    np.testing.assert_allclose(got[WEIGHTED_AVERAGE], [8, 3, 4.5, 3, 2, 3.5, 5], atol=1e-6)
    assert got[GATEKEEPER_APPLIED].tolist() == [False, True, True, True, False, False, False]
    # Without a normalization the raw average is the average.
    np.testing.assert_array_equal(got[RAW_WEIGHTED_AVERAGE], got[WEIGHTED_AVERAGE])


def test_tier_is_the_first_threshold_the_average_reaches():
    got = run(TWO_GATES, [[8, 8, 8], [7, 7, 7], [6.75, 7, 7], [4, 4, 8], [8, 4, 8], [2, 8, 8], [0, 0, 0]])
    # 8 → high; exactly 7 → high (reached is >=); 6.875 → medium; [4, 4, 8]: 2 + 1 + 2 = 5, capped at
    # 4.5 by b → medium; [8, 4, 8]: 7 capped at 4.5 → medium; 3 → low; 0 → low (threshold 0 is reached).
    np.testing.assert_allclose(got[WEIGHTED_AVERAGE], [8, 7, 6.875, 4.5, 4.5, 3, 0], atol=1e-6)
    assert got[TIER].tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert [TWO_GATES.tier(int(i)).name for i in got[TIER]] == ["high", "high", "medium", "medium", "medium", "low", "low"]


def test_no_tier_reached_is_the_production_fallback():
    spec = FilterSpec(name="no_low", dimensions=("a", "b"), weights=(0.5, 0.5), tiers=TIERS[:2])
    got = run(spec, [[2, 2], [4, 4], [3.99, 4]])
    assert got[TIER].tolist() == [NO_TIER_INDEX, 1, NO_TIER_INDEX]
    assert spec.tier(NO_TIER_INDEX) == NO_TIER
    assert (NO_TIER.name, NO_TIER.description) == ("low", "No tier matched")  # FilterBaseScorer._assign_tier
    # A filter without tiers answers the fallback for every article.
    assert run(FilterSpec(name="none", dimensions=("a",), weights=(1.0,)), [[9]])[TIER].tolist() == [NO_TIER_INDEX]
    with pytest.raises(FilterServeError, match="tier index 3"):
        spec.tier(3)


def test_percentile_normalization_is_ranking_metadata_the_tier_reads_the_raw_average():
    spec = FilterSpec(
        name="normalized", dimensions=("a", "b"), weights=(0.5, 0.5), tiers=TIERS,
        gatekeepers=(Gatekeeper("a", below=2.0, cap=4.5),),
        normalization=Normalization("percentile", points=Breakpoints((4.0, 6.0, 10.0), (0.0, 5.0, 10.0))),
    )
    got = run(spec, [[3, 3], [5, 5], [6, 8], [10, 10], [12, 12], [1, 10]])
    # Raw 3 is below x0: y0 = 0. Raw 5: halfway from (4, 0) to (6, 5) = 2.5, and its tier is medium:
    # the op-point reads the calibrated raw average, the normalized one only ranks (ADR-022, NM#280;
    # this test pinned the tier on the normalized average before issue 26). Raw 7: 5 + 1.25.
    # Raw 10: the last breakpoint. Raw 12 clamps to 10 first. [1, 10]: raw 5.5 is capped at 4.5 by
    # the gatekeeper first (medium on 4.5), then normalized: 0 + 0.5 · 2.5 = 1.25.
    np.testing.assert_allclose(got[RAW_WEIGHTED_AVERAGE], [3, 5, 7, 10, 10, 4.5], atol=1e-6)
    np.testing.assert_allclose(got[WEIGHTED_AVERAGE], [0, 2.5, 6.25, 10, 10, 1.25], atol=1e-6)
    assert [spec.tier(int(i)).name for i in got[TIER]] == ["low", "medium", "high", "high", "high", "medium"]
    assert got[GATEKEEPER_APPLIED].tolist() == [False, False, False, False, False, True]


def test_linear_normalization_is_capped_at_ten():
    spec = FilterSpec(name="scaled", dimensions=("a",), weights=(1.0,), tiers=TIERS,
                      normalization=Normalization("linear", score_scale_factor=1.25))
    got = run(spec, [[3.2], [4], [8], [9.5]])
    np.testing.assert_allclose(got[WEIGHTED_AVERAGE], [4.0, 5.0, 10.0, 10.0], atol=1e-6)
    np.testing.assert_allclose(got[RAW_WEIGHTED_AVERAGE], [3.2, 4, 8, 9.5], atol=1e-6)
    # The tier on the raw average: 3.2 stays low although its scaled 4.0 would reach medium.
    assert [spec.tier(int(i)).name for i in got[TIER]] == ["low", "medium", "high", "high"]


def test_a_non_finite_raw_score_on_a_calibrated_dimension_becomes_zero():
    # score_calibration.apply_calibration: a non-finite value is set to 0.0 before the clamp.
    spec = FilterSpec(name="cal", dimensions=("a", "b"), weights=(0.5, 0.5),
                      calibration=(("a", Breakpoints((0.0, 10.0), (2.0, 8.0))),))
    got = run(spec, [[math.nan, 4], [math.inf, 4], [5, 4]])
    np.testing.assert_allclose(got[FINAL_SCORES], [[0, 4], [0, 4], [5, 4]], atol=1e-6)


def test_nested_calibration_file_as_the_production_filters_ship_it(tmp_path: Path):
    nested = {
        "method": "isotonic", "fitted_on": "val", "n_samples": 659, "filter_name": "uplifting", "filter_version": "4.0",
        "dimensions": {"wonder": {"x": [0, 5, 10], "y": [1, 6, 9]}, "agency": {"x": [1, 2], "y": [3, 4]}},
        "stats": {"mae_before": 0.78, "mae_after": 0.77, "per_dimension": {"wonder": {"n_breakpoints": 3}}},
    }
    flat = {"wonder": {"x": [0, 5, 10], "y": [1, 6, 9]}, "agency": {"x": [1, 2], "y": [3, 4]}}
    (tmp_path / "nested.json").write_text(json.dumps(nested))
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    from_nested = UPLIFTING_V4.with_calibration(tmp_path / "nested.json")
    assert from_nested == UPLIFTING_V4.with_calibration(tmp_path / "flat.json")
    assert dict(from_nested.calibration)["wonder"] == Breakpoints((0.0, 5.0, 10.0), (1.0, 6.0, 9.0))
    # wonder raw 2.5 → 3.5; agency raw 0 → 3 (flat below x0); the rest pass through.
    got = run(from_nested, [[0, 5, 5, 5, 5, 5, 5, 2.5]])
    np.testing.assert_allclose(got[FINAL_SCORES][0], [3, 5, 5, 5, 5, 5, 5, 3.5], atol=1e-6)
    nested["method"] = "linear"
    (tmp_path / "other.json").write_text(json.dumps(nested))
    with pytest.raises(FilterServeError, match="calibration method 'linear' is not supported"):
        UPLIFTING_V4.with_calibration(tmp_path / "other.json")
    nested["method"] = "isotonic"
    nested["dimensions"]["kindness"] = {"x": [0, 1], "y": [0, 1]}
    (tmp_path / "unknown.json").write_text(json.dumps(nested))
    with pytest.raises(FilterServeError, match="calibration names 'kindness'"):
        UPLIFTING_V4.with_calibration(tmp_path / "unknown.json")


def test_uplifting_v4_rules_come_from_its_config_yaml():
    # filters/uplifting/v4/config.yaml: justice 0.04, resilience 0.02; tiers impact ≥ 7, connection ≥ 4, not_uplifting ≥ 0.
    weights = dict(zip(UPLIFTING_V4.dimensions, UPLIFTING_V4.weights))
    assert (weights["justice"], weights["resilience"]) == (0.04, 0.02)
    assert sum(UPLIFTING_V4.weights) == pytest.approx(1.0)
    assert [(t.name, t.threshold) for t in UPLIFTING_V4.tiers] == [("impact", 7.0), ("connection", 4.0), ("not_uplifting", 0.0)]
    assert UPLIFTING_V4.head_tail is None
    # Each dimension at 10 except justice (0): 10 − 0.4 = 9.6 with 0.04, not 9.7 as with the card's 0.03.
    got = run(UPLIFTING_V4, [[10, 10, 10, 10, 10, 0, 10, 10], [5, 5, 5, 5, 5, 5, 5, 5], [3, 3, 6, 3, 3, 3, 3, 3]])
    np.testing.assert_allclose(got[WEIGHTED_AVERAGE], [9.6, 5.0, 0.62 * 3 + 0.38 * 6], atol=1e-5)
    assert [UPLIFTING_V4.tier(int(i)).name for i in got[TIER]] == ["impact", "connection", "connection"]


def test_the_rules_round_trip_through_the_description(tmp_path: Path):
    spec = FilterSpec(
        name="everything", dimensions=("a", "b"), weights=(0.25, 0.75), head_tail=HeadTail(128, 64, " … "),
        gatekeepers=TWO_GATES.gatekeepers[:1] + (Gatekeeper("b", 1.0, 2.0, (("a", 9.0),)),), tiers=TIERS,
        calibration=(("b", Breakpoints((0.0, 1.0), (0.0, 2.0))),),
        normalization=Normalization("percentile", points=Breakpoints((1.0, 2.0), (0.0, 10.0))),
    )
    (tmp_path / "filter.json").write_text(json.dumps(spec.to_dict()))
    assert load_filter(tmp_path / "filter.json") == spec
    linear = FilterSpec(name="lin", dimensions=("a",), weights=(1.0,), normalization=Normalization("linear", score_scale_factor=1.5))
    assert FilterSpec.from_dict(linear.to_dict()) == linear
    # A record written before these rules (one "gatekeeper", no tiers) still reads.
    old = {k: v for k, v in UPLIFTING_V4.to_dict().items() if k not in ("gatekeepers", "tiers", "head_tail", "normalization")}
    old["gatekeeper"] = UPLIFTING_V4.gatekeepers[0].to_dict()
    assert FilterSpec.from_dict(old).gatekeepers == UPLIFTING_V4.gatekeepers


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tiers": [{"name": "a", "threshold": 1}, {"name": "a", "threshold": 0}]}, "tier names must be distinct"),
        ({"tiers": [{"name": "a"}]}, "a tier must be"),
        ({"normalization": {"method": "zscore"}}, "normalization must be"),
        ({"normalization": {"method": "percentile", "x": [1, 1], "y": [0, 1]}}, "strictly increasing"),
        ({"normalization": {"method": "linear", "score_scale_factor": -2}}, "score_scale_factor must be a positive"),
        ({"head_tail": {"head_tokens": 0}}, "head_tokens must be a positive whole number"),
        ({"gatekeepers": [{"dimension": "kindness", "below": 1, "cap": 2}]}, "gatekeeper names 'kindness'"),
    ],
)
def test_bad_rules_are_one_clear_line(tmp_path: Path, change: dict, message: str):
    path = tmp_path / "filter.json"
    path.write_text(json.dumps({**UPLIFTING_V4.to_dict(), **change}))
    with pytest.raises(FilterServeError, match=message) as caught:
        load_filter(path)
    assert str(path) in str(caught.value)
