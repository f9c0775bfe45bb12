"""Writes the Triton configs, the tokenizer model and the ensemble next to exported ONNX files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve import contract, head_tail
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.model_repository import runtime
from filterserve.model_repository.decision import write_decision_model
from filterserve.model_repository.gpu import (
    TENSORRT_PRECISION,
    TRT_CACHE_ROOT,
    TensorRTAccelerator,
    engine_cache_dir,
    onnx_checksum,
    serving_profile,
)
from filterserve.model_repository.runtime import openvino
from filterserve.model_repository.runtime.tensor_backend import TokenRules

TOKENIZER_TEMPLATE = Path(runtime.__file__).resolve().parent / "templates" / "tokenizer_model.py"
# The tokenizer step runs without this package: it reads the contract's names and runs the one
# head+tail implementation from copies of these modules beside its model.py.
STEP_MODULES = (Path(contract.__file__), Path(head_tail.__file__))

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
# computes ~4% padding, and requests of one bucket can still batch; docs/design.md has the trade-off.
DEFAULT_BUCKET = 16
# Longer texts (TEXT, TITLE or CONTENT) are refused. Texts are cut before tokenizing (only the
# first max_length tokens are read), but a text with no word boundary cannot be cut provably and
# is tokenized whole: 256 KiB of one "word" holds the tokenizer step for about a second here. A
# head+tail filter reads the end too, so it counts every token: 256 KiB of English took 0.25 s
# with Gemma-3's tokenizer here (CPU shared with other work), 256 KiB of Chinese 0.07 s.
DEFAULT_MAX_TEXT_BYTES = 1 << 18
DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class RepositorySettings:
    """How the written repository serves a filter, apart from the facts of the exported model.

    One value, checked when it is made, so the export (which holds it in its options), the CLI
    and :func:`write_repository` share one set of checks and messages; the messages name the
    export's flags, the one place a user sets these.
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # Most rows × padded length per tensor-model run (memory on small GPUs); None: max_batch_size × max_length.
    max_batch_tokens: int | None = None
    bucket: int = DEFAULT_BUCKET
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    gpu: bool = False
    trt_cache_root: str = TRT_CACHE_ROOT

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise FilterServeError(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        if self.bucket < 1 or self.max_text_bytes < 1:
            raise FilterServeError(
                f"--bucket and --max-text-bytes must be at least 1, got {self.bucket} and {self.max_text_bytes}"
            )

    def record_fields(self) -> dict[str, int | None]:
        """What a filter's record keeps of these: build-engine reads them back to size its engine to what the server sends."""
        return {"max_batch_size": self.max_batch_size, "max_batch_tokens": self.max_batch_tokens,
                "bucket": self.bucket, "max_text_bytes": self.max_text_bytes}

    def check(self, spec: FilterSpec) -> None:
        """What depends on the filter too: one full-length article must fit in a tensor-model run."""
        if self.max_batch_tokens is not None and self.max_batch_tokens < spec.max_length:
            raise FilterServeError(
                f"--max-batch-tokens {self.max_batch_tokens} is below max_length {spec.max_length}: "
                "one full-length article must fit"
            )


def tensor_model_name(name: str, precision: str, default_precision: str) -> str:
    """The default precision keeps the plain name so the ensemble and clients never change."""
    return contract.tensor_model(name, None if precision == default_precision else precision)


def _to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def _set_params(config: mc.ModelConfig, params: Mapping[str, object]) -> None:
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


def _add_text_inputs(config: mc.ModelConfig, *, content_length: bool = True) -> None:
    """TEXT, or TITLE + CONTENT: each optional, the tokenizer step says which combination is missing;
    CONTENT_LENGTH optional too (else the step measures the content), except where nothing reads it
    (the stage-1 embedder's ensemble: Triton refuses an ensemble input that no step takes)."""
    for name in contract.TEXT_INPUTS:
        _add_tensor(config.input, name, mc.TYPE_STRING, [1], optional=True)
    if content_length:
        _add_tensor(config.input, contract.CONTENT_LENGTH_INPUT, mc.TYPE_INT32, [1], optional=True)


def _add_decision_outputs(config: mc.ModelConfig, spec: FilterSpec) -> None:
    """What the decision step answers (contract.DECISION_OUTPUTS); ``tier`` indexes the tiers in the ensemble's filter parameter."""
    kinds = {
        contract.FINAL_SCORES: (mc.TYPE_FP32, spec.num_labels),
        contract.WEIGHTED_AVERAGE: (mc.TYPE_FP32, 1),
        contract.GATEKEEPER_APPLIED: (mc.TYPE_BOOL, 1),
        contract.RAW_WEIGHTED_AVERAGE: (mc.TYPE_FP32, 1),
        contract.TIER: (mc.TYPE_INT32, 1),
        contract.SHORT_CONTENT_CAP_APPLIED: (mc.TYPE_BOOL, 1),
        contract.CONTENT_LENGTH: (mc.TYPE_INT32, 1),
    }
    for name in contract.DECISION_OUTPUTS:
        data_type, width = kinds[name]
        _add_tensor(config.output, name, data_type, [width])


def tokenizer_config(
    spec: FilterSpec, *, max_batch_size: int, pad_token_id: int, bucket: int, max_text_bytes: int, tensor_model: str
) -> mc.ModelConfig:
    """A filter's tokenizer step: its template and head+tail cut (:func:`token_step_config`)."""
    return token_step_config(
        contract.tokenizer_model(spec.name), max_length=spec.max_length, text_template=spec.text_template,
        head_tail=json.dumps(spec.head_tail.to_dict(), ensure_ascii=False) if spec.head_tail else "",
        max_batch_size=max_batch_size, pad_token_id=pad_token_id, bucket=bucket, max_text_bytes=max_text_bytes,
        tensor_model=tensor_model,
    )


def token_step_config(
    name: str, *, max_length: int, text_template: str, head_tail: str, max_batch_size: int, pad_token_id: int, bucket: int,
    max_text_bytes: int, tensor_model: str,
) -> mc.ModelConfig:
    """The tokenizer step (``templates/tokenizer_model.py``) of a filter or of the stage-1 embedder.
    ``head_tail``: the cut as JSON ({"head_tokens", "tail_tokens", "separator"}), or "" for none."""
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    _add_text_inputs(config)
    for token_input in contract.TOKEN_INPUTS:
        _add_tensor(config.output, token_input, mc.TYPE_INT64, [-1])
    _add_tensor(config.output, contract.N_TOKENS, mc.TYPE_INT32, [1])
    _add_tensor(config.output, contract.TRUNCATED, mc.TYPE_BOOL, [1])
    _add_tensor(config.output, contract.CONTENT_LENGTH, mc.TYPE_INT32, [1])
    _add_tensor(config.output, contract.SCREENED, mc.TYPE_BOOL, [1])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _dynamic_batching(config, max_batch_size, TOKENIZER_QUEUE_DELAY_US)
    _set_params(config, {
        "max_length": max_length,
        "pad_token_id": pad_token_id,
        "bucket": bucket,
        "max_text_bytes": max_text_bytes,
        "text_template": text_template,
        "head_tail": head_tail,
        "tensor_model": tensor_model,
        # The step runs without this package: it names its counters from here (filterserve.contract).
        "real_tokens_metric": contract.REAL_TOKENS_METRIC,
        "computed_tokens_metric": contract.COMPUTED_TOKENS_METRIC,
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
    _add_tensor(config.input, contract.CONTENT_LENGTH_INPUT, mc.TYPE_INT32, [1])
    _add_tensor(config.input, contract.SCREENED, mc.TYPE_BOOL, [1])
    _add_tensor(config.output, contract.SCORES, mc.TYPE_FP32, [spec.num_labels])
    _add_decision_outputs(config, spec)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _dynamic_batching(config, max_batch_size, DECISION_QUEUE_DELAY_US)
    return config


def _add_warmup(config: mc.ModelConfig, batch_size: int, dims: list[int]) -> None:
    """Zero ids under a mask of ones. Token id 0 is in every vocabulary; the mask comes from a file
    (written by :func:`write_tensor_model`) because Triton has no "ones_data"."""
    warmup = config.model_warmup.add(name="zeros_and_ones", batch_size=batch_size)
    ids_name, mask_name = contract.TOKEN_INPUTS
    warmup.inputs[ids_name].CopyFrom(mc.ModelWarmup.Input(data_type=mc.TYPE_INT64, dims=dims, zero_data=True))
    warmup.inputs[mask_name].CopyFrom(mc.ModelWarmup.Input(data_type=mc.TYPE_INT64, dims=dims, input_data_file=mask_name))


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
    _add_warmup(config, min(WARMUP_BATCH, max_batch_size), [WARMUP_SEQ_LEN])
    if tensorrt is not None:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters.update(tensorrt.parameters())
    rules = TokenRules(vocab_size=vocab_size, pad_token_id=pad_token_id, max_length=spec.max_length,
                       max_batch_tokens=max_batch_tokens or max_batch_size * spec.max_length)
    _set_params(config, {**rules.parameters(), "precision": precision})
    return config


def openvino_model_config(spec: FilterSpec, model_name: str, *, precision: str) -> mc.ModelConfig:
    """Triton's OpenVINO backend (NVIDIA's x86 container; the stand-in here), with only the parameters it reads.

    ``max_batch_size`` 0 and full shapes: with a batch size the backend would fix every run at
    ``max_batch_size`` rows (see :mod:`filterserve.model_repository.runtime.openvino`). Each request runs
    alone, at its own shape. The stand-in's input rules go beside the config (:func:`write_repository`).
    """
    config = mc.ModelConfig(
        name=model_name, backend=openvino.BACKEND, max_batch_size=0, default_model_filename=openvino.MODEL_FILE
    )
    for name in contract.TOKEN_INPUTS:
        _add_tensor(config.input, name, mc.TYPE_INT64, [-1, -1])
    _add_tensor(config.output, contract.LOGITS, mc.TYPE_FP32, [-1, spec.num_labels])
    _add_tensor(config.output, contract.WEIGHTED_SCORE, mc.TYPE_FP32, [-1, 1])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _add_warmup(config, 1, [WARMUP_BATCH, WARMUP_SEQ_LEN])
    _set_params(config, openvino.backend_parameters(bf16=precision == "bf16"))
    return config


def openvino_rules(settings: RepositorySettings, max_length: int, pad_token_id: int, vocab_size: int) -> dict[str, int]:
    """The input rules the OpenVINO stand-in checks, as the ONNX Runtime stand-in reads them from its config."""
    return TokenRules(vocab_size=vocab_size, pad_token_id=pad_token_id, max_length=max_length,
                      max_batch_tokens=settings.max_batch_tokens or settings.max_batch_size * max_length).parameters()


def ensemble_config(spec: FilterSpec, *, max_batch_size: int, tensor_model: str) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, platform="ensemble", max_batch_size=max_batch_size)
    _add_text_inputs(config)
    _add_tensor(config.output, contract.SCORES, mc.TYPE_FP32, [spec.num_labels])
    _add_tensor(config.output, contract.WEIGHTED_SCORE, mc.TYPE_FP32, [1])
    _add_decision_outputs(config, spec)
    _add_tensor(config.output, contract.N_TOKENS, mc.TYPE_INT32, [1])
    _add_tensor(config.output, contract.TRUNCATED, mc.TYPE_BOOL, [1])
    tokens = {name: f"_{name}" for name in contract.TOKEN_INPUTS}
    # The length and the row kind go to the decision step, which answers the length (no ensemble
    # output may feed a step, contract.py).
    rows = {contract.CONTENT_LENGTH: f"_{contract.CONTENT_LENGTH}", contract.SCREENED: f"_{contract.SCREENED}"}
    config.ensemble_scheduling.step.add(
        model_name=contract.tokenizer_model(spec.name),
        model_version=-1,
        input_map={name: name for name in (*contract.TEXT_INPUTS, contract.CONTENT_LENGTH_INPUT)},
        output_map={**tokens, **rows, contract.N_TOKENS: contract.N_TOKENS, contract.TRUNCATED: contract.TRUNCATED},
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
        input_map={contract.LOGITS: f"_{contract.LOGITS}", contract.CONTENT_LENGTH_INPUT: rows[contract.CONTENT_LENGTH],
                   contract.SCREENED: rows[contract.SCREENED]},
        output_map={name: name for name in (contract.SCORES, *contract.DECISION_OUTPUTS)},
    )
    # Clients read the filter (dimensions, weights, template, rules) from the server's config.
    _set_params(config, {contract.FILTER_PARAMETER: json.dumps(spec.to_dict(), ensure_ascii=False)})
    return config


def _write_config(model_dir: Path, config: mc.ModelConfig) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(_to_text(config), encoding="utf-8")


def write_tensor_model(model_dir: Path, config: mc.ModelConfig) -> None:
    """A tensor model's config and the warm-up mask file it names (ONNX, OpenVINO and TensorRT alike)."""
    _write_config(model_dir, config)
    (model_dir / "warmup").mkdir(exist_ok=True)
    mask = config.model_warmup[0].inputs[contract.TOKEN_INPUTS[1]]
    np.ones(int(np.prod(mask.dims)), dtype="<i8").tofile(model_dir / "warmup" / mask.input_data_file)


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
    settings: RepositorySettings,
    *,
    tokenizer_dir: Path,
    precisions: list[str],
    default_precision: str,
    pad_token_id: int,
    vocab_size: int,
    executions: dict[str, str] | None = None,
) -> None:
    """Complete the repository around the ONNX files (OpenVINO IR for its variants) the export already wrote into ``repo``.

    ``settings`` is how the server runs the filter; the keywords are facts of the exported model.
    With ``settings.gpu``, every tensor model runs on a GPU instance and the fp16 variant, the one
    whose parity and gate figures describe FP16 arithmetic, gets ONNX Runtime's TensorRT accelerator,
    its engines cached under ``trt_cache_root/<model>/<checksum of its ONNX files>``.
    ``executions``: the execution precision each OpenVINO variant was gated at, which its
    stand-in holds it to.
    """
    repo = Path(repo)
    tokenizer_dir = Path(tokenizer_dir)
    settings.check(spec)
    if default_precision not in precisions:
        raise FilterServeError(f"default precision {default_precision!r} is not among the exported {precisions}")
    if not 0 <= pad_token_id < vocab_size:
        raise FilterServeError(f"pad_token_id {pad_token_id} is outside the vocabulary [0, {vocab_size})")
    max_batch_size = settings.max_batch_size

    for precision in precisions:
        model_name = tensor_model_name(spec.name, precision, default_precision)
        model_dir = repo / model_name
        if precision in contract.OPENVINO_PRECISIONS:  # CPU only, whatever settings.gpu says (ExportOptions refuses both)
            if not (model_dir / "1" / openvino.MODEL_FILE).is_file():
                raise FilterServeError(f"{precision} tensor model missing: expected {model_dir / '1' / openvino.MODEL_FILE}")
            write_tensor_model(model_dir, openvino_model_config(spec, model_name, precision=precision))
            openvino.write_standin_file(model_dir, openvino_rules(settings, spec.max_length, pad_token_id, vocab_size),
                                        (executions or {}).get(precision))
            continue
        if not (model_dir / "1" / "model.onnx").is_file():
            raise FilterServeError(f"{precision} tensor model missing: expected {model_dir / '1' / 'model.onnx'}")
        tensorrt = None
        if settings.gpu and precision == TENSORRT_PRECISION:
            tensorrt = TensorRTAccelerator(
                profile=serving_profile(max_batch_size, spec.max_length, settings.bucket),
                cache_dir=engine_cache_dir(settings.trt_cache_root, model_name, onnx_checksum(model_dir / "1" / "model.onnx")),
            )
        config = tensor_model_config(
            spec,
            model_name,
            precision=precision,
            max_batch_size=max_batch_size,
            pad_token_id=pad_token_id,
            vocab_size=vocab_size,
            gpu=settings.gpu,
            tensorrt=tensorrt,
            max_batch_tokens=settings.max_batch_tokens,
        )
        write_tensor_model(model_dir, config)

    write_filter_steps(repo, spec, settings, tokenizer_dir=tokenizer_dir, pad_token_id=pad_token_id,
                       tensor_model=contract.tensor_model(spec.name))


def write_token_step(repo: Path, config: mc.ModelConfig, tokenizer_dir: Path) -> None:
    """A tokenizer step's folder: its config, the tokenizer files, the step's code and the modules it loads by path."""
    _write_config(repo / config.name, config)
    _copy_tokenizer(tokenizer_dir, repo / config.name / "1" / "tokenizer")
    shutil.copy2(TOKENIZER_TEMPLATE, repo / config.name / "1" / "model.py")
    for module in STEP_MODULES:
        shutil.copy2(module, repo / config.name / "1" / module.name)


def write_filter_steps(
    repo: Path,
    spec: FilterSpec,
    settings: RepositorySettings,
    *,
    tokenizer_dir: Path,
    pad_token_id: int,
    tensor_model: str,
    logits_width: int | None = None,
    amend: Callable[[dict[str, mc.ModelConfig]], None] | None = None,
) -> None:
    """A filter's decision step, tokenizer step and ensemble (over ``tensor_model``), the ensemble last.

    A shared-base group's member (:mod:`filterserve.model_repository.group`) reads ``logits``
    ``logits_width`` wide, and its ``amend`` changes the configs (model name → config) before they are written.
    """
    tokenizer_name, decision_name = contract.tokenizer_model(spec.name), contract.decision_model(spec.name)
    configs = {
        decision_name: decision_config(spec, max_batch_size=settings.max_batch_size),
        tokenizer_name: tokenizer_config(
            spec,
            max_batch_size=settings.max_batch_size,
            pad_token_id=pad_token_id,
            bucket=settings.bucket,
            max_text_bytes=settings.max_text_bytes,
            tensor_model=tensor_model,
        ),
        spec.name: ensemble_config(spec, max_batch_size=settings.max_batch_size, tensor_model=tensor_model),
    }
    if amend is not None:
        amend(configs)
    _write_config(repo / decision_name, configs[decision_name])
    write_decision_model(repo / decision_name / "1" / "model.onnx", spec, logits_width)

    write_token_step(repo, configs[tokenizer_name], Path(tokenizer_dir))

    _write_config(repo / spec.name, configs[spec.name])
    (repo / spec.name / "1").mkdir(exist_ok=True)  # Triton needs a version folder, even if empty


# ---- the stage-1 embedder and the probes (issue 26) ------------------------------------------------
# EMBEDDER_TEMPLATE: production's embedder input (EmbeddingStage._prepare_text) for a row with both
# a title and a content; a plain caller whose article lacks one sends the other as TEXT.
EMBEDDER_TEMPLATE = "{title}\n\n{content}"


@dataclass(frozen=True)
class EmbedderFacts:
    """What the repository's configs need of the exported stage-1 embedder."""

    width: int
    max_length: int
    pad_token_id: int
    vocab_size: int


def embedder_tensor_config(facts: EmbedderFacts, settings: RepositorySettings) -> mc.ModelConfig:
    """``tensor_model(EMBEDDER)``: TOKEN_INPUTS → EMBEDDING, on ONNX Runtime, checked and budgeted as a filter's tensor model."""
    config = mc.ModelConfig(
        name=contract.tensor_model(contract.EMBEDDER), backend="onnxruntime", max_batch_size=settings.max_batch_size,
        default_model_filename="model.onnx",
    )
    for name in contract.TOKEN_INPUTS:
        _add_tensor(config.input, name, mc.TYPE_INT64, [-1])
    _add_tensor(config.output, contract.EMBEDDING, mc.TYPE_FP32, [facts.width])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _dynamic_batching(config, settings.max_batch_size, TENSOR_QUEUE_DELAY_US)
    _add_warmup(config, min(WARMUP_BATCH, settings.max_batch_size), [WARMUP_SEQ_LEN])
    rules = TokenRules(vocab_size=facts.vocab_size, pad_token_id=facts.pad_token_id, max_length=facts.max_length,
                       max_batch_tokens=settings.max_batch_tokens or settings.max_batch_size * facts.max_length)
    _set_params(config, {**rules.parameters(), "precision": "fp32"})
    return config


def embedder_ensemble_config(facts: EmbedderFacts, settings: RepositorySettings) -> mc.ModelConfig:
    """``EMBEDDER``: TEXT, or TITLE + CONTENT → EMBEDDING (and how much of the article it read)."""
    config = mc.ModelConfig(name=contract.EMBEDDER, platform="ensemble", max_batch_size=settings.max_batch_size)
    _add_text_inputs(config, content_length=False)
    _add_tensor(config.output, contract.EMBEDDING, mc.TYPE_FP32, [facts.width])
    _add_tensor(config.output, contract.N_TOKENS, mc.TYPE_INT32, [1])
    _add_tensor(config.output, contract.TRUNCATED, mc.TYPE_BOOL, [1])
    tokens = {name: f"_{name}" for name in contract.TOKEN_INPUTS}
    config.ensemble_scheduling.step.add(
        model_name=contract.tokenizer_model(contract.EMBEDDER), model_version=-1,
        input_map={name: name for name in contract.TEXT_INPUTS},
        output_map={**tokens, contract.N_TOKENS: contract.N_TOKENS, contract.TRUNCATED: contract.TRUNCATED},
    )
    config.ensemble_scheduling.step.add(
        model_name=contract.tensor_model(contract.EMBEDDER), model_version=-1, input_map=tokens,
        output_map={contract.EMBEDDING: contract.EMBEDDING},
    )
    return config


def embedder_models() -> list[str]:
    """The embedder's model folders, the ensemble last."""
    return [contract.tensor_model(contract.EMBEDDER), contract.tokenizer_model(contract.EMBEDDER), contract.EMBEDDER]


def write_embedder(repo: Path, facts: EmbedderFacts, settings: RepositorySettings, *, tokenizer_dir: Path) -> None:
    """The embedder's configs, tokenizer step and ensemble around the ONNX file the export wrote
    into ``repo/tensor_model(EMBEDDER)/1``."""
    tensor_dir = repo / contract.tensor_model(contract.EMBEDDER)
    if not (tensor_dir / "1" / "model.onnx").is_file():
        raise FilterServeError(f"stage-1 embedder model missing: expected {tensor_dir / '1' / 'model.onnx'}")
    write_tensor_model(tensor_dir, embedder_tensor_config(facts, settings))
    write_token_step(repo, token_step_config(
        contract.tokenizer_model(contract.EMBEDDER), max_length=facts.max_length, text_template=EMBEDDER_TEMPLATE,
        head_tail="", max_batch_size=settings.max_batch_size, pad_token_id=facts.pad_token_id, bucket=settings.bucket,
        max_text_bytes=settings.max_text_bytes, tensor_model=contract.tensor_model(contract.EMBEDDER),
    ), tokenizer_dir)
    _write_config(repo / contract.EMBEDDER, embedder_ensemble_config(facts, settings))
    (repo / contract.EMBEDDER / "1").mkdir(exist_ok=True)


def probe_config(spec: FilterSpec, width: int, settings: RepositorySettings) -> mc.ModelConfig:
    """``probe_model(<name>)``: EMBEDDING → PROBE_SCORES, a few Gemm layers on ONNX Runtime."""
    config = mc.ModelConfig(
        name=contract.probe_model(spec.name), backend="onnxruntime", max_batch_size=settings.max_batch_size,
        default_model_filename="model.onnx",
    )
    _add_tensor(config.input, contract.EMBEDDING, mc.TYPE_FP32, [width])
    _add_tensor(config.output, contract.PROBE_SCORES, mc.TYPE_FP32, [spec.num_labels])
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _dynamic_batching(config, settings.max_batch_size, DECISION_QUEUE_DELAY_US)
    return config


def write_probe(repo: Path, spec: FilterSpec, width: int, settings: RepositorySettings) -> None:
    """The probe's config beside the ONNX file the export wrote into ``repo/probe_model(<name>)/1``."""
    model_dir = repo / contract.probe_model(spec.name)
    if not (model_dir / "1" / "model.onnx").is_file():
        raise FilterServeError(f"stage-1 probe model missing: expected {model_dir / '1' / 'model.onnx'}")
    _write_config(model_dir, probe_config(spec, width, settings))


HYBRID_TEMPLATE = Path(runtime.__file__).resolve().parent / "templates" / "hybrid_model.py"


def _add_hybrid_outputs(config: mc.ModelConfig, spec: FilterSpec) -> None:
    """The stage-2 ensemble's outputs, then STAGE_USED and STAGE1_ESTIMATE."""
    _add_tensor(config.output, contract.SCORES, mc.TYPE_FP32, [spec.num_labels])
    _add_tensor(config.output, contract.WEIGHTED_SCORE, mc.TYPE_FP32, [1])
    _add_decision_outputs(config, spec)
    _add_tensor(config.output, contract.N_TOKENS, mc.TYPE_INT32, [1])
    _add_tensor(config.output, contract.TRUNCATED, mc.TYPE_BOOL, [1])
    _add_tensor(config.output, contract.STAGE_USED, mc.TYPE_STRING, [1])
    _add_tensor(config.output, contract.STAGE1_ESTIMATE, mc.TYPE_FP32, [1])


def hybrid_step_config(spec: FilterSpec, settings: RepositorySettings, threshold: float) -> mc.ModelConfig:
    """``hybrid_model(<name>)``: the BLS step (``templates/hybrid_model.py``) and what it reads."""
    config = mc.ModelConfig(name=contract.hybrid_model(spec.name), backend="python", max_batch_size=settings.max_batch_size)
    _add_text_inputs(config)
    _add_hybrid_outputs(config, spec)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _dynamic_batching(config, settings.max_batch_size, TOKENIZER_QUEUE_DELAY_US)
    _set_params(config, {
        "threshold": repr(float(threshold)),
        "weights": json.dumps(list(spec.weights)),
        "embedder": contract.EMBEDDER,
        "probe_model": contract.probe_model(spec.name),
        "stage2_model": contract.stage2_model(spec.name),
        "decision_model": contract.decision_model(spec.name),
    })
    return config


def hybrid_ensemble_config(spec: FilterSpec, settings: RepositorySettings) -> mc.ModelConfig:
    """``<name>``: one step, the BLS; it carries the filter description, as every filter's ensemble does."""
    config = mc.ModelConfig(name=spec.name, platform="ensemble", max_batch_size=settings.max_batch_size)
    _add_text_inputs(config)
    _add_hybrid_outputs(config, spec)
    config.ensemble_scheduling.step.add(
        model_name=contract.hybrid_model(spec.name), model_version=-1,
        input_map={name: name for name in (*contract.TEXT_INPUTS, contract.CONTENT_LENGTH_INPUT)},
        output_map={name: name for name in contract.HYBRID_OUTPUTS},
    )
    _set_params(config, {contract.FILTER_PARAMETER: json.dumps(spec.to_dict(), ensure_ascii=False)})
    return config


def hybrid_models(name: str) -> list[str]:
    """The models a hybrid filter adds to its own: the probe, stage 2's ensemble, the BLS step."""
    return [contract.probe_model(name), contract.stage2_model(name), contract.hybrid_model(name)]


def write_hybrid(repo: Path, spec: FilterSpec, settings: RepositorySettings, *, threshold: float) -> None:
    """Turn a filter written by :func:`write_repository` into a hybrid one: its ensemble becomes
    ``stage2_model(<name>)`` (without the filter description, so clients list the filter once), and
    ``<name>`` the one call through the BLS step."""
    stage2 = ensemble_config(spec, max_batch_size=settings.max_batch_size, tensor_model=contract.tensor_model(spec.name))
    stage2.name = contract.stage2_model(spec.name)
    del stage2.parameters[contract.FILTER_PARAMETER]
    shutil.rmtree(repo / spec.name)
    _write_config(repo / stage2.name, stage2)
    (repo / stage2.name / "1").mkdir(exist_ok=True)
    step = hybrid_step_config(spec, settings, threshold)
    _write_config(repo / step.name, step)
    (repo / step.name / "1").mkdir(exist_ok=True)
    shutil.copy2(HYBRID_TEMPLATE, repo / step.name / "1" / "model.py")
    shutil.copy2(Path(contract.__file__), repo / step.name / "1" / "contract.py")
    _write_config(repo / spec.name, hybrid_ensemble_config(spec, settings))
    (repo / spec.name / "1").mkdir(exist_ok=True)
