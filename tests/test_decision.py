"""The filter's decision (calibration → clamp → weighted average → gatekeeper) on hand-computed cases.

The graph is run with ONNX Runtime exactly as the server's decision step runs it; every expected
number below was worked out by hand from the rules in the model card.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import decide

from filterserve.errors import FilterServeError
from filterserve.filter_loader import load_filter
from filterserve.filters import UPLIFTING_V4, Breakpoints, FilterSpec, Gatekeeper

# Rows below are in uplifting v4's order: agency, progress, collective_benefit, connection,
# innovation, justice, resilience, wonder.


def test_cap_applies_when_collective_benefit_is_low():
    # cb 4 < 5, wonder 6 < 7: capped. Average = .14*8 + .19*8 + .38*4 + .10*8 + .08*8 + .03*8 + .03*8 + .05*6 = 6.1
    final, average, applied = decide(UPLIFTING_V4, [[8, 8, 4, 8, 8, 8, 8, 6]])
    assert final.tolist() == [[8, 8, 4, 8, 8, 8, 8, 6]]
    assert average[0] == pytest.approx(3.0) and applied[0]


def test_exception_wonder_7_and_collective_benefit_3_lifts_the_cap():
    # cb 3 (>= 3, < 5) with wonder 7: no cap. Average = .62*8 + .38*3 - .05*8 + .05*7 = 6.05
    final, average, applied = decide(UPLIFTING_V4, [[8, 8, 3, 8, 8, 8, 8, 7]])
    assert average[0] == pytest.approx(6.05, abs=1e-5) and not applied[0]
    # cb 2.9 is under the exception's floor: capped again.
    _, average, applied = decide(UPLIFTING_V4, [[8, 8, 2.9, 8, 8, 8, 8, 7]])
    assert average[0] == pytest.approx(3.0) and applied[0]
    # wonder 6.99 misses the exception: capped.
    _, _, applied = decide(UPLIFTING_V4, [[8, 8, 3, 8, 8, 8, 8, 6.99]])
    assert applied[0]


def test_cap_that_does_not_lower_the_average_is_not_reported():
    # cb 1: the rule holds, but the average 0.38*1 + 0.62*2 = 1.62 is already under 3.
    _, average, applied = decide(UPLIFTING_V4, [[2, 2, 1, 2, 2, 2, 2, 2]])
    assert average[0] == pytest.approx(1.62, abs=1e-5) and not applied[0]
    # cb exactly 5 is not "below 5".
    _, average, applied = decide(UPLIFTING_V4, [[8, 8, 5, 8, 8, 8, 8, 8]])
    assert average[0] == pytest.approx(0.62 * 8 + 0.38 * 5, abs=1e-5) and not applied[0]


def test_clamp_at_both_ends_before_averaging_and_gating():
    # Raw -2 → 0 and 12.5 → 10; cb 11 → 10 (not gated). Average = .14*0 + .19*10 + .38*10 + .10*10 + .08*10 + .04*0 + .02*10 + .05*10 = 8.2
    final, average, applied = decide(UPLIFTING_V4, [[-2, 12.5, 11, 10, 10, -0.5, 10, 10]])
    assert final.tolist() == [[0, 10, 10, 10, 10, 0, 10, 10]]
    assert average[0] == pytest.approx(8.2, abs=1e-5) and not applied[0]
    # A raw collective_benefit of -1 clamps to 0 (< 5): capped.
    _, average, applied = decide(UPLIFTING_V4, [[9, 9, -1, 9, 9, 9, 9, 9]])
    assert average[0] == pytest.approx(3.0) and applied[0]


def test_calibration_interpolates_and_clips_at_the_ends():
    agency = Breakpoints(x=(1.0, 3.0, 7.0), y=(0.5, 2.5, 9.0))
    spec = replace(UPLIFTING_V4, gatekeepers=(), calibration=(("agency", agency),))
    rows = [[x, 4, 6, 4, 4, 4, 4, 4] for x in (0.0, 1.0, 2.0, 5.0, 7.0, 20.0)]
    final, average, applied = decide(spec, rows)
    # Below x0 → y0; on a breakpoint → its y; between → linear; past the last → y_last (then clamp).
    np.testing.assert_allclose(final[:, 0], [0.5, 0.5, 1.5, 5.75, 9.0, 9.0], atol=1e-6)
    np.testing.assert_allclose(final[:, 1:], np.array(rows)[:, 1:], atol=0)  # uncalibrated dims pass through
    np.testing.assert_allclose(average, [0.14 * a + 0.38 * 6 + 0.48 * 4 for a in final[:, 0]], atol=1e-5)
    assert not applied.any()


def test_gatekeeper_reads_the_calibrated_clamped_score():
    # Raw cb 6 would pass, but its calibration maps 6 → 4.5: capped (wonder 6 takes no exception).
    cb = Breakpoints(x=(0.0, 10.0), y=(0.0, 7.5))
    spec = replace(UPLIFTING_V4, calibration=(("collective_benefit", cb),))
    final, average, applied = decide(spec, [[8, 8, 6, 8, 8, 8, 8, 6]])
    assert final[0, 2] == pytest.approx(4.5)
    assert average[0] == pytest.approx(3.0) and applied[0]


def test_weights_that_do_not_sum_to_one_give_a_true_average():
    spec = FilterSpec(name="two", dimensions=("a", "b"), weights=(1.0, 3.0))
    _, average, applied = decide(spec, [[2, 6], [10, 0]])
    np.testing.assert_allclose(average, [(2 + 18) / 4, 10 / 4], atol=1e-6)
    assert not applied.any()


def test_calibration_file_and_filter_round_trip(tmp_path: Path):
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"wonder": {"x": [0, 5, 10], "y": [0, 6, 10]}}))
    spec = UPLIFTING_V4.with_calibration(calibration)
    assert dict(spec.calibration)["wonder"] == Breakpoints((0.0, 5.0, 10.0), (0.0, 6.0, 10.0))
    (tmp_path / "filter.json").write_text(json.dumps(spec.to_dict()))
    assert load_filter(tmp_path / "filter.json") == spec


@pytest.mark.parametrize(
    "calibration, message",
    [
        ({"nope": {"x": [0, 1], "y": [0, 1]}}, "calibration names 'nope'"),
        ({"wonder": {"x": [0, 1, 1], "y": [0, 1, 2]}}, "strictly increasing"),
        ({"wonder": {"x": [0, 1], "y": [0]}}, "as many x as y"),
        ({"wonder": [0, 1]}, 'must be {"x"'),
        ({"wonder": {"x": [0, "a"], "y": [0, 1]}}, "must be a number"),
    ],
)
def test_bad_calibration_is_a_clear_error(tmp_path: Path, calibration, message):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(calibration))
    with pytest.raises(FilterServeError, match=message):
        UPLIFTING_V4.with_calibration(path)


def test_bad_rules_and_templates_are_clear_errors():
    with pytest.raises(FilterServeError, match="gatekeeper names 'kindness'"):
        replace(UPLIFTING_V4, gatekeepers=(Gatekeeper("kindness", 5, 3),))
    with pytest.raises(FilterServeError, match=r"may only use \{title\} and \{content\}"):
        replace(UPLIFTING_V4, text_template="{title}: {body}")
    with pytest.raises(FilterServeError, match="title is empty"):
        UPLIFTING_V4.input_text("  ", "content")
    assert UPLIFTING_V4.input_text("Title", "Body") == "Title\n\nBody"
