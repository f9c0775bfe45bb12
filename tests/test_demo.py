"""The README's main job: ``filterserve demo`` on a fresh machine, with no real weights."""

from __future__ import annotations

import subprocess
import sys

import pytest

from filterserve.data import sample_articles
from filterserve.filters import UPLIFTING_V4


@pytest.mark.timeout(300)
def test_demo_exports_serves_scores_and_stops(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "filterserve.cli", "demo", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scores MEAN NOTHING" in proc.stderr
    lines = proc.stdout.strip().splitlines()
    header, rows = lines[0], lines[2:]
    assert header.split()[1:] == [*UPLIFTING_V4.dimensions, "average", "gated"]  # full names
    assert len(rows) == len(sample_articles())
    for row in rows:
        *numbers, gated = row[40:].split()
        final, average = [float(x) for x in numbers[:-1]], float(numbers[-1])
        assert len(final) == UPLIFTING_V4.num_labels and all(0 <= x <= 10 for x in final)
        mean = sum(w * x for w, x in zip(UPLIFTING_V4.weights, final))
        expected = min(mean, 3.0) if gated == "yes" else mean
        assert average == pytest.approx(expected, abs=0.02)  # 2 decimals printed
    assert (tmp_path / "model_repository" / "filter.json").is_file()
    assert "server stopped" in proc.stderr
