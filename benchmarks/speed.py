"""``filterserve bench latency`` and ``throughput``: every way to run the filter, same texts, same run.

Latency answers what the export and the server buy over the card's recipe (PyTorch + unmerged
PEFT) per article, as a ratio and as achieved FLOP/s against this machine's measured matmul
peak of the arithmetic each engine runs (fp32, bf16 or int8: :mod:`filterserve.benchmarks.peaks`).
Throughput answers what users see on a day's news: uneven article lengths, bursts of
requests, and the tokens computed for padding, against the filter's production scorer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # type: ignore[import-untyped]

from filterserve.benchmarks.articles import REALISTIC_MIX, articles_of_lengths, realistic_lengths, texts_of_length
from filterserve.benchmarks.engines import (
    BatchEngine,
    Engine,
    OpenVinoEngine,
    Repository,
    TorchEngine,
    exported_engines,
    n_exported_engines,
    open_choice,
    served_engines,
    served_variants,
)
from filterserve.benchmarks.options import LatencyOptions, ServerChoice, ThroughputOptions
from filterserve.benchmarks.peaks import ARITHMETICS, matmul_peaks, model_shapes
from filterserve.benchmarks.report import grouped_bars, machine, table, write_report

CARD = "pytorch_peft"
PRODUCTION = "production_scorer"
PRODUCTION_BATCH = 16
WARMUP = 2
SHORT_TOKENS = 32
# The median real article (DESIGN.md: 97 Qwen tokens over 116 multilingual articles).
NEWS_MEDIAN_TOKENS = 100
# The peer a user tries first: the card's recipe with one line changed, ``model.to(torch.bfloat16)``.
TORCH_BF16 = "pytorch_bf16"


def _timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters the exported graph multiplies by: all but the embedding table, which is only
    indexed, and (in a PEFT model) the LoRA matrices and the head's frozen original, which the merge removes."""
    skipped = ("embed_tokens", "lora_", "original_module")
    return sum(p.numel() for name, p in model.named_parameters() if not any(s in name for s in skipped))


def _engines(repo: Repository, server: ServerChoice, context: dict[str, Any]) -> Iterator[Engine]:
    """One engine at a time, so a 1.5B model is never held twice; the merge happens after PEFT is measured,
    and the bf16 peer is loaded afresh (a merge cannot be undone)."""
    from filterserve.export.load import load_reference

    loaded = load_reference(repo.base, repo.adapter, repo.spec)
    context["tokenizer"] = loaded.tokenizer
    context["params"] = matmul_params(loaded.model)
    yield TorchEngine(CARD, loaded.model, loaded.tokenizer, repo.spec.max_length)
    merged = loaded.model.merge_and_unload()
    yield TorchEngine("pytorch_merged", merged, loaded.tokenizer, repo.spec.max_length)
    del merged, loaded
    loaded = load_reference(repo.base, repo.adapter, repo.spec)
    yield TorchEngine(TORCH_BF16, loaded.model.to(torch.bfloat16), loaded.tokenizer, repo.spec.max_length)
    del loaded
    yield from exported_engines(repo, context["tokenizer"], in_process_f32=True)
    yield from served_engines(repo, server.url, server.protocol)
    if server.url is None:
        yield from served_variants(repo)


def _n_engines(repo: Repository, url: str | None) -> int:
    return 3 + n_exported_engines(repo, in_process_f32=True) + (1 if url else 1 + len(repo.tensor_models))


def _describe(engine: Engine, context: dict[str, Any]) -> None:
    """What the report says of an engine besides its figures: its arithmetic, and what OpenVINO ran."""
    context.setdefault("arithmetic", {})[engine.name] = engine.arithmetic
    if isinstance(engine, OpenVinoEngine):
        context.setdefault("openvino_execution", {})[engine.name] = engine.execution


def _efficiency(stats: dict[str, Any], tokens_per_s: float, arithmetic: str, context: dict[str, Any]) -> None:
    """FLOP/s of the exported graph at this token rate, and their share of the arithmetic's peak
    (None where this CPU has no peak for it: bf16 emulated on a CPU without bf16 arithmetic)."""
    stats["flops_per_s"] = 2 * context["params"] * tokens_per_s
    peak = context["peaks"].get(arithmetic)
    stats["fraction_of_peak"] = None if peak is None else stats["flops_per_s"] / peak["flops"]


def _speed_run(
    kind: str,
    repo: Repository,
    server: ServerChoice,
    units_per_engine: int,
    measure: Callable[[Engine, dict[str, Any], tqdm], dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Peak first (on an idle process), then each engine in turn under one progress bar.

    FLOP/s are derived afterwards: the parameter count comes from the merged model, which
    exists only once the card's recipe has been measured.
    """
    context: dict[str, Any] = {"peaks": matmul_peaks(model_shapes(repo.base))}
    results: dict[str, Any] = {}
    with tqdm(total=_n_engines(repo, server.url) * units_per_engine, desc=kind, unit="req") as bar:
        for engine in _engines(repo, server, context):
            bar.set_postfix_str(engine.name)
            _describe(engine, context)
            results[engine.name] = measure(engine, context, bar)
    return context, results


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def run_latency(options: LatencyOptions) -> dict[str, Any]:
    """Batch-1 latency at a short text, the median real article, half of max_length and max_length."""
    repo = open_choice(options.repository)
    requests = options.requests
    probe = repo.spec.max_length
    lengths = {"short": min(SHORT_TOKENS, probe), "news_median": min(NEWS_MEDIAN_TOKENS, probe),
               "median": max(probe // 2, 1), "max_length": probe}

    def measure(engine: Engine, context: dict[str, Any], bar: tqdm) -> dict[str, Any]:
        row = {}
        for label, n_tokens in lengths.items():
            text = texts_of_length(context["tokenizer"], n_tokens, 1)[0]
            times = []
            for i in range(WARMUP + requests):
                elapsed = _timed(partial(engine.one, text))
                if i >= WARMUP:
                    times.append(elapsed)
                bar.update()
            row[label] = _percentiles(times)
        return row

    context, results = _speed_run("latency", repo, options.server, len(lengths) * (WARMUP + requests), measure)
    for name, row in results.items():
        for label, stats in row.items():
            stats["speedup_p50_vs_card"] = results[CARD][label]["p50_ms"] / stats["p50_ms"]
            _efficiency(stats, lengths[label] / (stats["p50_ms"] / 1000), context["arithmetic"][name], context)
    report = _report(repo, context, requests, {"lengths_tokens": lengths, "engines": results})
    report["summary"] = {e: {label: round(s["p50_ms"], 2) for label, s in row.items()} for e, row in results.items()}
    rows = [[e, label, lengths[label], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["speedup_p50_vs_card"], s["flops_per_s"] / 1e9,
             context["arithmetic"][e], s["fraction_of_peak"]] for e, row in results.items() for label, s in row.items()]
    markdown = _heading("Latency at batch 1", report) + table(
        ["engine", "text", "tokens", "p50 ms", "p95 ms", "p99 ms", "speedup vs card (p50)", "GFLOP/s", "arithmetic", "of its peak"],
        rows,
    )
    write_report(options.out, "latency", report, markdown, _latency_figure(results, list(lengths)))
    return report


def _throughput_engines(repo: Repository, server: ServerChoice, context: dict[str, Any]) -> Iterator[Engine]:
    """The production scorer's way (PyTorch + PEFT, padded to max_length, batches of 16), every
    exported variant on length-sorted batches, then the server: the client and a plain caller."""
    from filterserve.export.load import load_reference

    loaded = load_reference(repo.base, repo.adapter, repo.spec)
    context["tokenizer"] = loaded.tokenizer
    context["params"] = matmul_params(loaded.model)
    yield TorchEngine(PRODUCTION, loaded.model, loaded.tokenizer, repo.spec.max_length, pad_to_max_length=True)
    yield TorchEngine(TORCH_BF16, loaded.model.to(torch.bfloat16), loaded.tokenizer, repo.spec.max_length, sort_by_length=True)
    del loaded
    yield from exported_engines(repo, context["tokenizer"], in_process_f32=True, sort_by_length=True)
    yield from served_engines(repo, server.url, server.protocol, plain=server.url is None)
    if server.url is None:
        yield from served_variants(repo)


def run_throughput(options: ThroughputOptions) -> dict[str, Any]:
    """Articles/s and computed/real tokens at each concurrency, on uniform and realistic article lengths.

    In process, concurrency is the batch size; served, it is the number of requests in flight
    (the server's dynamic batcher joins them). The production scorer pads every batch of 16 to
    max_length whatever the concurrency, so it runs once per mix and is the baseline of every ratio.
    """
    repo = open_choice(options.repository)
    spec, url, requests, mixes = repo.spec, options.server.url, options.requests, options.mixes
    context: dict[str, Any] = {"peaks": matmul_peaks(model_shapes(repo.base))}
    results: dict[str, dict[str, dict[str, Any]]] = {mix: {} for mix in mixes}
    articles: dict[str, list[tuple[str, str]]] = {}
    levels = [str(level) for level in options.concurrency]
    n_engines = 2 + n_exported_engines(repo, in_process_f32=True) + (1 if url else 2 + len(repo.tensor_models))
    with tqdm(total=n_engines * len(mixes), desc="throughput", unit="run") as bar:
        for engine in _throughput_engines(repo, options.server, context):
            _describe(engine, context)
            if not articles:
                lengths = {"uniform": [spec.max_length // 2] * requests, "realistic": realistic_lengths(requests, seed=1)}
                articles = {mix: articles_of_lengths(context["tokenizer"], spec, lengths[mix], seed=1) for mix in mixes}
            bar.set_postfix_str(engine.name)
            for mix in mixes:
                results[mix][engine.name] = _throughput_row(engine, articles[mix], spec, levels, context["tokenizer"])
                bar.update()
    for engines in results.values():
        for name, row in engines.items():
            for level, stats in row.items():
                stats["ratio_vs_production"] = stats["articles_per_s"] / engines[PRODUCTION][level]["articles_per_s"]
                if stats["computed_tokens"] is not None:
                    _efficiency(stats, stats["computed_tokens"] / stats["seconds"], context["arithmetic"][name], context)
    read = {mix: spec.model_texts([spec.input_text(*a) for a in arts], context["tokenizer"]) for mix, arts in articles.items()}
    real = {mix: [min(len(context["tokenizer"](text)["input_ids"]), spec.max_length) for text in texts]
            for mix, texts in read.items()}
    report = {
        "filter": spec.name,
        "repository": str(repo.path),
        "baseline": PRODUCTION,
        "requests": requests,
        "concurrency": list(options.concurrency),
        "mixes": {mix: {"articles": len(articles[mix]), "median_tokens": float(np.median(real[mix])),
                        "mean_tokens": float(np.mean(real[mix])), "head_tail": spec.head_tail is not None,
                        "truncated": sum(len(context["tokenizer"](spec.input_text(*a))["input_ids"]) > spec.max_length
                                         for a in articles[mix])}
                  for mix in mixes},
        "realistic_mix": [dict(zip(("component", "share", "min_tokens", "max_tokens"), c)) for c in REALISTIC_MIX],
        "engines": results,
        "goals": _goals(results, repo),
        **_efficiency_context(context),
        "machine": machine(),
    }
    report["summary"] = {mix: {e: {c: round(s["articles_per_s"], 3) for c, s in row.items()} for e, row in engines.items()}
                         for mix, engines in results.items()}
    write_report(options.out, "throughput", report, _throughput_markdown(report), _throughput_figure(report))
    return report


def _throughput_row(
    engine: Engine, articles: list[tuple[str, str]], spec: Any, levels: list[str], tokenizer: Any
) -> dict[str, dict[str, Any]]:
    """In-process engines read the model texts (template and head+tail cut, as the production scorer
    does before tokenizing); served ones get the articles, and the server cuts them."""
    texts = spec.model_texts([spec.input_text(*a) for a in articles], tokenizer)
    items: list[Any] = texts if isinstance(engine, BatchEngine) else articles
    row: dict[str, dict[str, Any]] = {}
    for level in levels:
        if engine.name == PRODUCTION and row:  # padded to max_length in batches of 16: the level changes nothing
            row[level] = dict(next(iter(row.values())))
            continue
        size = PRODUCTION_BATCH if engine.name == PRODUCTION else int(level)
        engine.run(items[:size], size)  # warm-up at this batch size / concurrency
        elapsed = _timed(partial(engine.run, items, size))
        tokens = engine.tokens
        row[level] = {
            "articles_per_s": len(items) / elapsed,
            "seconds": elapsed,
            "real_tokens": tokens.real if tokens else None,
            "computed_tokens": tokens.computed if tokens else None,
            "computed_per_real": tokens.ratio if tokens else None,
        }
    return row


def _served_row(repo: Repository, precision: str) -> str:
    """The served row of a variant: the default is served through the ensemble itself (``served_grpc``)."""
    return "served_grpc" if precision == repo.manifest.default_precision else f"served_{precision}"


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
        goal("served articles/s at concurrency 16 ÷ at concurrency 1",
             served["16"]["articles_per_s"] / served["1"]["articles_per_s"], 0.95, False)
        goal("served (default precision) ÷ production scorer, concurrency 16", served["16"]["ratio_vs_production"], 3.0, False)
    int8 = realistic.get("onnx_int8", {}).get("16")
    if int8:
        goal("ONNX Runtime int8 ÷ production scorer, batch 16 (in process)", int8["ratio_vs_production"], 10.0, False)

    def ratio(faster: str, slower: str) -> float | None:
        a, b = realistic.get(faster, {}).get("16"), realistic.get(slower, {}).get("16")
        return a["articles_per_s"] / b["articles_per_s"] if a and b else None

    goal("served bf16 (OpenVINO) ÷ served fp32 (ONNX Runtime), realistic mix, concurrency 16",
         ratio(_served_row(repo, "bf16"), _served_row(repo, "fp32")), 1.7, False)
    goal("OpenVINO int8 ÷ ONNX Runtime int8, realistic mix, batch 16 (in process)", ratio("openvino_int8", "onnx_int8"), 1.3, False)
    goal("OpenVINO int8 ÷ ONNX Runtime int8, realistic mix, concurrency 16 (served)",
         ratio(_served_row(repo, "ov_int8"), _served_row(repo, "int8")), 1.3, False)
    return goals


def _efficiency_context(context: dict[str, Any]) -> dict[str, Any]:
    """What the FLOP/s and shares of peak were computed from, and what each OpenVINO row ran."""
    return {
        "matmul_params": context["params"],
        "peaks": context["peaks"],
        "arithmetic": context["arithmetic"],
        "openvino_execution": context.get("openvino_execution", {}),
    }


def _report(repo: Repository, context: dict[str, Any], requests: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "filter": repo.spec.name,
        "repository": str(repo.path),
        "card_recipe": CARD,
        "requests": requests,
        **_efficiency_context(context),
        "machine": machine(),
        **body,
    }


def _heading(title: str, report: dict[str, Any]) -> str:
    return f"# {title}: {report['filter']}\n\nCard's recipe: {CARD} (PyTorch + unmerged PEFT). " + _peaks_note(report)


def _peaks_note(report: dict[str, Any]) -> str:
    """How FLOP/s and "of its peak" are computed, and what OpenVINO reported running."""
    peaks = ", ".join(f"{a} {p['flops'] / 1e9:.1f}" for a, p in report["peaks"].items())
    missing = [a for a in ARITHMETICS if a not in report["peaks"]]
    if missing:
        peaks += f" ({', '.join(missing)}: none, this CPU has no {'/'.join(missing)} arithmetic, so those rows have no peak)"
    ran = "".join(f"- {engine}: {e['engine']} ran {e['precision']} (compute layers {e['compute_layers']}; CPU flags "
                  f"{', '.join(e['cpu']['flags']) or 'none'})\n" for engine, e in report["openvino_execution"].items())
    return (f"FLOP/s = 2 × {report['matmul_params']:,} parameters × tokens/s (computed tokens); of its peak = against the "
            f"measured matmul peak of the arithmetic the engine runs: {peaks} GFLOP/s "
            f"({report['machine']['torch_threads']} threads).\n\n" + (f"{ran}\n" if ran else ""))


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
             "served, concurrency = requests in flight. computed/real = tokens run ÷ article tokens "
             "(the server's counters for served runs). "
             "OpenVINO tensor models are served unbatched (max_batch_size 0: Triton's OpenVINO backend would pad every run to "
             "max_batch_size rows), so concurrency only queues their requests.\n\n" + _peaks_note(report)]
    for mix, figures in report["mixes"].items():
        parts.append(f"\n## {mix} lengths: median {figures['median_tokens']:.0f} tokens, mean {figures['mean_tokens']:.0f}, "
                     f"{figures['truncated']} of {figures['articles']} past max_length\n\n")
        rows = [[engine, level, s["articles_per_s"], s["ratio_vs_production"], s["computed_per_real"],
                 report["arithmetic"][engine], s.get("fraction_of_peak")]
                for engine, row in report["engines"][mix].items() for level, s in row.items()]
        parts.append(table(["engine", "concurrency", "articles/s", "× production scorer", "computed/real", "arithmetic",
                            "of its peak"], rows))
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
        for ax in (speed, waste):  # a dozen engines: the default ten colours would repeat
            ax.set_prop_cycle(color=[plt.cm.tab20(i) for i in range(20)])
        for engine, row in report["engines"][mix].items():
            levels = [int(c) for c in row]
            speed.plot(levels, [s["articles_per_s"] for s in row.values()], marker="o", label=engine)
            if all(s["computed_per_real"] is not None for s in row.values()):
                waste.plot(levels, [s["computed_per_real"] for s in row.values()], marker="o", label=engine)
        for ax, label in ((speed, "articles/s"), (waste, "computed / real tokens")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (in process: batch size)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        speed.set_title(f"{mix} lengths: throughput")
        waste.set_title(f"{mix} lengths: padding waste")
    fig.tight_layout()
    return fig
