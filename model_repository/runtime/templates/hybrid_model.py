"""Triton Python model (BLS): a hybrid filter's one call, stage 1 for every row, stage 2 for the routed rows.

Production's HybridScorer (veen-systems/llm-distillery ``filters/common/hybrid_scorer.py`` @4d17e75,
``embedding_stage.py`` @3e1ccec): embed the article, run the probe, clamp each score to [0, 10],
take the weighted average Σ wᵢ·sᵢ, and run the fine-tuned model only when that average reaches
the threshold. Here the embedder (its ensemble), the probe and stage 2 (the filter's stage-2
ensemble) are the repository's own models, called in-process (Business Logic Scripting): stage 2
sees one batch of only the routed rows, and a screened row costs one embedder and one probe run.

A screened row answers the probe's clamped scores as its scores, its stage-1 average as both
averages, no gatekeeper, and the first tier that average reaches (``_assign_tier``); every row
answers ``stage_used`` and ``stage1_estimate``. It runs inside NVIDIA's container as well, so it
imports only numpy and the copy of ``contract.py`` beside it, and reads the rest from its config.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

_path = Path(__file__).with_name("contract.py")
_spec = importlib.util.spec_from_file_location("filterserve_step_contract", _path)
assert _spec is not None and _spec.loader is not None
contract = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(contract)


def _param(config: dict, key: str) -> str:
    return config["parameters"][key]["string_value"]


def _call(model: str, inputs: list, outputs: list[str]) -> dict[str, np.ndarray]:
    """One BLS request; an error of the called model is raised with its name."""
    response = pb_utils.InferenceRequest(model_name=model, inputs=inputs, requested_output_names=outputs).exec()
    if response.has_error():
        raise RuntimeError(f"{model}: {response.error().message()}")
    return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.threshold = float(_param(config, "threshold"))
        self.weights = np.asarray(json.loads(_param(config, "weights")), dtype=np.float64)
        self.tiers = [float(t) for t in json.loads(_param(config, "tier_thresholds"))]
        self.embedder = _param(config, "embedder")
        self.probe = _param(config, "probe_model")
        self.stage2 = _param(config, "stage2_model")
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.dtypes = {tensor["name"]: pb_utils.triton_string_to_numpy(tensor["data_type"]) for tensor in config["output"]}

    def _tier(self, average: float) -> int:
        return next((i for i, threshold in enumerate(self.tiers) if average >= threshold), contract.NO_TIER_INDEX)

    def _score(self, request: object) -> pb_utils.InferenceResponse:
        texts = [t for name in contract.TEXT_INPUTS if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None]
        stage1 = _call(self.embedder, texts, [contract.EMBEDDING, contract.N_TOKENS, contract.TRUNCATED])
        probe = _call(self.probe, [pb_utils.Tensor(contract.EMBEDDING, stage1[contract.EMBEDDING])], [contract.PROBE_SCORES])
        clamped = np.clip(probe[contract.PROBE_SCORES].astype(np.float64), 0.0, 10.0)
        estimate = clamped @ self.weights
        routed = np.flatnonzero(estimate >= self.threshold)
        rows = len(estimate)
        out: dict[str, np.ndarray] = {
            contract.SCORES: clamped, contract.FINAL_SCORES: clamped,
            contract.WEIGHTED_SCORE: estimate[:, None], contract.WEIGHTED_AVERAGE: estimate[:, None],
            contract.RAW_WEIGHTED_AVERAGE: estimate[:, None], contract.GATEKEEPER_APPLIED: np.zeros((rows, 1), dtype=bool),
            contract.TIER: np.array([[self._tier(float(a))] for a in estimate]),
            contract.N_TOKENS: stage1[contract.N_TOKENS], contract.TRUNCATED: stage1[contract.TRUNCATED],
        }
        out = {name: value.astype(self.dtypes[name]) for name, value in out.items()}
        if len(routed):
            inputs = [pb_utils.Tensor(t.name(), t.as_numpy()[routed]) for t in texts]
            stage2 = _call(self.stage2, inputs, list(contract.ENSEMBLE_OUTPUTS))
            for name, value in stage2.items():
                out[name][routed] = value
        used = np.full((rows, 1), contract.STAGE1_LOW.encode(), dtype=object)
        used[routed] = contract.STAGE2.encode()
        out[contract.STAGE_USED] = used
        out[contract.STAGE1_ESTIMATE] = estimate[:, None].astype(np.float32)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, out[name]) for name in self.outputs])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._score(request))
            except RuntimeError as exc:  # a called model refused the request (an empty text, a size limit)
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
        return responses
