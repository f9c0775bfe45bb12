"""A stand-in for Triton's ONNX Runtime backend, written as a Python backend model.

The pytriton wheel's tritonserver has no ONNX Runtime backend library, so ``backend:
"onnxruntime"`` would fail to load there. Placed in the backend directory as
``onnxruntime/model.py``, this stand-in serves the unchanged container-style model folder with
the onnxruntime Python package; in NVIDIA's container Triton's C++ backend takes over. Every
"served" CPU figure in this project's README was measured through this stand-in.

Token models are checked before they run (lengths, vocabulary, a right-padded mask with the pad
id under it) and run in pieces of at most ``max_batch_tokens`` tokens.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils



def _invalid(message: str) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def _cpu_allowance() -> int:
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


def _providers(instance_kind: str, device_id: int) -> list:
    available = ort.get_available_providers()
    if instance_kind == "GPU":
        gpu = [(p, {"device_id": device_id}) for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        return gpu + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        filename = config.get("default_model_filename") or "model.onnx"
        path = Path(args["model_repository"]) / args["model_version"] / filename
        providers = _providers(args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = _cpu_allowance()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        params = {key: int(value["string_value"]) for key, value in config.get("parameters", {}).items()
                  if key in ("vocab_size", "pad_token_id", "max_length", "max_batch_tokens")}
        # Token models (vocab_size set) get their inputs checked; small models (the decision step) do not.
        self.token_rules = params if "vocab_size" in params else None
        self.max_batch_tokens = params.get("max_batch_tokens")

    def _validate(self, feeds: dict[str, np.ndarray]) -> str | None:
        """The tensor model pools at the last token whose id is not the pad id and ignores the mask,
        so a request padded any other way would be scored at a padding position, silently."""
        rules = self.token_rules
        if rules is None:
            return None
        input_ids, attention_mask = feeds["input_ids"], feeds["attention_mask"]
        if input_ids.shape != attention_mask.shape:
            return f"attention_mask shape {list(attention_mask.shape)} does not match input_ids shape {list(input_ids.shape)}"
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            return f"input_ids must have shape [batch, seq] with seq >= 1, got {list(input_ids.shape)}"
        if input_ids.shape[1] > rules["max_length"]:
            return f"sequence length {input_ids.shape[1]} exceeds max_length {rules['max_length']}"
        bad = (input_ids < 0) | (input_ids >= rules["vocab_size"])
        if bad.any():
            return f"input_ids holds token id {int(input_ids[bad][0])} outside the vocabulary [0, {rules['vocab_size']})"
        real = attention_mask.sum(axis=1)
        prefix = np.arange(attention_mask.shape[1]) < real[:, None]
        if not np.array_equal(attention_mask, prefix.astype(attention_mask.dtype)):
            return "attention_mask must be a right-padded prefix of ones (values 0 and 1, ones first) in every row"
        if (real == 0).any():
            return f"row {int(np.argmin(real))} is all padding: no token to score"
        if (input_ids[~prefix] != rules["pad_token_id"]).any():
            return f"padding positions (attention_mask 0) must hold the pad token id {rules['pad_token_id']}"
        return None

    def _runs(self, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Rows split so that no run holds more than max_batch_tokens tokens (one row at least)."""
        rows, *rest = next(iter(feeds.values())).shape
        per_row = int(np.prod(rest)) if self.token_rules else 0
        step = max(1, self.max_batch_tokens // per_row) if self.max_batch_tokens and per_row else rows
        return [{name: value[i : i + step] for name, value in feeds.items()} for i in range(0, rows, step)]

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, request in enumerate(requests):
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
            error = self._validate(feeds)
            if error:
                responses[index] = _invalid(error)
            else:
                groups.setdefault(tuple(f.shape[1:] for f in feeds.values()), []).append((index, feeds))

        # One session run per shape: requests the batcher joined share one.
        for members in groups.values():
            feeds = {name: np.concatenate([f[name] for _, f in members]) for name in self.input_names}
            try:
                runs = [self.session.run(self.output_names, run) for run in self._runs(feeds)]
                outputs = [np.concatenate(parts) for parts in zip(*runs)]
            except Exception as exc:  # an ONNX Runtime failure fails this group, not the others
                for index, _ in members:
                    responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"ONNX Runtime: {exc}"))
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
