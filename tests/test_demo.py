"""The README's main job: ``filterserve demo`` on a fresh machine, with no real weights."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from filterserve.data import sample_articles
from filterserve.demo import DEMO_INVESTMENT_RISK, INVESTMENT_RISK_V2, TITLE_WIDTH, UPLIFTING_SAMPLES
from filterserve.filters import UPLIFTING_V4


def _rows(table: str) -> tuple[list[str], list[list[str]]]:
    """Header cells after the article column, and each row's cells after its (fixed-width) title."""
    header, _, *rows = table.splitlines()
    return header[TITLE_WIDTH:].split(), [row[TITLE_WIDTH:].split() for row in rows]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_demo_trains_two_filters_serves_both_and_ranks_the_uplifting_samples_first(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "filterserve.cli", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training uplifting_v4 (8 dimensions, qwen2) and investment_risk_v2 (5 dimensions, gemma3_text)" in proc.stderr
    # Both filters learned their labels (the demo's point: scores that mean something), and the demo
    # never fell back to a random-weight stand-in, whose warning says its scores mean nothing.
    learned = re.findall(r"^  (\w+): validation MAE (\d+\.\d+) \(a constant guess: (\d+\.\d+)\)$", proc.stderr, re.M)
    assert sorted(name for name, _, _ in learned) == sorted([UPLIFTING_V4.name, INVESTMENT_RISK_V2.name]), proc.stderr
    assert all(float(mae) < float(constant) for _, mae, constant in learned), learned
    assert "mean nothing" not in proc.stderr.lower()
    summary, *details = proc.stdout.strip().split("\n\n")
    articles = sample_articles()

    header, rows = _rows(summary)
    assert header == [word for name in ("uplifting_v4", "investment_risk_v2") for col in ("average", "gated", "tier") for word in (name, col)]
    uplifting = {a["id"]: float(row[0]) for a, row in zip(articles, rows, strict=True)}
    ranked = sorted(uplifting, key=uplifting.get, reverse=True)
    assert set(ranked[: len(UPLIFTING_SAMPLES)]) == set(UPLIFTING_SAMPLES), uplifting

    for spec, detail in zip((UPLIFTING_V4, INVESTMENT_RISK_V2), details, strict=True):
        title, table = detail.split("\n", 1)
        assert title.startswith(f"{spec.name}: final scores")
        header, rows = _rows(table)
        assert header == [*spec.dimensions, "average"]  # full names: collective_benefit is not cut
        summary_column = 0 if spec is UPLIFTING_V4 else 3
        for row, summary_row in zip(rows, _rows(summary)[1], strict=True):
            final, average = [float(x) for x in row[:-1]], float(row[-1])
            assert len(final) == spec.num_labels and all(0 <= x <= 10 for x in final)
            mean = sum(w * x for w, x in zip(spec.weights, final)) / sum(spec.weights)
            gated = summary_row[summary_column + 1] == "yes"
            assert average == pytest.approx(min(mean, 3.0) if gated else mean, abs=0.02)  # 2 decimals printed
            assert float(summary_row[summary_column]) == average
            # The tier: the first of the filter's ordered tiers the average reaches (both demo filters have tiers).
            tiers = DEMO_INVESTMENT_RISK.tiers if spec is INVESTMENT_RISK_V2 else UPLIFTING_V4.tiers
            if not any(abs(average - t.threshold) < 0.01 for t in tiers):  # 2 decimals printed
                assert summary_row[summary_column + 2] == next(t.name for t in tiers if average >= t.threshold)
    index = json.loads((tmp_path / "model_repository" / "filterserve.json").read_text())
    assert sorted(index["filters"]) == ["investment_risk_v2", "uplifting_v4"]
    assert "server stopped" in proc.stderr
