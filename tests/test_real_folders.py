"""Issue 26: the three real filter folders, as veen-systems/llm-distillery ships them
(tests/data/filters, README there for paths and commits), read with filterserve's readers, and one
of them exports as shipped.

- human_thriving v9: threshold 1.75 and its ``probe_sha256`` pin in config.yaml, head+tail off;
- belonging v3: ``DEFAULT_THRESHOLD = 1.00`` in inference_hybrid.py, config.yaml agreeing;
- nature_recovery v4: config.yaml says ``threshold: 3.225`` while inference_hybrid.py's
  ``DEFAULT_THRESHOLD = 0.75`` is what production runs; the export says so. It is the one exported.

No probe weights are stored, so each test copies a folder and writes a stand-in probe pickle in
production's format. human_thriving's pin names the real probe, which no stand-in reproduces.
"""

from __future__ import annotations

import hashlib
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

FILTERS = Path(__file__).parent / "data" / "filters"
DIMENSIONS = ("recovery_evidence", "measurable_outcomes", "ecological_significance", "restoration_scale",
              "human_agency", "protection_durability")
THRIVING_PIN = "ccbebe9f0c749416827a96638a270b0e8f9da9306ec29755affe2da8c8ea9379"  # the real probe's


def shipped_copy(root: Path, name: str = "nature_recovery", version: str = "v4", probe: bool = True) -> Path:
    """The folder in production's layout, with a stand-in probe where production keeps its own.

    Its Python files are stored as ``*.py.shipped`` (byte for byte): upstream code kept as data, never
    importable from this repository and out of its lint and duplicate checks; the copy restores the names."""
    folder = root / "filters" / name / version
    shutil.copytree(FILTERS / name / version, folder)
    for stored in folder.glob("*.py.shipped"):
        stored.rename(stored.with_suffix(""))
    if probe:
        scaler, mlp = production_probe(len(DIMENSIONS), seed=13, input_dim=E5_WIDTH)
        write_production_probe(folder / PROBE, scaler, mlp)
    return folder


def test_human_thriving_v9_reads_its_threshold_from_config_and_refuses_a_probe_off_its_pin(tmp_path):
    folder = shipped_copy(tmp_path, "human_thriving", "v9")
    spec = load_filter(folder)
    assert spec.name == "human_thriving_v9" and spec.version == "9.0" and len(spec.dimensions) == 6
    assert sum(spec.weights) == pytest.approx(1.0)
    assert spec.head_tail is None  # no preprocessing block: head+tail off
    assert [(t.name, t.threshold) for t in spec.tiers] == [("high", 7.0), ("medium", 4.5), ("low", 0.0)]
    assert len(spec.calibration) == 6
    assert spec.normalization is not None and spec.normalization.method == "percentile"
    # calibration.json says filter_version 8.0 (v8's student); the scorer applies it all the same
    assert read_filter_folder(folder).disagreements == (
        "calibration.json was fitted for filter_version '8.0', the filter is '9.0'; applied all the same, as the scorer does",)

    # The pin names the real probe; the stand-in differs, so the folder as shipped is refused in one line.
    with pytest.raises(FilterServeError, match=f"probe_sha256 pins {THRIVING_PIN} to the threshold 1.75") as refused:
        read_hybrid_settings(folder)
    assert "\n" not in str(refused.value)

    # With the pin rewritten to the stand-in (the only change), the threshold comes from config.yaml.
    config = folder / "config.yaml"
    stand_in = hashlib.sha256((folder / PROBE).read_bytes()).hexdigest()
    config.write_text(config.read_text(encoding="utf-8").replace(THRIVING_PIN, stand_in), encoding="utf-8")
    hybrid = read_hybrid_settings(folder)
    assert hybrid is not None and hybrid.threshold == 1.75 and hybrid.threshold_from_config
    assert hybrid.probe_sha256 == stand_in and not hybrid.disagreements


def test_belonging_v3_runs_default_threshold_and_config_agrees(tmp_path):
    folder = shipped_copy(tmp_path, "belonging", "v3")
    spec = load_filter(folder)
    assert spec.name == "belonging_v3" and spec.version == "3.0" and len(spec.dimensions) == 6
    assert sum(spec.weights) == pytest.approx(1.0)
    assert spec.head_tail is not None and (spec.head_tail.head_tokens, spec.head_tail.tail_tokens) == (256, 256)
    assert [(t.name, t.threshold) for t in spec.tiers] == [("high", 7.0), ("medium", 4.0), ("low", 0.0)]
    assert [(g.dimension, g.below, g.cap) for g in spec.gatekeepers] == [("community_fabric", 3.0, 3.42)]
    assert len(spec.calibration) == 6
    assert spec.normalization is not None and spec.normalization.method == "percentile"
    # both JSON files were fitted on v1; the scorer applies them all the same
    assert len(read_filter_folder(folder).disagreements) == 2

    hybrid = read_hybrid_settings(folder)
    assert hybrid is not None and hybrid.threshold == 1.0 and not hybrid.threshold_from_config
    assert hybrid.threshold_source.endswith("inference_hybrid.py DEFAULT_THRESHOLD (line 36)")
    assert not hybrid.disagreements  # config.yaml's 1.00 agrees


def test_nature_recovery_v4_reads_as_the_issue_states(tmp_path):
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


def test_a_shipped_folder_without_its_probe_is_refused_in_one_line(tmp_path):
    with pytest.raises(FilterServeError, match=r"stage-1 probe .*embedding_probe_e5small\.pkl is missing") as refused:
        read_hybrid_settings(shipped_copy(tmp_path, probe=False))
    assert "\n" not in str(refused.value)


@pytest.mark.slow  # one export through the CLI
@pytest.mark.timeout(1200)
def test_nature_recovery_v4_exports_as_shipped_and_reports_3225_vs_075(tmp_path):
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
    assert hybrid.threshold_source.endswith("inference_hybrid.py DEFAULT_THRESHOLD (line 37)")
    assert any("= 3.225; using 0.75" in d for d in hybrid.disagreements)
    assert not list(repo.rglob("*.pkl"))
