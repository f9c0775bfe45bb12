"""Several filters in one repository (issue 14): layout, records, and exports that never break it."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import FIVE_DIMS, tree_digest

from filterserve.benchmarks.engines import open_repository
from filterserve.errors import FilterServeError, ParityError
from filterserve.export import pipeline
from filterserve.filter_loader import load_filter
from filterserve.filters import UPLIFTING_V4
from filterserve.manifest import read_filter_records

NAMES = ["investment_risk_v2", "uplifting_v4"]


def _copy(repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    return copy


def _siblings(tmp_path: Path) -> list[str]:
    """What sits beside the repository: a staging folder left behind would show here."""
    return sorted(p.name for p in tmp_path.iterdir())


def test_two_filters_side_by_side_each_with_its_own_record(multi_exported):
    repo = multi_exported
    index = json.loads((repo / "filterserve.json").read_text())
    assert index == {"format": "filterserve.repository/1", "filters": {n: f"{n}.filter.json" for n in NAMES}}
    records = read_filter_records(repo)
    assert [len(records[n].filter["dimensions"]) for n in NAMES] == [5, 8]
    folders = sorted(p.name for p in repo.iterdir() if p.is_dir())
    assert folders == sorted(records["uplifting_v4"].models + records["investment_risk_v2"].models)
    for record in records.values():
        assert record.parity["fp32"].passed and record.sources["adapter"].sha256

    assert load_filter(repo, "investment_risk_v2") == FIVE_DIMS
    assert load_filter(repo / "uplifting_v4.filter.json") == UPLIFTING_V4
    with pytest.raises(FilterServeError, match="holds 2 filters .*investment_risk_v2, uplifting_v4.*; name one"):
        load_filter(repo)
    five = open_repository(repo, filter_name="investment_risk_v2")
    assert five.spec == FIVE_DIMS and five.tensor_models == {"fp32": repo / "investment_risk_v2_onnx" / "1" / "model.onnx"}
    with pytest.raises(FilterServeError, match="holds no filter 'nope'; it holds: investment_risk_v2, uplifting_v4"):
        open_repository(repo, filter_name="nope")


@pytest.mark.slow  # a whole export of its own
def test_re_exporting_one_filter_leaves_the_other_byte_for_byte(multi_exported, standin, tmp_path):
    repo = _copy(multi_exported, tmp_path)
    five_before = {k: v for k, v in tree_digest(repo).items() if k.startswith("investment_risk_v2")}
    manifest = pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, repo, precisions="fp32,fp16")
    after = tree_digest(repo)
    assert {k: v for k, v in after.items() if k.startswith("investment_risk_v2")} == five_before
    assert manifest["tensor_models"] == {"fp32": "uplifting_v4_onnx", "fp16": "uplifting_v4_onnx_fp16"}
    assert "uplifting_v4_onnx_fp16/1/model.onnx" in after
    assert _siblings(tmp_path) == ["repo"]


def test_a_truncated_adapter_leaves_the_repository_byte_for_byte(multi_exported, standin, tmp_path):
    repo = _copy(multi_exported, tmp_path / "served")
    broken = tmp_path / "broken"
    shutil.copytree(standin.adapter_dir, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = tree_digest(repo)
    with pytest.raises(FilterServeError, match=r"cannot read the adapter weights .*adapter_model.safetensors \(truncated or corrupt\?\)"):
        pipeline.export_filter(str(standin.base_dir), broken, repo, force=True)  # force: a different adapter
    assert tree_digest(repo) == before
    assert _siblings(tmp_path / "served") == ["repo"], "the staging folder is removed"


@pytest.mark.slow  # a whole export of its own
def test_a_parity_failure_late_in_the_export_leaves_the_repository_byte_for_byte(multi_exported, standin, tmp_path, monkeypatch):
    repo = _copy(multi_exported, tmp_path / "served")
    before = tree_digest(repo)
    monkeypatch.setitem(pipeline.TOLERANCES, "fp16", 1e-9)  # fp32 is built and passes, then fp16 fails
    with pytest.raises(ParityError, match="ONNX fp16 differs"):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, repo, precisions="fp32,fp16")
    assert tree_digest(repo) == before
    assert _siblings(tmp_path / "served") == ["repo"]


@pytest.mark.slow  # a whole export of its own
def test_ctrl_c_in_the_middle_of_the_swap_is_rolled_back(multi_exported, standin, tmp_path, monkeypatch):
    """The commit's renames are the only moment the repository changes: interrupt it half-way."""
    repo = _copy(multi_exported, tmp_path / "served")
    before = tree_digest(repo)
    real_rename = os.rename
    into_repo: list[str] = []

    def interrupted_rename(src, dst):
        if Path(dst).parent == repo:
            into_repo.append(Path(dst).name)
            if len(into_repo) == 2:  # one new folder is in, the old ones are aside
                raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted_rename)
    with pytest.raises(KeyboardInterrupt):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, repo, precisions="fp32")
    monkeypatch.setattr(os, "rename", real_rename)
    assert len(into_repo) >= 2
    assert tree_digest(repo) == before
    assert _siblings(tmp_path / "served") == ["repo"]


def test_a_filter_may_not_take_another_filters_model_folders(multi_exported, standin, tmp_path):
    repo = _copy(multi_exported, tmp_path)
    before = tree_digest(repo)
    squatter = replace(UPLIFTING_V4, name="investment_risk_v2_onnx")
    with pytest.raises(FilterServeError, match="would overwrite investment_risk_v2_onnx of filter 'investment_risk_v2'"):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, repo, squatter)
    (repo / "stray").mkdir()
    with pytest.raises(FilterServeError, match=r"repo/stray exists but no filter record lists it; pass --force"):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, repo, replace(UPLIFTING_V4, name="stray"))
    (repo / "stray").rmdir()
    assert tree_digest(repo) == before
