"""``filterserve bench <fixture|accuracy|latency|throughput>`` arguments and entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from filterserve import defaults
from filterserve.contract import GATE_TOLERANCE
from filterserve.filter_loader import load_filter


def _repository_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", required=True, help="folder written by `filterserve export`")
    parser.add_argument("--name", help="which filter of the repository (default: its only one)")
    parser.add_argument("--base", help="base model (default: the path in the filter's record)")
    parser.add_argument("--adapter", help="adapter folder (default: the path in the filter's record)")
    parser.add_argument("--out", default="bench-report", help="folder for the markdown, JSON and PNG reports")


def _served_arguments(parser: argparse.ArgumentParser, started_here: bool) -> None:
    parser.add_argument(
        "--url",
        help="HOST:PORT of a running server"
        + (" (default: start one on the repository and use gRPC and HTTP)" if started_here else " (default: no served model)"),
    )
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc", help="protocol of --url")


def _concurrencies(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not items or min(items) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be positive integers, got {value!r}")
    return list(dict.fromkeys(items))


def _mixes(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in ("uniform", "realistic")]
    if not items or unknown:
        raise argparse.ArgumentTypeError(f"mixes are uniform and realistic, got {value!r}")
    return list(dict.fromkeys(items))


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)

    fixture = sub.add_parser("fixture", help="train a tiny Qwen2 + LoRA filter on generated labelled articles")
    fixture.add_argument("--out", required=True, help="folder for base/, adapter/, train.jsonl, val.jsonl")
    fixture.add_argument("--steps", type=int, default=600, help="training steps (batch 16)")
    fixture.add_argument("--filter", help="filter description JSON (default: uplifting v4)")
    fixture.add_argument("--seed", type=int, default=42)

    accuracy = sub.add_parser("accuracy", help="MAE/RMSE of the reference, every exported variant and the served model")
    accuracy.add_argument("--data", required=True, help="labelled JSONL: title, content, one field per dimension")
    _repository_arguments(accuracy)
    _served_arguments(accuracy, started_here=False)
    accuracy.add_argument("--tolerance", type=float, default=GATE_TOLERANCE, help="largest MAE increase admitted vs the reference")

    memory = sub.add_parser("memory", help="served RAM per model (after loading, after a batch) and the tokenizer step's time")
    memory.add_argument("--model-repository", required=True, help="folder written by `filterserve export`")
    memory.add_argument("--batch", type=int, default=8, help="rows of the batch run on every tensor model")
    memory.add_argument("--tokens", type=int, default=512, help="tokens per row (capped at the filter's max_length)")
    memory.add_argument("--out", default="bench-report", help="folder for the markdown, JSON and PNG reports")

    family = sub.add_parser("family", help="one random base and N stand-in filters on it (8 and 5 dimensions in turn, "
                            "LoRA ranks 16 and 8), the input of bench shared-base")
    family.add_argument("--out", required=True, help="folder for base/, a folder per filter and family.json")
    family.add_argument("--count", type=int, default=6, help="how many filters (default: 6)")
    family.add_argument("--shape", choices=defaults.STANDIN_SHAPES, default=defaults.STANDIN_SHAPE,
                        help="tiny (seconds), or a real base's dimensions with random weights")
    family.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    family.add_argument("--tokenizer", help="a real tokenizer.json (Qwen2.5's, or Gemma-3's for the gemma3 shapes): the real vocabulary and token lengths")

    shared = sub.add_parser("shared-base", help="N filters of one base served merged vs as one shared-base group: "
                            "served memory, throughput, single-filter latency, what the LoRA paths cost")
    shared.add_argument("--family", required=True, help="folder written by `filterserve bench family`")
    shared.add_argument("--counts", type=_concurrencies, default=[1, 2, 4, 6], help="numbers of filters served, comma-separated")
    shared.add_argument("--batch", type=int, default=8, help="rows of the batch each tensor model runs before memory is read")
    shared.add_argument("--tokens", type=int, default=512, help="tokens per row of that batch (capped at max_length)")
    shared.add_argument("--articles", type=int, default=32, help="realistic-mix articles, each scored by every filter")
    shared.add_argument("--concurrency", type=int, default=16, help="requests in flight per filter")
    shared.add_argument("--requests", type=int, default=10, help="timed batch-1 requests per text (latency, LoRA cost)")
    shared.add_argument("--work", help="keep the exported repositories in this folder (default: a temporary one, removed)")
    shared.add_argument("--out", default="bench-report", help="folder for the markdown, JSON and PNG reports")

    for name, help_text in (
        ("latency", "batch-1 latency p50/p95/p99 at short, median and max_length texts, every engine side by side"),
        ("throughput", "articles/s and tokens/s against concurrency, every engine side by side"),
    ):
        speed = sub.add_parser(name, help=help_text)
        _repository_arguments(speed)
        _served_arguments(speed, started_here=True)
        speed.add_argument("--requests", type=int, default=20, help="timed requests per engine and length (latency) or per level (throughput)")
        if name == "throughput":
            speed.add_argument("--concurrency", type=_concurrencies, default=[1, 4, 16, 64], help="comma-separated levels")
            speed.add_argument("--mix", type=_mixes, default=["uniform", "realistic"],
                               help="article lengths: uniform (max_length/2 each) and/or realistic (the news-like mix)")


def bench_command(args: argparse.Namespace) -> int:
    Path(args.out).mkdir(parents=True, exist_ok=True)  # an --out that cannot be made fails now, not after the run
    if args.bench == "fixture":
        from filterserve.benchmarks.trained_fixture import build_trained_fixture

        made = build_trained_fixture(Path(args.out), load_filter(args.filter), steps=args.steps, seed=args.seed)
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(made).items()}, indent=2))
        print(f"export it with: filterserve export --base {made.base_dir} --adapter {made.adapter_dir} --out REPO", file=sys.stderr)
        return 0
    if args.bench == "accuracy":
        from filterserve.benchmarks.accuracy import run_accuracy

        report = run_accuracy(
            args.model_repository, args.data, args.base, args.adapter, args.url, args.protocol, args.tolerance, args.out, args.name
        )
        print(json.dumps({n: {"mae": v["mae"], "mae_delta": v["mae_delta"]} for n, v in report["variants"].items()}, indent=2))
        return 0
    if args.bench == "family":
        from filterserve.benchmarks.shared_base import build_family
        from filterserve.export.standin import standin_shape

        shape = standin_shape(args.shape, args.layers, bool(args.tokenizer))
        family = build_family(Path(args.out), args.count, shape, Path(args.tokenizer) if args.tokenizer else None)
        print(json.dumps(family, indent=2))
        return 0
    if args.bench == "shared-base":
        from filterserve.benchmarks.shared_base import read_family, run_shared_base

        base, members = read_family(Path(args.family))
        report = run_shared_base(base, members, args.out, args.counts, args.batch, args.tokens, args.articles, args.concurrency,
                                 args.requests, args.work)
        print(f"wrote {args.out}/shared_base.md, .json and .png", file=sys.stderr)
        print(json.dumps(report["summary"], indent=2))
        return 0
    if args.bench == "memory":
        from filterserve.benchmarks.memory import run_memory

        report = run_memory(args.model_repository, args.out, args.batch, args.tokens)
        print(json.dumps({m: v.get("after_batch", v.get("loaded")) for m, v in report["models"].items()}, indent=2))
        return 0
    from filterserve.benchmarks.speed import run_latency, run_throughput

    if args.bench == "latency":
        report = run_latency(args.model_repository, args.base, args.adapter, args.url, args.protocol, args.requests, args.out, args.name)
    else:
        report = run_throughput(
            args.model_repository, args.base, args.adapter, args.url, args.protocol, args.requests, args.concurrency,
            args.mix, args.out, args.name,
        )
    print(f"wrote {args.out}/{args.bench}.md, .json and .png", file=sys.stderr)
    print(json.dumps(report["summary"], indent=2))
    return 0
