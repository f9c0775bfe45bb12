"""A stand-in for Triton's ONNX Runtime backend, written as a Python backend model.

The pytriton wheel's tritonserver has no ONNX Runtime backend library, so ``backend:
"onnxruntime"`` would fail to load there. Placed in the backend directory as
``onnxruntime/model.py``, this stand-in serves the unchanged container-style model folder with
the onnxruntime Python package; in NVIDIA's container Triton's C++ backend takes over. Every
"served" ONNX Runtime figure in this project's README was measured through this stand-in.

Token models (``vocab_size`` among the config parameters) are checked before they run and run in
pieces of at most ``max_batch_tokens`` tokens (:mod:`filterserve.model_repository.runtime.tensor_backend`);
a dynamic int8 model runs each row alone at its own length, since its activation scales span the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from filterserve import contract
from filterserve.model_repository.runtime.tensor_backend import TensorBackend, TokenRules, cpu_allowance


def _providers(instance_kind: str, device_id: int) -> list:
    available = ort.get_available_providers()
    if instance_kind == "GPU":
        gpu = [(p, {"device_id": device_id}) for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        return gpu + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TritonPythonModel(TensorBackend):
    engine = "ONNX Runtime"
    # What a session run raises: onnxruntime's own exception types (plain Exception subclasses).
    expected_errors = (RuntimeError, ValueError, ort_errors.Fail, ort_errors.InvalidArgument,
                       ort_errors.RuntimeException, ort_errors.EPFail, ort_errors.NotImplemented)

    def load(self, model_dir: Path, version: str, config: dict, args: dict) -> None:
        path = model_dir / version / (config.get("default_model_filename") or "model.onnx")
        providers = _providers(args.get("model_instance_kind", "CPU"), int(args.get("model_instance_device_id", 0)))
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_allowance()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        params = {key: value for key, value in parameters.items() if key in TokenRules.names()}
        if "vocab_size" in params:
            self.token_rules = TokenRules.from_mapping(params)
        self.rows_alone = parameters.get("precision") in contract.PER_RUN_SCALED_PRECISIONS

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)
