"""``filterserve bench accuracy``: does an exported or served variant keep the model's accuracy?

Parity against the reference on a handful of texts cannot show a variant (fp16, int8) that
drifts a little everywhere; the validation MAE against the labels can, and it is the figure
the card reports. The gate admits a variant only if it moves that MAE by no more than the
tolerance, overall and on every dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filterserve.benchmarks.engines import ACCURACY_BATCH, open_repository, ort_engines, served_engines
from filterserve.benchmarks.report import grouped_bars, machine, table, write_report
from filterserve.benchmarks.trained_fixture import labels, read_jsonl
from filterserve.client.client import item_text
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.progress import Steps

REFERENCE = "pytorch_peft"
DEFAULT_TOLERANCE = 0.01


class AccuracyGateError(FilterServeError):
    """A variant moves the validation MAE beyond the tolerance, or produces NaN/Inf."""


@dataclass(frozen=True)
class LabelledSet:
    """Articles as the model reads them (``title. content``) and their labels, one column per dimension."""

    path: Path
    texts: list[str]
    truth: np.ndarray


def read_labelled(path: Path, spec: FilterSpec) -> LabelledSet:
    """Shared by this benchmark and the export's gate, so both judge the same texts the same way."""
    articles = read_jsonl(path)
    if not articles:
        raise FilterServeError(f"{path} holds no articles")
    return LabelledSet(path, [item_text(a) for a in articles], labels(articles, spec))


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


def build_report(spec: FilterSpec, truth: np.ndarray, reference: np.ndarray, variants: dict[str, np.ndarray]) -> dict[str, Any]:
    """The reference first (its deltas are zero by construction), then every variant."""
    scored = {REFERENCE: reference, **variants}
    return {
        "filter": spec.name,
        "dimensions": list(spec.dimensions),
        "n_articles": int(truth.shape[0]),
        "reference": REFERENCE,
        "variants": {name: variant_metrics(s, truth, reference, spec) for name, s in scored.items()},
    }


def refusals(report: dict[str, Any], tolerance: float = DEFAULT_TOLERANCE) -> dict[str, list[str]]:
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


def accuracy_gate(report: dict[str, Any], tolerance: float = DEFAULT_TOLERANCE) -> list[str]:
    """Every refusal as one message; empty means every variant is admitted."""
    return [reason for reasons in refusals(report, tolerance).values() for reason in reasons]


def _markdown(report: dict[str, Any]) -> str:
    variants = report["variants"]
    overall = table(
        ["variant", "MAE", "RMSE", "ΔMAE vs reference", "max |Δ|", "mean |Δ|", "finite"],
        [[n, v["mae"], v["rmse"], v["mae_delta"], v["max_abs_diff"], v["mean_abs_diff"], v["finite"]] for n, v in variants.items()],
    )
    per_dim = table(
        ["dimension", *(f"{n} MAE" for n in variants), *(f"{n} ΔMAE" for n in variants if n != report["reference"])],
        [
            [dim, *(v["per_dimension"][dim]["mae"] for v in variants.values()),
             *(v["per_dimension"][dim]["mae_delta"] for n, v in variants.items() if n != report["reference"])]
            for dim in report["dimensions"]
        ],
    )
    verdict = "passed" if report["passed"] else "FAILED:\n\n" + "\n".join(f"- {f}" for f in report["failures"])
    return (
        f"# Accuracy: {report['filter']} on {report['n_articles']} labelled articles\n\n"
        f"Reference: {report['reference']} (the card's recipe). Gate: MAE increase ≤ {report['tolerance']:g}, "
        f"overall and per dimension; {verdict}\n\n## Overall\n\n{overall}\n## Per dimension\n\n{per_dim}"
    )


def _figure(report: dict[str, Any], scores: dict[str, np.ndarray]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(13, 4.5))
    dims = report["dimensions"]
    grouped_bars(bars, dims, {n: [v["per_dimension"][d]["mae"] for d in dims] for n, v in report["variants"].items()}, "MAE vs labels")
    bars.set_title("per-dimension MAE per variant")
    reference = scores[REFERENCE].ravel()
    for name, s in scores.items():
        if name != REFERENCE:
            scatter.scatter(reference, s.ravel(), s=6, alpha=0.6, label=name)
    finite = reference[np.isfinite(reference)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scatter.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
    scatter.set_xlabel(f"{REFERENCE} score")
    scatter.set_ylabel("variant score")
    scatter.set_title("reference vs variant (all dimensions)")
    scatter.legend(fontsize=7)
    return fig


def run_accuracy(
    repository: str | Path,
    data: str | Path,
    base: str | None = None,
    adapter: str | Path | None = None,
    url: str | None = None,
    protocol: str = "grpc",
    tolerance: float = DEFAULT_TOLERANCE,
    out: str | Path = "bench-report",
) -> dict[str, Any]:
    """Score the labelled set with every variant, write the reports, then raise if the gate fails.

    The reports are written before the gate raises, so a failing run still leaves the figures
    to investigate.
    """
    from filterserve.export.load import load_reference
    from filterserve.export.parity import reference_scores

    repo = open_repository(repository, base, adapter)
    spec = repo.spec
    labelled = read_labelled(Path(data), spec)
    truth, texts = labelled.truth, labelled.texts
    steps = Steps(total=4 + len(repo.tensor_models))
    with steps.step(f"load the card's recipe: {repo.base} + {repo.adapter} (PyTorch + PEFT)"):
        loaded = load_reference(repo.base, repo.adapter, spec)
    with steps.step(f"reference scores, one text at a time ({len(texts)} articles)"):
        reference = reference_scores(loaded.model, loaded.tokenizer, texts, spec.max_length)
    variants: dict[str, np.ndarray] = {}
    for engine in ort_engines(repo, loaded.tokenizer):
        with steps.step(f"{engine.name}: ONNX Runtime, right-padded batches of {ACCURACY_BATCH}"):
            variants[engine.name] = engine.run(texts)
    with steps.step(f"served model at {url} ({protocol})" if url else "served model: skipped (no --url)"):
        for served in served_engines(repo, url, protocol) if url else ():
            variants[served.name] = served.run(texts)
    with steps.step("metrics, gate and reports"):
        report = build_report(spec, truth, reference, variants)
        report["failures"] = accuracy_gate(report, tolerance)
        report.update(passed=not report["failures"], tolerance=tolerance, data=str(data), repository=str(repo.path), machine=machine())
        paths = write_report(Path(out), "accuracy", report, _markdown(report), _figure(report, {REFERENCE: reference, **variants}))
        steps.say(f"wrote {', '.join(str(p) for p in paths.values())}")
    if report["failures"]:
        raise AccuracyGateError("accuracy gate failed: " + "; ".join(report["failures"]))
    return report
