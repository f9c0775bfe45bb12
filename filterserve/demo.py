"""``filterserve demo``: the whole flow on one machine, export → serve → score → table.

With no weights given it builds a tiny random stand-in, so a fresh machine can run the
project end to end in about a minute; with ``--base`` and ``--adapter`` it is the same flow on
the real filter.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from filterserve.errors import FilterServeError
from filterserve.filters import load_filter


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model folder or hub id (default: a tiny random stand-in)")
    parser.add_argument("--adapter", help="PEFT adapter folder (with --base)")
    parser.add_argument("--filter", help="filter description JSON (default: uplifting v4)")
    parser.add_argument("--workdir", default="filterserve-demo", help="where the stand-in and the repository go")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")


def _table(dimensions: tuple[str, ...], rows: list[tuple[str, list[float], float, bool]]) -> str:
    """Final (clamped, calibrated) scores under their full dimension names, then the decision."""
    widths = [max(len(d), 6) for d in dimensions]
    header = f"{'article':<40} " + " ".join(f"{d:>{w}}" for d, w in zip(dimensions, widths)) + f" {'average':>8} gated"
    lines = [header, "-" * len(header)]
    for title, scores, average, gated in rows:
        title = title if len(title) <= 40 else title[:37] + "..."
        cells = " ".join(f"{s:>{w}.2f}" for s, w in zip(scores, widths))
        lines.append(f"{title:<40} {cells} {average:8.2f} {'yes' if gated else 'no':>5}")
    return "\n".join(lines)


def demo_command(args: argparse.Namespace) -> int:
    from filterserve.client import FilterClient, ScoreError
    from filterserve.data import sample_articles
    from filterserve.export.pipeline import export_filter
    from filterserve.export.standin import build_standin
    from filterserve.serve import TritonServer

    if bool(args.base) != bool(args.adapter):
        raise FilterServeError("--base and --adapter go together")
    spec = load_filter(args.filter)
    workdir = Path(args.workdir)
    if args.base:
        base, adapter = args.base, Path(args.adapter)
    else:
        print("No --base/--adapter given: building a tiny RANDOM stand-in for Qwen2.5 + LoRA.\n"
              "Its scores MEAN NOTHING; the demo shows the pipeline, not the filter.", file=sys.stderr)
        made = build_standin(workdir / "standin", spec)
        base, adapter = str(made.base_dir), made.adapter_dir
    repo = workdir / "model_repository"
    export_filter(base, adapter, repo, spec, precisions="fp32", force=True)

    articles = sample_articles()
    print(f"starting tritonserver on {repo} ...", file=sys.stderr)
    with TritonServer(repo) as server:
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        client = FilterClient(url, protocol=args.protocol, model=spec.name)
        results = client.score_many([(a["title"], a["content"]) for a in articles], concurrency=8)
    rows = []
    for article, result in zip(articles, results):
        if isinstance(result, ScoreError):
            raise FilterServeError(f"scoring {article['id']} failed: {result}")
        rows.append((article["title"], list(result.final_scores.values()), result.weighted_average, result.gatekeeper_applied))
    print(_table(spec.dimensions, rows))
    if not args.base:
        print("\n(random stand-in weights: these numbers mean nothing)", file=sys.stderr)
    print(f"server stopped; the repository stays in {repo}", file=sys.stderr)
    return 0
