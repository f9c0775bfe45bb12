"""Triton Python model (BLS): a hybrid filter's one call, stage 1 for every row, stage 2 for the routed rows.

Production's HybridScorer (veen-systems/llm-distillery ``filters/common/hybrid_scorer.py`` @4d17e75,
``embedding_stage.py`` @3e1ccec): embed the article, run the probe, clamp each score to [0, 10],
take the weighted average Σ wᵢ·sᵢ, and run the fine-tuned model only when that average reaches
the threshold. Here the embedder (its ensemble), the probe and stage 2 (the filter's stage-2
ensemble) are the repository's own models, called in-process (Business Logic Scripting): stage 2
sees one batch of only the routed rows, and a screened row costs one embedder and one probe run.

A screened row goes through the filter's own decision step as a stage-1 row (``screened``: the
probe's scores clamped, neither calibrated nor gated, then the short-content cap and the op-point
tier, as hybrid_scorer.py's stage1_low branch does), so the rules live in one graph; every row
answers ``stage_used`` and ``stage1_estimate`` (the stage-1 average before the cap). The article's
content_length is measured here as the tokenizer step measures it (or taken as sent) and passed to
both stages, so a routed row and a screened one are capped on the same length. It runs inside
NVIDIA's container as well, so it imports only numpy and the copy of ``contract.py`` beside it, and
reads the rest from its config.
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
        self.embedder = _param(config, "embedder")
        self.probe = _param(config, "probe_model")
        self.stage2 = _param(config, "stage2_model")
        self.decision = _param(config, "decision_model")
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.dtypes = {tensor["name"]: pb_utils.triton_string_to_numpy(tensor["data_type"]) for tensor in config["output"]}

    @staticmethod
    def _lengths(request: object, texts: list) -> np.ndarray:
        """content_length per row: CONTENT_LENGTH as sent, else CONTENT's (or TEXT's) code points."""
        sent = pb_utils.get_input_tensor_by_name(request, contract.CONTENT_LENGTH_INPUT)
        if sent is not None:
            lengths = sent.as_numpy().reshape(-1, 1).astype(np.int32)
            if (lengths < 0).any():
                raise ValueError(f"{contract.CONTENT_LENGTH_INPUT} must not be negative")
            return lengths
        by_name = {tensor.name(): tensor.as_numpy().reshape(-1) for tensor in texts}
        measured = by_name.get(contract.CONTENT, by_name.get(contract.TEXT))
        if measured is None:
            raise ValueError(f"send {contract.TEXT}, or {contract.TITLE} and {contract.CONTENT}")
        return np.array([[len(value.decode("utf-8"))] for value in measured], dtype=np.int32)

    def _score(self, request: object) -> pb_utils.InferenceResponse:
        texts = [t for name in contract.TEXT_INPUTS if (t := pb_utils.get_input_tensor_by_name(request, name)) is not None]
        stage1 = _call(self.embedder, texts, [contract.EMBEDDING, contract.N_TOKENS, contract.TRUNCATED])
        lengths = self._lengths(request, texts)
        raw = _call(self.probe, [pb_utils.Tensor(contract.EMBEDDING, stage1[contract.EMBEDDING])], [contract.PROBE_SCORES])
        probe = raw[contract.PROBE_SCORES].astype(np.float32)
        clamped = np.clip(probe.astype(np.float64), 0.0, 10.0)
        estimate = clamped @ self.weights
        routed = np.flatnonzero(estimate >= self.threshold)
        rows = len(estimate)
        screened = _call(self.decision, [pb_utils.Tensor(contract.LOGITS, probe),
                                         pb_utils.Tensor(contract.CONTENT_LENGTH_INPUT, lengths),
                                         pb_utils.Tensor(contract.SCREENED, np.ones((rows, 1), dtype=bool))],
                         list(contract.DECISION_OUTPUTS))
        out: dict[str, np.ndarray] = {
            **screened, contract.SCORES: clamped, contract.WEIGHTED_SCORE: estimate[:, None],
            contract.N_TOKENS: stage1[contract.N_TOKENS], contract.TRUNCATED: stage1[contract.TRUNCATED],
        }
        out = {name: value.astype(self.dtypes[name]) for name, value in out.items()}
        if len(routed):
            inputs = [pb_utils.Tensor(t.name(), t.as_numpy()[routed]) for t in texts]
            inputs.append(pb_utils.Tensor(contract.CONTENT_LENGTH_INPUT, lengths[routed]))
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
            except (RuntimeError, ValueError) as exc:  # a called model refused the request (an empty text, a size limit)
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
        return responses
