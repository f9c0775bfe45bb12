"""The serving contract: model and tensor names that the export, the repository, the server, the
client and any plain Triton caller agree on.

They are public (README, docs/scoring.md): renaming one breaks every deployed client, so they live in one
place and every module reads them from here. The tokenizer step runs inside Triton without this
package: the export copies this file beside the step's ``model.py``, which loads it by path, so it
imports nothing (tests/test_layout.py checks). The stand-in backends (used only under
``filterserve serve``) import it.
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
# A shared-base group's tensor model <group>_onnx takes, besides TOKEN_INPUTS, each row's filter
# (INT64 [1], the member's index in its group record); its outputs are TENSOR_OUTPUTS, with
# LOGITS as wide as the group's widest member (each member's decision step reads its first n_dims).
FILTER_INDEX = "filter_index"
# The group tensor model's config parameter listing its members in filter_index order (JSON list);
# a member's tokenizer step holds its index in the parameter FILTER_INDEX.
GROUP_MEMBERS_PARAMETER = "filters"
# Inside <group>_onnx: each member's adapter folder as exported, from which the group is rebuilt
# (never loaded by the server).
GROUP_ADAPTERS = "adapters"
# Decision step <name>_decision: LOGITS in; out, the raw scores as read (SCORES) and what the
# filter's consumers read. The ensemble's SCORES come from this step, not straight from the tensor
# model: Triton 2.51 prunes a step whose outputs are all unrequested, and counts an ensemble output
# that also feeds a later step twice, so a client asking for a subset of the outputs got "unexpected
# deadlock". No ensemble output feeds another step.
SCORES = "scores"
# WEIGHTED_AVERAGE: after the gatekeepers and the short-content cap, and normalized where the
# filter has a normalization; RAW_WEIGHTED_AVERAGE: the same before the normalization (equal to it
# without one); TIER: INT32, the index into the filter's ordered tiers (its FILTER_PARAMETER lists
# their names and descriptions) of the first one RAW_WEIGHTED_AVERAGE reaches (the op-point on the
# calibrated raw average; the normalization only ranks), or NO_TIER_INDEX when none is reached.
FINAL_SCORES, WEIGHTED_AVERAGE, GATEKEEPER_APPLIED = "final_scores", "weighted_average", "gatekeeper_applied"
RAW_WEIGHTED_AVERAGE, TIER = "raw_weighted_average", "tier"
NO_TIER_INDEX = -1
# The current rules' inputs and stamps (the short-content cap, the stage-1 rows through one decision).
# CONTENT_LENGTH, INT32 [1]: characters (code points) of the article's content, as the production
# scorer stamps it (BasePreFilter.content_length: the record's ``text``, else its ``content``).
# The tokenizer step measures CONTENT (or the joined TEXT), unless the request sends the ensemble's
# optional CONTENT_LENGTH_INPUT (a record whose ``text`` field production measures instead); the
# decision step reads it as CONTENT_LENGTH_INPUT for the short-content cap and answers it as
# CONTENT_LENGTH (sent in upper case, answered in lower case, as TEXT is sent and scores answered).
# UNKNOWN_CONTENT_LENGTH (token ids sent without their text) applies no cap, as the scorer applies
# none to a row it never stamped.
CONTENT_LENGTH, CONTENT_LENGTH_INPUT = "content_length", "CONTENT_LENGTH"
UNKNOWN_CONTENT_LENGTH = -1
# SCREENED, BOOL [1], a decision-step input: the row's scores are the stage-1 probe's (the hybrid's
# stage1_low rows), which production clamps but neither calibrates nor gates (HybridScorer: no
# gatekeeper on stage 1); the short-content cap and the tier still apply. The tokenizer step sends
# false for every row it tokenizes.
SCREENED = "screened"
DECISION_INPUTS = (LOGITS, CONTENT_LENGTH_INPUT, SCREENED)
# SHORT_CONTENT_CAP_APPLIED, BOOL [1]: the short-content cap lowered the average.
SHORT_CONTENT_CAP_APPLIED = "short_content_cap_applied"
DECISION_OUTPUTS: tuple[str, ...] = (FINAL_SCORES, WEIGHTED_AVERAGE, GATEKEEPER_APPLIED, RAW_WEIGHTED_AVERAGE, TIER,
                                     SHORT_CONTENT_CAP_APPLIED, CONTENT_LENGTH)
ENSEMBLE_OUTPUTS: tuple[str, ...] = (SCORES, WEIGHTED_SCORE, *DECISION_OUTPUTS, N_TOKENS, TRUNCATED)
# The ensemble's config parameter holding the filter description as JSON: clients read the
# dimensions, weights, template and rules from the server rather than from a local copy.
FILTER_PARAMETER = "filter"
# Prometheus counters of the tokenizer step, labelled model="<tensor model>": their ratio is the padding waste.
REAL_TOKENS_METRIC, COMPUTED_TOKENS_METRIC = "filterserve_real_tokens_total", "filterserve_computed_tokens_total"

# Max |Δ| against the PyTorch + PEFT reference on the parity texts, per variant. INT8 has no
# bound of its own: only the accuracy gate on trained weights can admit it.
# The OpenVINO variants: ov_fp32 fuses and reorders f32 arithmetic (1e-4 measured at
# Qwen2.5-1.5B width, 4 layers, scores up to 37); ov_int8, like int8, only the gate can admit.
# bf16 keeps 8 significant bits, so its error grows with the scores: its bound is relative (see
# RELATIVE_PARITY). OpenVINO bf16 measured 0.5% of the largest |score| on the trained fixture and
# 1.4% at Qwen2.5-1.5B width, 4 layers, and 3.0% at its full 28 layers (PyTorch bf16: 2.6% and 3.5%).
# 10% catches a broken kernel (openvinotoolkit/openvino#38256: wrong bf16 MatMul, off by the
# scores' own size), not a drift: that is the accuracy gate's.
PARITY_TOLERANCES: dict[str, float | None] = {
    "fp32": 1e-4, "fp16": 0.05, "int8": None, "bf16": 0.1, "ov_fp32": 1e-3, "ov_int8": None,
}
# Variants whose PARITY_TOLERANCES entry is a share of the reference's largest |score|.
RELATIVE_PARITY = frozenset({"bf16"})
MERGE_TOLERANCE = 1e-4
# Variants that run on OpenVINO (Triton's backend "openvino"); fp32, fp16 and int8 run on ONNX Runtime.
OPENVINO_PRECISIONS = ("bf16", "ov_fp32", "ov_int8")
# What a shared-base group can run, the whole group at once: fp32 (ONNX Runtime) or bf16 (OpenVINO). fp16
# and int8 are not offered: one quantization of the shared base would have to pass every member's gate.
GROUP_PRECISIONS = ("fp32", "bf16")
# Max |Δ| of what a server answers (raw scores, weighted score, final scores, weighted average)
# against the PyTorch + PEFT reference run one text at a time. Looser than the fp32 parity bound
# because a served request is padded to its length bucket, may share a batch with others (or be
# padded to max_length under a token budget), and the decision step's arithmetic runs in fp32 on
# top; far tighter than what a wrong template, tokenizer or model moves the scores by (the tests
# check that the old ". " join differs by more than this).
SERVED_TOLERANCE = 1e-3
# The most the validation MAE may rise, overall and per dimension, for a variant to be served.
GATE_TOLERANCE = 0.01


def parity_limit(precision: str, reference_scale: float) -> float:
    """The largest max |Δ| a variant may show against a reference whose largest |score| is ``reference_scale``."""
    tolerance = PARITY_TOLERANCES[precision]
    if tolerance is None:
        return float("inf")
    return tolerance * reference_scale if precision in RELATIVE_PARITY else tolerance


def tokenizer_model(filter_name: str) -> str:
    return f"{filter_name}_tokenizer"


def decision_model(filter_name: str) -> str:
    return f"{filter_name}_decision"


def tensor_model(filter_name: str, precision: str | None = None) -> str:
    """``<name>_onnx`` is the one the ensemble serves; other precisions carry their suffix."""
    return f"{filter_name}_onnx" if precision is None else f"{filter_name}_onnx_{precision}"


# ---- same article, same score ------------------------------------------------------------------------
# Max |Δ| of any score field (raw, final, weighted score and averages) between two servings of one
# article by one fp32 filter: alone, batched with others, shuffled, at any concurrency, over either
# protocol. Batching changes no arithmetic the article's row depends on, so this is rounding only.
DETERMINISM_TOLERANCE = 1e-4
# Variants whose activations are quantized with one scale per run (ONNX Runtime's dynamic int8: each
# DynamicQuantizeLinear takes the min and max of the whole input, every row and padding position): a row's
# scores would move with the rows and the padding it runs with (by up to 1.3 on the trained fixture), so the
# stand-in backend runs each of their rows alone, cut to its own tokens (read from the tensor model's
# "precision" parameter). OpenVINO's int8 is calibrated (static scales) and batches freely.
PER_RUN_SCALED_PRECISIONS = frozenset({"int8"})


# ---- the hybrid: the stage-1 embedder, the probes, the one call --------------------------------------------
# One stage-1 embedder per repository, shared by every filter whose stage 1 names it:
# EMBEDDER (ensemble: TEXT, or TITLE + CONTENT → EMBEDDING, N_TOKENS, TRUNCATED) over its tokenizer
# step tokenizer_model(EMBEDDER) and its tensor model tensor_model(EMBEDDER) (TOKEN_INPUTS →
# EMBEDDING: FP32 [batch, width], mean-pooled over the attention mask and L2-normalized, as the
# model's modules.json declares).
EMBEDDER = "stage1_embedder"
EMBEDDING = "embedding"
# A filter's probe probe_model(<name>): EMBEDDING in, the probe's raw scores out (FP32 [batch, n_dims],
# the scaler folded in; the clamp, the weighted average and the threshold come after).
PROBE_SCORES = "probe_scores"
# Max |Δ| of the fp32 embedder against SentenceTransformer.encode (unit vectors).
EMBEDDING_TOLERANCE = 1e-4


def probe_model(filter_name: str) -> str:
    return f"{filter_name}_probe"
# A hybrid filter's <name> is an ensemble of one Python step, hybrid_model(<name>), which embeds the
# article (EMBEDDER), runs the probe, and sends only the rows whose stage-1 average reaches the
# threshold to the stage-2 ensemble stage2_model(<name>) (the filter's ensemble as exported
# without a stage 1). Besides ENSEMBLE_OUTPUTS it answers STAGE_USED (BYTES: STAGE1_LOW or STAGE2)
# and STAGE1_ESTIMATE (FP32 [1], the stage-1 average, for every row).
STAGE_USED, STAGE1_ESTIMATE = "stage_used", "stage1_estimate"
STAGE1_LOW, STAGE2 = "stage1_low", "stage2"
HYBRID_OUTPUTS = (*ENSEMBLE_OUTPUTS, STAGE_USED, STAGE1_ESTIMATE)


def hybrid_model(filter_name: str) -> str:
    return f"{filter_name}_hybrid"


def stage2_model(filter_name: str) -> str:
    return f"{filter_name}_stage2"
