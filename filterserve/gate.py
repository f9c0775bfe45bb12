"""The accuracy gate: does a variant keep the validation MAE the card reports?

Parity against the reference on a handful of texts cannot show a variant (fp16, int8) that
drifts a little everywhere; the validation MAE against the labels can. The gate admits a
variant only if it moves that MAE by no more than the tolerance, overall and on every
dimension. The export and ``filterserve bench accuracy`` both judge with this module, on
texts read by the same reader, so they cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from filterserve.contract import GATE_TOLERANCE
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.manifest import GateRecord, SkippedLine

REFERENCE = "pytorch_peft"
# Articles per batch the gate scores a variant in: right-padded batches, as a server runs them.
GATE_BATCH = 16


class AccuracyGateRefusal(FilterServeError):
    """Variants the accuracy gate refused, with the dimension and figures that failed."""

    def __init__(self, refused: dict[str, list[str]], written: list[str] | None = None) -> None:
        self.refused = refused
        reasons = "; ".join(r for reasons in refused.values() for r in reasons)
        kept = f"the repository holds only {', '.join(written)}. " if written is not None else ""
        super().__init__(f"accuracy gate refused {', '.join(refused)}: {kept}{reasons}")


@dataclass(frozen=True)
class LabelledSet:
    """Articles as the model reads them (the filter's template and head+tail cut) and their labels, one column per dimension."""

    path: Path
    texts: list[str]
    truth: np.ndarray
    # (line number, reason) of articles refused as the production scorer refuses them.
    skipped: list[tuple[int, str]] = field(default_factory=list)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """``(line number, record)`` per non-blank line; a malformed line is an error naming it."""
    if not path.is_file():
        raise FilterServeError(f"data file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FilterServeError(f"{path} line {number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise FilterServeError(f"{path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    return records


def labels(articles: list[dict], spec: FilterSpec) -> np.ndarray:
    try:
        return np.array([[float(a[dim]) for dim in spec.dimensions] for a in articles], dtype=np.float64)
    except KeyError as exc:
        raise FilterServeError(f"a labelled article has no field {exc} (one numeric field per dimension is needed)") from None


def read_labelled(path: Path, spec: FilterSpec, tokenizer: Any = None) -> LabelledSet:
    """Every article with a title and content, as the model reads it (the filter's template and
    head+tail cut, which needs the filter's ``tokenizer``); the others are skipped and listed."""
    if spec.head_tail is not None and tokenizer is None:
        raise FilterServeError(f"filter {spec.name!r} cuts articles to head+tail: reading {path} needs its tokenizer")
    texts, kept, skipped = [], [], []
    for number, article in read_jsonl(path):
        try:
            texts.append(spec.input_text(article.get("title"), article.get("content")))
        except FilterServeError as exc:
            skipped.append((number, str(exc)))
            continue
        try:
            kept.append(labels([article], spec)[0])
        except FilterServeError as exc:
            raise FilterServeError(f"{path} line {number}: {exc}") from None
    if not texts:
        raise FilterServeError(f"{path} holds no article with a title and content")
    return LabelledSet(path, spec.model_texts(texts, tokenizer), np.stack(kept), skipped)


def _errors(scores: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    err = scores - truth
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean()))}


def variant_metrics(scores: np.ndarray, truth: np.ndarray, reference: np.ndarray, spec: FilterSpec) -> dict[str, Any]:
    """MAE/RMSE against the labels and |Δ| against the reference, overall and per dimension."""
    scores = scores.astype(np.float64)
    diff = np.abs(scores - reference)
    ref_mae = np.abs(reference - truth).mean(axis=0)
    per_dim = {}
    for j, dim in enumerate(spec.dimensions):
        col = _errors(scores[:, j], truth[:, j])
        per_dim[dim] = {
            **col,
            "mae_delta": col["mae"] - float(ref_mae[j]),
            "max_abs_diff": float(diff[:, j].max()),
            "mean_abs_diff": float(diff[:, j].mean()),
        }
    overall = _errors(scores, truth)
    return {
        **overall,
        "mae_delta": overall["mae"] - float(np.abs(reference - truth).mean()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "finite": bool(np.isfinite(scores).all()),
        "per_dimension": per_dim,
    }


def build_report(
    spec: FilterSpec, truth: np.ndarray, reference: np.ndarray, variants: dict[str, np.ndarray], reference_name: str = REFERENCE
) -> dict[str, Any]:
    """The reference first (its deltas are zero by construction), then every variant.

    ``reference_name`` says what the reference scores came from: the card's recipe at export time,
    the fp32 ONNX model on a device that has no PyTorch + PEFT reference (``build-engine``).
    """
    scored = {reference_name: reference, **variants}
    return {
        "filter": spec.name,
        "dimensions": list(spec.dimensions),
        "n_articles": int(truth.shape[0]),
        "reference": reference_name,
        "variants": {name: variant_metrics(s, truth, reference, spec) for name, s in scored.items()},
    }


def refusals(report: dict[str, Any], tolerance: float = GATE_TOLERANCE) -> dict[str, list[str]]:
    """Variant → why the gate refuses it (absent when admitted).

    Only an MAE increase fails: a variant that happens to score the labels slightly better has
    not lost accuracy (its |Δ| to the reference is still in the report).
    """
    refused: dict[str, list[str]] = {}
    ref = report["variants"][report["reference"]]
    for name, v in report["variants"].items():
        if name == report["reference"]:
            continue
        reasons = []
        if not v["finite"]:
            reasons.append(f"{name} produces NaN/Inf scores (max |Δ| vs {report['reference']} = {v['max_abs_diff']})")
        else:
            if v["mae_delta"] > tolerance:
                reasons.append(
                    f"{name}: overall MAE {v['mae']:.4f} vs {ref['mae']:.4f} for {report['reference']} "
                    f"(+{v['mae_delta']:.4f} > tolerance {tolerance:g})"
                )
            for dim, d in v["per_dimension"].items():
                if d["mae_delta"] > tolerance:
                    reasons.append(
                        f"{name} on dimension {dim}: MAE {d['mae']:.4f} vs {ref['per_dimension'][dim]['mae']:.4f} "
                        f"(+{d['mae_delta']:.4f} > tolerance {tolerance:g}; max |Δ| {d['max_abs_diff']:.3g})"
                    )
        if reasons:
            refused[name] = reasons
    return refused


@dataclass(frozen=True)
class GateOutcome:
    """What the gate made of one run: the record kept in the filter's record, and what it refused and why."""

    record: GateRecord
    refused: dict[str, list[str]]

    @property
    def report(self) -> dict[str, Any]:
        return self.record.report

    def retried(self, again: GateOutcome, variant: str) -> GateOutcome:
        """This outcome with ``variant``'s figures and verdict from ``again`` (its rebuild, gated alone)."""
        variants = {**self.report["variants"], variant: again.report["variants"][variant]}
        record = GateRecord(self.record.tolerance, self.record.data, {**self.report, "variants": variants}, self.record.skipped)
        return GateOutcome(record, {**{v: r for v, r in self.refused.items() if v != variant}, **again.refused})


def judge(spec: FilterSpec, labelled: LabelledSet, reference: np.ndarray, scored: dict[str, np.ndarray], tolerance: float,
          reference_name: str = REFERENCE) -> GateOutcome:
    """Every variant in ``scored`` against ``reference`` on ``labelled``: the report, the record, the refusals.

    Each export (a merged filter's variants, a group's members, a TensorRT engine) gates with this,
    so their records have one shape.
    """
    report = build_report(spec, labelled.truth, reference, scored, reference_name)
    skipped = [SkippedLine(line, reason) for line, reason in labelled.skipped]
    return GateOutcome(GateRecord(tolerance, str(labelled.path), report, skipped), refusals(report, tolerance))
