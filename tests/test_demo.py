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
    assert header.split()[1:] == [d[:8] for d in UPLIFTING_V4.dimensions] + ["weighted"]
    assert len(rows) == len(sample_articles())
    for row in rows:
        numbers = [float(x) for x in row[40:].split()]
        assert len(numbers) == UPLIFTING_V4.num_labels + 1
        assert numbers[-1] == pytest.approx(UPLIFTING_V4.weighted(numbers[:-1]), abs=2e-3)  # 3 decimals printed
    assert (tmp_path / "model_repository" / "filter.json").is_file()
    assert "server stopped" in proc.stderr
