"""The supervisor's test inferences: what they send, and the facts that tell busy from broken.

A test inference that fails names no culprit, and one that is late may only wait behind a queue.
So the helpers here answer narrower questions, each within a deadline of its own: has the
ensemble's work moved on (:func:`completed_requests`), and which step fails when they are replayed
one by one (:func:`replay_steps`). What to do about the answers is the supervisor's business.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from filterserve import contract

PROBE_TEXT = "Volunteers rebuilt the village school. Classes resume on Monday."


@dataclass
class Probe:
    """A test inference in flight, and how much work the ensemble's models had completed."""

    sent_at: float
    launch: int
    completed: int
    progress_at: float
    late: bool = False
    error: InferenceServerException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Replay:
    """What replaying an ensemble's steps found: the first step that failed (and why), or one that
    answered late (busy: nothing to conclude), or neither (every step answers)."""

    failed_step: str | None = None
    message: str = ""
    late: bool = False


def is_late(error: InferenceServerException) -> bool:
    return "DEADLINE_EXCEEDED" in str(error.status())


def _tensor(name: str, data: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype))
    tensor.set_data_from_numpy(data)
    return tensor


def _probe_inputs() -> dict[str, np.ndarray]:
    return {contract.TEXT: np.array([[PROBE_TEXT.encode()]], dtype=object)}


def probe_tensors() -> list[grpcclient.InferInput]:
    """A filter ensemble's test request: one short, ordinary text."""
    return [_tensor(name, data) for name, data in _probe_inputs().items()]


def completed_requests(client: grpcclient.InferenceServerClient, models: set[str], timeout_s: float) -> int | None:
    """Requests ``models`` have answered so far (successes and failures); None if the statistics are late."""
    try:
        stats = client.get_inference_statistics(as_json=True, client_timeout=timeout_s)
    except InferenceServerException:
        return None
    total = 0
    for entry in stats.get("model_stats", []):
        if entry.get("name") in models:
            counts = entry.get("inference_stats", {})
            total += sum(int(counts.get(kind, {}).get("count", 0)) for kind in ("success", "fail"))
    return total


def replay_steps(client: grpcclient.InferenceServerClient, config: mc.ModelConfig, timeout_s: float) -> Replay:
    """The ensemble's steps one by one, each fed what the one before returned."""
    tensors = _probe_inputs()
    for step in config.ensemble_scheduling.step:
        inputs = [_tensor(model_input, tensors[tensor]) for model_input, tensor in step.input_map.items() if tensor in tensors]
        try:
            result = client.infer(step.model_name, inputs, client_timeout=timeout_s)
        except InferenceServerException as exc:
            if is_late(exc):
                return Replay(late=True)
            return Replay(failed_step=step.model_name, message=exc.message())
        tensors.update({tensor: result.as_numpy(out) for out, tensor in step.output_map.items()})
    return Replay()
