"""Writes the Triton configs, the tokenizer model and the ensemble next to exported ONNX files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.model_repository.decision import write_decision_model
from filterserve.model_repository.gpu import (
    TENSORRT_PRECISION,
    TRT_CACHE_ROOT,
    TensorRTAccelerator,
    engine_cache_dir,
    onnx_checksum,
    serving_profile,
)

_HERE = Path(__file__).resolve().parent
TOKENIZER_TEMPLATE = _HERE / "templates" / "tokenizer_model.py"
ONNXRUNTIME_SHIM = _HERE / "backends" / "onnxruntime" / "model.py"

# Files a Hugging Face tokenizer folder may hold; anything else there (adapter weights) stays behind.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
WARMUP_SEQ_LEN = 16
WARMUP_BATCH = 2
TENSOR_QUEUE_DELAY_US = 1000
TOKENIZER_QUEUE_DELAY_US = 500
DECISION_QUEUE_DELAY_US = 100
# Requests are padded to a multiple of this many tokens. Real news (median ~100 tokens) then
# computes ~5% padding, and requests of one bucket can still batch; see README for the trade-off.
DEFAULT_BUCKET = 16
# Longer texts (TEXT, TITLE or CONTENT) are refused. Texts are cut before tokenizing (only the
# first max_length tokens are read), but a text with no word boundary cannot be cut provably and
# is tokenized whole: 256 KiB of one "word" holds the tokenizer step for about a second here.
DEFAULT_MAX_TEXT_BYTES = 1 << 18


def tensor_model_name(name: str, precision: str, default_precision: str) -> str:
    """The default precision keeps the plain name so the ensemble and clients never change."""
    return contract.tensor_model(name, None if precision == default_precision else precision)


def _to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def _set_params(config: mc.ModelConfig, params: dict[str, object]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = str(value)


def _dynamic_batching(config: mc.ModelConfig, max_batch_size: int, delay_us: int) -> None:
    preferred = [b for b in (4, 8, 16, 32) if b <= max_batch_size]
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = delay_us


def _add_tensor(tensors, name: str, data_type: int, dims: list[int], optional: bool = False) -> None:
    """``tensors`` is a repeated ModelInput or ModelOutput field."""
    tensor = tensors.add()
    tensor.name = name
    tensor.data_type = data_type
    tensor.dims.extend(dims)
    if optional:
        tensor.optional = True


def _add_text_inputs(config: mc.ModelConfig) -> None:
    """TEXT, or TITLE + CONTENT: each optional, the tokenizer step says which combination is missing."""
    for name in contract.TEXT_INPUTS:
        _add_tensor(config.input, name, mc.TYPE_STRING, [1], optional=True)


def tokenizer_config(
    spec: FilterSpec, *, max_batch_size: int, pad_token_id: int, bucket: int, max_text_bytes: int, tensor_model: str
) -> mc.ModelConfig:
    config = mc.ModelConfig(name=contract.tokenizer_model(spec.name), backend="python", max_batch_size=max_batch_size)
    _add_text_inputs(config)
    for name in contract.TOKEN_INPUTS:
        _add_tensor(config.output, name, mc.TYPE_INT64, [-1])
    _add_tensor(config.output, contract.N_TOKENS, mc.TYPE_INT32, [1])
    _add_tensor(config.output, contract.TRUNCATED, mc.TYPE_BOOL, [1])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _dynamic_batching(config, max_batch_size, TOKENIZER_QUEUE_DELAY_US)
    _set_params(config, {
        "max_length": spec.max_length,
        "pad_token_id": pad_token_id,
        "bucket": bucket,
        "max_text_bytes": max_text_bytes,
        "text_template": spec.text_template,
        "tensor_model": tensor_model,
    })
    return config


def decision_config(spec: FilterSpec, *, max_batch_size: int) -> mc.ModelConfig:
    """The decision graph on ONNX Runtime: Triton's C++ backend in the container, the stand-in here."""
    config = mc.ModelConfig(
        name=contract.decision_model(spec.name),
        backend="onnxruntime",
        max_batch_size=max_batch_size,
        default_model_filename="model.onnx",
    )
    _add_tensor(config.input, contract.LOGITS, mc.TYPE_FP32, [spec.num_labels])
    _add_tensor(config.output, contract.SCORES, mc.TYPE_FP32, [spec.num_labels])
    _add_tensor(config.output, contract.FINAL_SCORES, mc.TYPE_FP32, [spec.num_labels])
    _add_tensor(config.output, contract.WEIGHTED_AVERAGE, mc.TYPE_FP32, [1])
    _add_tensor(config.output, contract.GATEKEEPER_APPLIED, mc.TYPE_BOOL, [1])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _dynamic_batching(config, max_batch_size, DECISION_QUEUE_DELAY_US)
    return config


def tensor_model_config(
    spec: FilterSpec,
    model_name: str,
    *,
    precision: str,
    max_batch_size: int,
    pad_token_id: int,
    vocab_size: int,
    gpu: bool,
    tensorrt: TensorRTAccelerator | None = None,
    max_batch_tokens: int | None = None,
) -> mc.ModelConfig:
    """``max_batch_tokens`` bounds rows × length per run (memory on small GPUs); None: no bound beyond max_batch_size.

    ``tensorrt`` puts ONNX Runtime's TensorRT accelerator in front of this model (NVIDIA's container).
    """
    config = mc.ModelConfig(
        name=model_name,
        backend="onnxruntime",
        max_batch_size=max_batch_size,
        default_model_filename="model.onnx",
    )
    for name in contract.TOKEN_INPUTS:
        _add_tensor(config.input, name, mc.TYPE_INT64, [-1])
    _add_tensor(config.output, contract.LOGITS, mc.TYPE_FP32, [spec.num_labels])
    _add_tensor(config.output, contract.WEIGHTED_SCORE, mc.TYPE_FP32, [1])
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=kind, count=1)
    _dynamic_batching(config, max_batch_size, TENSOR_QUEUE_DELAY_US)
    warmup = config.model_warmup.add(name="zeros_and_ones", batch_size=min(WARMUP_BATCH, max_batch_size))
    # Token id 0 is in every vocabulary; the mask comes from a file because Triton has no "ones_data".
    ids_name, mask_name = contract.TOKEN_INPUTS
    warmup.inputs[ids_name].CopyFrom(mc.ModelWarmup.Input(data_type=mc.TYPE_INT64, dims=[WARMUP_SEQ_LEN], zero_data=True))
    warmup.inputs[mask_name].CopyFrom(
        mc.ModelWarmup.Input(data_type=mc.TYPE_INT64, dims=[WARMUP_SEQ_LEN], input_data_file=mask_name)
    )
    if tensorrt is not None:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters.update(tensorrt.parameters())
    _set_params(config, {
        "vocab_size": vocab_size,
        "pad_token_id": pad_token_id,
        "precision": precision,
        "max_length": spec.max_length,
        "max_batch_tokens": max_batch_tokens or max_batch_size * spec.max_length,
    })
    return config


def ensemble_config(spec: FilterSpec, *, max_batch_size: int, tensor_model: str) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, platform="ensemble", max_batch_size=max_batch_size)
    _add_text_inputs(config)
    _add_tensor(config.output, contract.SCORES, mc.TYPE_FP32, [spec.num_labels])
    _add_tensor(config.output, contract.WEIGHTED_SCORE, mc.TYPE_FP32, [1])
    _add_tensor(config.output, contract.FINAL_SCORES, mc.TYPE_FP32, [spec.num_labels])
    _add_tensor(config.output, contract.WEIGHTED_AVERAGE, mc.TYPE_FP32, [1])
    _add_tensor(config.output, contract.GATEKEEPER_APPLIED, mc.TYPE_BOOL, [1])
    _add_tensor(config.output, contract.N_TOKENS, mc.TYPE_INT32, [1])
    _add_tensor(config.output, contract.TRUNCATED, mc.TYPE_BOOL, [1])
    tokens = {name: f"_{name}" for name in contract.TOKEN_INPUTS}
    config.ensemble_scheduling.step.add(
        model_name=contract.tokenizer_model(spec.name),
        model_version=-1,
        input_map={name: name for name in contract.TEXT_INPUTS},
        output_map={**tokens, contract.N_TOKENS: contract.N_TOKENS, contract.TRUNCATED: contract.TRUNCATED},
    )
    config.ensemble_scheduling.step.add(
        model_name=tensor_model,
        model_version=-1,
        input_map=tokens,
        output_map={contract.LOGITS: f"_{contract.LOGITS}", contract.WEIGHTED_SCORE: contract.WEIGHTED_SCORE},
    )
    config.ensemble_scheduling.step.add(  # SCORES too: no ensemble output may feed a step (contract.py)
        model_name=contract.decision_model(spec.name),
        model_version=-1,
        input_map={contract.LOGITS: f"_{contract.LOGITS}"},
        output_map={name: name for name in (contract.SCORES, *contract.DECISION_OUTPUTS)},
    )
    # Clients read the filter (dimensions, weights, template, rules) from the server's config.
    _set_params(config, {contract.FILTER_PARAMETER: json.dumps(spec.to_dict(), ensure_ascii=False)})
    return config


def _write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(_to_text(config), encoding="utf-8")


def write_tensor_model(model_dir: Path, config: mc.ModelConfig) -> None:
    """A tensor model's config and the warm-up mask file it names (ONNX and TensorRT alike)."""
    _write_config(model_dir, config)
    (model_dir / "warmup").mkdir(exist_ok=True)
    np.ones(WARMUP_SEQ_LEN, dtype="<i8").tofile(model_dir / "warmup" / "attention_mask")


def _copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise FilterServeError(f"no tokenizer.json in {tokenizer_dir}: the tokenizer model needs the fast tokenizer file")
    dest.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, dest / name)


def write_repository(
    repo: Path,
    spec: FilterSpec,
    *,
    tokenizer_dir: Path,
    precisions: list[str],
    default_precision: str,
    max_batch_size: int,
    pad_token_id: int,
    vocab_size: int,
    bucket: int = DEFAULT_BUCKET,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    max_batch_tokens: int | None = None,
    gpu: bool = False,
    trt_cache_root: str = TRT_CACHE_ROOT,
) -> None:
    """Complete the repository around the ONNX files the export already wrote into ``repo``.

    With ``gpu``, every tensor model runs on a GPU instance and the fp16 variant, the one whose
    parity and gate figures describe FP16 arithmetic, gets ONNX Runtime's TensorRT accelerator,
    its engines cached under ``trt_cache_root/<model>/<checksum of its ONNX files>``.
    """
    repo = Path(repo)
    tokenizer_dir = Path(tokenizer_dir)
    if default_precision not in precisions:
        raise FilterServeError(f"default precision {default_precision!r} is not among the exported {precisions}")
    if max_batch_size < 1:
        raise FilterServeError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if bucket < 1:
        raise FilterServeError(f"bucket must be at least 1, got {bucket}")
    if max_text_bytes < 1:
        raise FilterServeError(f"max_text_bytes must be at least 1, got {max_text_bytes}")
    if max_batch_tokens is not None and max_batch_tokens < spec.max_length:
        raise FilterServeError(
            f"max_batch_tokens {max_batch_tokens} is below max_length {spec.max_length}: one full-length article must fit"
        )
    if not 0 <= pad_token_id < vocab_size:
        raise FilterServeError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {vocab_size})")

    for precision in precisions:
        model_name = tensor_model_name(spec.name, precision, default_precision)
        model_dir = repo / model_name
        if not (model_dir / "1" / "model.onnx").is_file():
            raise FilterServeError(f"{precision} tensor model missing: expected {model_dir / '1' / 'model.onnx'}")
        tensorrt = None
        if gpu and precision == TENSORRT_PRECISION:
            tensorrt = TensorRTAccelerator(
                profile=serving_profile(max_batch_size, spec.max_length, bucket),
                cache_dir=engine_cache_dir(trt_cache_root, model_name, onnx_checksum(model_dir / "1" / "model.onnx")),
            )
        config = tensor_model_config(
            spec,
            model_name,
            precision=precision,
            max_batch_size=max_batch_size,
            pad_token_id=pad_token_id,
            vocab_size=vocab_size,
            gpu=gpu,
            tensorrt=tensorrt,
            max_batch_tokens=max_batch_tokens,
        )
        write_tensor_model(model_dir, config)

    decision_dir = repo / contract.decision_model(spec.name)
    _write_config(decision_dir, decision_config(spec, max_batch_size=max_batch_size))
    write_decision_model(decision_dir / "1" / "model.onnx", spec)

    tokenizer_dir_out = repo / contract.tokenizer_model(spec.name)
    _write_config(
        tokenizer_dir_out,
        tokenizer_config(
            spec,
            max_batch_size=max_batch_size,
            pad_token_id=pad_token_id,
            bucket=bucket,
            max_text_bytes=max_text_bytes,
            tensor_model=contract.tensor_model(spec.name),
        ),
    )
    _copy_tokenizer(tokenizer_dir, tokenizer_dir_out / "1" / "tokenizer")
    shutil.copy2(TOKENIZER_TEMPLATE, tokenizer_dir_out / "1" / "model.py")

    _write_config(
        repo / spec.name,
        ensemble_config(
            spec,
            max_batch_size=max_batch_size,
            tensor_model=tensor_model_name(spec.name, default_precision, default_precision),
        ),
    )
    (repo / spec.name / "1").mkdir(exist_ok=True)  # Triton needs a version folder, even if empty
