"""What the Python-backend stand-ins for Triton's C++ tensor backends (onnxruntime, openvino) share.

The pytriton wheel's tritonserver has neither backend library, so each is stood in for by a
Python backend model in the backend directory (``backends/<name>/model.py``) that loads the
unchanged container-style model folder. Both check a token model's input the same way before it
runs, split a run to a token budget, and answer the requests the batcher joined from one run
per shape; only loading and running differ. They run only under ``filterserve serve`` (its
interpreter is the stub's ``python3``), so they import this package; in NVIDIA's container
Triton's C++ backends take their place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from filterserve import contract


def cpu_allowance() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota (a pod's CPU limit).

    ONNX Runtime sizes its thread pool from the machine's cores; in a pod limited to 2 of 64
    cores, 64 threads would fight over 2 and run slower than 2 threads.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


@dataclass(frozen=True)
class TokenRules:
    """What a request to a token model must look like; ``max_batch_tokens`` bounds one run."""

    vocab_size: int
    pad_token_id: int
    max_length: int
    max_batch_tokens: int | None = None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The keys under which the writer records the rules: a tensor model's config parameters
        (ONNX Runtime) or the OpenVINO stand-in's file."""
        return tuple(field.name for field in fields(cls))

    def parameters(self) -> dict[str, int]:
        """The rules as the writer records them, and :meth:`from_mapping` reads them back."""
        return {name: value for name in self.names() if (value := getattr(self, name)) is not None}

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> TokenRules:
        return cls(
            vocab_size=int(values["vocab_size"]),
            pad_token_id=int(values["pad_token_id"]),
            max_length=int(values["max_length"]),
            max_batch_tokens=int(values["max_batch_tokens"]) if values.get("max_batch_tokens") is not None else None,
        )

    def check(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> str | None:
        """The tensor model pools at the last token whose id is not the pad id and ignores the mask,
        so a request padded any other way would be scored at a padding position, silently."""
        if input_ids.shape != attention_mask.shape:
            return f"attention_mask shape {list(attention_mask.shape)} does not match input_ids shape {list(input_ids.shape)}"
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            return f"input_ids must have shape [batch, seq] with seq >= 1, got {list(input_ids.shape)}"
        if input_ids.shape[1] > self.max_length:
            return f"sequence length {input_ids.shape[1]} exceeds max_length {self.max_length}"
        bad = (input_ids < 0) | (input_ids >= self.vocab_size)
        if bad.any():
            return f"input_ids holds token id {int(input_ids[bad][0])} outside the vocabulary [0, {self.vocab_size})"
        real = attention_mask.sum(axis=1)
        prefix = np.arange(attention_mask.shape[1]) < real[:, None]
        if not np.array_equal(attention_mask, prefix.astype(attention_mask.dtype)):
            return "attention_mask must be a right-padded prefix of ones (values 0 and 1, ones first) in every row"
        if (real == 0).any():
            return f"row {int(np.argmin(real))} is all padding: no token to score"
        if (input_ids[~prefix] != self.pad_token_id).any():
            return f"padding positions (attention_mask 0) must hold the pad token id {self.pad_token_id}"
        return None


def split_runs(feeds: dict[str, np.ndarray], max_batch_tokens: int | None) -> list[dict[str, np.ndarray]]:
    """Rows split so that no run holds more than ``max_batch_tokens`` tokens (one row at least)."""
    rows, *rest = next(iter(feeds.values())).shape
    per_row = int(np.prod(rest))
    step = max(1, max_batch_tokens // per_row) if max_batch_tokens and per_row else rows
    return [{name: value[i : i + step] for name, value in feeds.items()} for i in range(0, rows, step)]


def own_rows(feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Each row alone, cut to its own tokens (the attention mask's ones): for a model whose arithmetic
    spans the whole run (:data:`~filterserve.contract.PER_RUN_SCALED_PRECISIONS`), so that a row's
    result depends on its article only, never on the rows or the padding it arrived with."""
    real = feeds[contract.TOKEN_INPUTS[1]].sum(axis=1)
    return [{name: value[i : i + 1, : real[i]] if name in contract.TOKEN_INPUTS else value[i : i + 1]
             for name, value in feeds.items()} for i in range(len(real))]


class TensorBackend:
    """``TritonPythonModel`` of a stand-in: subclasses :meth:`load` the model and :meth:`run` one piece.

    ``self.token_rules`` (set by :meth:`load`) turns the input checks and the token budget on;
    small models (the decision step) have none. ``self.rows_alone`` (set by :meth:`load`) runs
    every row by itself (:func:`own_rows`) instead.
    """

    engine = "the tensor backend"  # named in the error of a failed run
    expected_errors: tuple[type[Exception], ...] = (RuntimeError,)

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        self.token_rules: TokenRules | None = None
        self.rows_alone = False
        # A shared-base group's tensor model lists its members: each row's filter_index must name one.
        members = config.get("parameters", {}).get(contract.GROUP_MEMBERS_PARAMETER, {}).get("string_value")
        self.members: int | None = len(json.loads(members)) if members else None
        self.load(Path(args["model_repository"]), args["model_version"], config, args)

    def load(self, model_dir: Path, version: str, config: dict, args: dict) -> None:
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs, in ``self.output_names`` order, of one run."""
        raise NotImplementedError

    def _check(self, feeds: dict[str, np.ndarray]) -> str | None:
        if self.token_rules is None:
            return None
        input_ids, attention_mask = (feeds[name] for name in contract.TOKEN_INPUTS)
        error = self.token_rules.check(input_ids, attention_mask)
        if error is None and self.members is not None:
            index = feeds[contract.FILTER_INDEX]
            if index.shape != (input_ids.shape[0], 1):
                return f"{contract.FILTER_INDEX} must have shape [batch, 1], got {list(index.shape)}"
            outside = (index < 0) | (index >= self.members)  # ONNX Gather would wrap a negative index to another filter
            if outside.any():
                return f"{contract.FILTER_INDEX} {int(index[outside][0])} names no filter of this group [0, {self.members})"
        return error

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, request in enumerate(requests):
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            error = self._check(feeds)
            if error:
                responses[index] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(error, pb_utils.TritonError.INVALID_ARG)
                )
            else:
                groups.setdefault(tuple(f.shape[1:] for f in feeds.values()), []).append((index, feeds))

        # One run per shape: requests the batcher joined share one.
        budget = self.token_rules.max_batch_tokens if self.token_rules else None
        for members in groups.values():
            feeds = {name: np.concatenate([f[name] for _, f in members]) for name in self.input_names}
            try:
                pieces = own_rows(feeds) if self.rows_alone else split_runs(feeds, budget)
                runs = [self.run(piece) for piece in pieces]
                outputs = [np.concatenate(parts) for parts in zip(*runs)]
            except self.expected_errors as exc:  # a failed run fails this group, not the others
                for index, _ in members:
                    responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.engine}: {exc}"))
                continue
            start = 0
            for index, request_feeds in members:
                end = start + next(iter(request_feeds.values())).shape[0]
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(out[start:end]))
                    for name, out in zip(self.output_names, outputs)
                ]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
                start = end
        return responses
