"""Issue 26: a real filter folder, as veen-systems/llm-distillery ships it (tests/data/filters,
README there for paths and commits), reads with filterserve's readers and exports as shipped.

nature_recovery v4 is the one stored: its config.yaml says ``threshold: 3.225`` while
inference_hybrid.py's ``DEFAULT_THRESHOLD = 0.75`` is what production runs, and the export must say
so. The folder ships no probe weights here, so each test copies it and writes a stand-in probe
pickle in production's format (no ``.pkl.sha256`` companion and no ``probe_sha256`` pin, as shipped).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from filterserve.errors import FilterServeError
from filterserve.filter_folder import read_filter_folder
from filterserve.filter_loader import load_filter
from filterserve.hybrid_settings import read_hybrid_settings
from tests.probe_fixtures import production_probe, write_production_probe
from tests.test_hybrid_end_to_end import E5_WIDTH, PROBE

SHIPPED = Path(__file__).parent / "data" / "filters" / "nature_recovery" / "v4"
DIMENSIONS = ("recovery_evidence", "measurable_outcomes", "ecological_significance", "restoration_scale",
              "human_agency", "protection_durability")


def shipped_copy(root: Path) -> Path:
    """The folder in production's layout, with a stand-in probe where production keeps its own."""
    folder = root / "filters" / "nature_recovery" / "v4"
    shutil.copytree(SHIPPED, folder)
    scaler, mlp = production_probe(len(DIMENSIONS), seed=13, input_dim=E5_WIDTH)
    write_production_probe(folder / PROBE, scaler, mlp)
    return folder


def test_the_shipped_folder_reads_as_the_issue_states(tmp_path):
    folder = shipped_copy(tmp_path)
    spec = load_filter(folder)
    assert spec.name == "nature_recovery_v4" and spec.version == "4.0"
    assert spec.dimensions == DIMENSIONS
    assert sum(spec.weights) == pytest.approx(1.0)
    assert spec.head_tail is not None and (spec.head_tail.head_tokens, spec.head_tail.tail_tokens) == (256, 256)
    assert [name for name, _ in spec.calibration] == list(DIMENSIONS)
    assert spec.normalization is None  # dropped at ecd21d9: v4 ships none
    # base_scorer.py's op-point, the runtime one (config.yaml's 3.75 agrees)
    assert [(t.name, t.threshold) for t in spec.tiers] == [("high", 7.0), ("medium", 3.75), ("low", 0.0)]
    assert [(g.dimension, g.below, g.cap) for g in spec.gatekeepers] == [("recovery_evidence", 3.0, 3.5)]
    # only the tier descriptions differ between base_scorer.py and config.yaml
    assert all(d.startswith("the description of tier ") for d in read_filter_folder(folder).disagreements)

    hybrid = read_hybrid_settings(folder)
    assert hybrid is not None
    assert hybrid.threshold == 0.75 and not hybrid.threshold_from_config
    assert hybrid.threshold_source.endswith("inference_hybrid.py DEFAULT_THRESHOLD (line 37)")
    assert [d.split(str(folder) + "/")[-1] for d in hybrid.disagreements] == [
        "config.yaml hybrid_inference.stage1.threshold = 3.225; using 0.75"]
    assert "DEFAULT_THRESHOLD = 0.75 (what production runs)" in hybrid.disagreements[0]


def test_the_shipped_folder_without_its_probe_is_refused_in_one_line():
    with pytest.raises(FilterServeError, match=r"stage-1 probe .*embedding_probe_e5small\.pkl is missing") as refused:
        read_hybrid_settings(SHIPPED)
    assert "\n" not in str(refused.value)


@pytest.mark.slow  # one export through the CLI
@pytest.mark.timeout(1200)
def test_the_shipped_folder_exports_as_shipped_and_reports_3225_vs_075(tmp_path):
    from filterserve.export.standin import StandinShape, build_e5_standin, build_standin
    from filterserve.manifest import read_filter_record

    folder = shipped_copy(tmp_path)
    spec = load_filter(folder)
    e5 = build_e5_standin(tmp_path / "e5")
    standin = build_standin(tmp_path / "standin", spec, StandinShape.gemma3_tiny(), seed=13)
    (folder / "model").symlink_to(standin.adapter_dir, target_is_directory=True)  # the adapter, as it ships
    repo = tmp_path / "repo"
    made = subprocess.run(
        [sys.executable, "-m", "filterserve.cli", "export", "--base", str(standin.base_dir), "--adapter", str(folder / "model"),
         "--out", str(repo), "--filter", str(folder), "--stage1-model", str(e5), "--max-batch-size", "8"],
        capture_output=True, text=True, timeout=1200,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    disagreement = [line.strip() for line in made.stderr.splitlines() if "DISAGREEMENT: stage-1 threshold" in line]
    assert len(disagreement) == 1, made.stderr[-3000:]
    assert "DEFAULT_THRESHOLD = 0.75 (what production runs)" in disagreement[0] and "= 3.225; using 0.75" in disagreement[0]
    hybrid = read_filter_record(repo, spec.name).hybrid
    assert hybrid is not None and hybrid.threshold == 0.75 and not hybrid.threshold_from_config
    assert not list(repo.rglob("*.pkl"))
