"""A Python-based Triton backend named ``onnxruntime``.

The pytriton wheel's tritonserver has no ONNX Runtime backend library, so ``backend:
"onnxruntime"`` would fail to load there. Placed in the backend directory as
``onnxruntime/model.py``, this shim serves the unchanged container-style model folder with the
onnxruntime Python package; in NVIDIA's container the real backend takes over.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils



def _invalid(message: str) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


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
        self.session = ort.InferenceSession(str(path), providers=providers)
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_names = [tensor["name"] for tensor in config["output"]]
        vocab = config.get("parameters", {}).get("vocab_size")
        # Token models (vocab_size set) get their ids checked; small models (the decision step) do not.
        self.vocab_size = int(vocab["string_value"]) if vocab else None

    def _validate(self, feeds: dict[str, np.ndarray]) -> str | None:
        if self.vocab_size is None:
            return None
        input_ids, attention_mask = feeds["input_ids"], feeds["attention_mask"]
        if input_ids.shape != attention_mask.shape:
            return f"attention_mask shape {list(attention_mask.shape)} does not match input_ids shape {list(input_ids.shape)}"
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            return f"input_ids must have shape [batch, seq] with seq >= 1, got {list(input_ids.shape)}"
        bad = (input_ids < 0) | (input_ids >= self.vocab_size)
        if bad.any():
            return f"input_ids holds token id {int(input_ids[bad][0])} outside the vocabulary [0, {self.vocab_size})"
        return None

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
                outputs = self.session.run(self.output_names, feeds)
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
