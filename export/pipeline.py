"""``filterserve export``: base + adapter → merged → ONNX variants → parity → accuracy gate → repository.

Every variant is checked against the PyTorch + PEFT reference before the repository is
written: fp32 and fp16 by their max |Δ| on fixed texts (a variant outside its tolerance
stops the export and leaves no half-written models); INT8, whose drift only trained weights
can judge, by the accuracy gate on the filter's labelled validation data. With validation
data every variant passes that gate too, and the ensemble serves the fastest admitted one.
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

from filterserve.errors import FilterServeError
from filterserve.export.load import Loaded, adapter_weights_path, load_reference
from filterserve.export.manifest import describe_source, prepare_out_dir, versions, write_manifest
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
from filterserve.filters import UPLIFTING_V4, FilterSpec
from filterserve.gate import AccuracyGateRefusal, LabelledSet, build_report, read_labelled, refusals
from filterserve import contract
from filterserve.model_repository import tensor_model_name, write_repository
from filterserve.model_repository.gpu import TENSORRT_PRECISION, TRT_CACHE_ROOT
from filterserve.model_repository.repository import DEFAULT_BUCKET, DEFAULT_MAX_TEXT_BYTES
from filterserve.progress import Steps

TOLERANCES = contract.PARITY_TOLERANCES
# fp16 converts the merged model in place, so it follows fp32; int8 quantizes the fp32 file and
# needs no PyTorch model, so it comes last, after the model is released (at 1.5B the quantizer's
# copy of the fp32 graph and the PyTorch model together would approach 24 GB).
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


def staged_dir(out: Path, spec: FilterSpec, precision: str) -> Path:
    """Where a variant is built before the default is known (renamed to ``<name>_onnx`` after)."""
    return out / contract.tensor_model(spec.name, precision)


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


def score_validation(loaded: Loaded, spec: FilterSpec, path: Path) -> Validation:
    labelled = read_labelled(path, spec)
    return Validation(labelled, reference_scores(loaded.model, loaded.tokenizer, labelled.texts, spec.max_length))


def gate_variants(
    validation: Validation, loaded: Loaded, spec: FilterSpec, variants: dict[str, Path], tolerance: float
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Validation MAE per variant against the reference's; returns the report and the refusals."""
    texts = validation.labelled.texts
    scored = {}
    for precision, path in variants.items():
        session = ort_session(path)
        scored[precision] = score_in_batches(
            lambda ids, mask: ort_scores(session, ids, mask)[0], loaded.tokenizer, texts, spec.max_length, GATE_BATCH
        )
    report = build_report(spec, validation.labelled.truth, validation.reference, scored)
    return report, refusals(report, tolerance)


def export_filter(
    base: str,
    adapter: str | Path,
    out: str | Path,
    spec: FilterSpec = UPLIFTING_V4,
    precisions: str | list[str] = "fp32",
    max_batch_size: int = 32,
    max_batch_tokens: int | None = None,
    bucket: int = DEFAULT_BUCKET,
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES,
    force: bool = False,
    gpu: bool = False,
    trt_cache_root: str = TRT_CACHE_ROOT,
    validation: str | Path | None = None,
    gate_tolerance: float = contract.GATE_TOLERANCE,
    default: str = "auto",
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Run the whole export and return the manifest written to ``out/filter.json``.

    ``default`` names the precision the ensemble ``<name>`` serves; ``auto`` is the fastest
    variant the accuracy gate admitted when ``validation`` is given, else the first listed.
    Variants refused by the gate are left out of the repository, which is still written for
    the admitted ones, and then :class:`AccuracyGateRefusal` names what was refused and why.
    """
    start = time.perf_counter()
    order = parse_precisions(precisions)
    if max_batch_size < 1:
        raise FilterServeError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    if default != "auto" and default not in order:
        raise FilterServeError(f"--default {default} is not among the exported precisions {order}")
    if "int8" in order and validation is None:
        raise FilterServeError(
            "int8 needs --validation VAL.jsonl (labelled articles): its drift can only be judged by the "
            "accuracy gate on trained weights"
        )
    adapter_dir, out = Path(adapter).expanduser(), Path(out).expanduser()
    if validation is not None and not Path(validation).is_file():
        raise FilterServeError(f"validation data not found: {validation}")
    build = [p for p in BUILD_ORDER if p in order or (p == "fp32" and "int8" in order)]
    steps = Steps(total=6 + 2 * len(build) + 2 * (validation is not None), stream=stream)

    with steps.step("check inputs and checksum the sources"):
        adapter_weights_path(adapter_dir)
        sources = {"base": describe_source(base), "adapter": describe_source(str(adapter_dir))}
        prepare_out_dir(out, {"filter": spec.to_dict(), "sources": sources}, force)

    with steps.step(f"load {base} (fp32) + adapter with PEFT, as the card does"):
        loaded = load_reference(base, adapter_dir, spec)
        max_positions = int(loaded.model.config.max_position_embeddings)
        if spec.max_length > max_positions:
            raise FilterServeError(f"filter max_length {spec.max_length} exceeds the model's {max_positions} positions")
        commit = getattr(loaded.model.config, "_commit_hash", None)
        if commit and "hub_id" in sources["base"]:
            sources["base"]["revision"] = commit

    with steps.step("reference scores (PyTorch + PEFT, one text at a time)"):
        texts = parity_texts(loaded.tokenizer, spec)
        reference = reference_scores(loaded.model, loaded.tokenizer, texts, spec.max_length)
        ids, mask = encode(loaded.tokenizer, texts, spec.max_length)
        steps.say(f"{len(texts)} texts, padded batch {ids.shape[0]}×{ids.shape[1]} tokens")
        weighted_reference = reference @ np.asarray(spec.weights, dtype=np.float64)

    model_dirs = [out / name for name in (spec.name, contract.tokenizer_model(spec.name), contract.decision_model(spec.name), contract.tensor_model(spec.name))]
    model_dirs += [staged_dir(out, spec, p) for p in build]
    try:
        held_out: Validation | None = None
        if validation is not None:  # the gate's reference is the unmerged PEFT model
            with steps.step(f"reference scores on the validation data {validation}"):
                held_out = score_validation(loaded, spec, Path(validation))
                steps.say(f"{len(held_out.labelled.texts)} labelled articles")
                for line, reason in held_out.labelled.skipped:
                    steps.say(f"skipped {validation} line {line}: {reason}")
        with steps.step("merge LoRA into the base and check the merge"):
            merged, merged_parity = merge(loaded, ids, mask, reference)
            steps.say(f"merged vs PEFT: max |Δ| = {merged_parity.max_abs_diff:.2e}")

        parity: dict[str, Any] = {"merged": merged_parity.to_dict()}
        paths: dict[str, Path] = {}

        def check_parity(precision: str) -> None:
            logits, weighted = ort_scores(ort_session(paths[precision]), ids, mask)
            tolerance = TOLERANCES[precision]
            limit = float("inf") if tolerance is None else tolerance
            result = compare(f"ONNX {precision}", logits, reference, limit)
            compare(f"ONNX {precision} weighted_score", weighted[:, :1], weighted_reference[:, None], limit)
            parity[precision] = result.to_dict() | {"tolerance": tolerance}
            steps.say(f"max |Δ| = {result.max_abs_diff:.2e} (tolerance {tolerance if tolerance is not None else 'the accuracy gate'})")

        def build_int8(rung: int) -> None:
            description, keep = EXCLUSION_LADDER[rung]
            kept = quantize_int8(paths["fp32"], paths["int8"], keep)
            int8_info.update(rung=rung, kept_fp32=description, fp32_matmuls=len(kept))
            steps.say(f"dynamic INT8 (per-channel weights); fp32 besides the head: {description} ({len(kept)} MatMuls)")

        int8_info: dict[str, Any] = {}
        for precision in build:
            paths[precision] = staged_dir(out, spec, precision) / "1" / "model.onnx"
            with steps.step(f"build {precision}"):
                if precision == "int8":
                    merged = loaded.model = None  # the reference scores are taken: free its memory
                    gc.collect()
                    build_int8(0)
                else:
                    if precision == "fp16":
                        merged.half()
                    export_onnx(merged, spec.weights, ids, mask, paths[precision])
            with steps.step(f"parity {precision} (ONNX Runtime) vs PyTorch + PEFT"):
                check_parity(precision)
        merged = loaded.model = None

        refused: dict[str, list[str]] = {}
        gate: dict[str, Any] | None = None
        if held_out is not None:
            with steps.step(f"accuracy gate on {validation} (MAE change ≤ {gate_tolerance:g}, overall and per dimension)"):
                gate, refused = gate_variants(held_out, loaded, spec, {p: paths[p] for p in order}, gate_tolerance)
                while "int8" in refused and int8_info["rung"] + 1 < len(EXCLUSION_LADDER):
                    steps.say("int8 refused: " + "; ".join(refused.pop("int8")) + "; keeping more layers in fp32")
                    build_int8(int8_info["rung"] + 1)
                    check_parity("int8")
                    retry, retry_refused = gate_variants(held_out, loaded, spec, {"int8": paths["int8"]}, gate_tolerance)
                    gate["variants"]["int8"] = retry["variants"]["int8"]
                    refused.update(retry_refused)
                for precision, reasons in refused.items():
                    steps.say(f"REFUSED {precision}: " + "; ".join(reasons))
        admitted = [p for p in order if p not in refused]
        if not admitted:
            raise AccuracyGateRefusal(refused)

        with steps.step("batch-1 latency of each variant (refused ones too, for the record), to pick the default"):
            median_row = int(np.argsort(mask.sum(axis=1))[len(texts) // 2])
            one_ids, one_mask = ids[median_row : median_row + 1], mask[median_row : median_row + 1]
            length = int(one_mask.sum())
            latency = {p: median_latency_ms(paths[p], one_ids[:, :length], one_mask[:, :length]) for p in order}
            default_precision = choose_default(default, admitted, latency, validated=validation is not None, gpu=gpu)
            steps.say(", ".join(f"{p} {ms:.1f} ms" for p, ms in latency.items()) + f" → default {default_precision}")

        with steps.step("write the Triton model repository and filter.json"):
            for precision in build:
                if precision not in admitted:
                    shutil.rmtree(staged_dir(out, spec, precision), ignore_errors=True)
            names = {p: tensor_model_name(spec.name, p, default_precision) for p in admitted}
            staged_dir(out, spec, default_precision).rename(out / names[default_precision])
            with tempfile.TemporaryDirectory() as tmp:
                loaded.tokenizer.save_pretrained(tmp)
                write_repository(
                    out,
                    spec,
                    tokenizer_dir=Path(tmp),
                    precisions=admitted,
                    default_precision=default_precision,
                    max_batch_size=max_batch_size,
                    pad_token_id=loaded.pad_token_id,
                    vocab_size=loaded.vocab_size,
                    gpu=gpu,
                    trt_cache_root=trt_cache_root,
                    bucket=bucket,
                    max_text_bytes=max_text_bytes,
                    max_batch_tokens=max_batch_tokens,
                )
            manifest = write_manifest(out, {
                "filter": spec.to_dict(),
                "models": [spec.name, contract.tokenizer_model(spec.name), contract.decision_model(spec.name), *names.values()],
                "ensemble": spec.name,
                "tensor_models": names,
                "default_precision": default_precision,
                "pad_token_id": loaded.pad_token_id,
                "vocab_size": loaded.vocab_size,
                "max_length": spec.max_length,
                "max_batch_size": max_batch_size,
                "max_batch_tokens": max_batch_tokens,
                "bucket": bucket,
                "max_text_bytes": max_text_bytes,
                "sources": sources,
                "versions": versions(),
                "parity": parity,
                "parity_texts": len(texts),
                "accuracy_gate": gate and {
                    "tolerance": gate_tolerance,
                    "data": str(validation),
                    "skipped": [{"line": line, "reason": reason} for line, reason in held_out.labelled.skipped],
                    "report": gate,
                },
                "refused": refused,
                "int8": int8_info or None,
                "latency_ms_batch1": latency,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "export_seconds": round(time.perf_counter() - start, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "step_seconds": steps.timings,
            })
    except BaseException:
        for path in model_dirs:
            shutil.rmtree(path, ignore_errors=True)
        raise
    if refused:
        raise AccuracyGateRefusal(refused, written=list(names))
    return manifest


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
