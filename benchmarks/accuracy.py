"""``filterserve bench accuracy``: the accuracy gate's figures for every variant, as a report.

The reference, every exported variant and (with ``--url``) the served model score the same
labelled articles; the report shows the MAE per dimension and whether the gate
(:mod:`filterserve.gate`) admits each one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from filterserve.benchmarks.engines import (
    ACCURACY_BATCH,
    OpenVinoEngine,
    exported_engines,
    n_exported_engines,
    open_choice,
    served_engines,
)
from filterserve.benchmarks.options import AccuracyOptions
from filterserve.benchmarks.report import grouped_bars, machine, table, write_report
from filterserve.gate import REFERENCE, AccuracyGateRefusal, build_report, read_labelled, refusals
from filterserve.progress import Steps


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
        f"# Accuracy: {report['filter']} on {report['n_articles']} labelled articles "
        f"({len(report['skipped'])} skipped: empty title or content)\n\n"
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


def run_accuracy(options: AccuracyOptions) -> dict[str, Any]:
    """Score the labelled set with every variant, write the reports, then raise if the gate fails.

    The reports are written before the gate raises, so a failing run still leaves the figures
    to investigate.
    """
    from filterserve.export.load import load_reference
    from filterserve.export.parity import reference_scores

    repo = open_choice(options.repository)
    spec, data, url, protocol = repo.spec, options.data, options.server.url, options.server.protocol
    steps = Steps(total=4 + n_exported_engines(repo))
    with steps.step(f"load the card's recipe: {repo.base} + {repo.adapter} (PyTorch + PEFT)"):
        loaded = load_reference(repo.base, repo.adapter, spec)
    labelled = read_labelled(data, spec, loaded.tokenizer)
    truth, texts = labelled.truth, labelled.texts
    for line, reason in labelled.skipped:
        steps.say(f"skipped {data} line {line}: {reason}")
    with steps.step(f"reference scores, one text at a time ({len(texts)} articles)"):
        reference = reference_scores(loaded.model, loaded.tokenizer, texts, spec.max_length)
    variants: dict[str, np.ndarray] = {}
    for engine in exported_engines(repo, loaded.tokenizer):
        runtime = f"OpenVINO ({engine.execution['precision']})" if isinstance(engine, OpenVinoEngine) else "ONNX Runtime"
        with steps.step(f"{engine.name}: {runtime}, right-padded batches of {ACCURACY_BATCH}"):
            variants[engine.name] = engine.run(texts)
    with steps.step(f"served model at {url} ({protocol})" if url else "served model: skipped (no --url)"):
        for served in served_engines(repo, url, protocol) if url else ():
            variants[served.name] = served.run(texts)
    with steps.step("metrics, gate and reports"):
        report = build_report(spec, truth, reference, variants)
        refused = refusals(report, options.tolerance)
        report["failures"] = [reason for reasons in refused.values() for reason in reasons]
        report["skipped"] = [{"line": line, "reason": reason} for line, reason in labelled.skipped]
        report.update(passed=not report["failures"], tolerance=options.tolerance, data=str(data), repository=str(repo.path),
                      machine=machine())
        paths = write_report(options.out, "accuracy", report, _markdown(report), _figure(report, {REFERENCE: reference, **variants}))
        steps.say(f"wrote {', '.join(str(p) for p in paths.values())}")
    if report["failures"]:
        raise AccuracyGateRefusal(refused)
    return report
