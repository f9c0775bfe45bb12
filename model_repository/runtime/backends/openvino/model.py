"""A stand-in for Triton's OpenVINO backend, written as a Python backend model.

The pytriton wheel's tritonserver has no OpenVINO backend library. Placed in the backend
directory as ``openvino/model.py``, this stand-in serves the unchanged container-style model
folder (``backend: "openvino"``, ``model.xml`` + ``model.bin``) with the openvino Python package,
compiled with exactly the properties Triton's backend derives from the same config parameters
(:func:`filterserve.model_repository.runtime.openvino.compile_properties`, which the export's gate uses
too); in NVIDIA's x86 container Triton's C++ backend takes over.

Two things it does that the real backend cannot, from ``filterserve_model.json`` beside the
config (the backend's config may hold only its own parameters): it checks token requests as the
ONNX Runtime stand-in does, and it refuses to load when the compiled model would run another
precision than the one the export gated (a repository moved to a CPU with, or without, bf16).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.model_repository.runtime import openvino as backend
from filterserve.model_repository.runtime.tensor_backend import TensorBackend, TokenRules


class TritonPythonModel(TensorBackend):
    engine = "OpenVINO"

    def load(self, model_dir: Path, version: str, config: dict, args: dict) -> None:
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        shaping = [key for key in backend.BATCH_SHAPING_PARAMETERS if parameters.get(key, "").strip().lower() == "yes"]
        if shaping:
            raise FilterServeError(f"the OpenVINO stand-in does not emulate {', '.join(shaping)}; generate configs with filterserve export")
        properties = backend.compile_properties(parameters)
        core = ov.Core()
        if parameters.get("CPU_EXTENSION_PATH"):
            core.add_extension(parameters["CPU_EXTENSION_PATH"])
        path = model_dir / version / (config.get("default_model_filename") or backend.MODEL_FILE)
        self.compiled = core.compile_model(core.read_model(str(path)), backend.target_device(parameters), properties)
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(name) for name in self.output_names]
        recorded = backend.read_standin_file(model_dir)
        running = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        gated = recorded.get("execution_precision")
        if gated is not None and running != gated:
            raise FilterServeError(
                f"{config['name']} would run {running} on this CPU, but its export gated {gated}: export it again on this machine"
            )
        self.token_rules = TokenRules.from_mapping(recorded)
        if contract.GROUP_MEMBERS_PARAMETER in recorded:
            self.members = len(recorded[contract.GROUP_MEMBERS_PARAMETER])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        return [np.array(result[output], copy=True) for output in self.outputs]
