"""``filterserve export``: base + adapter → merged → ONNX variants → parity → model repository.

Every variant is checked against the PyTorch + PEFT reference before the repository is
written; a variant outside its tolerance stops the export and leaves no half-written models.
"""

from __future__ import annotations

import resource
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from filterserve.errors import FilterServeError
from filterserve.export.load import adapter_weights_path, load_reference
from filterserve.export.manifest import describe_source, prepare_out_dir, versions, write_manifest
from filterserve.export.merge import merge
from filterserve.export.onnx_export import export_onnx
from filterserve.export.parity import compare, encode, ort_scores, ort_session, parity_texts, reference_scores
from filterserve.filters import UPLIFTING_V4, FilterSpec
from filterserve.model_repository import tensor_model_name, write_repository
from filterserve.progress import Steps

# Max |Δ| against the PyTorch + PEFT reference, per precision (issue 2).
TOLERANCES: dict[str, float] = {"fp32": 1e-4, "fp16": 0.05}
# fp16 converts the merged model in place, so it must come after fp32.
PRECISION_ORDER = ("fp32", "fp16")


def parse_precisions(value: str | list[str] | tuple[str, ...]) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [p.strip().lower() for p in items if p.strip()]
    unknown = [p for p in items if p not in TOLERANCES]
    if not items or unknown:
        raise FilterServeError(
            f"unknown precision {', '.join(unknown) or '(none)'}; choose from {', '.join(TOLERANCES)}"
        )
    return list(dict.fromkeys(items))


def export_filter(
    base: str,
    adapter: str | Path,
    out: str | Path,
    spec: FilterSpec = UPLIFTING_V4,
    precisions: str | list[str] = "fp32",
    max_batch_size: int = 32,
    force: bool = False,
    gpu: bool = False,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Run the whole export and return the manifest written to ``out/filter.json``.

    The first precision listed is the default: the ensemble ``<name>`` serves it.
    """
    start = time.perf_counter()
    order = parse_precisions(precisions)
    default_precision = order[0]
    if max_batch_size < 1:
        raise FilterServeError(f"--max-batch-size must be at least 1, got {max_batch_size}")
    adapter_dir, out = Path(adapter).expanduser(), Path(out).expanduser()
    steps = Steps(total=5 + 2 * len(order), stream=stream)

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
        texts = parity_texts(loaded.tokenizer, spec.max_length)
        reference = reference_scores(loaded.model, loaded.tokenizer, texts, spec.max_length)
        ids, mask = encode(loaded.tokenizer, texts, spec.max_length)
        steps.say(f"{len(texts)} texts, padded batch {ids.shape[0]}×{ids.shape[1]} tokens")
        weighted_reference = reference @ np.asarray(spec.weights, dtype=np.float64)

    with steps.step("merge LoRA into the base and check the merge"):
        merged, merged_parity = merge(loaded, ids, mask, reference)
        steps.say(f"merged vs PEFT: max |Δ| = {merged_parity.max_abs_diff:.2e}")

    names = {p: tensor_model_name(spec.name, p, default_precision) for p in order}
    parity: dict[str, Any] = {"merged": merged_parity.to_dict()}
    try:
        for precision in sorted(order, key=PRECISION_ORDER.index):
            onnx_path = out / names[precision] / "1" / "model.onnx"
            with steps.step(f"export ONNX {precision} → {names[precision]}"):
                if precision == "fp16":
                    merged.half()
                export_onnx(merged, spec.weights, ids, mask, onnx_path)
            with steps.step(f"parity {precision} (ONNX Runtime) vs PyTorch + PEFT"):
                logits, weighted = ort_scores(ort_session(onnx_path), ids, mask)
                tolerance = TOLERANCES[precision]
                result = compare(f"ONNX {precision}", logits, reference, tolerance)
                compare(f"ONNX {precision} weighted_score", weighted[:, :1], weighted_reference[:, None], tolerance)
                parity[precision] = result.to_dict()
                steps.say(f"max |Δ| = {result.max_abs_diff:.2e} (tolerance {tolerance:g})")

        with steps.step("write the Triton model repository and filter.json"):
            with tempfile.TemporaryDirectory() as tmp:
                loaded.tokenizer.save_pretrained(tmp)
                write_repository(
                    out,
                    spec,
                    tokenizer_dir=Path(tmp),
                    precisions=order,
                    default_precision=default_precision,
                    max_batch_size=max_batch_size,
                    pad_token_id=loaded.pad_token_id,
                    vocab_size=loaded.vocab_size,
                    gpu=gpu,
                    tensorrt_fp16=gpu,
                )
            manifest = {
                "filter": spec.to_dict(),
                "models": [spec.name, f"{spec.name}_tokenizer", *names.values()],
                "ensemble": spec.name,
                "tensor_models": names,
                "default_precision": default_precision,
                "pad_token_id": loaded.pad_token_id,
                "vocab_size": loaded.vocab_size,
                "max_length": spec.max_length,
                "max_batch_size": max_batch_size,
                "sources": sources,
                "versions": versions(),
                "parity": parity,
                "parity_texts": len(texts),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "export_seconds": round(time.perf_counter() - start, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "step_seconds": steps.timings,
            }
            manifest = write_manifest(out, manifest)
    except BaseException:
        for name in [spec.name, f"{spec.name}_tokenizer", *names.values()]:
            shutil.rmtree(out / name, ignore_errors=True)
        raise
    return manifest
