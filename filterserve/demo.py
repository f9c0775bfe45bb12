"""``filterserve demo``: the whole flow on one machine, train or take filters → export → serve → score.

With no weights given it trains two small filters in seconds (uplifting v4's 8 dimensions on a
Qwen2.5 stand-in, and investment-risk's 5 on a Gemma-3 stand-in with head+tail input and tiers, as
the production filters run today), on generated articles whose cue words come from the sample
articles themselves, exports both into one repository, serves it and scores the samples with both
filters at once. Their scores follow those cue words, so the uplifting samples rank above the
others on uplifting: a newcomer sees scores that mean something. With ``--base`` and
``--adapter`` (repeatable, with one ``--filter`` each) it is the same flow on the real filters.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from filterserve.errors import FilterServeError
from filterserve.filter_loader import load_filter
from filterserve.filters import UPLIFTING_V4, FilterSpec, HeadTail, Tier

# The card gives investment-risk v2's shape (5 dimensions, same base and recipe) but not its
# dimension names or weights: these are the demo's and the tests' stand-ins.
INVESTMENT_RISK_V2 = FilterSpec(
    name="investment_risk_v2",
    dimensions=("macro_risk", "credit_stress", "sentiment", "volatility", "evidence"),
    weights=(0.3, 0.25, 0.2, 0.15, 0.1),
    description="investment-risk v2's shape (5 regression scores); dimension names are stand-ins",
)

# Cue words per dimension, read off the sample articles (filterserve/data/sample_articles.jsonl):
# the uplifting ones (a1 library, a3 membrane, a5 bakery, a6 court, a7 comet) hold uplifting's
# cues, the others (a2 budget, a4 markets, a8 factory) investment risk's, and no word of one
# list appears in the other kind of article.
DEMO_CUES: dict[str, dict[str, tuple[str, ...]]] = {
    UPLIFTING_V4.name: {
        "agency": ("volunteers", "organised", "residents", "team"),
        "progress": ("reopened", "new", "overturn", "built"),
        "collective_benefit": ("people", "public", "families", "free", "school", "Schools", "students", "university", "villages"),
        "connection": ("neighbours", "club", "exchanges", "neighbourhood"),
        "innovation": ("membrane", "design", "engineers", "sunlight"),
        "justice": ("court", "innocence", "law", "conviction"),
        "resilience": ("flooded", "rebuild", "arrived", "burst"),
        "wonder": ("comet", "astronomers", "Sun", "photographed"),
    },
    INVESTMENT_RISK_V2.name: {
        "macro_risk": ("interest", "rates", "central", "budget"),
        "credit_stress": ("plant", "closure", "fees", "taxes"),
        "sentiment": ("fell", "decline", "falling", "slide", "delay"),
        "volatility": ("volatility", "Stock", "indices", "shares", "traders"),
        "evidence": ("Analysts", "cited", "expect", "voted"),
    },
}
# The demo's second filter as the production family runs: Gemma-3, head+tail input, ordered tiers
# (investment_risk v6's, from its base_scorer.py TIER_THRESHOLDS).
DEMO_INVESTMENT_RISK = replace(
    INVESTMENT_RISK_V2,
    head_tail=HeadTail(),
    tiers=(
        Tier("high", 7.0, "Critical risk signal - act now to reduce exposure"),
        Tier("medium", 4.0, "Moderate signal - worth tracking, limited immediate action"),
        Tier("low", 0.0, "Low signal - noise, not investment-relevant, or already priced in"),
    ),
)
# (filter, stand-in base): Qwen2.5 for uplifting v4 (its card's base), Gemma-3 for the other.
DEMO_BASES = {UPLIFTING_V4.name: "qwen2", DEMO_INVESTMENT_RISK.name: "gemma3_text"}
UPLIFTING_SAMPLES = ("a1", "a3", "a5", "a6", "a7")
TRAINING_STEPS = 600
TITLE_WIDTH = 40


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model folder or hub id (default: train two small filters)")
    parser.add_argument("--adapter", action="append", help="PEFT adapter folder (with --base; repeat for several filters)")
    parser.add_argument("--filter", action="append", help="filter description JSON, one per --adapter (default: uplifting v4)")
    parser.add_argument("--workdir", default="filterserve-demo", help="where the trained filters and the repository go")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")


def demo_backgrounds() -> list[list[str]]:
    """The sample articles, word by word, without any filter's cue words: the sentences the demo's
    filters are trained in (each training article is one of them with cue words dropped in)."""
    from filterserve.data import sample_articles

    cues = {word.lower() for dims in DEMO_CUES.values() for words in dims.values() for word in words}
    return [
        [w for w in f"{a['title']} {a['content']}".split() if w.strip(".,;:'\"").lower() not in cues]
        for a in sample_articles()
    ]


def _train_one(workdir: Path, spec: FilterSpec) -> tuple[str, Path, FilterSpec, float, float]:
    """One filter, in its own process; its progress goes to ``<workdir>/<name>/train.log``."""
    from filterserve.benchmarks.trained_fixture import build_trained_fixture
    from filterserve.export.standin import GEMMA3, StandinShape

    shape = StandinShape.gemma3_tiny() if DEMO_BASES[spec.name] == GEMMA3 else StandinShape()
    (workdir / spec.name).mkdir(parents=True, exist_ok=True)
    with open(workdir / spec.name / "train.log", "w", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        fixture = build_trained_fixture(
            workdir / spec.name, spec, steps=TRAINING_STEPS, cues=DEMO_CUES[spec.name], backgrounds=demo_backgrounds(),
            shape=shape,
        )
    return str(fixture.base_dir), fixture.adapter_dir, spec, fixture.val_mae, fixture.constant_mae


def _train(workdir: Path) -> list[tuple[str, Path, FilterSpec]]:
    """Both filters at once: each trains on one thread, so two processes halve the wait on two cores."""
    specs = (UPLIFTING_V4, DEMO_INVESTMENT_RISK)
    print(f"training {' and '.join(f'{s.name} ({s.num_labels} dimensions, {DEMO_BASES[s.name]})' for s in specs)} on the sample articles "
          f"with cue words dropped in ({TRAINING_STEPS} steps each, logs in {workdir}/<name>/train.log)", file=sys.stderr)
    with ProcessPoolExecutor(len(specs), mp_context=multiprocessing.get_context("spawn")) as pool:
        made = list(pool.map(_train_one, [workdir] * len(specs), specs))
    for _, _, spec, val_mae, constant_mae in made:
        print(f"  {spec.name}: validation MAE {val_mae:.2f} (a constant guess: {constant_mae:.2f})", file=sys.stderr)
    return [(base, adapter, spec) for base, adapter, spec, _, _ in made]


def _given(args: argparse.Namespace) -> list[tuple[str, Path, FilterSpec]]:
    adapters, filters = args.adapter or [], args.filter or []
    if not adapters:
        raise FilterServeError("--base needs at least one --adapter")
    if filters and len(filters) != len(adapters):
        raise FilterServeError(f"give one --filter per --adapter ({len(adapters)} adapters, {len(filters)} filters)")
    specs = [load_filter(f) for f in filters] or [UPLIFTING_V4]
    return [(args.base, Path(a), spec) for a, spec in zip(adapters, specs)]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned first column, the rest right-aligned to the width of their full names."""
    widths = [TITLE_WIDTH] + [max(len(h), 6) for h in header[1:]]

    def cell(value: Any, width: int) -> str:
        return f"{value:>{width}.2f}" if isinstance(value, float) else f"{value:>{width}}"

    lines = [" ".join([f"{header[0]:<{widths[0]}}", *(f"{h:>{w}}" for h, w in zip(header[1:], widths[1:]))])]
    lines.append("-" * len(lines[0]))
    for title, *values in rows:
        title = title if len(title) <= TITLE_WIDTH else title[: TITLE_WIDTH - 3] + "..."
        lines.append(" ".join([f"{title:<{widths[0]}}", *(cell(v, w) for v, w in zip(values, widths[1:]))]))
    return "\n".join(lines)


def demo_command(args: argparse.Namespace) -> int:
    from filterserve.client import FilterResult, MultiFilterClient, ScoreError
    from filterserve.data import sample_articles
    from filterserve.export.pipeline import export_filter
    from filterserve.serve import TritonServer

    if bool(args.base) != bool(args.adapter):
        raise FilterServeError("--base and --adapter go together")
    workdir = Path(args.workdir)
    filters = _given(args) if args.base else _train(workdir)
    repo = workdir / "model_repository"
    for base, adapter, spec in filters:
        export_filter(base, adapter, repo, spec, precisions="fp32", force=True)

    articles = sample_articles()
    print(f"starting tritonserver on {repo} ...", file=sys.stderr)
    with TritonServer(repo) as server:
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        with MultiFilterClient(url, args.protocol, [spec.name for _, _, spec in filters]) as client:
            scored = list(client.score_iter([(a["title"], a["content"]) for a in articles], concurrency=8))
    results: list[dict[str, FilterResult]] = []
    for article, by_filter in zip(articles, scored):
        failed = [f"{name}: {r.message}" for name, r in by_filter.items() if isinstance(r, ScoreError)]
        if failed:
            raise FilterServeError(f"scoring {article['id']} failed: {'; '.join(failed)}")
        results.append({name: r for name, r in by_filter.items() if isinstance(r, FilterResult)})

    names = [spec.name for _, _, spec in filters]
    print(_table(["article", *(f"{n} {col}" for n in names for col in ("average", "gated", "tier"))],
                 [[a["title"], *(v for n in names for v in (r[n].weighted_average, "yes" if r[n].gatekeeper_applied else "no", r[n].tier))]
                  for a, r in zip(articles, results)]))
    for _, _, spec in filters:
        print(f"\n{spec.name}: final scores (calibrated, clamped to 0-10) and the weighted average")
        print(_table(["article", *spec.dimensions, "average"],
                     [[a["title"], *r[spec.name].final_scores.values(), r[spec.name].weighted_average] for a, r in zip(articles, results)]))
    if not args.base:
        print("\n(small filters trained on the sample articles' cue words: their scores follow those words, "
              "not the real filters' judgement)", file=sys.stderr)
    print(f"server stopped; the repository stays in {repo}", file=sys.stderr)
    return 0
