"""The export stage on the tiny stand-in: merge, ONNX, parity, manifest and every refusal."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import FIVE_DIMS

from filterserve.cli import build_parser, main
from filterserve.data import sample_articles
from filterserve.errors import FilterServeError, ParityError
from filterserve.export import pipeline
from filterserve.export.cli import export_options
from filterserve.export.load import load_reference
from filterserve.export.merge import merge
from filterserve.export.options import ExportOptions
from filterserve.export.parity import encode, ort_scores, ort_session, parity_texts, reference_scores
from filterserve.export.standin import StandinShape, build_standin
from filterserve.filter_loader import load_filter
from filterserve.filters import UPLIFTING_V4
from filterserve.model_repository.repository import RepositorySettings

ARTICLE_TEXTS = [UPLIFTING_V4.input_text(a["title"], a["content"]) for a in sample_articles()]


def test_manifest_records_filter_sources_versions_and_parity(exported, standin, reference):
    repo, manifest = exported
    assert json.loads((repo / "filterserve.json").read_text()) == {
        "format": "filterserve.repository/1", "filters": {"uplifting_v4": "uplifting_v4.filter.json"}}
    on_disk = json.loads((repo / "uplifting_v4.filter.json").read_text())
    assert on_disk["filter"]["dimensions"][2] == {"name": "collective_benefit", "weight": 0.38}
    assert [d["name"] for d in on_disk["filter"]["dimensions"]] == list(UPLIFTING_V4.dimensions)
    assert on_disk["max_length"] == 512
    assert on_disk["pad_token_id"] == reference.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert on_disk["tensor_models"] == {"fp32": "uplifting_v4_onnx", "fp16": "uplifting_v4_onnx_fp16"}
    adapter_sums = on_disk["sources"]["adapter"]["sha256"]
    assert len(adapter_sums["adapter_model.safetensors"]) == 64
    assert "model.safetensors" in on_disk["sources"]["base"]["sha256"]
    assert on_disk["versions"]["torch"].startswith("2.13.0")
    assert on_disk["parity"]["fp32"]["max_abs_diff"] <= 1e-4 and on_disk["parity"]["fp32"]["passed"]
    assert on_disk["parity"]["fp16"]["max_abs_diff"] <= 0.05 and on_disk["parity"]["fp16"]["finite"]
    assert on_disk["parity"]["merged"]["max_abs_diff"] <= 1e-4
    for name in on_disk["tensor_models"].values():
        assert (repo / name / "1" / "model.onnx").is_file()
        assert (repo / name / "1" / "model.onnx.data").is_file(), "weights must be external data"
    assert manifest == on_disk


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("fp16", 0.05)])
def test_exported_variants_match_peft_on_unseen_texts(exported, reference, precision, tolerance):
    repo, manifest = exported
    texts = ARTICLE_TEXTS + ["x", "Short title. " + "word " * 700]
    expected = reference(texts)
    ids, mask = encode(reference.tokenizer, texts, 512)
    session = ort_session(repo / manifest["tensor_models"][precision] / "1" / "model.onnx")
    logits, weighted = ort_scores(session, ids, mask)
    assert logits.shape == (len(texts), 8) and weighted.shape == (len(texts), 1)
    assert np.isfinite(logits).all()
    assert np.abs(logits - expected).max() <= tolerance
    assert np.abs(weighted[:, 0] - expected @ np.array(UPLIFTING_V4.weights)).max() <= tolerance
    assert expected.std(axis=0).min() > 1e-3, "scores must vary between texts for the check to mean anything"


def test_batch_and_sequence_axes_are_dynamic(exported, reference):
    repo, manifest = exported
    session = ort_session(repo / manifest["tensor_models"]["fp32"] / "1" / "model.onnx")
    single = reference(ARTICLE_TEXTS[:1])
    for batch, extra_pad in [(1, 0), (3, 5), (7, 40)]:
        ids, mask = encode(reference.tokenizer, ARTICLE_TEXTS[:1] * batch, 512)
        ids = np.pad(ids, ((0, 0), (0, extra_pad)), constant_values=manifest["pad_token_id"])
        mask = np.pad(mask, ((0, 0), (0, extra_pad)))
        logits, _ = ort_scores(session, ids, mask)
        assert np.abs(logits - single).max() <= 1e-4


def test_parity_texts_are_articles_in_the_filters_template(reference):
    texts = parity_texts(reference.tokenizer, UPLIFTING_V4)
    assert all(t.count("\n\n") == 1 for t in texts), "title, blank line, content: the training format"
    assert "A\n\nB" in texts, "the shortest possible article exercises the pooling at position 2"
    assert any("太阳能" in t for t in texts) and any("متطوعون" in t for t in texts), "non-Latin scripts"
    lengths = [len(reference.tokenizer(t)["input_ids"]) for t in texts]
    assert max(lengths) > 512, "one text must be longer than max_length so truncation is exercised"
    ids, _ = encode(reference.tokenizer, texts, 512)
    assert ids.shape[1] == 512


@pytest.mark.slow  # a whole export of its own
def test_template_comes_from_the_filter_description(standin, tmp_path):
    """A filter trained on another join is exported and checked on that join, recorded in its record."""
    dashed = replace(UPLIFTING_V4, name="dashed", text_template="{title} -- {content}")
    manifest = pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, tmp_path / "repo", dashed)
    assert manifest["filter"]["text_template"] == "{title} -- {content}"
    assert load_filter(tmp_path / "repo" / "dashed.filter.json").text_template == "{title} -- {content}"
    config = (tmp_path / "repo" / "dashed_tokenizer" / "config.pbtxt").read_text()
    assert '"{title} -- {content}"' in config


def test_merge_keeps_trained_head_and_drops_lora(standin):
    loaded = load_reference(str(standin.base_dir), standin.adapter_dir, UPLIFTING_V4)
    texts = ARTICLE_TEXTS[:3]
    ref = reference_scores(loaded.model, loaded.tokenizer, texts, 512)
    ids, mask = encode(loaded.tokenizer, texts, 512)
    merged, result = merge(loaded, ids, mask, ref)
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    assert np.allclose(merged.score.weight.detach().numpy(), loaded.adapter_score_weight.numpy())
    assert result.max_abs_diff <= 1e-4
    assert merged.config.pad_token_id == loaded.pad_token_id


def test_lora_changes_the_scores(standin, reference):
    """Guards the fixture: were the LoRA weights zero, a merge that dropped them would pass parity."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from filterserve.export.load import read_adapter_tensors, score_head

    head_only = AutoModelForSequenceClassification.from_pretrained(str(standin.base_dir), num_labels=8)
    head_only.config.pad_token_id = reference.tokenizer.pad_token_id
    with torch.no_grad():
        head_only.score.weight.copy_(score_head(read_adapter_tensors(standin.adapter_dir), standin.adapter_dir))
    without_lora = reference_scores(head_only.eval(), reference.tokenizer, ARTICLE_TEXTS[:2], 512)
    assert np.abs(without_lora - reference(ARTICLE_TEXTS[:2])).max() > 1e-2


@pytest.mark.slow  # a whole export of its own
def test_five_dimension_filter_exports_the_same_way(tmp_path):
    stand = build_standin(tmp_path / "src", FIVE_DIMS, seed=1)
    manifest = pipeline.export_filter(str(stand.base_dir), stand.adapter_dir, tmp_path / "repo", FIVE_DIMS)
    assert [d["name"] for d in manifest["filter"]["dimensions"]] == list(FIVE_DIMS.dimensions)
    session = ort_session(tmp_path / "repo" / "investment_risk_v2_onnx" / "1" / "model.onnx")
    loaded = load_reference(str(stand.base_dir), stand.adapter_dir, FIVE_DIMS)
    ids, mask = encode(loaded.tokenizer, ARTICLE_TEXTS[:2], 256)
    logits, weighted = ort_scores(session, ids, mask)
    assert logits.shape == (2, 5)
    assert np.allclose(weighted[:, 0], logits @ np.array(FIVE_DIMS.weights), atol=1e-5)
    assert load_filter(tmp_path / "repo") == FIVE_DIMS  # a repository folder: its only filter


def test_parity_failure_stops_the_export_and_leaves_no_models(standin, tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.TOLERANCES, "fp16", 1e-9)
    with pytest.raises(ParityError, match=r"ONNX fp16 differs .* max \|Δ\| = .* > tolerance 1e-09"):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, tmp_path / "repo", precisions="fp32,fp16")
    assert not (tmp_path / "repo").exists(), "nothing is written before every check passed"
    assert not list(tmp_path.glob(".repo.staging-*")), "the staging folder is removed"


# --- refusals, each with a message that names the problem --------------------------------


def test_missing_paths_are_named(standin, tmp_path):
    with pytest.raises(FilterServeError, match="adapter folder not found"):
        pipeline.export_filter(str(standin.base_dir), tmp_path / "nope", tmp_path / "o1")
    with pytest.raises(FilterServeError, match="base model not found: /no/such/base"):
        pipeline.export_filter("/no/such/base", standin.adapter_dir, tmp_path / "o2")
    with pytest.raises(FilterServeError, match="adapter_config.json is missing"):
        pipeline.export_filter(str(standin.base_dir), standin.base_dir, tmp_path / "o3")


def test_adapter_for_another_base_is_refused(standin, tmp_path):
    other = build_standin(tmp_path / "other", UPLIFTING_V4, shape=StandinShape(hidden_size=32, intermediate_size=64))
    with pytest.raises(FilterServeError, match=r"does not match the base model: .*LoRA A takes 32 inputs, base layer 64"):
        pipeline.export_filter(str(standin.base_dir), other.adapter_dir, tmp_path / "out")


def test_tokenizer_without_pad_token_is_refused(tmp_path):
    stand = build_standin(tmp_path / "src", UPLIFTING_V4, with_tokenizer_pad=False)
    with pytest.raises(FilterServeError, match="has no pad token"):
        pipeline.export_filter(str(stand.base_dir), stand.adapter_dir, tmp_path / "out")


def test_filter_that_disagrees_with_the_head_is_refused(standin, tmp_path):
    with pytest.raises(FilterServeError, match="score head has 8 outputs but filter 'investment_risk_v2' has 5"):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, tmp_path / "out", FIVE_DIMS)


@pytest.mark.slow  # a whole export of its own
def test_a_different_export_of_the_same_filter_needs_force(standin, tmp_path):
    repo = tmp_path / "repo"
    pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, repo)
    pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, repo)  # the same export again: replaced quietly
    other = build_standin(tmp_path / "other", UPLIFTING_V4, seed=3)
    with pytest.raises(FilterServeError, match="already holds a different export of filter 'uplifting_v4' .*--force"):
        pipeline.export_filter(str(other.base_dir), other.adapter_dir, repo)
    manifest = pipeline.export_filter(str(other.base_dir), other.adapter_dir, repo, force=True)
    assert manifest["sources"]["adapter"]["path"] == str(other.adapter_dir.resolve())
    assert sorted(p.name for p in repo.iterdir()) == sorted(["filterserve.json", "uplifting_v4.filter.json", *manifest["models"]])


def test_non_empty_foreign_folder_is_never_cleared(standin, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FilterServeError, match="not empty and holds no filterserve export"):
        pipeline.export_filter(str(standin.base_dir), standin.adapter_dir, tmp_path, force=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_unknown_precision_is_refused():
    with pytest.raises(FilterServeError, match="unknown precision fp8"):
        pipeline.parse_precisions("fp32,fp8")


def test_cli_flags_become_one_export_options_value(tmp_path):
    argv = ["export", "--base", "B", "--adapter", "~/adapter", "--out", str(tmp_path / "out"), "--name", "renamed",
            "--precision", "FP16, fp32,fp16", "--default", "fp32", "--force", "--max-batch-size", "8",
            "--max-batch-tokens", "1024", "--bucket", "32", "--max-text-bytes", "1000", "--gpu", "--trt-cache-dir", "/cache"]
    options = export_options(build_parser().parse_args(argv))
    assert options == ExportOptions(
        "B", Path.home() / "adapter", tmp_path / "out", replace(UPLIFTING_V4, name="renamed"), precisions=("fp16", "fp32"),
        default="fp32", force=True, repository=RepositorySettings(8, 1024, 32, 1000, gpu=True, trt_cache_root="/cache"),
    )
    assert options.build == ("fp32", "fp16")
    defaults = export_options(build_parser().parse_args(argv[:7]))
    assert defaults == ExportOptions("B", Path.home() / "adapter", tmp_path / "out")  # the CLI's defaults are the API's


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
        (["--bucket", "0"], "--bucket and --max-text-bytes must be at least 1, got 0 and 262144"),
        (["--max-batch-tokens", "100"], "--max-batch-tokens 100 is below max_length 512: one full-length article must fit"),
        (["--precision", "fp32", "--default", "fp16"], r"--default fp16 is not among the exported precisions \['fp32'\]"),
        (["--precision", "fp32,int8"], "int8 needs --validation VAL.jsonl"),
        (["--validation", "missing.jsonl"], "validation data not found: missing.jsonl"),
    ],
)
def test_bad_flags_are_refused_in_one_line_before_anything_is_read_or_written(standin, tmp_path, capsys, flags, message):
    out = tmp_path / "deeper" / "repo"
    argv = ["export", "--base", str(standin.base_dir), "--adapter", str(standin.adapter_dir), "--out", str(out), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.fullmatch(f"error: {message}.*", err), err
    assert list(tmp_path.iterdir()) == []  # not even the folder above --out, where the staging folder goes


def test_options_given_flat_or_whole_are_the_same_export_options():
    flat = ExportOptions.of("b", "a", "o", FIVE_DIMS, precisions="fp16", max_batch_size=4, bucket=8)
    assert flat == ExportOptions("b", "a", "o", FIVE_DIMS, precisions=("fp16",), repository=RepositorySettings(4, bucket=8))
    assert ExportOptions.of("b", "a", "o") == ExportOptions("b", "a", "o")
    assert ExportOptions("b", "a", "o", precisions="int8", validation="pyproject.toml").build == ("fp32", "int8")
    with pytest.raises(TypeError, match="repository"):  # settings given twice: one would be dropped silently
        ExportOptions.of("b", "a", "o", repository=RepositorySettings(), max_batch_size=4)


def test_cli_prints_one_line_error_and_exits_2(standin, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "filterserve.cli", "export", "--base", str(standin.base_dir),
         "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: adapter folder not found: {tmp_path / 'missing'}"
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # a whole export of its own
def test_cli_export_shows_progress_and_writes_repository(standin, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "filterserve.cli", "export", "--base", str(standin.base_dir),
         "--adapter", str(standin.adapter_dir), "--out", str(tmp_path / "repo"), "--name", "demo_filter"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1/8] check inputs" in proc.stderr and "[8/8] write the Triton model repository" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["models"][0] == "demo_filter"
    assert summary["parity_max_abs_diff"]["fp32"] <= 1e-4
    assert (Path(tmp_path / "repo") / "demo_filter_onnx" / "1" / "model.onnx").is_file()
