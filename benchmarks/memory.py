"""``filterserve bench memory``: what each served model costs in RAM, and what the tokenizer step costs in time.

Several filters on one machine add up, and the answer to "how many fit" is the served
resident memory of each model's process, not its file size: ONNX Runtime holds the weights
(converted, for fp16 on the CPU), plus an arena that grows to the largest batch it has run.
This starts a server on the repository, reads every model's stub process (psutil: RSS, and
USS, the memory no other process shares) after loading, then again after one batch of
``batch × tokens`` on each tensor model, and times the tokenizer step alone: the figures that
decide whether filters should share a tokenizer step and what :mod:`filterserve.serve.memory`
assumes per model.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from filterserve import contract
from filterserve.benchmarks.engines import SERVED_TIMEOUT_S
from filterserve.benchmarks.options import MemoryOptions
from filterserve.benchmarks.report import grouped_bars, machine, table, write_report
from filterserve.errors import FilterServeError
from filterserve.progress import Steps
from filterserve.serve.assembly import PYTHON_STUB
from filterserve.serve.memory import MB, folder_bytes

HOP_REQUESTS = 50


def running_pid(server: Any) -> int:
    """The process id of a started :class:`~filterserve.serve.TritonServer` (inside its ``with``, it has one)."""
    if server.pid is None:
        raise FilterServeError("tritonserver is not running: no process to measure")
    return int(server.pid)


def stub_processes(server_pid: int) -> dict[str, Any]:
    """Model name → its stub process: the stub's first argument is ``<repository>/<model>/<version>/<file>``."""
    import psutil

    stubs = {}
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if child.name() == PYTHON_STUB:
                stubs[Path(child.cmdline()[1]).parent.parent.name] = child
        except (psutil.NoSuchProcess, psutil.ZombieProcess, IndexError):
            continue
    return stubs


def _memory(process: Any) -> dict[str, float]:
    info = process.memory_full_info()
    return {"rss_mb": round(info.rss / MB, 1), "uss_mb": round(info.uss / MB, 1)}


def _tokenizer_hop_ms(client: Any, model: str, text: str) -> float:
    """Median time of one request to the tokenizer step alone (one Python hop, one tokenization)."""
    import tritonclient.grpc as grpcclient

    data = np.array([[text.encode()]], dtype=object)
    tensor = grpcclient.InferInput(contract.TEXT, [1, 1], "BYTES")
    tensor.set_data_from_numpy(data)
    client.infer(model, [tensor])  # warm-up
    times = []
    for _ in range(HOP_REQUESTS):
        start = time.perf_counter()
        client.infer(model, [tensor])
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def run_token_batch(client: Any, model: str, batch: int, tokens: int, vocab_size: int, members: int | None = None) -> None:
    """One ``batch × tokens`` batch of random ids on a tensor model; a group's (``members``) rows cycle through its filters."""
    import tritonclient.grpc as grpcclient

    ids = np.random.default_rng(0).integers(1, vocab_size, size=(batch, tokens), dtype=np.int64)
    feeds = dict(zip(contract.TOKEN_INPUTS, (ids, np.ones_like(ids))))
    if members is not None:
        feeds[contract.FILTER_INDEX] = (np.arange(batch, dtype=np.int64) % members).reshape(-1, 1)
    inputs = []
    for name, data in feeds.items():
        tensor = grpcclient.InferInput(name, list(data.shape), "INT64")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    client.infer(model, inputs, client_timeout=SERVED_TIMEOUT_S)


def run_memory(options: MemoryOptions) -> dict[str, Any]:
    """Per model: files on disk, served RSS/USS after loading and after one ``batch × tokens`` batch."""
    import psutil
    import tritonclient.grpc as grpcclient

    from filterserve.manifest import read_filter_records, read_group_records
    from filterserve.serve import TritonServer

    repo, batch, tokens = options.repository, options.batch, options.tokens
    records = read_filter_records(repo)
    groups = read_group_records(repo)
    steps = Steps(total=3)
    models: dict[str, dict[str, Any]] = {}
    with steps.step(f"start tritonserver on {repo} and read every model's process"), TritonServer(repo) as server:
        stubs = stub_processes(running_pid(server))
        for name, record in records.items():
            kinds = {name: "ensemble", contract.tokenizer_model(name): "tokenizer", contract.decision_model(name): "decision"}
            kinds |= {model: f"tensor {precision}" for precision, model in record.tensor_models.items()}
            for model, kind in kinds.items():
                models[model] = {"filter": name, "kind": kind, "files_mb": round(folder_bytes(repo / model) / MB, 1)}
                if model in stubs:
                    models[model]["loaded"] = _memory(stubs[model])
        for name, group in groups.items():  # one tensor model for all the group's members
            model = group.tensor_model
            models[model] = {"filter": ", ".join(group.members), "kind": f"tensor {group.precision} (group {name})",
                             "files_mb": round(folder_bytes(repo / model) / MB, 1)}
            if model in stubs:
                models[model]["loaded"] = _memory(stubs[model])
        server_memory = _memory(psutil.Process(running_pid(server)))
        client = grpcclient.InferenceServerClient(server.grpc_url)
        with steps.step(f"one batch of {batch}×{tokens} tokens on every tensor model"):
            for record in records.values():
                for model in record.tensor_models.values():
                    run_token_batch(client, model, batch, min(tokens, record.max_length), record.vocab_size)
                    models[model]["after_batch"] = _memory(stubs[model])
            for group in groups.values():
                model = group.tensor_model
                run_token_batch(client, model, batch, min(tokens, group.max_length), group.vocab_size, len(group.members))
                models[model]["after_batch"] = _memory(stubs[model])
        with steps.step(f"tokenizer step alone, median of {HOP_REQUESTS} requests"):
            from filterserve.data import sample_articles

            article = sample_articles()[0]
            hops = {}
            for name, record in records.items():
                spec_text = record.filter["text_template"].format(title=article["title"], content=article["content"])
                hops[name] = _tokenizer_hop_ms(client, contract.tokenizer_model(name), spec_text)
        client.close()
    if not any("after_batch" in m for m in models.values()):
        raise FilterServeError(f"no tensor model of {repo} runs in a Python stub here; nothing to measure")
    report = {
        "repository": str(repo),
        "batch": batch,
        "tokens": tokens,
        "models": models,
        "tritonserver": server_memory,
        "tokenizer_hop_ms": hops,
        "machine": machine(),
    }
    rows = [[m, v["kind"], v["files_mb"], v.get("loaded", {}).get("rss_mb", ""), v.get("loaded", {}).get("uss_mb", ""),
             v.get("after_batch", {}).get("rss_mb", ""), v.get("after_batch", {}).get("uss_mb", "")] for m, v in models.items()]
    markdown = (f"# Served memory per model ({repo})\n\n"
                + table(["model", "kind", "files MB", "RSS MB loaded", "USS MB loaded",
                         f"RSS MB after {batch}×{tokens}", f"USS MB after {batch}×{tokens}"], rows)
                + f"\ntritonserver itself: RSS {server_memory['rss_mb']} MB. Tokenizer step alone (median ms): {hops}\n")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(8, 4))
    measured = [m for m, v in models.items() if "loaded" in v]
    grouped_bars(ax, measured, {
        "files": [models[m]["files_mb"] for m in measured],
        "RSS loaded": [models[m]["loaded"]["rss_mb"] for m in measured],
        "RSS after batch": [models[m].get("after_batch", models[m]["loaded"])["rss_mb"] for m in measured],
    }, "MB")
    write_report(options.out, "memory", report, markdown, figure)
    return report
