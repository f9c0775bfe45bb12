"""The Triton side of a shared-base group: its tensor model's config, and what each member's steps add.

A member keeps its public ensemble (``<name>``: TEXT or TITLE + CONTENT in, the contract's outputs)
and its own tokenizer and decision steps. Three things differ from a merged filter:

- the tokenizer step also answers ``filter_index`` (INT64 [1], the member's index in its group),
  set from its config, and the ensemble passes it to the group's tensor model beside the tokens;
- the tensor step is the group's ``<group>_onnx``, whose ``logits`` are as wide as the widest member;
- the decision step reads ``logits`` that wide and keeps its own first ``n_dims`` columns.

Because every member's rows carry their index, the group's dynamic batcher may join requests of
different filters into one run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from filterserve import contract
from filterserve.filters import FilterSpec
from filterserve.model_repository.repository import (
    WARMUP_BATCH,
    RepositorySettings,
    _add_tensor,
    _set_params,
    openvino_model_config,
    openvino_rules,
    tensor_model_config,
    write_filter_steps,
    write_tensor_model,
)
from filterserve.model_repository.runtime import openvino


def group_tensor_config(
    name: str,
    members: list[FilterSpec],
    settings: RepositorySettings,
    *,
    pad_token_id: int,
    vocab_size: int,
    precision: str = "fp32",
) -> mc.ModelConfig:
    """As a merged tensor model's, for the widest member at the longest member's max_length, plus ``filter_index``.

    fp32 runs on ONNX Runtime and lists the members in a parameter (the stand-in checks each row's
    index against them); bf16 on Triton's OpenVINO backend, whose config holds only that backend's
    parameters (its stand-in reads the members from :data:`openvino.STANDIN_FILE`).
    """
    import json

    widest = max(members, key=lambda spec: spec.num_labels)
    shape = replace(widest, name=name, max_length=max(spec.max_length for spec in members))
    if precision in contract.OPENVINO_PRECISIONS:
        config = openvino_model_config(shape, contract.tensor_model(name), precision=precision)
        _add_tensor(config.input, contract.FILTER_INDEX, mc.TYPE_INT64, [-1, 1])
        index_dims = [WARMUP_BATCH, 1]
    else:
        config = tensor_model_config(
            shape,
            contract.tensor_model(name),
            precision=precision,
            max_batch_size=settings.max_batch_size,
            pad_token_id=pad_token_id,
            vocab_size=vocab_size,
            gpu=settings.gpu,
            max_batch_tokens=settings.max_batch_tokens,
        )
        _add_tensor(config.input, contract.FILTER_INDEX, mc.TYPE_INT64, [1])
        _set_params(config, {contract.GROUP_MEMBERS_PARAMETER: json.dumps([spec.name for spec in members])})
        index_dims = [1]
    for warmup in config.model_warmup:  # index 0 is every group's first member
        warmup.inputs[contract.FILTER_INDEX].CopyFrom(mc.ModelWarmup.Input(data_type=mc.TYPE_INT64, dims=index_dims, zero_data=True))
    return config


def write_group_tensor_model(repo: Path, name: str, members: list[FilterSpec], settings: RepositorySettings, *,
                             pad_token_id: int, vocab_size: int, precision: str = "fp32",
                             execution_precision: str | None = None) -> None:
    """The config beside the group's model file (ONNX, or OpenVINO's IR for bf16), which the export
    already wrote into ``repo/<name>_onnx/1``; for bf16 also the stand-in's file, with the precision gated."""
    config = group_tensor_config(name, members, settings, pad_token_id=pad_token_id, vocab_size=vocab_size,
                                 precision=precision)
    model_dir = repo / contract.tensor_model(name)
    write_tensor_model(model_dir, config)
    if precision in contract.OPENVINO_PRECISIONS:
        max_length = max(spec.max_length for spec in members)
        openvino.write_standin_file(model_dir, openvino_rules(settings, max_length, pad_token_id, vocab_size),
                                    execution_precision, [spec.name for spec in members])


def _with_filter_index(configs: dict[str, mc.ModelConfig], spec: FilterSpec, index: int, width: int) -> None:
    """Amend a merged filter's step configs into a member's (see the module's docstring)."""
    tokenizer = configs[contract.tokenizer_model(spec.name)]
    _add_tensor(tokenizer.output, contract.FILTER_INDEX, mc.TYPE_INT64, [1])
    _set_params(tokenizer, {contract.FILTER_INDEX: index})  # the client reads it too
    decision = configs[contract.decision_model(spec.name)]
    logits = next(t for t in decision.input if t.name == contract.LOGITS)
    del logits.dims[:]
    logits.dims.append(width)
    ensemble = configs[spec.name]
    tokenizer_step, tensor_step = ensemble.ensemble_scheduling.step[0], ensemble.ensemble_scheduling.step[1]
    tokenizer_step.output_map[contract.FILTER_INDEX] = f"_{contract.FILTER_INDEX}"
    tensor_step.input_map[contract.FILTER_INDEX] = f"_{contract.FILTER_INDEX}"


def write_member_steps(
    repo: Path,
    spec: FilterSpec,
    settings: RepositorySettings,
    *,
    group: str,
    index: int,
    width: int,
    tokenizer_dir: Path,
    pad_token_id: int,
) -> None:
    """A member's ensemble, tokenizer step and decision step, wired to the group's tensor model."""
    write_filter_steps(
        repo, spec, settings, tokenizer_dir=tokenizer_dir, pad_token_id=pad_token_id,
        tensor_model=contract.tensor_model(group), logits_width=width,
        amend=lambda configs: _with_filter_index(configs, spec, index, width),
    )
