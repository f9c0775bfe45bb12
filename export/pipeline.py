"""``filterserve export``: base + adapter → merged → ONNX variants → parity → accuracy gate → repository.

The export is a sequence of named stages, each taking what it needs and returning what it
made, so every step can be read and tested alone:

- plan: the caller's arguments → :class:`ExportPlan`, validated before anything is read
- check: the plan → the sources' checksums; the repository must accept this filter
- load: plan, sources → :class:`Loaded` (PyTorch + PEFT in fp32, the tokenizer)
- reference: the PEFT model → :class:`Reference` (the card's scores, before the merge)
- merge + build: the PEFT model, freed at the end → fp32/fp16 ONNX files and their parity
- build int8: the fp32 file → :class:`Int8Build`
- gate: variants, labelled validation data → :class:`GateOutcome` (report, refusals)
- pick default: admitted variants → batch-1 latency per variant, the served precision
- write: all of the above → the filter's record, swapped into the repository

Everything is built in a staging folder beside the repository (:mod:`filterserve.export.staging`)
and swapped in only after every check passed: a failure at any stage leaves the repository,
and every other filter in it, as it was. fp32 and fp16 must stay within their parity tolerance of
the PyTorch + PEFT reference; INT8, whose drift only trained weights can judge, must pass the
accuracy gate on labelled validation data, as every variant must when such data is given.
"""

from __future__ import annotations

import gc
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export.load import Loaded, adapter_weights_path, load_reference
from filterserve.export.manifest import describe_source, new_record, versions
from filterserve.export.merge import merge
from filterserve.export.onnx_export import export_onnx
from filterserve.export.parity import (
    compare,
    encode,
    ort_scores,
    ort_session,
    parity_texts,
    reference_scores,
    score_in_batches,
)
from filterserve.export.quantize import EXCLUSION_LADDER, quantize_int8
from filterserve.export.staging import candidate_models, commit, plan_replacement, staging_folder
from filterserve.filters import UPLIFTING_V4, FilterSpec
from filterserve.gate import AccuracyGateRefusal, LabelledSet, build_report, read_labelled, refusals
from filterserve.model_repository import tensor_model_name, write_repository
from filterserve.model_repository.gpu import TENSORRT_PRECISION, TRT_CACHE_ROOT
from filterserve.model_repository.repository import DEFAULT_BUCKET, DEFAULT_MAX_TEXT_BYTES
from filterserve.progress import Steps

TOLERANCES = contract.PARITY_TOLERANCES
# int8 is quantized from the fp32 file after the PyTorch model is freed (see pytorch_stage).
BUILD_ORDER = ("fp32", "fp16", "int8")
LATENCY_REPEATS = 5
GATE_BATCH = 16


def parse_precisions(value: str | list[str] | tuple[str, ...]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [p.strip().lower() for p in items if p.strip()]
    unknown = [p for p in items if p not in TOLERANCES]
    if not items or unknown:
        raise FilterServeError(
            f"unknown precision {', '.join(unknown) or '(none)'}; choose from {', '.join(TOLERANCES)}"
        )
    return list(dict.fromkeys(items))


@dataclass(frozen=True)
class ExportPlan:
    """The export's validated arguments: what every later stage reads and none changes."""

    base: str
    adapter: Path
    out: Path
    spec: FilterSpec
    precisions: list[str]  # as listed: without validation data the first becomes the default
    build: list[str]  # in BUILD_ORDER; fp32 too when only int8 was asked (it is quantized from fp32)
    max_batch_size: int
    max_batch_tokens: int | None
    bucket: int
    max_text_bytes: int
    gpu: bool
    trt_cache_root: str
    validation: Path | None
    gate_tolerance: float
    default: str
    force: bool

    @property
    def total_steps(self) -> int:
        return 6 + 2 * len(self.build) + 2 * (self.validation is not None)


def plan_export(
    base: str,
    adapter: str | Path,
    out: str | Path,
    spec: FilterSpec,
    precisions: str | list[str],
    max_batch_size: int,
    force: bool,
    gpu: bool,
    validation: str | Path | None,
    gate_tolerance: float,
    default: str,
    *,
    max_batch_tokens: int | None = None,
    bucket: int = DEFAULT_BUCKET,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    trt_cache_root: str = TRT_CACHE_ROOT,
) -> ExportPlan:
    """Refuse bad arguments before anything is loaded or written."""
    order = parse_precisions(precisions)
    if max_batch_size < 1:
        raise FilterServeError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if bucket < 1 or max_text_bytes < 1:
        raise FilterServeError(f"--bucket and --max-text-bytes must be at least 1, got {bucket} and {max_text_bytes}")
    if max_batch_tokens is not None and max_batch_tokens < spec.max_length:
        raise FilterServeError(
            f"--max-batch-tokens {max_batch_tokens} is below max_length {spec.max_length}: one full-length article must fit"
        )
    if default != "auto" and default not in order:
        raise FilterServeError(f"--default {default} is not among the exported precisions {order}")
    if "int8" in order and validation is None:
        raise FilterServeError(
            "int8 needs --validation VAL.jsonl (labelled articles): its drift can only be judged by the "
            "accuracy gate on trained weights"
        )
    if validation is not None and not Path(validation).is_file():
        raise FilterServeError(f"validation data not found: {validation}")
    return ExportPlan(
        base=base,
        adapter=Path(adapter).expanduser(),
        out=Path(out).expanduser(),
        spec=spec,
        precisions=order,
        build=[p for p in BUILD_ORDER if p in order or (p == "fp32" and "int8" in order)],
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        bucket=bucket,
        max_text_bytes=max_text_bytes,
        gpu=gpu,
        trt_cache_root=trt_cache_root,
        validation=Path(validation) if validation is not None else None,
        gate_tolerance=gate_tolerance,
        default=default,
        force=force,
    )


def variant_path(staging: Path, spec: FilterSpec, precision: str) -> Path:
    """Where a variant is built before the default is known (renamed to ``<name>_onnx`` after)."""
    return staging / contract.tensor_model(spec.name, precision) / "1" / "model.onnx"


def median_latency_ms(onnx_path: Path, ids: np.ndarray, mask: np.ndarray) -> float:
    """Batch-1 latency of one median-length text: what picks the fastest admitted variant."""
    session = ort_session(onnx_path)
    ort_scores(session, ids, mask)  # warm-up
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        ort_scores(session, ids, mask)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


@dataclass(frozen=True)
class Validation:
    """Labelled articles and the card's scores for them, taken before the merge changes the model."""

    labelled: LabelledSet
    reference: np.ndarray


@dataclass(frozen=True)
class Reference:
    """What every variant is held to: the card's recipe on the parity texts (and the validation data)."""

    texts: list[str]
    scores: np.ndarray
    weighted: np.ndarray
    ids: np.ndarray  # the parity texts as one right-padded batch
    mask: np.ndarray
    validation: Validation | None


@dataclass(frozen=True)
class Variants:
    """ONNX files in the staging folder, by precision, and their parity records (``merged`` too)."""

    paths: dict[str, Path]
    parity: dict[str, Any]


@dataclass(frozen=True)
class Int8Build:
    """Which rung of the exclusion ladder the INT8 file was quantized on."""

    rung: int
    kept_fp32: str
    fp32_matmuls: int

    def to_dict(self) -> dict[str, Any]:
        return {"rung": self.rung, "kept_fp32": self.kept_fp32, "fp32_matmuls": self.fp32_matmuls}


@dataclass(frozen=True)
class GateOutcome:
    """The accuracy gate's report (None without validation data), its refusals, and INT8 as it ended."""

    report: dict[str, Any] | None
    refused: dict[str, list[str]]
    int8: Int8Build | None
    int8_parity: dict[str, Any] | None


def check_stage(plan: ExportPlan, steps: Steps) -> dict[str, Any]:
    """Paths exist, the sources are checksummed, and the repository accepts this filter: before any loading."""
    with steps.step("check inputs and checksum the sources"):
        adapter_weights_path(plan.adapter)
        sources = {"base": describe_source(plan.base), "adapter": describe_source(str(plan.adapter))}
        plan_replacement(
            plan.out, plan.spec.name, candidate_models(plan.spec.name, plan.build),
            {"filter": plan.spec.to_dict(), "sources": sources}, plan.force,
        )
    return sources


def load_stage(plan: ExportPlan, sources: dict[str, Any], steps: Steps) -> tuple[Loaded, dict[str, Any]]:
    """The card's recipe in fp32; the sources gain the hub revision when the base came from the hub."""
    with steps.step(f"load {plan.base} (fp32) + adapter with PEFT, as the card does"):
        loaded = load_reference(plan.base, plan.adapter, plan.spec)
        max_positions = int(loaded.model.config.max_position_embeddings)
        if plan.spec.max_length > max_positions:
            raise FilterServeError(f"filter max_length {plan.spec.max_length} exceeds the model's {max_positions} positions")
        commit_hash = getattr(loaded.model.config, "_commit_hash", None)
        if commit_hash and "hub_id" in sources["base"]:
            sources = {**sources, "base": {**sources["base"], "revision": commit_hash}}
    return loaded, sources


def reference_stage(plan: ExportPlan, loaded: Loaded, steps: Steps) -> Reference:
    """The unmerged PEFT model's scores: the parity texts, then the validation data if any."""
    spec = plan.spec
    with steps.step("reference scores (PyTorch + PEFT, one text at a time)"):
        texts = parity_texts(loaded.tokenizer, spec)
        scores = reference_scores(loaded.model, loaded.tokenizer, texts, spec.max_length)
        ids, mask = encode(loaded.tokenizer, texts, spec.max_length)
        steps.say(f"{len(texts)} texts, padded batch {ids.shape[0]}×{ids.shape[1]} tokens")
    validation = None
    if plan.validation is not None:
        with steps.step(f"reference scores on the validation data {plan.validation}"):
            labelled = read_labelled(plan.validation, spec)
            validation = Validation(labelled, reference_scores(loaded.model, loaded.tokenizer, labelled.texts, spec.max_length))
            steps.say(f"{len(labelled.texts)} labelled articles")
            for line, reason in labelled.skipped:
                steps.say(f"skipped {plan.validation} line {line}: {reason}")
    weighted = scores @ np.asarray(spec.weights, dtype=np.float64)
    return Reference(texts, scores, weighted, ids, mask, validation)


def check_parity(precision: str, path: Path, reference: Reference, steps: Steps) -> dict[str, Any]:
    """Raw scores and the weighted score against the reference; raises ParityError outside the tolerance."""
    logits, weighted = ort_scores(ort_session(path), reference.ids, reference.mask)
    tolerance = TOLERANCES[precision]
    limit = float("inf") if tolerance is None else tolerance
    result = compare(f"ONNX {precision}", logits, reference.scores, limit)
    compare(f"ONNX {precision} weighted_score", weighted[:, :1], reference.weighted[:, None], limit)
    steps.say(f"max |Δ| = {result.max_abs_diff:.2e} (tolerance {tolerance if tolerance is not None else 'the accuracy gate'})")
    return result.to_dict() | {"tolerance": tolerance}


def pytorch_stage(plan: ExportPlan, loaded: Loaded, reference: Reference, staging: Path, steps: Steps) -> Variants:
    """Owns the PyTorch model from here on: merge, fp32 and fp16 ONNX with their parity, then frees it.

    fp16 converts the merged model in place, so it follows fp32. The model is released before
    INT8, whose quantizer holds its own copy of the fp32 graph (both together approach 24 GB at 1.5B).
    """
    try:
        with steps.step("merge LoRA into the base and check the merge"):
            merged, merged_parity = merge(loaded, reference.ids, reference.mask, reference.scores)
            steps.say(f"merged vs PEFT: max |Δ| = {merged_parity.max_abs_diff:.2e}")
        paths: dict[str, Path] = {}
        parity: dict[str, Any] = {"merged": merged_parity.to_dict()}
        for precision in (p for p in plan.build if p != "int8"):
            paths[precision] = variant_path(staging, plan.spec, precision)
            with steps.step(f"build {precision}"):
                if precision == "fp16":
                    merged.half()
                export_onnx(merged, plan.spec.weights, reference.ids, reference.mask, paths[precision])
            with steps.step(f"parity {precision} (ONNX Runtime) vs PyTorch + PEFT"):
                parity[precision] = check_parity(precision, paths[precision], reference, steps)
    finally:
        merged = loaded.model = None
        gc.collect()
    return Variants(paths, parity)


def build_int8(fp32_path: Path, int8_path: Path, rung: int, steps: Steps) -> Int8Build:
    """Dynamic INT8 from the fp32 file, keeping in fp32 what the ladder's ``rung`` names."""
    description, keep = EXCLUSION_LADDER[rung]
    kept = quantize_int8(fp32_path, int8_path, keep)
    steps.say(f"dynamic INT8 (per-channel weights); fp32 besides the head: {description} ({len(kept)} MatMuls)")
    return Int8Build(rung, description, len(kept))


def gate_variants(
    validation: Validation, tokenizer: Any, spec: FilterSpec, variants: dict[str, Path], tolerance: float
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Validation MAE per variant against the reference's; returns the report and the refusals."""
    texts = validation.labelled.texts
    scored = {}
    for precision, path in variants.items():
        session = ort_session(path)
        scored[precision] = score_in_batches(
            lambda ids, mask: ort_scores(session, ids, mask)[0], tokenizer, texts, spec.max_length, GATE_BATCH
        )
    report = build_report(spec, validation.labelled.truth, validation.reference, scored)
    return report, refusals(report, tolerance)


def gate_stage(
    plan: ExportPlan, tokenizer: Any, reference: Reference, paths: dict[str, Path], int8: Int8Build | None, steps: Steps
) -> GateOutcome:
    """Every variant through the accuracy gate; a refused INT8 climbs the exclusion ladder before giving up."""
    validation = reference.validation
    if validation is None:
        return GateOutcome(None, {}, int8, None)
    tolerance = plan.gate_tolerance
    int8_parity = None
    with steps.step(f"accuracy gate on {plan.validation} (MAE change ≤ {tolerance:g}, overall and per dimension)"):
        report, refused = gate_variants(validation, tokenizer, plan.spec, {p: paths[p] for p in plan.precisions}, tolerance)
        while int8 is not None and "int8" in refused and int8.rung + 1 < len(EXCLUSION_LADDER):
            steps.say("int8 refused: " + "; ".join(refused["int8"]) + "; keeping more layers in fp32")
            int8 = build_int8(paths["fp32"], paths["int8"], int8.rung + 1, steps)
            int8_parity = check_parity("int8", paths["int8"], reference, steps)
            retry, retry_refused = gate_variants(validation, tokenizer, plan.spec, {"int8": paths["int8"]}, tolerance)
            report = {**report, "variants": {**report["variants"], "int8": retry["variants"]["int8"]}}
            refused = {**{p: r for p, r in refused.items() if p != "int8"}, **retry_refused}
        for precision, reasons in refused.items():
            steps.say(f"REFUSED {precision}: " + "; ".join(reasons))
    return GateOutcome(report, refused, int8, int8_parity)


def default_stage(
    plan: ExportPlan, reference: Reference, paths: dict[str, Path], admitted: list[str], steps: Steps
) -> tuple[dict[str, float], str]:
    """Batch-1 latency of every variant (refused ones too, for the record) and the precision the ensemble serves."""
    with steps.step("batch-1 latency of each variant (refused ones too, for the record), to pick the default"):
        median_row = int(np.argsort(reference.mask.sum(axis=1))[len(reference.texts) // 2])
        length = int(reference.mask[median_row].sum())
        one_ids = reference.ids[median_row : median_row + 1, :length]
        one_mask = reference.mask[median_row : median_row + 1, :length]
        latency = {p: median_latency_ms(paths[p], one_ids, one_mask) for p in plan.precisions}
        default_precision = choose_default(plan.default, admitted, latency, validated=plan.validation is not None, gpu=plan.gpu)
        steps.say(", ".join(f"{p} {ms:.1f} ms" for p, ms in latency.items()) + f" → default {default_precision}")
    return latency, default_precision


def write_stage(
    plan: ExportPlan,
    staging: Path,
    loaded: Loaded,
    sources: dict[str, Any],
    reference: Reference,
    variants: Variants,
    gate: GateOutcome,
    latency: dict[str, float],
    default_precision: str,
    steps: Steps,
    started: float,
) -> dict[str, Any]:
    """Complete the repository in the staging folder, record it, then swap the filter into ``plan.out``."""
    spec = plan.spec
    admitted = [p for p in plan.precisions if p not in gate.refused]
    with steps.step("write the Triton model repository and the filter's record, then swap them in"):
        for precision, path in variants.paths.items():
            if precision not in admitted:
                shutil.rmtree(path.parent.parent)
        names = {p: tensor_model_name(spec.name, p, default_precision) for p in admitted}
        variants.paths[default_precision].parent.parent.rename(staging / names[default_precision])
        with tempfile.TemporaryDirectory() as tmp:
            loaded.tokenizer.save_pretrained(tmp)
            write_repository(
                staging,
                spec,
                tokenizer_dir=Path(tmp),
                precisions=admitted,
                default_precision=default_precision,
                max_batch_size=plan.max_batch_size,
                pad_token_id=loaded.pad_token_id,
                vocab_size=loaded.vocab_size,
                gpu=plan.gpu,
                trt_cache_root=plan.trt_cache_root,
                bucket=plan.bucket,
                max_text_bytes=plan.max_text_bytes,
                max_batch_tokens=plan.max_batch_tokens,
            )
        validation = reference.validation
        record = new_record({
            "filter": spec.to_dict(),
            "models": [spec.name, contract.tokenizer_model(spec.name), contract.decision_model(spec.name), *names.values()],
            "ensemble": spec.name,
            "tensor_models": names,
            "default_precision": default_precision,
            "pad_token_id": loaded.pad_token_id,
            "vocab_size": loaded.vocab_size,
            "max_length": spec.max_length,
            "max_batch_size": plan.max_batch_size,
            "max_batch_tokens": plan.max_batch_tokens,
            "bucket": plan.bucket,
            "max_text_bytes": plan.max_text_bytes,
            "sources": sources,
            "versions": versions(),
            "parity": variants.parity,
            "parity_texts": len(reference.texts),
            "accuracy_gate": {
                "tolerance": plan.gate_tolerance,
                "data": str(plan.validation),
                "skipped": [{"line": line, "reason": reason} for line, reason in validation.labelled.skipped],
                "report": gate.report,
            } if validation is not None else None,
            "refused": gate.refused,
            "int8": gate.int8.to_dict() if gate.int8 else None,
            "latency_ms_batch1": latency,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "export_seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "step_seconds": steps.timings,
        })
        commit(plan.out, staging, record, plan.force)
        steps.say(f"{spec.name} is in {plan.out}: {', '.join(record['models'])}")
    return record


def export_filter(
    base: str,
    adapter: str | Path,
    out: str | Path,
    spec: FilterSpec = UPLIFTING_V4,
    precisions: str | list[str] = "fp32",
    max_batch_size: int = 32,
    force: bool = False,
    gpu: bool = False,
    validation: str | Path | None = None,
    gate_tolerance: float = contract.GATE_TOLERANCE,
    default: str = "auto",
    stream: TextIO | None = None,
    *,
    max_batch_tokens: int | None = None,
    bucket: int = DEFAULT_BUCKET,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    trt_cache_root: str = TRT_CACHE_ROOT,
) -> dict[str, Any]:
    """Run every stage and return the filter's record, as written to ``out/<name>.filter.json``.

    ``out`` may hold other filters: they are left as they are. ``default`` names the precision
    the ensemble ``<name>`` serves; ``auto`` is the fastest variant the accuracy gate admitted
    when ``validation`` is given, else the first listed. Variants refused by the gate are left out
    of the repository, which still receives the admitted ones; then :class:`AccuracyGateRefusal`
    names what was refused and why.
    """
    started = time.perf_counter()
    plan = plan_export(
        base, adapter, out, spec, precisions, max_batch_size, force, gpu, validation, gate_tolerance, default,
        max_batch_tokens=max_batch_tokens, bucket=bucket, max_text_bytes=max_text_bytes, trt_cache_root=trt_cache_root,
    )
    steps = Steps(total=plan.total_steps, stream=stream)
    sources = check_stage(plan, steps)
    with staging_folder(plan.out, spec.name) as staging:
        loaded, sources = load_stage(plan, sources, steps)
        reference = reference_stage(plan, loaded, steps)
        variants = pytorch_stage(plan, loaded, reference, staging, steps)
        int8 = None
        if "int8" in plan.build:
            int8_path = variant_path(staging, spec, "int8")
            with steps.step("build int8"):
                int8 = build_int8(variants.paths["fp32"], int8_path, 0, steps)
            with steps.step("parity int8 (ONNX Runtime) vs PyTorch + PEFT"):
                int8_parity = check_parity("int8", int8_path, reference, steps)
            variants = Variants({**variants.paths, "int8": int8_path}, {**variants.parity, "int8": int8_parity})
        gate = gate_stage(plan, loaded.tokenizer, reference, variants.paths, int8, steps)
        if gate.int8_parity is not None:
            variants = Variants(variants.paths, {**variants.parity, "int8": gate.int8_parity})
        admitted = [p for p in plan.precisions if p not in gate.refused]
        if not admitted:
            raise AccuracyGateRefusal(gate.refused)
        latency, default_precision = default_stage(plan, reference, variants.paths, admitted, steps)
        record = write_stage(plan, staging, loaded, sources, reference, variants, gate, latency, default_precision, steps, started)
    if gate.refused:
        raise AccuracyGateRefusal(gate.refused, written=list(record["tensor_models"]))
    return record


def choose_default(default: str, admitted: list[str], latency: dict[str, float], validated: bool, gpu: bool = False) -> str:
    """An explicit choice wins; ``auto`` takes the fastest gate-admitted variant, or the first listed.

    Without validation data only the parity check stands behind fp16, and a 0.05 bound on a few
    texts is no proof that the MAE did not move, so ``auto`` does not promote it. For a GPU the
    latencies measured here on the CPU say nothing: ``auto`` serves the variant that runs on
    TensorRT when the gate admitted it, and otherwise prefers any other variant to int8, which gets no TensorRT.
    """
    if default != "auto":
        if default not in admitted:
            raise FilterServeError(f"--default {default} was refused by the accuracy gate")
        return default
    if gpu:
        if validated and TENSORRT_PRECISION in admitted:
            return TENSORRT_PRECISION
        return next((p for p in admitted if p != "int8"), admitted[0])
    if not validated:
        return admitted[0]
    return min(admitted, key=latency.__getitem__)
