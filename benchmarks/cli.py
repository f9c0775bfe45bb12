"""``filterserve bench <command>``: arguments, the options value each command parses into, and the entry point.

Each command's arguments become one frozen options value (:mod:`filterserve.benchmarks.options`),
checked once here; the benchmark below takes it whole.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from filterserve import defaults
from filterserve.benchmarks.options import (
    AccuracyOptions,
    BenchOptions,
    DeterminismOptions,
    FamilyOptions,
    FixtureOptions,
    LatencyOptions,
    MemoryOptions,
    RepositoryChoice,
    ServerChoice,
    SharedBaseOptions,
    ThroughputOptions,
)
from filterserve.contract import GATE_TOLERANCE
from filterserve.filter_loader import load_filter


def _integers(value: str) -> tuple[int, ...]:
    """Comma-separated integers, each once, in the order given (their range is checked with the rest of the options)."""
    try:
        return tuple(dict.fromkeys(int(v) for v in value.split(",") if v.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def _listed(values: tuple[object, ...]) -> str:
    """A default list as the user would type it: argparse parses a string default with the option's type,
    and --help shows it as typed."""
    return ",".join(map(str, values))


def _names(value: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))


def _out_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path(defaults.BENCH_OUT), help="folder for the markdown, JSON and PNG reports")


def _repository_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path, required=True, help="folder written by `filterserve export`")
    parser.add_argument("--name", help="which filter of the repository (default: its only one)")
    parser.add_argument("--base", help="base model (default: the path in the filter's record)")
    parser.add_argument("--adapter", type=Path, help="adapter folder (default: the path in the filter's record)")
    _out_argument(parser)


def _served_arguments(parser: argparse.ArgumentParser, started_here: bool) -> None:
    parser.add_argument(
        "--url",
        help="HOST:PORT of a running server"
        + (" (default: start one on the repository and use gRPC and HTTP)" if started_here else " (default: no served model)"),
    )
    parser.add_argument("--protocol", choices=["grpc", "http"], default=defaults.BENCH_PROTOCOL, help="protocol of --url")


def _repository(args: argparse.Namespace) -> RepositoryChoice:
    return RepositoryChoice(args.model_repository, args.name, args.base, args.adapter)


def _server(args: argparse.Namespace) -> ServerChoice:
    return ServerChoice(args.url, args.protocol)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=defaults.HelpFormatter)

    fixture = command("fixture", "train a tiny Qwen2 + LoRA filter on generated labelled articles")
    fixture.add_argument("--out", type=Path, required=True, help="folder for base/, adapter/, train.jsonl, val.jsonl")
    fixture.add_argument("--steps", type=int, default=defaults.FIXTURE_STEPS, help="training steps (batch 16)")
    fixture.add_argument("--filter", help="filter description JSON (default: uplifting v4)")
    fixture.add_argument("--seed", type=int, default=defaults.FIXTURE_SEED, help="seed of the articles and the weights")

    accuracy = command("accuracy", "MAE/RMSE of the reference, every exported variant and the served model")
    accuracy.add_argument("--data", type=Path, required=True, help="labelled JSONL: title, content, one field per dimension")
    _repository_arguments(accuracy)
    _served_arguments(accuracy, started_here=False)
    accuracy.add_argument("--tolerance", type=float, default=GATE_TOLERANCE, help="largest MAE increase admitted vs the reference")

    memory = command("memory", "served RAM per model (after loading, after a batch) and the tokenizer step's time")
    memory.add_argument("--model-repository", type=Path, required=True, help="folder written by `filterserve export`")
    memory.add_argument("--batch", type=int, default=defaults.MEMORY_BATCH, help="rows of the batch run on every tensor model")
    memory.add_argument("--tokens", type=int, default=defaults.MEMORY_TOKENS, help="tokens per row (capped at the filter's max_length)")
    _out_argument(memory)

    family = command("family", "one random base and N stand-in filters on it (8 and 5 dimensions in turn, LoRA ranks 16 and 8), "
                     "the input of bench shared-base")
    family.add_argument("--out", type=Path, required=True, help="folder for base/, a folder per filter and family.json")
    family.add_argument("--count", type=int, default=defaults.FAMILY_COUNT, help="how many filters")
    family.add_argument("--shape", choices=defaults.STANDIN_SHAPES, default=defaults.STANDIN_SHAPE,
                        help="tiny (seconds), or a real base's dimensions with random weights")
    family.add_argument("--layers", type=int, help="decoder layers (default: the shape's)")
    family.add_argument("--tokenizer", type=Path,
                        help="a real tokenizer.json (Qwen2.5's, or Gemma-3's for the gemma3 shapes): the real vocabulary and token lengths")

    shared = command("shared-base", "N filters of one base served merged vs as one shared-base group: "
                     "served memory, throughput, single-filter latency, what the LoRA paths cost")
    shared.add_argument("--family", type=Path, required=True, help="folder written by `filterserve bench family`")
    shared.add_argument("--counts", type=_integers, default=_listed(defaults.SHARED_BASE_COUNTS),
                        help="numbers of filters served, comma-separated")
    shared.add_argument("--batch", type=int, default=defaults.MEMORY_BATCH,
                        help="rows of the batch each tensor model runs before memory is read")
    shared.add_argument("--tokens", type=int, default=defaults.MEMORY_TOKENS, help="tokens per row of that batch (capped at max_length)")
    shared.add_argument("--articles", type=int, default=defaults.SHARED_BASE_ARTICLES,
                        help="realistic-mix articles, each scored by every filter")
    shared.add_argument("--concurrency", type=int, default=defaults.CONCURRENCY, help="requests in flight per filter")
    shared.add_argument("--requests", type=int, default=defaults.SHARED_BASE_REQUESTS,
                        help="timed batch-1 requests per text (latency, LoRA cost)")
    shared.add_argument("--work", type=Path, help="keep the exported repositories in this folder (default: a temporary one, removed)")
    _out_argument(shared)

    def speed(name: str, help_text: str, requests: int, requests_help: str) -> argparse.ArgumentParser:
        parser = command(name, help_text)
        _repository_arguments(parser)
        _served_arguments(parser, started_here=True)
        parser.add_argument("--requests", type=int, default=requests, help=requests_help)
        return parser

    speed("latency", "batch-1 latency p50/p95/p99 at short, median and max_length texts, every engine side by side",
          defaults.LATENCY_REQUESTS, "timed requests per engine and text length")
    throughput = speed("throughput", "articles/s and tokens/s against concurrency, every engine side by side",
                       defaults.THROUGHPUT_REQUESTS, "articles per run")
    throughput.add_argument("--concurrency", type=_integers, default=_listed(defaults.THROUGHPUT_CONCURRENCY),
                            help="comma-separated levels (in process: batch sizes)")
    throughput.add_argument("--mix", type=_names, default=_listed(defaults.MIXES),
                            help=f"article lengths, comma-separated: {' and/or '.join(defaults.MIXES)} "
                                 "(max_length/2 each; the news-like mix)")

    determinism = command("determinism", "same article, same score: every precision of the repository served, the same articles "
                          "sent alone, in mixed batches, shuffled at concurrency 1 and 16, over gRPC and HTTP; max |Δ| and "
                          "verdict flips beside production's own figures")
    _repository_arguments(determinism)
    determinism.add_argument("--articles", type=int, default=defaults.DETERMINISM_ARTICLES,
                             help="realistic-mix articles (besides the demo's)")


# ---- each command: its options value, then its run -------------------------------------------------


def _fixture(options: FixtureOptions) -> int:
    from filterserve.benchmarks.trained_fixture import build_trained_fixture

    made = build_trained_fixture(options.out, options.spec, steps=options.steps, seed=options.seed)
    print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(made).items()}, indent=2))
    print(f"export it with: filterserve export --base {made.base_dir} --adapter {made.adapter_dir} --out REPO", file=sys.stderr)
    return 0


def _accuracy(options: AccuracyOptions) -> int:
    from filterserve.benchmarks.accuracy import run_accuracy

    report = run_accuracy(options)
    print(json.dumps({n: {"mae": v["mae"], "mae_delta": v["mae_delta"]} for n, v in report["variants"].items()}, indent=2))
    return 0


def _family(options: FamilyOptions) -> int:
    from filterserve.benchmarks.shared_base import build_family

    print(json.dumps(build_family(options), indent=2))
    return 0


def _shared_base(options: SharedBaseOptions) -> int:
    from filterserve.benchmarks.shared_base import run_shared_base

    report = run_shared_base(options)
    print(f"wrote {options.out}/shared_base.md, .json and .png", file=sys.stderr)
    print(json.dumps(report["summary"], indent=2))
    return 0


def _memory(options: MemoryOptions) -> int:
    from filterserve.benchmarks.memory import run_memory

    report = run_memory(options)
    print(json.dumps({m: v.get("after_batch", v.get("loaded")) for m, v in report["models"].items()}, indent=2))
    return 0


def _latency(options: LatencyOptions) -> int:
    from filterserve.benchmarks.speed import run_latency

    return _speed_summary("latency", options.out, run_latency(options)["summary"])


def _throughput(options: ThroughputOptions) -> int:
    from filterserve.benchmarks.speed import run_throughput

    return _speed_summary("throughput", options.out, run_throughput(options)["summary"])


def _speed_summary(stem: str, out: Path, summary: object) -> int:
    print(f"wrote {out}/{stem}.md, .json and .png", file=sys.stderr)
    print(json.dumps(summary, indent=2))
    return 0


def _determinism(options: DeterminismOptions) -> int:
    from filterserve.benchmarks.determinism import run_determinism

    return _speed_summary("determinism", options.out, run_determinism(options)["summary"])


def _family_options(args: argparse.Namespace) -> FamilyOptions:
    from filterserve.export.standin import standin_shape  # torch: only once the command runs

    return FamilyOptions(args.out, standin_shape(args.shape, args.layers, args.tokenizer is not None), args.count, args.tokenizer)


# command → (its options value from the parsed arguments, its run)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], BenchOptions], Callable[[Any], int]]] = {
    "fixture": (lambda a: FixtureOptions(a.out, load_filter(a.filter), a.steps, a.seed), _fixture),
    "accuracy": (lambda a: AccuracyOptions(_repository(a), a.data, _server(a), a.tolerance, a.out), _accuracy),
    "memory": (lambda a: MemoryOptions(a.model_repository, a.batch, a.tokens, a.out), _memory),
    "family": (_family_options, _family),
    "shared-base": (lambda a: SharedBaseOptions(a.family, a.counts, a.batch, a.tokens, a.articles, a.concurrency, a.requests,
                                                a.work, a.out), _shared_base),
    "latency": (lambda a: LatencyOptions(_repository(a), _server(a), a.requests, a.out), _latency),
    "determinism": (lambda a: DeterminismOptions(_repository(a), a.articles, a.out), _determinism),
    "throughput": (lambda a: ThroughputOptions(_repository(a), _server(a), a.requests, a.concurrency, a.mix, a.out), _throughput),
}


def bench_options(args: argparse.Namespace) -> BenchOptions:
    """The options value of the chosen command, checked: a bad value fails here, in one line, before any work."""
    options = COMMANDS[args.bench][0](args)
    options.check()
    return options


def bench_command(args: argparse.Namespace) -> int:
    options = bench_options(args)
    options.out.mkdir(parents=True, exist_ok=True)  # an --out that cannot be made fails now, not after the run
    return COMMANDS[args.bench][1](options)
