"""Faster variants behind the accuracy gate (issue 6): INT8 on the CPU, the default pick, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import perturb_head
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve.errors import FilterServeError
from filterserve.export import child, pipeline
from filterserve.export.quantize import EXCLUSION_LADDER
from filterserve.filters import UPLIFTING_V4

SPEC = UPLIFTING_V4


def _served_precision(repo) -> str:
    config = text_format.Parse((repo / f"{SPEC.name}_onnx" / "config.pbtxt").read_text(), mc.ModelConfig())
    return config.parameters["precision"].string_value


def test_int8_without_validation_data_is_refused(standin, tmp_path):
    with pytest.raises(FilterServeError, match="int8 needs --validation"):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, tmp_path / "repo", precisions="fp32,int8")
    assert not (tmp_path / "repo").exists(), "refused before anything was written"


@pytest.mark.slow  # trains the fixture, then quantizes and gates three variants
@pytest.mark.timeout(600)
def test_gated_export_admits_variants_and_serves_the_fastest(trained, tmp_path):
    # At a tolerance of 0.05 the tiny fixture's INT8 is admitted on the first rung, so all three
    # variants are served and the default is picked among them.
    repo = tmp_path / "repo"
    manifest = pipeline.export_filter(
        str(trained.base_dir), trained.adapter_dir, repo, SPEC, precisions="fp32,fp16,int8",
        validation=trained.val_path, gate_tolerance=0.05,
    )
    report = manifest["accuracy_gate"]["report"]["variants"]
    admitted = list(manifest["tensor_models"])
    assert sorted(admitted) == ["fp16", "fp32", "int8"] and manifest["refused"] == {}
    assert manifest["int8"]["rung"] == 0, "admitted on the first try: only the head kept in fp32"
    for precision in admitted:
        figures = report[precision]
        assert figures["finite"] and figures["mae_delta"] <= 0.05
        assert all(d["mae_delta"] <= 0.05 for d in figures["per_dimension"].values())
    assert report["fp32"]["max_abs_diff"] <= 1e-4 and report["int8"]["max_abs_diff"] > report["fp16"]["max_abs_diff"]
    latency = manifest["latency_ms_batch1"]
    assert set(latency) == {"fp32", "fp16", "int8"}
    assert _served_precision(repo) == manifest["default_precision"]
    assert manifest["parity"]["int8"]["tolerance"] is None and manifest["parity"]["int8"]["finite"]
    assert json.loads((repo / f"{SPEC.name}.filter.json").read_text()) == manifest
    # Readable by a server running as another user, as the fp32 files are (the quantizer wrote 0600)
    modes = {f"{f.parent.parent.name}/{f.name}": oct(f.stat().st_mode) for f in repo.glob("*/1/model.onnx*")}
    assert len(modes) == 7 and len(set(modes.values())) == 1, modes  # 3 variants with their data, the decision


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_variant_that_moves_the_mae_is_refused_with_its_figures(trained, tmp_path, monkeypatch):
    quantize_in_child = child.run

    def broken_int8(step, job):  # the child quantizes as always, then its int8 file is spoilt
        ran = quantize_in_child(step, job)
        if job.kind == "int8":
            perturb_head(Path(job.target), Path(job.target), column=2, factor=1.5)
        return ran

    monkeypatch.setattr(child, "run", broken_int8)
    repo = tmp_path / "repo"
    with pytest.raises(pipeline.AccuracyGateRefusal) as refusal:
        pipeline.export_filter(
            str(trained.base_dir), trained.adapter_dir, repo, SPEC, precisions="int8,fp32",
            validation=trained.val_path, default="auto",
        )
    message = str(refusal.value)
    assert "refused int8" in message and "the repository holds only fp32" in message
    assert f"int8 on dimension {SPEC.dimensions[2]}: MAE" in message and "> tolerance 0.01" in message
    manifest = json.loads((repo / f"{SPEC.name}.filter.json").read_text())
    assert manifest["tensor_models"] == {"fp32": f"{SPEC.name}_onnx"}
    assert list(manifest["refused"]) == ["int8"]
    assert manifest["int8"]["rung"] == len(EXCLUSION_LADDER) - 1, "every rung of the exclusion ladder was tried"
    assert not (repo / f"{SPEC.name}_onnx_int8").exists()
    assert _served_precision(repo) == "fp32"


def test_default_is_the_fastest_admitted_only_with_validation():
    latency = {"fp32": 5.0, "fp16": 6.0, "int8": 1.5}
    assert pipeline.choose_default("auto", ["fp32", "fp16", "int8"], latency, validated=True) == "int8"
    assert pipeline.choose_default("auto", ["fp16", "fp32"], latency, validated=True) == "fp32"
    assert pipeline.choose_default("auto", ["fp16", "fp32"], latency, validated=False) == "fp16"  # first listed
    assert pipeline.choose_default("fp16", ["fp32", "fp16"], latency, validated=True) == "fp16"
    with pytest.raises(FilterServeError, match="--default int8 was refused"):
        pipeline.choose_default("int8", ["fp32"], latency, validated=True)


def test_explicit_default_must_be_exported(standin, tmp_path):
    with pytest.raises(FilterServeError, match="--default fp16 is not among the exported precisions"):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, tmp_path / "r", precisions="fp32", default="fp16")
