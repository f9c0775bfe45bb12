"""The pre-flight memory check (issue 14): refuse, with a message, what cannot fit; no server needed."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from filterserve.errors import FilterServeError
from filterserve.export.standin import StandinShape
from filterserve.filters import UPLIFTING_V4
from filterserve.serve.memory import (
    ARENA_BYTES_PER_TOKEN,
    GB,
    MB,
    STUB_BYTES,
    WEIGHT_FACTOR,
    available_bytes,
    check_memory,
    estimate,
    folder_bytes,
    parameters,
    shape_estimate,
    weight_file_bytes,
)

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
# Qwen2.5-1.5B's published parameter count (tied embedding), without a score head.
QWEN25_1_5B_PARAMETERS = 1_543_714_304


def _files(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_each_served_model_is_estimated_from_its_files_and_precision(exported):
    repo, manifest = exported
    found = estimate(repo, available=100 * GB)
    assert set(found.models) == {p.parent.name for p in repo.glob("*/config.pbtxt")}
    assert found.models["uplifting_v4"] == 0, "an ensemble holds nothing of its own"
    largest_batch = manifest["max_batch_size"] * manifest["max_length"]  # 16 × 512 tokens
    for precision, model in manifest["tensor_models"].items():
        weights = int(_files(repo / model) * WEIGHT_FACTOR[precision])
        assert found.models[model] == STUB_BYTES + weights + ARENA_BYTES_PER_TOKEN * largest_batch
    assert found.models["uplifting_v4_tokenizer"] == STUB_BYTES + _files(repo / "uplifting_v4_tokenizer")
    assert found.fits and found.needed == int(sum(found.models.values()) * 1.10)


def test_models_that_cannot_fit_are_refused_with_the_figures(exported):
    repo, _ = exported
    with pytest.raises(FilterServeError, match=(
        r"the models in .* need about \d+\.\d GB once served \(uplifting_v4_onnx.*GB.*plus 10% headroom\) "
        r"but only 0\.0 GB is available: serve fewer filters, their int8 variants, filters of one base as one group "
            r"\(export --share-base\), or export with a smaller --max-batch-size"
    )):
        check_memory(repo, available=10 * MB)
    only_fp32 = check_memory(repo, models=["uplifting_v4_onnx"], available=4 * GB)
    assert list(only_fp32.models) == ["uplifting_v4_onnx"]
    with pytest.raises(FilterServeError, match="no model nope in"):
        estimate(repo, ["nope"])


@pytest.mark.parametrize(
    "shape",
    [StandinShape(), StandinShape.qwen25_1_5b(), StandinShape.gemma3_tiny(), StandinShape.gemma3_1b()],
    ids=["tiny qwen2", "qwen2.5-1.5b", "tiny gemma3", "gemma3-1b"],
)
def test_the_parameter_count_is_transformers_own(shape: StandinShape):
    """The shape estimate's weights stand on the model the export loads, built here without memory."""
    import torch
    from transformers import AutoModelForSequenceClassification, Gemma3TextConfig, Qwen2Config

    dims = dict(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
                num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
                intermediate_size=shape.intermediate_size, num_labels=UPLIFTING_V4.num_labels, pad_token_id=0)
    config = Qwen2Config(**dims) if shape.architecture == "qwen2" else Gemma3TextConfig(head_dim=shape.head_dim, **dims)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    assert sum(parameters(shape, UPLIFTING_V4.num_labels)) == sum(p.numel() for p in model.parameters())


def test_qwen25_1_5b_has_its_published_size():
    assert sum(parameters(StandinShape.qwen25_1_5b(), 0)) == QWEN25_1_5B_PARAMETERS


@pytest.mark.parametrize("run", ["8x512", "32x512"])
def test_weight_files_from_the_shape_are_the_measured_exports(run: str):
    """``bench memory`` on an export of Qwen2.5-1.5B's dimensions at 4 of its 28 layers, 8 dimensions."""
    report = json.loads((RESULTS / f"memory-qwen2.5-1.5b-dims-4-layers-{run}.json").read_text())
    shape = replace(StandinShape.qwen25_1_5b(), num_hidden_layers=4)
    tensors = {v["kind"].split()[1]: v["files_mb"] * MB for v in report["models"].values() if v["kind"].startswith("tensor")}
    assert set(tensors) == {"fp32", "fp16", "int8"}
    for precision, measured in tensors.items():
        assert weight_file_bytes(shape, UPLIFTING_V4.num_labels, precision) == pytest.approx(measured, rel=0.005), precision


def test_the_shape_estimate_is_what_the_check_finds_in_an_export(exported):
    """Same models, same names, same terms: sizing a pod from a shape is sizing the export it will serve."""
    repo, manifest = exported
    found = estimate(repo, available=100 * GB)
    tokenizer = folder_bytes(repo / "uplifting_v4_tokenizer")
    sized = shape_estimate("uplifting_v4", StandinShape(), UPLIFTING_V4.num_labels, list(manifest["tensor_models"]),
                           manifest["max_batch_size"], tokenizer, 100 * GB)
    assert sized.models.keys() == found.models.keys()
    for model, held in found.models.items():
        # What the shape leaves out: the ONNX graph (0.4 MB at this toy size, twice that as fp16
        # is held), configs, warm-up data.
        assert 0 <= held - sized.models[model] < 2 * MB, model
    assert sized.needed == pytest.approx(found.needed, rel=1e-3)


def test_available_memory_is_what_the_machine_reports():
    reported = psutil.virtual_memory().available
    assert 0 < available_bytes() <= reported + 512 * MB  # a container's limit may leave less, never more


@pytest.mark.slow  # starts a tritonserver
@pytest.mark.timeout(240)
def test_bench_memory_reads_every_stub_of_every_filter(multi_exported, tmp_path):
    from filterserve.cli import main

    assert main(["bench", "memory", "--model-repository", str(multi_exported), "--batch", "4", "--tokens", "256",
                 "--out", str(tmp_path)]) == 0
    import json

    report = json.loads((tmp_path / "memory.json").read_text())
    models = report["models"]
    for name in ("uplifting_v4", "investment_risk_v2"):
        assert "loaded" not in models[name], "an ensemble has no process of its own"
        for step in ("tokenizer", "decision", "onnx"):
            assert models[f"{name}_{step}"]["loaded"]["uss_mb"] > 0
        tensor = models[f"{name}_onnx"]
        assert tensor["after_batch"]["rss_mb"] >= tensor["loaded"]["rss_mb"] - 1, "a batch leaves the arena at least as large"
        assert report["tokenizer_hop_ms"][name] > 0
    assert (tmp_path / "memory.md").read_text().count("| tensor fp32 |") == 2
