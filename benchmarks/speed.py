"""``filterserve bench latency`` and ``throughput``: every way to run the filter, same texts, same run.

The question the numbers answer is what the export and the server buy over the card's recipe
(PyTorch + unmerged PEFT), so every engine is reported as a ratio against it, and as achieved
FLOP/s against this machine's measured matmul peak, which says how much headroom is left.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from filterserve.benchmarks.engines import Engine, Repository, TorchEngine, open_repository, ort_engines, served_engines
from filterserve.benchmarks.report import grouped_bars, machine, table, write_report

CARD = "pytorch_peft"
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


def texts_of_length(tokenizer: Any, n_tokens: int, count: int, seed: int = 0) -> list[str]:
    """``count`` different texts of exactly ``n_tokens`` tokens (decoded, then checked by re-encoding)."""
    from filterserve.data import sample_articles

    words = " ".join(f"{a['title']} {a['content']}" for a in sample_articles()).split()
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        rng.shuffle(words)
        ids = tokenizer(" ".join(words * (n_tokens // len(words) + 2)))["input_ids"]
        text = tokenizer.decode(ids[:n_tokens])
        while len(tokenizer(text)["input_ids"]) > n_tokens:
            text = text[:-1]
        texts.append(text)
    return texts


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


def run_throughput(
    repository: str | Path,
    base: str | None = None,
    adapter: str | Path | None = None,
    url: str | None = None,
    protocol: str = "grpc",
    requests: int = 64,
    concurrency: Sequence[int] = (1, 4, 16, 64),
    out: str | Path = "bench-report",
    filter_name: str | None = None,
) -> dict[str, Any]:
    """Articles/s at each concurrency: in process as batches of that size, served as requests in flight
    (the server's dynamic batcher joins them)."""
    repo = open_repository(repository, base, adapter, filter_name)
    probe = repo.spec.max_length
    n_tokens = max(probe // 2, 1)

    def measure(engine: Engine, context: dict[str, Any], bar: tqdm) -> dict[str, Any]:
        texts = texts_of_length(context["tokenizer"], n_tokens, requests, seed=1)
        row = {}
        for level in concurrency:
            engine.run(texts[:level], level)  # warm-up at this batch size / concurrency
            elapsed = _timed(lambda: engine.run(texts, level))
            bar.update(requests)
            row[str(level)] = {"articles_per_s": requests / elapsed, "tokens_per_s": requests * n_tokens / elapsed, "seconds": elapsed}
        return row

    context, results = _speed_run("throughput", repo, url, protocol, requests * len(concurrency), measure)
    for row in results.values():
        for level, stats in row.items():
            stats["ratio_vs_card"] = stats["articles_per_s"] / results[CARD][level]["articles_per_s"]
            stats["flops_per_s"] = 2 * context["params"] * stats["tokens_per_s"]
            stats["fraction_of_peak"] = stats["flops_per_s"] / context["peak_flops"]
    report = _report(repo, context, requests, {"tokens_per_text": n_tokens, "concurrency": list(concurrency), "engines": results})
    report["summary"] = {e: {c: round(s["articles_per_s"], 2) for c, s in row.items()} for e, row in results.items()}
    rows = [[e, level, s["articles_per_s"], s["tokens_per_s"], s["ratio_vs_card"], s["flops_per_s"] / 1e9, s["fraction_of_peak"]]
            for e, row in results.items() for level, s in row.items()]
    markdown = _heading(f"Throughput, {requests} texts of {n_tokens} tokens", report) + table(
        ["engine", "concurrency", "articles/s", "tokens/s", "× card", "GFLOP/s", "of peak"], rows
    )
    write_report(Path(out), "throughput", report, markdown, _throughput_figure(results))
    return report


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


def _throughput_figure(results: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for engine, row in results.items():
        ax.plot([int(c) for c in row], [s["articles_per_s"] for s in row.values()], marker="o", label=engine)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (in process: batch size)")
    ax.set_ylabel("articles/s")
    ax.set_title("throughput against concurrency")
    ax.legend(fontsize=7)
    return fig
