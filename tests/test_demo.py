"""The README's main job: ``filterserve demo`` on a fresh machine, with no real weights."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from filterserve.data import sample_articles
from filterserve.demo import ARTICLE_WIDTH, DEMO_INVESTMENT_RISK, INVESTMENT_RISK_V2, UPLIFTING_SAMPLES, WIDTH, _table
from filterserve.filters import UPLIFTING_V4


def _decisions(table: str) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """The first table: its header, and ``{article id: {filter: [tier, gated, average]}}`` (one row per article and filter)."""
    header, _, *rows = table.splitlines()
    found: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        article = row[:ARTICLE_WIDTH].split()
        name, *cells = row[ARTICLE_WIDTH:].split()
        found.setdefault(article[0] if article else list(found)[-1], {})[name] = cells
    return header.split(), found


def test_tables_wrap_columns_past_the_width_and_keep_the_first_column() -> None:
    header = ["dimension", *(f"article_{i}" for i in range(12))]
    text = _table(header, [["agency", *[float(i) for i in range(12)]]], first_width=12)
    blocks = text.split("\n\n")
    assert len(blocks) == 2 and all(len(line) <= WIDTH for line in text.splitlines())
    assert [b.splitlines()[0].split()[0] for b in blocks] == ["dimension", "dimension"]
    assert [cell for b in blocks for cell in b.splitlines()[2].split()[1:]] == [f"{i:.2f}" for i in range(12)]
    cut = _table(["article", "x"], [["a very long title that does not fit", 1.0]], first_width=10).splitlines()[2]
    assert cut.startswith("a very ...") and cut.endswith("1.00")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_trains_two_filters_serves_both_and_ranks_the_uplifting_samples_first(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "filterserve.cli", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=840,  # a hang guard: training is minutes on a busy 2-core machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Every line fits 100 columns: the tables, and the progress (the workdir is the user's own path). The
    # training shows its progress as it goes (a bar counting both filters' steps), not one line for a minute.
    assert all(len(line) <= WIDTH for line in proc.stdout.splitlines()), max(proc.stdout.splitlines(), key=len)
    printed = proc.stderr.replace(str(tmp_path), "WORKDIR").splitlines()
    assert all(len(line) <= WIDTH for line in printed), max(printed, key=len)
    bar = re.findall(r"training: +(\d+)%.*?(\d+)/1200", proc.stderr)
    assert bar and bar[-1] == ("100", "1200"), proc.stderr[:3000]
    assert "training uplifting_v4 (8 dimensions, qwen2) and investment_risk_v2 (5 dimensions, gemma3_text)" in proc.stderr
    # Both filters learned their labels (the demo's point: scores that mean something), and the demo
    # never fell back to a random-weight stand-in, whose warning says its scores mean nothing.
    learned = re.findall(r"^  (\w+): validation MAE (\d+\.\d+) \(a constant guess: (\d+\.\d+)\)$", proc.stderr, re.M)
    assert sorted(name for name, _, _ in learned) == sorted([UPLIFTING_V4.name, INVESTMENT_RISK_V2.name]), proc.stderr
    assert all(float(mae) < float(constant) for _, mae, constant in learned), learned
    assert "mean nothing" not in proc.stderr.lower()
    assert all((tmp_path / name / "export.log").stat().st_size > 0 for name in ("uplifting_v4", "investment_risk_v2"))
    summary, *details = proc.stdout.strip().split("\n\n")
    articles = sample_articles()

    header, decisions = _decisions(summary)
    assert header == ["article", "filter", "tier", "gated", "average"]
    assert list(decisions) == [a["id"] for a in articles]
    assert all(list(by_filter) == ["uplifting_v4", "investment_risk_v2"] for by_filter in decisions.values())
    uplifting = {a: float(by_filter["uplifting_v4"][2]) for a, by_filter in decisions.items()}
    ranked = sorted(uplifting, key=uplifting.get, reverse=True)
    assert set(ranked[: len(UPLIFTING_SAMPLES)]) == set(UPLIFTING_SAMPLES), uplifting

    for spec, detail in zip((UPLIFTING_V4, INVESTMENT_RISK_V2), details, strict=True):
        title, table = detail.split("\n", 1)
        assert title.startswith(f"{spec.name}: final scores")
        top, _, *rows = table.splitlines()
        assert top.split() == ["dimension", *(a["id"] for a in articles)]
        cells = {row.split()[0]: [float(x) for x in row.split()[1:]] for row in rows}
        assert list(cells) == [*spec.dimensions, "average"]  # full names: collective_benefit is not cut
        tiers = DEMO_INVESTMENT_RISK.tiers if spec is INVESTMENT_RISK_V2 else UPLIFTING_V4.tiers
        for k, article in enumerate(articles):
            final, average = [cells[d][k] for d in spec.dimensions], cells["average"][k]
            assert all(0 <= x <= 10 for x in final)
            mean = sum(w * x for w, x in zip(spec.weights, final)) / sum(spec.weights)
            tier, gated, shown_average = decisions[article["id"]][spec.name]
            assert average == pytest.approx(min(mean, 3.0) if gated == "yes" else mean, abs=0.02)  # 2 decimals printed
            assert float(shown_average) == average
            # The tier: the first of the filter's ordered tiers the average reaches (both demo filters have tiers).
            if not any(abs(average - t.threshold) < 0.01 for t in tiers):  # 2 decimals printed
                assert tier == next(t.name for t in tiers if average >= t.threshold)
    index = json.loads((tmp_path / "model_repository" / "filterserve.json").read_text())
    assert sorted(index["filters"]) == ["investment_risk_v2", "uplifting_v4"]
    assert "server stopped" in proc.stderr
