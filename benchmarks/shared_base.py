"""``filterserve bench shared-base``: N filters of one base served merged (one model each) and shared (one group), side by side.

The question a shared base answers is how many filters fit on one box, and at what cost per
article. So one run measures, for every N asked (1, 2, 4, 6 by default) and both layouts:

- served memory: the RSS of tritonserver and every model's stub, after loading and after each
  tensor model ran one ``batch × tokens`` batch (its arena grows to the largest batch it ran);
- throughput: article·filter results per second, every article of the realistic mix through
  every filter in one pass (``filterserve score``'s way: :class:`MultiFilterClient`);
- single-filter latency: batch 1, the first filter, at a median-length and a max_length text;

and, in process with ONNX Runtime, what the LoRA paths cost: the group's model against the merged
model of the same filter, on the same batches, with the LoRA share of the FLOPs beside it. A layout
that the pre-flight memory check refuses is reported as not fitting, with the check's message.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from filterserve import contract
from filterserve.benchmarks.articles import articles_of_lengths, realistic_lengths, texts_of_length
from filterserve.benchmarks.engines import SERVED_TIMEOUT_S
from filterserve.benchmarks.options import FamilyOptions, SharedBaseOptions
from filterserve.benchmarks.report import machine, table, write_report
from filterserve.errors import FilterServeError
from filterserve.export.shared_base import MemberSource
from filterserve.filter_loader import load_filter
from filterserve.filters import FilterSpec
from filterserve.manifest import REPOSITORY_FORMAT, REPOSITORY_MANIFEST, read_filter_records, write_json_atomic
from filterserve.progress import Steps

FAMILY_RECORD = "family.json"
LATENCY_TOKENS = 100  # the realistic mix's median article
WARMUP = 2
MB = 1 << 20


# ---------------------------------------------------------------------------------------------
# A family of stand-in filters on one base


def build_family(options: FamilyOptions, seed: int = 0) -> dict[str, Any]:
    """One random base and ``count`` adapters on it, ``filter_1`` … : 8 dimensions at LoRA rank 16 (uplifting v4's)
    and 5 at rank 8 (its first five) in turn.

    Written as ``out/base``, ``out/<filter>/adapter`` and ``out/<filter>/filter.json``, listed in
    ``out/family.json``: the input of :func:`run_shared_base`. Random weights: the figures are memory
    and speed, never scores.
    """
    from filterserve.export.standin import build_standin
    from filterserve.filters import UPLIFTING_V4

    out, count = options.out, options.count
    five = FilterSpec("filter", UPLIFTING_V4.dimensions[:5], UPLIFTING_V4.weights[:5], text_template=UPLIFTING_V4.text_template)
    kinds = [(UPLIFTING_V4, 16), (five, 8)]
    first = None
    members = []
    for k in range(count):
        spec, rank = kinds[k % 2]
        spec = replace(spec, name=f"filter_{k + 1}")
        made = build_standin(out if first is None else out / spec.name, spec, shape=options.shape, seed=seed + k,
                             tokenizer_file=options.tokenizer, rank=rank, on_base=first)
        if first is None:  # out/base is the family's; the first adapter moves beside the others
            (out / spec.name).mkdir()
            made = replace(made, adapter_dir=made.adapter_dir.rename(out / spec.name / "adapter"))
            first = made
        (out / spec.name / "filter.json").write_text(json.dumps(spec.to_dict(), indent=2), encoding="utf-8")
        members.append({"filter": spec.name, "adapter": str(made.adapter_dir), "description": str(out / spec.name / "filter.json"),
                        "dimensions": spec.num_labels, "rank": rank})
    family = {"base": str(out / "base"), "members": members}
    (out / FAMILY_RECORD).write_text(json.dumps(family, indent=2), encoding="utf-8")
    return family


def read_family(folder: Path) -> tuple[str, list[MemberSource]]:
    path = folder / FAMILY_RECORD
    if not path.is_file():
        raise FilterServeError(f"{folder} holds no {FAMILY_RECORD}: build one with `filterserve bench family --out {folder}`")
    family = json.loads(path.read_text(encoding="utf-8"))
    return family["base"], [MemberSource(load_filter(m["description"]), Path(m["adapter"])) for m in family["members"]]


# ---------------------------------------------------------------------------------------------
# The repositories: merged filters (subsets of one export) and one group per N


def _merged_subset(full: Path, names: Sequence[str], dest: Path) -> Path:
    """A repository holding the merged filters ``names`` of ``full``: hard links, no second copy on disk."""
    records = read_filter_records(full)
    dest.mkdir(parents=True)
    for name in names:
        for model in records[name].models:
            shutil.copytree(full / model, dest / model, copy_function=os.link)
        shutil.copy2(full / f"{name}.filter.json", dest / f"{name}.filter.json")
    write_json_atomic(dest / REPOSITORY_MANIFEST, {"format": REPOSITORY_FORMAT, "filters": {n: f"{n}.filter.json" for n in names}})
    return dest


def export_merged(base: str, members: list[MemberSource], work: Path, settings: Any, quiet: Any) -> Path:
    """Every filter merged (a tensor model each) into one repository, its subsets are hard-linked from."""
    from filterserve.export.pipeline import export_filter

    full = work / "merged_all"
    for member in members:
        export_filter(base, member.adapter, full, member.spec, repository=settings, stream=quiet)
    return full


# ---------------------------------------------------------------------------------------------
# What one served layout costs


def _rss(server_pid: int) -> dict[str, float]:
    """tritonserver and each stub (by model), in MB, and their sum."""
    import psutil

    from filterserve.benchmarks.memory import stub_processes

    processes = {"tritonserver": psutil.Process(server_pid), **stub_processes(server_pid)}
    found = {name: round(p.memory_info().rss / MB, 1) for name, p in processes.items()}
    return {"total_mb": round(sum(found.values()), 1), "by_process_mb": found}


def _fill_arenas(server: Any, repo: Path, batch: int, tokens: int) -> None:
    """One ``batch × tokens`` batch on every tensor model (a group's rows spread over its members)."""
    import tritonclient.grpc as grpcclient

    from filterserve.benchmarks.memory import run_token_batch
    from filterserve.manifest import read_group_records

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for record in read_filter_records(repo).values():
            for model in record.tensor_models.values():
                run_token_batch(client, model, batch, min(tokens, record.max_length), record.vocab_size)
        for group in read_group_records(repo).values():
            run_token_batch(client, group.tensor_model, batch, min(tokens, group.max_length), group.vocab_size,
                            members=len(group.members))
    finally:
        client.close()


def _throughput(url: str, names: list[str], articles: list[tuple[str, str]], concurrency: int) -> dict[str, float]:
    from filterserve.client import MultiFilterClient

    with MultiFilterClient(url, "grpc", filters=names, timeout_s=SERVED_TIMEOUT_S) as client:
        list(client.score_iter(articles[:concurrency], concurrency))  # warm-up
        start = time.perf_counter()
        results = list(client.score_iter(articles, concurrency))
        elapsed = time.perf_counter() - start
    failed = [r for row in results for r in row.values() if not hasattr(r, "scores")]
    if failed:
        raise FilterServeError(f"{len(failed)} of {len(results) * len(names)} results failed, first: {failed[0]}")
    return {"results_per_s": len(results) * len(names) / elapsed, "articles_per_s": len(results) / elapsed, "seconds": elapsed}


def _latency(url: str, spec: FilterSpec, texts: dict[str, str], requests: int) -> dict[str, float]:
    from filterserve.client import FilterClient

    client = FilterClient(url, "grpc", model=spec.name, timeout_s=SERVED_TIMEOUT_S)
    try:
        row = {}
        for label, text in texts.items():
            times = []
            for i in range(WARMUP + requests):
                start = time.perf_counter()
                client.score_text(text)
                if i >= WARMUP:
                    times.append((time.perf_counter() - start) * 1000)
            row[f"{label}_p50_ms"] = statistics.median(times)
        return row
    finally:
        client.close()


def measure_served(repo: Path, names: list[str], articles: list[tuple[str, str]], latency_texts: dict[str, str],
                   spec: FilterSpec, options: SharedBaseOptions) -> dict[str, Any]:
    from filterserve.benchmarks.memory import running_pid
    from filterserve.serve import TritonServer
    from filterserve.serve.memory import check_memory

    try:
        check_memory(repo)  # what serve checks first: a layout it refuses does not fit on this machine
    except FilterServeError as exc:
        return {"fits": False, "refused": str(exc)}
    with TritonServer(repo) as server:
        loaded = _rss(running_pid(server))
        _fill_arenas(server, repo, options.batch, options.tokens)
        after = _rss(running_pid(server))
        speed = _throughput(server.grpc_url, names, articles, options.concurrency)
        latency = _latency(server.grpc_url, spec, latency_texts, options.requests)
    return {"fits": True, "rss_loaded": loaded, "rss_after_batch": after, "throughput": speed, "latency": latency}


# ---------------------------------------------------------------------------------------------
# What the LoRA paths cost, in process


def lora_cost(merged_onnx: Path, group_onnx: Path, group_size: int, tokenizer: Any, spec: FilterSpec,
              articles: list[tuple[str, str]], requests: int) -> dict[str, Any]:
    """The first filter through its merged model and through the group's (its rows only), same batches: ms and ratio."""
    from filterserve.export.parity import encode, ort_scores, ort_session

    merged, shared = ort_session(merged_onnx), ort_session(group_onnx)
    texts = [spec.input_text(*a) for a in articles]
    lengths = {"batch 1, median text": texts_of_length(tokenizer, LATENCY_TOKENS, 1),
               "batch 1, max_length text": texts_of_length(tokenizer, spec.max_length, 1),
               f"batch {min(16, len(texts))}, realistic mix": texts[:16]}
    rows = {}
    for label, batch_texts in lengths.items():
        ids, mask = encode(tokenizer, batch_texts, spec.max_length)
        index = np.zeros((ids.shape[0], 1), dtype=np.int64)

        def timed(run) -> float:
            for _ in range(WARMUP):
                run()
            times = []
            for _ in range(requests):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1000)
            return statistics.median(times)

        merged_ms = timed(partial(ort_scores, merged, ids, mask))
        shared_ms = timed(partial(ort_scores, shared, ids, mask, index))
        rows[label] = {"tokens": int(ids.size), "merged_ms": merged_ms, "shared_ms": shared_ms, "shared_over_merged": shared_ms / merged_ms}
    return {"group_size": group_size, "runs": rows, "lora_flop_share": lora_flop_share(group_onnx)}


def lora_flop_share(group_onnx: Path) -> float:
    """LoRA multiply-adds per token over those of the base layers they sit on, read off the group's stacks.

    A row computes one member's LoRA at the largest rank any member has on that layer (ranks are
    padded with zeros to stack them), so this is the share one row pays.
    """
    import onnx

    model = onnx.load(str(group_onnx), load_external_data=False)
    stacks = {t.name: tuple(t.dims) for t in model.graph.initializer if t.name.endswith((".lora_a", ".lora_b"))}
    lora = sum(d[1] * d[2] for d in stacks.values())  # [members, in, r] and [members, r, out]
    base = sum(d[1] * stacks[name.removesuffix("_a") + "_b"][2] for name, d in stacks.items() if name.endswith("_a"))
    return lora / base if base else float("nan")


# ---------------------------------------------------------------------------------------------
# The run


def run_shared_base(options: SharedBaseOptions) -> dict[str, Any]:
    """Merged vs shared at every N in ``counts``: served memory, throughput, single-filter latency; LoRA cost in process."""
    import tempfile

    from filterserve.export.load import load_tokenizer
    from filterserve.model_repository.repository import RepositorySettings

    base, members = read_family(options.family)
    counts = sorted(options.counts)
    if counts[-1] > len(members):
        raise FilterServeError(f"--counts must lie between 1 and the {len(members)} filters of {options.family}, got {list(counts)}")
    settings = RepositorySettings(max_batch_size=max(options.batch, 16))
    steps = Steps(total=2 + 3 * len(counts))
    work = options.work
    scratch = work or Path(tempfile.mkdtemp(prefix="filterserve-shared-bench-"))
    tokenizer = load_tokenizer(members[0].adapter)
    spec = members[0].spec
    mix = articles_of_lengths(tokenizer, spec, realistic_lengths(options.articles, seed=1), seed=1)
    latency_texts = {"median": texts_of_length(tokenizer, LATENCY_TOKENS, 1)[0],
                     "max_length": texts_of_length(tokenizer, spec.max_length, 1)[0]}
    from filterserve.export.group import build_group
    from filterserve.manifest import read_group_records

    served: dict[str, dict[int, Any]] = {"merged": {}, "shared": {}}
    try:
        with open(os.devnull, "w") as quiet:  # the exports' own progress is not shown
            with steps.step(f"export {counts[-1]} filters merged (a tensor model each)"):
                full = export_merged(base, members[: counts[-1]], scratch, settings, quiet)
            for n in counts:
                names = [m.spec.name for m in members[:n]]
                repos = {"merged": _merged_subset(full, names, scratch / f"merged_{n}"), "shared": scratch / f"shared_{n}"}
                with steps.step(f"export a shared-base group of {n} filter(s)"):
                    build_group(base, members[:n], repos["shared"], settings, stream=quiet)
                for kind, repo in repos.items():
                    with steps.step(f"serve {n} filter(s) {kind}: memory, throughput, latency"):
                        served[kind][n] = measure_served(repo, names, mix, latency_texts, spec, options)
                if n != counts[-1] and work is None:  # a 1.5B group is GBs: keep only the largest, for the LoRA cost
                    shutil.rmtree(repos["shared"])
        with steps.step("the LoRA paths' cost in process (ONNX Runtime, the first filter)"):
            largest = scratch / f"shared_{counts[-1]}"
            group = next(iter(read_group_records(largest).values()))
            cost = lora_cost(full / contract.tensor_model(spec.name) / "1" / "model.onnx",
                             largest / group.tensor_model / "1" / "model.onnx", counts[-1], tokenizer, spec, mix,
                             options.requests)
    finally:
        if work is None:
            shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "base": base,
        "filters": [{"name": m.spec.name, "dimensions": m.spec.num_labels, "adapter": str(m.adapter)} for m in members],
        "counts": counts,
        "batch": options.batch,
        "tokens": options.tokens,
        "articles": len(mix),
        "concurrency": options.concurrency,
        "served": {kind: {str(n): v for n, v in by_n.items()} for kind, by_n in served.items()},
        "lora_cost": cost,
        "goals": _goals(served, counts),
        "machine": machine(),
    }
    report["summary"] = {kind: {str(n): (v["rss_after_batch"]["total_mb"], round(v["throughput"]["results_per_s"], 3)) if v["fits"]
                                else "does not fit" for n, v in by_n.items()} for kind, by_n in served.items()}
    write_report(options.out, "shared_base", report, _markdown(report), _figure(report))
    return report


def _goals(served: dict[str, dict[int, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure measured in this run."""
    goals = []

    def goal(what: str, value: float | None, target: float, at_most: bool) -> None:
        if value is not None:
            goals.append({"goal": what, "measured": value, "target": target, "met": bool(value <= target if at_most else value >= target)})

    merged, shared = served["merged"], served["shared"]
    one = merged.get(1)
    largest = counts[-1]
    if one and one["fits"] and shared[largest]["fits"]:
        goal(f"RSS of a group of {largest} ÷ RSS of 1 merged filter (after a batch)",
             shared[largest]["rss_after_batch"]["total_mb"] / one["rss_after_batch"]["total_mb"], 1.3, True)
    both = [n for n in counts if merged[n]["fits"] and shared[n]["fits"]]
    if both:
        n = both[-1]
        goal(f"throughput shared ÷ merged, {n} filters, realistic mix",
             shared[n]["throughput"]["results_per_s"] / merged[n]["throughput"]["results_per_s"], 0.95, False)
        goal(f"single-filter latency shared ÷ merged, median text, {n} filters loaded",
             shared[n]["latency"]["median_p50_ms"] / merged[n]["latency"]["median_p50_ms"], 1.1, True)
    return goals


def _markdown(report: dict[str, Any]) -> str:
    rows = []
    for n in report["counts"]:
        for kind in ("merged", "shared"):
            v = report["served"][kind][str(n)]
            if not v["fits"]:
                rows.append([n, kind, "does not fit", "", "", "", "", v["refused"]])
                continue
            rows.append([n, kind, v["rss_loaded"]["total_mb"], v["rss_after_batch"]["total_mb"], v["throughput"]["results_per_s"],
                         v["latency"]["median_p50_ms"], v["latency"]["max_length_p50_ms"], ""])
    cost = report["lora_cost"]
    cost_rows = [[label, r["tokens"], r["merged_ms"], r["shared_ms"], r["shared_over_merged"]] for label, r in cost["runs"].items()]
    return (
        f"# One base for N filters: merged vs shared ({report['base']})\n\n"
        f"Memory: RSS of tritonserver + every stub, after loading and after each tensor model ran "
        f"{report['batch']}×{report['tokens']} tokens. "
        f"Throughput: {report['articles']} articles of the realistic mix, each through every filter (one pass, "
        f"{report['concurrency']} requests in flight per filter), in article·filter results per second. Latency: batch 1, "
        f"filter {report['filters'][0]['name']}, p50.\n\n"
        + table(["filters", "layout", "RSS MB loaded", "RSS MB after batch", "results/s", "latency ms (median text)",
                 "latency ms (max_length)", "refused"], rows)
        + f"\n## The LoRA paths in process (ONNX Runtime, filter {report['filters'][0]['name']}, group of {cost['group_size']})\n\n"
        f"LoRA multiply-adds per token: {cost['lora_flop_share']:.2%} of the base's linear layers.\n\n"
        + table(["run", "tokens", "merged ms", "shared ms", "shared ÷ merged"], cost_rows)
        + "\n## Goals (measured in this run)\n\n"
        + table(["goal", "measured", "target", "met"], [[g["goal"], g["measured"], g["target"], g["met"]] for g in report["goals"]])
    )


def _figure(report: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, speed, latency) = plt.subplots(1, 3, figsize=(15, 4.5))
    for kind, marker in (("merged", "o"), ("shared", "s")):
        fitting = [(int(n), v) for n, v in report["served"][kind].items() if v["fits"]]
        ns = [n for n, _ in fitting]
        memory.plot(ns, [v["rss_after_batch"]["total_mb"] / 1024 for _, v in fitting], marker=marker, label=kind)
        speed.plot(ns, [v["throughput"]["results_per_s"] for _, v in fitting], marker=marker, label=kind)
        latency.plot(ns, [v["latency"]["median_p50_ms"] for _, v in fitting], marker=marker, label=f"{kind}, median text")
        latency.plot(ns, [v["latency"]["max_length_p50_ms"] for _, v in fitting], marker=marker, linestyle="--",
                     label=f"{kind}, max_length text")
    for ax, title, label in ((memory, "served RSS after a batch", "GB"), (speed, "throughput, realistic mix", "article·filter results/s"),
                             (latency, "single-filter latency (batch 1, p50)", "ms")):
        ax.set_xlabel("filters served")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
