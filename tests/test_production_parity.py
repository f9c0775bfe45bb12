"""Done when: a Gemma-3 filter folder as it ships → ``filterserve export --filter <folder>`` →
``serve`` → ``filterserve score --schema production`` gives, per article, what the production
scorer gives: its whole result dict, in its order (``scores``, ``weighted_average``, ``tier``,
``gatekeeper_applied``, the stamps, and the consumer's ``raw_weighted_average``, since the folder
has a normalization), within the served tolerance; the tier is the op-point on the raw average.

The production scorer is re-implemented below from its rules (veen-systems/llm-distillery:
``filters/common/filter_base_scorer.py``, ``text_preprocessing.py``, ``score_calibration.py``,
``model_loading.py``; the consuming service's normalization as ADR-014/ADR-018 describe it), on
PyTorch + PEFT, the way production runs it: transformers' own tokenizer with its own padding side
(left, for Gemma), batches of 16 padded to 512, head+tail through ``tokenizer.encode``/``decode``.
It reads the constants this test wrote into base_scorer.py, never filterserve's reading of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXED_ARTICLES
from helpers import PRODUCTION_KEYS, score_production

from filterserve.contract import SERVED_TOLERANCE
from filterserve.data import sample_articles
from filterserve.filter_folder import read_filter_folder
from filterserve.serve import TritonServer

pytestmark = pytest.mark.slow  # exports through the CLI, starts the real tritonserver

# --- the filter, as its author wrote it: base_scorer.py's constants (the runtime source) ---
FILTER_NAME, FILTER_VERSION = "community", "2.0"
DIMENSION_NAMES = ["local_action", "evidence", "inclusion", "durability", "connection"]
DIMENSION_WEIGHTS = {"local_action": 0.30, "evidence": 0.20, "inclusion": 0.20, "durability": 0.15, "connection": 0.15}
TIER_THRESHOLDS = [
    ("high", 7.0, "Strong, documented community action"),
    ("medium", 4.0, "Some documented community action"),
    ("low", 0.0, "Little or no community action"),
]
GATEKEEPER_DIMENSION, GATEKEEPER_MIN, GATEKEEPER_CAP = "evidence", 5.0, 3.5
HEAD_TOKENS, TAIL_TOKENS, SEPARATOR = 256, 256, " [...] "
# Breakpoints that spread the stand-in's raw outputs (a few units around 0) over the 0-10 scale.
CALIBRATION = {
    "local_action": {"x": [-3.0, -1.0, 0.0, 1.0, 3.0], "y": [0.5, 2.0, 5.0, 8.0, 9.5]},
    "evidence": {"x": [-2.0, 0.0, 2.0], "y": [1.0, 5.0, 9.0]},
    "inclusion": {"x": [-2.0, -0.5, 0.5, 2.0], "y": [0.0, 3.5, 6.5, 10.0]},
    "durability": {"x": [-1.5, 1.5], "y": [2.0, 8.0]},
}  # connection is left uncalibrated: its raw score is only clamped
NORMALIZATION = {"x": [2.0, 4.0, 6.0, 8.0], "y": [0.0, 3.0, 7.0, 10.0]}

BASE_SCORER = f'''"""Community filter v2 - base scorer constants (written for this test in the production layout)."""

from filters.common.filter_base_scorer import FilterBaseScorer


class BaseCommunityScorer(FilterBaseScorer):
    FILTER_NAME = {FILTER_NAME!r}
    FILTER_VERSION = {FILTER_VERSION!r}
    DIMENSION_NAMES = {DIMENSION_NAMES!r}
    DIMENSION_WEIGHTS = {DIMENSION_WEIGHTS!r}
    TIER_THRESHOLDS = {TIER_THRESHOLDS!r}
    GATEKEEPER_DIMENSION = {GATEKEEPER_DIMENSION!r}
    GATEKEEPER_MIN = {GATEKEEPER_MIN!r}
    GATEKEEPER_CAP = {GATEKEEPER_CAP!r}

    def _load_prefilter(self):
        from filters.community.v2.prefilter import CommunityPreFilterV2
        self.prefilter = CommunityPreFilterV2()
'''

# config.yaml as such folders ship it: documentation, plus the head+tail switch the scorer reads.
# Its medium tier is stale (3.75 against base_scorer.py's live 4.0): the export must report it.
CONFIG = f"""
filter:
  name: {FILTER_NAME}
  version: "{FILTER_VERSION}"
  description: "Community action (a made-up Gemma-3 filter in the production layout)"
scoring:
  score_scale_factor: 1.2
  dimensions:
{"".join(f"    {d}:{chr(10)}      weight: {w}{chr(10)}" for d, w in DIMENSION_WEIGHTS.items())}
  tiers:
    high: {{threshold: 7.0, description: "Strong, documented community action"}}
    medium: {{threshold: 3.75, description: "Some documented community action"}}
    low: {{threshold: 0.0, description: "Little or no community action"}}
  gatekeepers:
    evidence_gatekeeper: {{dimension: evidence, threshold: 5.0, max_score: 3.5}}
preprocessing:
  head_tail: {{enabled: true, head_tokens: {HEAD_TOKENS}, tail_tokens: {TAIL_TOKENS}, separator: "{SEPARATOR}"}}
training:
  recommended_model: "google/gemma-3-1b-pt"
"""


def write_filter_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "base_scorer.py").write_text(BASE_SCORER, encoding="utf-8")
    (folder / "config.yaml").write_text(CONFIG, encoding="utf-8")
    (folder / "calibration.json").write_text(json.dumps({
        "method": "isotonic", "fitted_on": "val", "n_samples": 500, "filter_name": FILTER_NAME,
        "filter_version": FILTER_VERSION, "dimensions": CALIBRATION, "stats": {"mae_before": 0.8, "mae_after": 0.7},
    }), encoding="utf-8")
    (folder / "normalization.json").write_text(json.dumps({
        "method": "percentile", "filter_name": FILTER_NAME, "filter_version": FILTER_VERSION, "n_articles": 1200,
        **NORMALIZATION, "stats": {"raw_min": NORMALIZATION["x"][0], "raw_max": NORMALIZATION["x"][-1]},
    }), encoding="utf-8")


# --- the production scorer, re-implemented from its rules ---

def extract_head_tail(text: str, tokenizer) -> str:
    tokens = tokenizer.encode(text, add_special_tokens=False)
    if len(tokens) <= HEAD_TOKENS + TAIL_TOKENS:
        return text
    head = tokenizer.decode(tokens[:HEAD_TOKENS], skip_special_tokens=True)
    tail = tokenizer.decode(tokens[-TAIL_TOKENS:], skip_special_tokens=True)
    return head + SEPARATOR + tail


def process_raw_scores(raw: np.ndarray) -> dict:
    calibrated = raw.copy()
    for i, dim in enumerate(DIMENSION_NAMES):
        if dim in CALIBRATION:
            value = float(raw[i])
            calibrated[i] = np.interp(value, CALIBRATION[dim]["x"], CALIBRATION[dim]["y"]) if np.isfinite(value) else 0.0
    scores = {dim: float(max(0.0, min(10.0, calibrated[i]))) for i, dim in enumerate(DIMENSION_NAMES)}
    weighted = sum(scores[d] * DIMENSION_WEIGHTS[d] for d in DIMENSION_NAMES)
    gatekeeper_applied = False
    if scores[GATEKEEPER_DIMENSION] < GATEKEEPER_MIN and weighted > GATEKEEPER_CAP:
        weighted, gatekeeper_applied = GATEKEEPER_CAP, True
    # _assign_tier on the calibrated raw average: the op-point decides once (ADR-022, NM#280; before
    # issue 26 this test re-assigned the tier on the normalized average, as ADR-014 once said).
    tier, description = next(((n, d) for n, t, d in TIER_THRESHOLDS if weighted >= t), ("low", "No tier matched"))
    # The consuming service: percentile normalization (the file passes its load guards), ranking metadata.
    normalized = float(np.interp(weighted, NORMALIZATION["x"], NORMALIZATION["y"])) if np.isfinite(weighted) else 0.0
    return {"scores": scores, "weighted_average": normalized, "raw_weighted_average": weighted,
            "tier": tier, "tier_description": description, "gatekeeper_applied": gatekeeper_applied}


def production_scores(base: Path, adapter: Path, articles: list[dict]) -> list[dict]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base), num_labels=len(DIMENSION_NAMES), problem_type="regression", dtype=torch.float32
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    results = []
    for start in range(0, len(articles), 16):
        batch = articles[start : start + 16]
        texts = [extract_head_tail(f"{a['title']}\n\n{a['content']}", tokenizer) for a in batch]
        inputs = tokenizer(texts, max_length=512, padding="max_length", truncation=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits.float().numpy()
        results += [process_raw_scores(row) for row in logits]
    return results


# --- the test ---

def near_a_boundary(expected: dict) -> bool:
    """Where a 1e-3 difference may rightly flip the tier or the gatekeeper."""
    close = lambda a, b: abs(a - b) <= 2 * SERVED_TOLERANCE  # noqa: E731
    uncapped = sum(expected["scores"][d] * DIMENSION_WEIGHTS[d] for d in DIMENSION_NAMES)
    return (any(close(expected["raw_weighted_average"], t) for _, t, _ in TIER_THRESHOLDS)
            or close(expected["scores"][GATEKEEPER_DIMENSION], GATEKEEPER_MIN)
            or close(uncapped, GATEKEEPER_CAP))


@pytest.mark.timeout(1500)
def test_a_gemma_filter_folder_is_scored_as_its_production_scorer_scores_it(tmp_path: Path):
    from filterserve.export.parity import head_tail_articles
    from filterserve.export.standin import StandinShape, build_standin

    folder = tmp_path / "filters" / FILTER_NAME / "v2"
    write_filter_folder(folder)
    spec = read_filter_folder(folder).spec
    made = build_standin(tmp_path / "standin", spec, StandinShape.gemma3_tiny(), seed=3)
    (folder / "model").symlink_to(made.adapter_dir, target_is_directory=True)  # the folder's adapter, as it ships

    repo = tmp_path / "repo"
    export = subprocess.run(
        [sys.executable, "-m", "filterserve.cli", "export", "--base", str(made.base_dir), "--adapter", str(folder / "model"),
         "--out", str(repo), "--filter", str(folder)],
        capture_output=True, text=True, timeout=1200,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    # The stale tier is reported, naming both files and both values; base_scorer.py's is served.
    assert "DISAGREEMENT: the threshold of tier medium: base_scorer.py has 4.0, config.yaml has 3.75" in export.stderr

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(made.adapter_dir))
    cases = head_tail_articles(tokenizer, spec)
    assert len(cases) == 6
    articles = [{"id": f"case{i}", "title": t, "content": c} for i, (t, c) in enumerate(cases)]
    articles += [{"id": f"mixed{i}", "title": t, "content": c} for i, (t, c) in enumerate(MIXED_ARTICLES)]
    articles += [{"id": a["id"], "title": a["title"], "content": a["content"]} for a in sample_articles()]

    with TritonServer(repo) as server:
        served = score_production(tmp_path, articles, server.grpc_url)
    expected = production_scores(made.base_dir, made.adapter_dir, articles)

    near = 0
    for article, row, want in zip(articles, served, expected):
        got = row[spec.name]
        assert list(got) == list(PRODUCTION_KEYS)
        # Stamped as production stamps them: the content's length, no cap configured, no hybrid served.
        assert (got["content_length"], got["short_content_cap_applied"]) == (len(article["content"]), False), article["id"]
        assert (got["stage_used"], got["stage1_estimate"], got["normalization_method"], got["version"]) == (
            "stage2", None, "percentile", FILTER_VERSION)
        assert list(got["scores"]) == DIMENSION_NAMES
        for dim in DIMENSION_NAMES:
            assert abs(got["scores"][dim] - want["scores"][dim]) <= SERVED_TOLERANCE, (article["id"], dim)
        assert abs(got["weighted_average"] - want["weighted_average"]) <= SERVED_TOLERANCE, article["id"]
        assert abs(got["raw_weighted_average"] - want["raw_weighted_average"]) <= SERVED_TOLERANCE, article["id"]
        if near_a_boundary(want):
            near += 1
            continue
        assert (got["tier"], got["tier_description"]) == (want["tier"], want["tier_description"]), article["id"]
        assert got["gatekeeper_applied"] == want["gatekeeper_applied"], article["id"]
    assert near <= 2
    # The articles exercise the rules: several tiers, the gatekeeper both ways, and rows whose normalized
    # average is under the op-point while their raw one reaches it: shown (medium), as production shows them.
    assert len({w["tier"] for w in expected}) >= 2
    assert {w["gatekeeper_applied"] for w in expected} == {True, False}
    assert any(w["raw_weighted_average"] >= 4.0 > w["weighted_average"] and w["tier"] != "low" for w in expected)
