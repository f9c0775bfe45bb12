"""A production filter folder as it ships (config.yaml, base_scorer.py, calibration.json,
normalization.json) read into a filter description: base_scorer.py's constants win, read with ast
and never run; every disagreement between the files is reported; the consuming service's load
guards decide the normalization.

The folders here are written in the production layout (veen-systems/llm-distillery,
``filters/<name>/v<N>/``), with their rules made up for the test.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from filterserve.errors import FilterServeError
from filterserve.filter_folder import read_filter_folder
from filterserve.filter_loader import load_filter
from filterserve.filters import UPLIFTING_V4, Breakpoints, FilterSpec, Gatekeeper, HeadTail, Normalization, ShortContent, Tier

DIMS = ("impact", "evidence", "reach")

BASE_SCORER = '''"""Made-up filter v7: base scorer constants."""

from filters.common.filter_base_scorer import FilterBaseScorer  # not installed here: the file must never be imported

raise SystemExit("base_scorer.py was executed")


class BaseMadeUpScorer(FilterBaseScorer):
    FILTER_NAME = "made_up"
    FILTER_VERSION = "7.0"

    DIMENSION_NAMES = ["impact", "evidence", "reach"]

    DIMENSION_WEIGHTS = {
        "impact": 0.5,
        "evidence": 0.25,
        "reach": 0.25,
    }

    TIER_THRESHOLDS = [
        ("high", 7.0, "Strong and verified"),
        ("medium", 4.0, "Some"),
        ("low", 0.0, "Little"),
    ]

    GATEKEEPER_DIMENSION = "evidence"
    GATEKEEPER_MIN: float = 3.0
    GATEKEEPER_CAP = 3.0

    def _load_prefilter(self):
        self.prefilter = None
'''

CONFIG = """
filter:
  name: made_up
  version: "7.0"
  description: "A made-up filter for the folder reader"
scoring:
  score_scale_factor: 1.25
  dimensions:
    impact:
      weight: 0.5
    evidence:
      weight: 0.25
      gatekeeper: true
      gatekeeper_threshold: 3
      gatekeeper_max_score: 3.0
    reach:
      weight: 0.25
  tiers:
    high:
      threshold: 7.0
      description: "Strong and verified"
    medium:
      threshold: 4.0
      description: "Some"
    low:
      threshold: 0.0
      description: "Little"
  gatekeepers:
    evidence_gatekeeper:
      dimension: evidence
      threshold: 3
      max_score: 3.0
preprocessing:
  head_tail:
    enabled: true
    head_tokens: 256
    tail_tokens: 256
    separator: " [...] "
"""

CALIBRATION = {
    "method": "isotonic", "fitted_on": "val", "n_samples": 400, "filter_name": "made_up", "filter_version": "7.0",
    "dimensions": {"impact": {"x": [0.0, 5.0], "y": [1.0, 9.0]}, "reach": {"x": [0.0, 1.0, 2.0], "y": [0.0, 4.0, 8.0]}},
    "stats": {"mae_before": 0.8, "mae_after": 0.7},
}


def normalization_file(n_articles: int = 500, raw_min: float = 4.0) -> dict:
    return {"method": "percentile", "filter_name": "made_up", "filter_version": "7.0", "n_articles": n_articles,
            "x": [raw_min, 6.0, 9.0], "y": [0.0, 5.0, 10.0], "stats": {"raw_min": raw_min, "raw_max": 9.0}}


def write_folder(root: Path, *, config: str = CONFIG, base_scorer: str | None = BASE_SCORER,
                 calibration: dict | None = CALIBRATION, normalization: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(config, encoding="utf-8")
    if base_scorer is not None:
        (root / "base_scorer.py").write_text(base_scorer, encoding="utf-8")
    if calibration is not None:
        (root / "calibration.json").write_text(json.dumps(calibration), encoding="utf-8")
    if normalization is not None:
        (root / "normalization.json").write_text(json.dumps(normalization), encoding="utf-8")
    return root


def test_a_consistent_folder_gives_its_rules_without_running_base_scorer(tmp_path: Path):
    folder = read_filter_folder(write_folder(tmp_path / "made_up" / "v7", normalization=normalization_file()))
    spec = folder.spec
    assert folder.disagreements == ()
    assert spec.name == "made_up_v7"
    assert spec.dimensions == DIMS and spec.weights == (0.5, 0.25, 0.25)
    assert spec.text_template == "{title}\n\n{content}" and spec.max_length == 512
    assert spec.head_tail == HeadTail(256, 256, " [...] ")
    assert spec.gatekeepers == (Gatekeeper("evidence", 3.0, 3.0),)
    assert spec.tiers == (Tier("high", 7.0, "Strong and verified"), Tier("medium", 4.0, "Some"), Tier("low", 0.0, "Little"))
    assert dict(spec.calibration) == {"impact": Breakpoints((0.0, 5.0), (1.0, 9.0)), "reach": Breakpoints((0.0, 1.0, 2.0), (0.0, 4.0, 8.0))}
    assert spec.normalization == Normalization("percentile", points=Breakpoints((4.0, 6.0, 9.0), (0.0, 5.0, 10.0)))
    assert spec.description == "A made-up filter for the folder reader"
    # The dimension calibration.json leaves out is not calibrated, and the notes say so.
    assert any("no breakpoints for ['evidence']" in note for note in folder.notes)


def test_disagreements_are_each_reported_and_base_scorer_wins(tmp_path: Path):
    stale = (CONFIG
             .replace("threshold: 4.0", "threshold: 3.75")  # the stale tier that shipped in production once
             .replace("    reach:\n      weight: 0.25", "    reach:\n      weight: 0.3")
             .replace("      max_score: 3.0\n", "      max_score: 3.5\n")
             .replace('version: "7.0"', 'version: "6.0"'))
    root = write_folder(tmp_path / "made_up" / "v7", config=stale)
    stream = io.StringIO()
    spec = load_filter(root, stream=stream)
    lines = stream.getvalue().splitlines()
    disagreements = [line for line in lines if "DISAGREEMENT" in line]
    assert all(line.startswith(str(root)) for line in lines)
    assert len(disagreements) == 4, lines
    text = "\n".join(disagreements)
    assert "the threshold of tier medium: base_scorer.py has 4.0, config.yaml has 3.75" in text
    assert "the weight of reach: base_scorer.py has 0.25, config.yaml has 0.3" in text
    assert "the gatekeepers (dimension, below, cap): base_scorer.py has [('evidence', 3.0, 3.0)], config.yaml has " in text
    assert "the filter's version (FILTER_VERSION): base_scorer.py has '7.0', config.yaml has '6.0'" in text
    # base_scorer.py's values are what is served.
    assert spec.tiers[1] == Tier("medium", 4.0, "Some")
    assert spec.weights == (0.5, 0.25, 0.25)
    assert spec.gatekeepers == (Gatekeeper("evidence", 3.0, 3.0),)
    assert spec.name == "made_up_v7"


def test_a_folder_without_base_scorer_takes_every_rule_from_config_yaml(tmp_path: Path):
    """Uplifting v4's folder: config.yaml only, with its gatekeeper exception; no head+tail section."""
    v4 = """
filter:
  name: uplifting
  version: "4.0"
scoring:
  dimensions:
    agency: {weight: 0.14}
    progress: {weight: 0.19}
    collective_benefit:
      weight: 0.38
      gatekeeper: true
      gatekeeper_threshold: 5
      gatekeeper_max_score: 3
      gatekeeper_exception: {dimension: wonder, threshold: 7, min_collective_benefit: 3}
    connection: {weight: 0.10}
    innovation: {weight: 0.08}
    justice: {weight: 0.04}
    resilience: {weight: 0.02}
    wonder: {weight: 0.05}
  tiers:
    impact: {threshold: 7.0, description: "High-impact solutions and progress"}
    connection: {threshold: 4.0, description: "Moderate collective benefit or connection"}
    not_uplifting: {threshold: 0.0, description: "Low collective benefit"}
"""
    folder = read_filter_folder(write_folder(tmp_path / "uplifting" / "v4", config=v4, base_scorer=None, calibration=None))
    assert replace(folder.spec, description=UPLIFTING_V4.description) == UPLIFTING_V4
    assert folder.disagreements == ()
    assert any("no base_scorer.py" in note for note in folder.notes)


def test_a_base_scorer_gatekeeper_ignores_config_yamls_exception_and_says_so(tmp_path: Path):
    config = CONFIG.replace("      gatekeeper_max_score: 3.0\n",
                            "      gatekeeper_max_score: 3.0\n      gatekeeper_exception: {dimension: impact, threshold: 8}\n")
    folder = read_filter_folder(write_folder(tmp_path / "f", config=config))
    assert folder.spec.gatekeepers == (Gatekeeper("evidence", 3.0, 3.0),)
    assert any("exception {'impact': 8.0}" in d and "not applied" in d for d in folder.disagreements)


@pytest.mark.parametrize(
    "normalization, scale, expected, reason",
    [
        (normalization_file(n_articles=150), True, Normalization("linear", score_scale_factor=1.25), "holds 150 articles"),
        (normalization_file(raw_min=5.01), True, Normalization("linear", score_scale_factor=1.25), "raw_min 5.01"),
        (normalization_file(n_articles=150), False, None, "holds 150 articles"),
        (None, True, Normalization("linear", score_scale_factor=1.25), "no normalization.json"),
        (None, False, None, None),
    ],
)
def test_normalization_follows_the_consuming_services_load_guards(tmp_path: Path, normalization, scale, expected, reason):
    """At least 200 articles and raw_min ≤ 4.5, else score_scale_factor ≠ 1.0, else nothing (ADR-018)."""
    config = CONFIG if scale else CONFIG.replace("score_scale_factor: 1.25", "score_scale_factor: 1.0")
    folder = read_filter_folder(write_folder(tmp_path / "f", config=config, normalization=normalization))
    assert folder.spec.normalization == expected
    if reason is not None:
        assert any(reason in note for note in folder.notes), folder.notes


def test_calibration_of_an_unknown_dimension_is_ignored_as_the_scorer_does(tmp_path: Path):
    calibration = {**CALIBRATION, "filter_version": "6.0",
                   "dimensions": {**CALIBRATION["dimensions"], "kindness": {"x": [0, 1], "y": [0, 1]}}}
    folder = read_filter_folder(write_folder(tmp_path / "f", calibration=calibration))
    assert [d for d, _ in folder.spec.calibration] == ["impact", "reach"]
    assert any("'kindness', which is not a dimension: ignored" in note for note in folder.notes)
    assert any("calibration.json was fitted for filter_version '6.0'" in d for d in folder.disagreements)


@pytest.mark.parametrize(
    "base_scorer, message",
    [
        (BASE_SCORER + "\nclass Other(BaseMadeUpScorer):\n    GATEKEEPER_CAP = 4.0\n", "assigns GATEKEEPER_CAP twice"),
        (BASE_SCORER.replace('"impact": 0.5,', '"impact": 0.25 * 2,'), "line 14: DIMENSION_WEIGHTS is not a literal"),
        (BASE_SCORER.replace('        "reach": 0.25,\n', ""), r"DIMENSION_WEIGHTS has no weight for \['reach'\]"),
        (BASE_SCORER.replace('("medium", 4.0, "Some"),', '("medium", 4.0),'), "must be \\(name, threshold, description\\)"),
        (BASE_SCORER.replace("class BaseMadeUpScorer", "class BaseMadeUpScorer("), "not valid Python"),
        (BASE_SCORER.replace('GATEKEEPER_DIMENSION = "evidence"', 'GATEKEEPER_DIMENSION = "kindness"'), "gatekeeper names 'kindness'"),
    ],
)
def test_a_base_scorer_that_cannot_be_read_is_one_clear_line(tmp_path: Path, base_scorer: str, message: str):
    root = write_folder(tmp_path / "f", base_scorer=base_scorer)
    with pytest.raises(FilterServeError, match=message) as caught:
        read_filter_folder(root)
    assert str(root) in str(caught.value)


def test_a_model_repository_folder_is_still_a_repository(tmp_path: Path):
    with pytest.raises(FilterServeError, match="is not a filterserve model repository"):
        load_filter(tmp_path)


# --- the short-content cap and the version (issue 26: the current rules) -----------------------


def test_short_content_and_version_are_read_as_the_scorer_reads_them(tmp_path: Path):
    plain = read_filter_folder(write_folder(tmp_path / "plain")).spec
    assert plain.short_content is None and plain.version == "7.0"  # FILTER_VERSION, as the consumer stamps it
    capped = read_filter_folder(write_folder(tmp_path / "capped", config=CONFIG + "short_content:\n  min_chars: 250\n  cap: 2.0\n"))
    assert capped.spec.short_content == ShortContent(cap=2.0, min_chars=250.0)
    assert any("short-content cap" in note for note in capped.notes)
    # min_chars defaults to 300 (_load_short_content_config); no cap, or a null one, is no rule.
    default = read_filter_folder(write_folder(tmp_path / "default", config=CONFIG + "short_content:\n  cap: 1.5\n")).spec
    assert default.short_content == ShortContent(cap=1.5, min_chars=300.0)
    off = read_filter_folder(write_folder(tmp_path / "off", config=CONFIG + "short_content:\n  min_chars: 300\n  cap: null\n")).spec
    assert off.short_content is None
    # The description round-trips through its JSON record (what the ensemble's config carries).
    assert FilterSpec.from_dict(capped.spec.to_dict()) == capped.spec


def test_a_bad_short_content_cap_is_refused_naming_the_file(tmp_path: Path):
    folder = write_folder(tmp_path / "bad", config=CONFIG + "short_content:\n  cap: lots\n")
    with pytest.raises(FilterServeError, match=r"config.yaml short_content cap must be a finite number"):
        read_filter_folder(folder)
