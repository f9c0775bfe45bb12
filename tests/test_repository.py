"""The generated repository: layout, configs and the checks ``write_repository`` makes (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from toy_onnx import TOY_SPEC, build_onnx, build_tokenizer, build_toy_export
from tritonclient.grpc import model_config_pb2 as mc

from filterserve import contract, head_tail
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.model_repository import write_repository
from filterserve.model_repository.repository import RepositorySettings

SPEC = TOY_SPEC


def _config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return build_toy_export(tmp_path_factory.mktemp("toy"), max_batch_size=8, bucket=32)


def _write(tmp_path: Path, settings: RepositorySettings | None = None, **overrides) -> Path:
    """A fresh repository with fp32 (default) and fp16 tensor models; ``overrides`` go to write_repository."""
    tokenizer_dir = tmp_path / "tokenizer"
    tok = build_tokenizer(tokenizer_dir)
    repo = tmp_path / "repo"
    for folder in (f"{SPEC.name}_onnx", f"{SPEC.name}_onnx_fp16"):
        build_onnx(repo / folder / "1" / "model.onnx", tok.get_vocab_size(), SPEC.weights)
    kwargs = dict(
        tokenizer_dir=tokenizer_dir,
        precisions=["fp32", "fp16"],
        default_precision="fp32",
        pad_token_id=0,
        vocab_size=tok.get_vocab_size(),
    )
    write_repository(repo, SPEC, settings or RepositorySettings(max_batch_size=16), **{**kwargs, **overrides})
    return repo


@pytest.mark.timeout(30)
def test_layout_is_self_contained(toy):
    tokenizer_version = toy.repo / f"{SPEC.name}_tokenizer" / "1"
    assert (tokenizer_version / "model.py").is_file()
    # The one head+tail implementation travels beside it: the step runs without filterserve installed.
    assert (tokenizer_version / "head_tail.py").read_bytes() == Path(head_tail.__file__).read_bytes()
    assert (tokenizer_version / "tokenizer" / "tokenizer.json").read_bytes() == (toy.tokenizer_dir / "tokenizer.json").read_bytes()
    assert (toy.repo / SPEC.name / "1").is_dir()
    assert (toy.repo / f"{SPEC.name}_onnx" / "1" / "model.onnx.data").is_file()
    mask = np.fromfile(toy.repo / f"{SPEC.name}_onnx" / "warmup" / "attention_mask", dtype="<i8")
    assert mask.tolist() == [1] * 16


@pytest.mark.timeout(30)
def test_configs_follow_the_contract(toy):
    tokenizer = _config(toy.repo, f"{SPEC.name}_tokenizer")
    assert tokenizer.backend == "python" and tokenizer.max_batch_size == 8
    text_inputs = [(name, mc.TYPE_STRING, [1], True) for name in ("TEXT", "TITLE", "CONTENT")]
    text_inputs.append(("CONTENT_LENGTH", mc.TYPE_INT32, [1], True))  # production's measure, when sent (issue 26)
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in tokenizer.input] == text_inputs
    assert [(t.name, t.data_type) for t in tokenizer.output] == [
        ("input_ids", mc.TYPE_INT64), ("attention_mask", mc.TYPE_INT64), ("n_tokens", mc.TYPE_INT32), ("truncated", mc.TYPE_BOOL),
        ("content_length", mc.TYPE_INT32), ("screened", mc.TYPE_BOOL),
    ]
    assert {k: v.string_value for k, v in tokenizer.parameters.items()} == {
        "max_length": str(SPEC.max_length),
        "pad_token_id": str(toy.pad_token_id),
        "bucket": "32",
        "max_text_bytes": str(1 << 18),
        "text_template": "{title}\n\n{content}",
        "head_tail": "",  # uplifting v4 reads the first 512 tokens; a head+tail filter's JSON rule goes here
        "tensor_model": f"{SPEC.name}_onnx",
        "real_tokens_metric": contract.REAL_TOKENS_METRIC,
        "computed_tokens_metric": contract.COMPUTED_TOKENS_METRIC,
    }
    assert list(tokenizer.dynamic_batching.preferred_batch_size) == [4, 8]

    tensor = _config(toy.repo, f"{SPEC.name}_onnx")
    assert tensor.backend == "onnxruntime"
    assert [(t.name, t.data_type, list(t.dims)) for t in tensor.input] == [
        ("input_ids", mc.TYPE_INT64, [-1]),
        ("attention_mask", mc.TYPE_INT64, [-1]),
    ]
    assert [(t.name, list(t.dims)) for t in tensor.output] == [("logits", [SPEC.num_labels]), ("weighted_score", [1])]
    assert tensor.parameters["vocab_size"].string_value == str(toy.vocab_size)
    assert tensor.parameters["max_batch_tokens"].string_value == str(8 * SPEC.max_length)  # rows × max_length: no extra bound
    assert tensor.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert not tensor.optimization.execution_accelerators.gpu_execution_accelerator
    assert tensor.model_warmup[0].inputs["input_ids"].data_type == mc.TYPE_INT64
    assert tensor.dynamic_batching.max_queue_delay_microseconds > 0

    ensemble = _config(toy.repo, SPEC.name)
    assert ensemble.platform == "ensemble"
    assert [(t.name, t.optional) for t in ensemble.input] == [("TEXT", True), ("TITLE", True), ("CONTENT", True), ("CONTENT_LENGTH", True)]
    steps = [s.model_name for s in ensemble.ensemble_scheduling.step]
    assert steps == [f"{SPEC.name}_tokenizer", f"{SPEC.name}_onnx", f"{SPEC.name}_decision"]
    n = SPEC.num_labels
    assert [(t.name, t.data_type, list(t.dims)) for t in ensemble.output] == [
        ("scores", mc.TYPE_FP32, [n]),
        ("weighted_score", mc.TYPE_FP32, [1]),
        ("final_scores", mc.TYPE_FP32, [n]),
        ("weighted_average", mc.TYPE_FP32, [1]),
        ("gatekeeper_applied", mc.TYPE_BOOL, [1]),
        ("raw_weighted_average", mc.TYPE_FP32, [1]),
        ("tier", mc.TYPE_INT32, [1]),
        ("short_content_cap_applied", mc.TYPE_BOOL, [1]),
        ("content_length", mc.TYPE_INT32, [1]),
        ("n_tokens", mc.TYPE_INT32, [1]),
        ("truncated", mc.TYPE_BOOL, [1]),
    ]
    assert FilterSpec.from_dict(json.loads(ensemble.parameters["filter"].string_value)) == SPEC

    decision = _config(toy.repo, f"{SPEC.name}_decision")
    assert decision.backend == "onnxruntime" and decision.max_batch_size == 8
    assert [(t.name, list(t.dims)) for t in decision.input] == [("logits", [n]), ("CONTENT_LENGTH", [1]), ("screened", [1])]
    assert [t.name for t in decision.output] == [
        "scores", "final_scores", "weighted_average", "gatekeeper_applied", "raw_weighted_average", "tier",
        "short_content_cap_applied", "content_length",
    ]
    # Triton 2.51 prunes an ensemble wrongly when one of its outputs also feeds a step (contract.py)
    fed = {tensor for step in ensemble.ensemble_scheduling.step for tensor in step.input_map.values()}
    assert fed.isdisjoint(t.name for t in ensemble.output)
    assert (toy.repo / f"{SPEC.name}_decision" / "1" / "model.onnx").is_file()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"precisions": ["fp32", "fp16", "int8"]}, "int8 tensor model missing"),
        ({"default_precision": "int8"}, "default precision"),
        ({"pad_token_id": 10**6}, "outside the vocabulary"),
        ({"settings": RepositorySettings(max_batch_tokens=10)},
         "max-batch-tokens 10 is below max_length 64: one full-length article must fit"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, overrides, message):
    with pytest.raises(FilterServeError, match=message):
        _write(tmp_path, **overrides)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"max_batch_size": 0}, "^--max-batch-size must be at least 1, got 0$"),
        ({"max_text_bytes": 0}, "^--bucket and --max-text-bytes must be at least 1, got 16 and 0$"),
        ({"bucket": -1}, "^--bucket and --max-text-bytes must be at least 1, got -1 and 262144$"),
    ],
)
def test_bad_settings_are_refused_when_made(settings, message):
    """The export's flags and write_repository share these checks: a settings value that exists is valid."""
    with pytest.raises(FilterServeError, match=message):
        RepositorySettings(**settings)


@pytest.mark.timeout(30)
def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FilterServeError, match="no tokenizer.json"):
        _write(tmp_path, tokenizer_dir=tmp_path / "empty")
