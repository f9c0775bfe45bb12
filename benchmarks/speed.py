"""``filterserve bench latency`` and ``throughput``: every way to run the filter, same texts, same run.

Latency answers what the export and the server buy over the card's recipe (PyTorch + unmerged
PEFT) per article, as a ratio and as achieved FLOP/s against this machine's measured matmul
peak. Throughput answers what users see on a day's news: uneven article lengths, bursts of
requests, and the tokens computed for padding, against the filter's production scorer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from filterserve.benchmarks.articles import REALISTIC_MIX, articles_of_lengths, realistic_lengths, texts_of_length
from filterserve.benchmarks.engines import (
    BatchEngine,
    Engine,
    Repository,
    TorchEngine,
    open_repository,
    ort_engines,
    served_engines,
)
from filterserve.benchmarks.report import grouped_bars, machine, table, write_report

CARD = "pytorch_peft"
PRODUCTION = "production_scorer"
PRODUCTION_BATCH = 16
MIXES = ("uniform", "realistic")
WARMUP = 2
SHORT_TOKENS = 32


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
    """The best of a few fp32 ``n×n`` matmuls: what this CPU (and its thread count) can reach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters a forward pass multiplies by: all but the embedding table, which is only indexed."""
    return sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)


def _engines(repo: Repository, url: str | None, protocol: str, context: dict[str, Any]) -> Iterator[Engine]:
    """One engine at a time, so a 1.5B model is never held twice; the merge happens after PEFT is measured."""
    from filterserve.export.load import load_reference

    loaded = load_reference(repo.base, repo.adapter, repo.spec)
    context["tokenizer"] = loaded.tokenizer
    yield TorchEngine(CARD, loaded.model, loaded.tokenizer, repo.spec.max_length)
    merged = loaded.model.merge_and_unload()
    context["params"] = matmul_params(merged)
    yield TorchEngine("pytorch_merged", merged, loaded.tokenizer, repo.spec.max_length)
    del merged, loaded
    yield from ort_engines(repo, context["tokenizer"])
    yield from served_engines(repo, url, protocol)


def _n_engines(repo: Repository, url: str | None) -> int:
    return 2 + len(repo.tensor_models) + (1 if url else 2)


def _speed_run(
    kind: str,
    repo: Repository,
    url: str | None,
    protocol: str,
    units_per_engine: int,
    measure: Callable[[Engine, dict[str, Any], tqdm], dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Peak first (on an idle process), then each engine in turn under one progress bar.

    FLOP/s are derived afterwards: the parameter count comes from the merged model, which
    exists only once the card's recipe has been measured.
    """
    context: dict[str, Any] = {"peak_flops": matmul_peak_flops()}
    results: dict[str, Any] = {}
    with tqdm(total=_n_engines(repo, url) * units_per_engine, desc=kind, unit="req") as bar:
        for engine in _engines(repo, url, protocol, context):
            bar.set_postfix_str(engine.name)
            results[engine.name] = measure(engine, context, bar)
    return context, results


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def run_latency(
    repository: str | Path,
    base: str | None = None,
    adapter: str | Path | None = None,
    url: str | None = None,
    protocol: str = "grpc",
    requests: int = 20,
    out: str | Path = "bench-report",
    filter_name: str | None = None,
) -> dict[str, Any]:
    """Batch-1 latency at a short text, half of max_length (standing in for a median article) and max_length."""
    repo = open_repository(repository, base, adapter, filter_name)
    probe = repo.spec.max_length
    lengths = {"short": min(SHORT_TOKENS, probe), "median": max(probe // 2, 1), "max_length": probe}

    def measure(engine: Engine, context: dict[str, Any], bar: tqdm) -> dict[str, Any]:
        row = {}
        for label, n_tokens in lengths.items():
            text = texts_of_length(context["tokenizer"], n_tokens, 1)[0]
            times = []
            for i in range(WARMUP + requests):
                elapsed = _timed(lambda: engine.one(text))
                if i >= WARMUP:
                    times.append(elapsed)
                bar.update()
            row[label] = _percentiles(times)
        return row

    context, results = _speed_run("latency", repo, url, protocol, len(lengths) * (WARMUP + requests), measure)
    for row in results.values():
        for label, stats in row.items():
            stats["speedup_p50_vs_card"] = results[CARD][label]["p50_ms"] / stats["p50_ms"]
            stats["flops_per_s"] = 2 * context["params"] * lengths[label] / (stats["p50_ms"] / 1000)
            stats["fraction_of_peak"] = stats["flops_per_s"] / context["peak_flops"]
    report = _report(repo, context, requests, {"lengths_tokens": lengths, "engines": results})
    report["summary"] = {e: {label: round(s["p50_ms"], 2) for label, s in row.items()} for e, row in results.items()}
    rows = [[e, label, lengths[label], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["speedup_p50_vs_card"], s["flops_per_s"] / 1e9,
             s["fraction_of_peak"]] for e, row in results.items() for label, s in row.items()]
    markdown = _heading("Latency at batch 1", report) + table(
        ["engine", "text", "tokens", "p50 ms", "p95 ms", "p99 ms", "speedup vs card (p50)", "GFLOP/s", "of peak"], rows
    )
    write_report(Path(out), "latency", report, markdown, _latency_figure(results, list(lengths)))
    return report


def _throughput_engines(repo: Repository, url: str | None, protocol: str, context: dict[str, Any]) -> Iterator[Engine]:
    """The production scorer's way (PyTorch + PEFT, padded to max_length, batches of 16), every
    exported variant on length-sorted batches, then the server: the client and a plain caller."""
    from filterserve.export.load import load_reference

    loaded = load_reference(repo.base, repo.adapter, repo.spec)
    context["tokenizer"] = loaded.tokenizer
    yield TorchEngine(PRODUCTION, loaded.model, loaded.tokenizer, repo.spec.max_length, pad_to_max_length=True)
    del loaded
    yield from ort_engines(repo, context["tokenizer"], sort_by_length=True)
    yield from served_engines(repo, url, protocol, plain=url is None)


def run_throughput(
    repository: str | Path,
    base: str | None = None,
    adapter: str | Path | None = None,
    url: str | None = None,
    protocol: str = "grpc",
    requests: int = 64,
    concurrency: Sequence[int] = (1, 4, 16, 64),
    mixes: Sequence[str] = MIXES,
    out: str | Path = "bench-report",
    filter_name: str | None = None,
) -> dict[str, Any]:
    """Articles/s and computed/real tokens at each concurrency, on uniform and realistic article lengths.

    In process, concurrency is the batch size; served, it is the number of requests in flight
    (the server's dynamic batcher joins them). The production scorer pads every batch of 16 to
    max_length whatever the concurrency, so it runs once per mix and is the baseline of every ratio.
    """
    repo = open_repository(repository, base, adapter, filter_name)
    spec = repo.spec
    context: dict[str, Any] = {}
    results: dict[str, dict[str, dict[str, Any]]] = {mix: {} for mix in mixes}
    articles: dict[str, list[tuple[str, str]]] = {}
    levels = [str(level) for level in concurrency]
    with tqdm(total=(2 + len(repo.tensor_models) + (1 if url else 3)) * len(mixes), desc="throughput", unit="run") as bar:
        for engine in _throughput_engines(repo, url, protocol, context):
            if not articles:
                lengths = {"uniform": [spec.max_length // 2] * requests, "realistic": realistic_lengths(requests, seed=1)}
                articles = {mix: articles_of_lengths(context["tokenizer"], spec, lengths[mix], seed=1) for mix in mixes}
            bar.set_postfix_str(engine.name)
            for mix in mixes:
                results[mix][engine.name] = _throughput_row(engine, articles[mix], spec, levels)
                bar.update()
    for mix, engines in results.items():
        for row in engines.values():
            for level, stats in row.items():
                stats["ratio_vs_production"] = stats["articles_per_s"] / engines[PRODUCTION][level]["articles_per_s"]
    real = {mix: [min(len(context["tokenizer"](spec.input_text(*a))["input_ids"]), spec.max_length) for a in arts]
            for mix, arts in articles.items()}
    report = {
        "filter": spec.name,
        "repository": str(repo.path),
        "baseline": PRODUCTION,
        "requests": requests,
        "concurrency": list(concurrency),
        "mixes": {mix: {"articles": len(articles[mix]), "median_tokens": float(np.median(real[mix])),
                        "mean_tokens": float(np.mean(real[mix])), "truncated": sum(len(context["tokenizer"](spec.input_text(*a))["input_ids"]) > spec.max_length for a in articles[mix])}
                  for mix in mixes},
        "realistic_mix": [dict(zip(("component", "share", "min_tokens", "max_tokens"), c)) for c in REALISTIC_MIX],
        "engines": results,
        "goals": _goals(results, repo),
        "machine": machine(),
    }
    report["summary"] = {mix: {e: {c: round(s["articles_per_s"], 3) for c, s in row.items()} for e, row in engines.items()}
                         for mix, engines in results.items()}
    write_report(Path(out), "throughput", report, _throughput_markdown(report), _throughput_figure(report))
    return report


def _throughput_row(engine: Engine, articles: list[tuple[str, str]], spec: Any, levels: list[str]) -> dict[str, dict[str, Any]]:
    texts = [spec.input_text(*a) for a in articles]
    items = texts if isinstance(engine, BatchEngine) else articles
    row: dict[str, dict[str, Any]] = {}
    for level in levels:
        if engine.name == PRODUCTION and row:  # padded to max_length in batches of 16: the level changes nothing
            row[level] = dict(next(iter(row.values())))
            continue
        size = PRODUCTION_BATCH if engine.name == PRODUCTION else int(level)
        engine.run(items[:size], size)  # warm-up at this batch size / concurrency
        elapsed = _timed(lambda: engine.run(items, size))
        tokens = engine.tokens
        row[level] = {
            "articles_per_s": len(items) / elapsed,
            "seconds": elapsed,
            "real_tokens": tokens.real if tokens else None,
            "computed_tokens": tokens.computed if tokens else None,
            "computed_per_real": tokens.ratio if tokens else None,
        }
    return row


def _goals(results: dict[str, dict[str, dict[str, Any]]], repo: Repository) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure: ratios within one run, never a wall-clock bound."""
    realistic = results.get("realistic", {})
    goals = []

    def goal(what: str, value: float | None, target: float, at_most: bool) -> None:
        if value is not None:
            goals.append({"goal": what, "measured": value, "target": target,
                          "met": bool(value <= target if at_most else value >= target)})

    client, plain = realistic.get("served_grpc", {}).get("16", {}), realistic.get("tritonclient_random_grpc", {}).get("16", {})
    goal("computed/real tokens, filterserve client, realistic mix, concurrency 16", client.get("computed_per_real"), 1.15, True)
    goal("computed/real tokens, plain tritonclient in random order, concurrency 16", plain.get("computed_per_real"), 1.3, True)
    served = realistic.get("served_grpc", {})
    if "1" in served and "16" in served:
        goal("served articles/s at concurrency 16 ÷ at concurrency 1", served["16"]["articles_per_s"] / served["1"]["articles_per_s"], 0.95, False)
        goal("served (default precision) ÷ production scorer, concurrency 16", served["16"]["ratio_vs_production"], 3.0, False)
    int8 = realistic.get("onnx_int8", {}).get("16")
    if int8:
        goal("ONNX Runtime int8 ÷ production scorer, batch 16 (in process)", int8["ratio_vs_production"], 10.0, False)
    return goals


def _report(repo: Repository, context: dict[str, Any], requests: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "filter": repo.spec.name,
        "repository": str(repo.path),
        "card_recipe": CARD,
        "requests": requests,
        "matmul_params": context["params"],
        "peak_flops": context["peak_flops"],
        "machine": machine(),
        **body,
    }


def _heading(title: str, report: dict[str, Any]) -> str:
    return (
        f"# {title}: {report['filter']}\n\nCard's recipe: {CARD} (PyTorch + unmerged PEFT). "
        f"FLOP/s = 2 × {report['matmul_params']:,} parameters × tokens/s; peak = measured fp32 matmul "
        f"{report['peak_flops'] / 1e9:.1f} GFLOP/s ({report['machine']['torch_threads']} threads).\n\n"
    )


def _latency_figure(results: dict[str, Any], lengths: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    grouped_bars(ax, lengths, {e: [row[label]["p50_ms"] for label in lengths] for e, row in results.items()}, "p50 latency (ms)")
    ax.set_yscale("log")
    ax.set_title("batch-1 latency (p50) per text length")
    return fig


def _throughput_markdown(report: dict[str, Any]) -> str:
    parts = [f"# Throughput: {report['filter']}, {report['requests']} articles per run\n\n"
             f"Baseline: {report['baseline']} (PyTorch + PEFT, every batch of {PRODUCTION_BATCH} padded to max_length, "
             "as the filter's production scorer ran it). In process, concurrency = batch size (length-sorted batches); "
             "served, concurrency = requests in flight. computed/real = tokens run ÷ article tokens (the server's counters for served runs).\n"]
    for mix, figures in report["mixes"].items():
        parts.append(f"\n## {mix} lengths: median {figures['median_tokens']:.0f} tokens, mean {figures['mean_tokens']:.0f}, "
                     f"{figures['truncated']} of {figures['articles']} past max_length\n\n")
        rows = [[engine, level, s["articles_per_s"], s["ratio_vs_production"], s["computed_per_real"]]
                for engine, row in report["engines"][mix].items() for level, s in row.items()]
        parts.append(table(["engine", "concurrency", "articles/s", "× production scorer", "computed/real"], rows))
    parts.append("\n## Goals (measured in this run)\n\n")
    parts.append(table(["goal", "measured", "target", "met"], [[g["goal"], g["measured"], g["target"], g["met"]] for g in report["goals"]]))
    return "".join(parts)


def _throughput_figure(report: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(report["engines"])
    fig, axes = plt.subplots(2, len(mixes), figsize=(6.5 * len(mixes), 8), squeeze=False)
    for column, mix in enumerate(mixes):
        speed, waste = axes[0][column], axes[1][column]
        for engine, row in report["engines"][mix].items():
            levels = [int(c) for c in row]
            speed.plot(levels, [s["articles_per_s"] for s in row.values()], marker="o", label=engine)
            if all(s["computed_per_real"] is not None for s in row.values()):
                waste.plot(levels, [s["computed_per_real"] for s in row.values()], marker="o", label=engine)
        for ax, label in ((speed, "articles/s"), (waste, "computed / real tokens")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (in process: batch size)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        speed.set_title(f"{mix} lengths: throughput")
        waste.set_title(f"{mix} lengths: padding waste")
    fig.tight_layout()
    return fig
