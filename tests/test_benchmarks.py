"""Benchmarks on a filter that learned something: the trained fixture, exported for real.

Accuracy gates are only meaningful when the model's scores track the labels, so these tests
train the fixture (seconds), export it in fp32 and fp16, and check the reports and the gate;
the speed benchmarks run with a real server started and stopped by the benchmark itself.
No test asserts a speed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import export_into, perturb_head

from filterserve.benchmarks.peaks import measured_arithmetics
from filterserve.benchmarks.trained_fixture import TrainedFixture, single_thread
from filterserve.cli import main
from filterserve.export.standin import LORA_TARGETS
from filterserve.filters import UPLIFTING_V4
from filterserve.gate import REFERENCE, build_report, read_jsonl, refusals

SPEC = UPLIFTING_V4
# pytorch_bf16: the card's recipe in bf16; openvino_f32: OpenVINO on the fp32 file, in process;
# served_fp16: the variant that is not the default, served through its own server.
ENGINES = {"pytorch_peft", "pytorch_merged", "pytorch_bf16", "onnx_fp32", "onnx_fp16", "openvino_f32", "served_grpc",
           "served_http", "served_fp16"}
THROUGHPUT_ENGINES = {"production_scorer", "pytorch_bf16", "onnx_fp32", "onnx_fp16", "openvino_f32", "served_grpc",
                      "served_http", "tritonclient_random_grpc", "served_fp16"}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """No test here measures a speed; one thread keeps them fast on a CPU shared with other jobs."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def trained_repo(trained: TrainedFixture, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("trained_export") / "repo"
    export_into(repo, trained, SPEC, precisions="fp32,fp16")
    return repo


@pytest.mark.slow  # trains the fixture
@pytest.mark.timeout(180)
def test_trained_fixture_learns_its_labels_in_the_real_layout(trained: TrainedFixture) -> None:
    assert trained.val_mae < 0.6 * trained.constant_mae, (trained.val_mae, trained.constant_mae)

    base_config = json.loads((trained.base_dir / "config.json").read_text())
    assert base_config["architectures"] == ["Qwen2ForCausalLM"]
    assert base_config.get("pad_token_id") is None  # as Qwen2.5's: whoever loads it must set it
    adapter_config = json.loads((trained.adapter_dir / "adapter_config.json").read_text())
    assert (adapter_config["task_type"], adapter_config["r"], adapter_config["lora_alpha"]) == ("SEQ_CLS", 8, 16)
    assert set(adapter_config["target_modules"]) == set(LORA_TARGETS)
    from safetensors import safe_open

    with safe_open(str(trained.adapter_dir / "adapter_model.safetensors"), "pt") as weights:
        assert any(k.endswith("score.weight") for k in weights.keys())
    assert (trained.adapter_dir / "tokenizer.json").is_file()

    train, val = ([a for _, a in read_jsonl(path)] for path in (trained.train_path, trained.val_path))
    assert not {a["id"] for a in train} & {a["id"] for a in val}
    for article in val:
        assert article["title"] and article["content"]
        assert all(0.0 <= article[dim] <= 10.0 for dim in SPEC.dimensions)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_accuracy_report_and_gate_pass(trained: TrainedFixture, trained_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    data = tmp_path / "val.jsonl"  # the validation set with an article the production scorer refuses
    lines = trained.val_path.read_text(encoding="utf-8").splitlines()
    lines.insert(3, json.dumps({"title": "No content", "content": "  ", **{d: 1.0 for d in SPEC.dimensions}}))
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code = main(["bench", "accuracy", "--data", str(data), "--model-repository", str(trained_repo), "--out", str(out)])
    assert code == 0
    assert all((out / f"accuracy.{ext}").stat().st_size > 0 for ext in ("md", "json", "png"))
    report = json.loads((out / "accuracy.json").read_text())
    assert set(report["variants"]) == {REFERENCE, "onnx_fp32", "onnx_fp16"}
    for variant in report["variants"].values():
        assert set(variant["per_dimension"]) == set(SPEC.dimensions)
        for figures in variant["per_dimension"].values():
            assert {"mae", "rmse", "mae_delta", "max_abs_diff", "mean_abs_diff"} <= set(figures)
    # The reference run here (one text at a time, from the saved files) is the model the fixture trained.
    assert report["variants"][REFERENCE]["mae"] == pytest.approx(trained.val_mae, abs=1e-3)
    assert report["variants"]["onnx_fp32"]["max_abs_diff"] < 1e-4
    assert report["passed"] and refusals(report) == {}
    assert report["skipped"] == [{"line": 4, "reason": "bad input: content is empty"}]
    assert report["n_articles"] == len(lines) - 1
    markdown = (out / "accuracy.md").read_text()
    assert "| onnx_fp16 |" in markdown and "(1 skipped: empty title or content)" in markdown


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_accuracy_gate_fails_on_a_perturbed_variant(trained: TrainedFixture, trained_repo: Path, tmp_path: Path, capsys) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained_repo, repo)
    manifest = json.loads((repo / f"{SPEC.name}.filter.json").read_text())
    fp32 = repo / manifest["tensor_models"]["fp32"] / "1" / "model.onnx"
    perturb_head(fp32, repo / "broken" / "1" / "model.onnx", column=3, factor=1.5)
    manifest["tensor_models"]["broken"] = "broken"
    (repo / f"{SPEC.name}.filter.json").write_text(json.dumps(manifest))

    out = tmp_path / "report"
    code = main(["bench", "accuracy", "--data", str(trained.val_path), "--model-repository", str(repo), "--out", str(out)])
    assert code != 0
    message = capsys.readouterr().err
    assert f"onnx_broken on dimension {SPEC.dimensions[3]}: MAE" in message
    assert "accuracy gate refused onnx_broken:" in message and "onnx_fp32" not in message.split("refused")[-1]
    report = json.loads((out / "accuracy.json").read_text())
    assert not report["passed"]

    truth = np.zeros((4, SPEC.num_labels))
    nan_report = build_report(SPEC, truth, truth, {"onnx_int8": np.full_like(truth, np.nan)})
    assert refusals(nan_report) == {"onnx_int8": [f"onnx_int8 produces NaN/Inf scores (max |Δ| vs {REFERENCE} = nan)"]}


def test_realistic_mix_has_the_documented_shape() -> None:
    from filterserve.benchmarks.articles import realistic_lengths

    lengths = np.array(realistic_lengths(20000, seed=3))
    assert np.median(lengths) == pytest.approx(100, abs=6)
    assert np.percentile(lengths, 25) == pytest.approx(55, abs=5) and np.percentile(lengths, 75) == pytest.approx(235, abs=20)
    assert (lengths > 512).mean() == pytest.approx(0.10, abs=0.01)
    assert np.minimum(lengths, 512).mean() == pytest.approx(166, abs=6)


def _tritonservers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "tritonserver" in p.name()]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_latency_and_throughput_reports_with_a_started_server(trained_repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    common = ["--model-repository", str(trained_repo), "--out", str(out)]
    assert main(["bench", "latency", *common, "--requests", "2"]) == 0
    assert main(["bench", "throughput", *common, "--requests", "8", "--concurrency", "1,4"]) == 0
    assert not _tritonservers()  # each benchmark stopped the server it started

    for stem in ("latency", "throughput"):
        assert all((out / f"{stem}.{ext}").stat().st_size > 0 for ext in ("md", "json", "png"))
    latency = json.loads((out / "latency.json").read_text())
    assert set(latency["engines"]) == ENGINES
    assert set(latency["lengths_tokens"]) == {"short", "news_median", "median", "max_length"}
    assert latency["lengths_tokens"]["max_length"] == SPEC.max_length
    for row in latency["engines"].values():
        for stats in row.values():
            assert {"p50_ms", "p95_ms", "p99_ms", "speedup_p50_vs_card", "flops_per_s", "fraction_of_peak"} <= set(stats)
    for engine, row in latency["engines"].items():  # a share of a peak only where this CPU has one
        has_peak = latency["arithmetic"][engine] in latency["peaks"]
        assert all((stats["fraction_of_peak"] is not None) == has_peak for stats in row.values()), engine
    assert latency["matmul_params"] > 0 and set(latency["peaks"]) == set(measured_arithmetics())
    assert all(peak["flops"] == max(peak["by"].values()) > 0 for peak in latency["peaks"].values())
    assert latency["arithmetic"]["pytorch_bf16"] == "bf16" and latency["arithmetic"]["served_fp16"] == "fp32"
    assert latency["openvino_execution"]["openvino_f32"]["precision"] == "f32"

    throughput = json.loads((out / "throughput.json").read_text())
    assert set(throughput["engines"]) == {"uniform", "realistic"}
    for engines in throughput["engines"].values():
        assert set(engines) == THROUGHPUT_ENGINES
        for row in engines.values():
            assert set(row) == {"1", "4"}
        # Every engine saw the same articles: in-process counts and the server's counters agree on the real tokens.
        real = {engine: row["4"]["real_tokens"] for engine, row in engines.items()}
        assert len(set(real.values())) == 1, real
        production = engines["production_scorer"]["4"]
        assert production["computed_tokens"] == 8 * SPEC.max_length  # 8 articles, padded to max_length
        sorted_batches, served = engines["onnx_fp32"]["4"], engines["served_grpc"]["4"]
        assert 1.0 <= served["computed_per_real"] <= sorted_batches["computed_per_real"] + 0.5
        assert served["computed_per_real"] < production["computed_per_real"]
    assert throughput["mixes"]["uniform"]["median_tokens"] == pytest.approx(SPEC.max_length // 2, abs=2)
