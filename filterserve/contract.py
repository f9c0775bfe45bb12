"""The serving contract: model and tensor names that the export, the repository, the server, the
client and any plain Triton caller agree on.

They are public (README, DESIGN): renaming one breaks every deployed client, so they live in one
place and every module reads them from here. The stand-in ONNX Runtime backend and the tokenizer
step run inside Triton without this package; they read the names from their model config.
"""

from __future__ import annotations

# Ensemble <name>: TEXT (already joined), or TITLE + CONTENT (the server applies the template).
TEXT, TITLE, CONTENT = "TEXT", "TITLE", "CONTENT"
TEXT_INPUTS = (TEXT, TITLE, CONTENT)
# Tokenizer step <name>_tokenizer: the tokens, and how much of the article the model reads.
TOKEN_INPUTS = ("input_ids", "attention_mask")
N_TOKENS, TRUNCATED = "n_tokens", "truncated"
# Tensor model <name>_onnx (and every other precision, and a TensorRT plan): TOKEN_INPUTS in.
LOGITS, WEIGHTED_SCORE = "logits", "weighted_score"
TENSOR_OUTPUTS = (LOGITS, WEIGHTED_SCORE)
# Decision step <name>_decision: LOGITS in; out, the raw scores as read (SCORES) and what the
# filter's consumers read. The ensemble's SCORES come from this step, not straight from the tensor
# model: Triton 2.51 prunes a step whose outputs are all unrequested, and counts an ensemble output
# that also feeds a later step twice, so a client asking for a subset of the outputs got "unexpected
# deadlock". No ensemble output feeds another step.
SCORES = "scores"
FINAL_SCORES, WEIGHTED_AVERAGE, GATEKEEPER_APPLIED = "final_scores", "weighted_average", "gatekeeper_applied"
DECISION_OUTPUTS = (FINAL_SCORES, WEIGHTED_AVERAGE, GATEKEEPER_APPLIED)
ENSEMBLE_OUTPUTS = (SCORES, WEIGHTED_SCORE, *DECISION_OUTPUTS, N_TOKENS, TRUNCATED)
# The ensemble's config parameter holding the filter description as JSON: clients read the
# dimensions, weights, template and rules from the server rather than from a local copy.
FILTER_PARAMETER = "filter"
# Prometheus counters of the tokenizer step, labelled model="<tensor model>": their ratio is the padding waste.
REAL_TOKENS_METRIC, COMPUTED_TOKENS_METRIC = "filterserve_real_tokens_total", "filterserve_computed_tokens_total"

# Max |Δ| against the PyTorch + PEFT reference on the parity texts, per variant. INT8 has no
# bound of its own: only the accuracy gate on trained weights can admit it.
PARITY_TOLERANCES: dict[str, float | None] = {"fp32": 1e-4, "fp16": 0.05, "int8": None}
MERGE_TOLERANCE = 1e-4
# The most the validation MAE may rise, overall and per dimension, for a variant to be served.
GATE_TOLERANCE = 0.01


def tokenizer_model(filter_name: str) -> str:
    return f"{filter_name}_tokenizer"


def decision_model(filter_name: str) -> str:
    return f"{filter_name}_decision"


def tensor_model(filter_name: str, precision: str | None = None) -> str:
    """``<name>_onnx`` is the one the ensemble serves; other precisions carry their suffix."""
    return f"{filter_name}_onnx" if precision is None else f"{filter_name}_onnx_{precision}"
