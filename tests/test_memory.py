"""The pre-flight memory check (issue 14): refuse, with a message, what cannot fit; no server needed."""

from __future__ import annotations

import psutil
import pytest

from filterserve.errors import FilterServeError
from filterserve.serve.memory import (
    ARENA_BYTES_PER_TOKEN,
    GB,
    MB,
    STUB_BYTES,
    WEIGHT_FACTOR,
    available_bytes,
    check_memory,
    estimate,
)


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
        r"but only 0\.0 GB is available: serve fewer filters, their int8 variants, or export with a smaller --max-batch-size"
    )):
        check_memory(repo, available=10 * MB)
    only_fp32 = check_memory(repo, models=["uplifting_v4_onnx"], available=4 * GB)
    assert list(only_fp32.models) == ["uplifting_v4_onnx"]
    with pytest.raises(FilterServeError, match="no model nope in"):
        estimate(repo, ["nope"])


def test_available_memory_is_what_the_machine_reports():
    reported = psutil.virtual_memory().available
    assert 0 < available_bytes() <= reported + 512 * MB  # a container's limit may leave less, never more


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
