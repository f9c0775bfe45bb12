"""``filterserve demo``: the whole flow on one machine, train or take filters → export → serve → score.

With no weights given it trains two small filters, one process each, under one progress bar (a
minute or two on two cores: uplifting v4's 8 dimensions on a Qwen2.5 stand-in, and investment-risk's
5 on a Gemma-3 stand-in with head+tail input and tiers, as the production filters run today,
described by ``examples/investment_risk_v2.json``), on generated articles whose cue words come from the sample
articles themselves, exports both into one repository, serves it and scores the samples with both
filters at once. Their scores follow those cue words, so the uplifting samples rank above the
others on uplifting: a newcomer sees scores that mean something. With ``--base`` and
``--adapter`` (repeatable, with one ``--filter`` each) it is the same flow on the real filters.
Every line it prints fits :data:`WIDTH` columns; the steps of each training and export go to
``<workdir>/<name>/train.log`` and ``export.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filterserve import defaults
from filterserve.errors import FilterServeError
from filterserve.filter_loader import load_filter
from filterserve.filters import UPLIFTING_V4, FilterSpec, HeadTail, Tier

if TYPE_CHECKING:
    from filterserve.client import FilterResult
    from filterserve.client.endpoint import Protocol as WireProtocol

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
# Every line the demo prints fits a terminal this wide; the article column of its first table is this wide.
WIDTH = 100
ARTICLE_WIDTH = 40


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model folder or hub id (default: train two small filters)")
    parser.add_argument("--adapter", type=Path, action="append",
                        help="PEFT adapter folder (with --base; repeat for several filters)")
    parser.add_argument("--filter", action="append", help="filter description JSON, one per --adapter (default: uplifting v4)")
    parser.add_argument("--workdir", type=Path, default=Path(defaults.DEMO_WORKDIR),
                        help="where the trained filters, their logs and the repository go")
    parser.add_argument("--protocol", choices=["grpc", "http"], default=defaults.BENCH_PROTOCOL,
                        help="how the demo's client talks to the server it starts")


@dataclass(frozen=True)
class DemoOptions:
    """The demo's run: the filters given (``base`` and ``(adapter, description)`` pairs), or none: train two."""

    workdir: Path
    protocol: WireProtocol = defaults.BENCH_PROTOCOL
    base: str | None = None
    filters: tuple[tuple[Path, FilterSpec], ...] = ()


def demo_options(args: argparse.Namespace) -> DemoOptions:
    adapters, filters = args.adapter or [], args.filter or []
    if bool(args.base) != bool(adapters):
        raise FilterServeError("--base and --adapter go together")
    if filters and len(filters) != len(adapters):
        raise FilterServeError(f"give one --filter per --adapter ({len(adapters)} adapters, {len(filters)} filters)")
    if filters and not adapters:
        raise FilterServeError("--filter describes a given --adapter; without --base and --adapter the demo trains its own")
    specs = [load_filter(f) for f in filters] or [UPLIFTING_V4] * len(adapters)
    return DemoOptions(args.workdir, args.protocol, args.base, tuple(zip(adapters, specs)))


def demo_backgrounds() -> list[list[str]]:
    """The sample articles, word by word, without any filter's cue words: the sentences the demo's
    filters are trained in (each training article is one of them with cue words dropped in)."""
    from filterserve.data import sample_articles

    cues = {word.lower() for dims in DEMO_CUES.values() for words in dims.values() for word in words}
    return [
        [w for w in f"{a['title']} {a['content']}".split() if w.strip(".,;:'\"").lower() not in cues]
        for a in sample_articles()
    ]


# In a training process: how many steps each filter has done, shared with the demo's progress bar.
_STEPS_DONE: Any = None


def _share_steps_done(counters: Any) -> None:
    global _STEPS_DONE
    _STEPS_DONE = counters


def _step_done(index: int, steps: int) -> None:
    _STEPS_DONE[index] = steps


def _train_one(workdir: Path, spec: FilterSpec, index: int) -> tuple[str, Path, FilterSpec, float, float]:
    """One filter, in its own process; its progress goes to ``<workdir>/<name>/train.log``, its step count to the bar."""
    from filterserve.benchmarks.trained_fixture import build_trained_fixture
    from filterserve.export.standin import GEMMA3, StandinShape

    shape = StandinShape.gemma3_tiny() if DEMO_BASES[spec.name] == GEMMA3 else StandinShape()
    (workdir / spec.name).mkdir(parents=True, exist_ok=True)
    with open(workdir / spec.name / "train.log", "w", encoding="utf-8") as log, contextlib.redirect_stderr(log):
        fixture = build_trained_fixture(
            workdir / spec.name, spec, steps=defaults.FIXTURE_STEPS, cues=DEMO_CUES[spec.name], backgrounds=demo_backgrounds(),
            shape=shape, on_step=partial(_step_done, index),
        )
    return str(fixture.base_dir), fixture.adapter_dir, spec, fixture.val_mae, fixture.constant_mae


def _train(workdir: Path) -> list[tuple[str, Path, FilterSpec]]:
    """Both filters at once: each trains on one thread, so two processes halve the wait on two cores."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    specs = (UPLIFTING_V4, DEMO_INVESTMENT_RISK)
    steps = defaults.FIXTURE_STEPS
    print(f"training {' and '.join(f'{s.name} ({s.num_labels} dimensions, {DEMO_BASES[s.name]})' for s in specs)}\n"
          f"  on the sample articles with cue words dropped in, {steps} steps each (about a minute or two);\n"
          f"  logs: {workdir}/<name>/train.log", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    steps_done = context.Array("i", len(specs))
    with ProcessPoolExecutor(len(specs), mp_context=context, initializer=_share_steps_done, initargs=(steps_done,)) as pool, \
            tqdm(total=len(specs) * steps, desc="training", unit="step", file=sys.stderr, ncols=80, mininterval=1.0) as bar:
        futures = [pool.submit(_train_one, workdir, spec, i) for i, spec in enumerate(specs)]
        while wait(futures, timeout=1.0).not_done:
            bar.update(sum(steps_done[:]) - bar.n)
        bar.update(sum(steps_done[:]) - bar.n)
        made = [future.result() for future in futures]
    for _, _, spec, val_mae, constant_mae in made:
        print(f"  {spec.name}: validation MAE {val_mae:.2f} (a constant guess: {constant_mae:.2f})", file=sys.stderr)
    return [(base, adapter, spec) for base, adapter, spec, _, _ in made]


def _export(filters: list[tuple[str, Path, FilterSpec]], workdir: Path) -> Path:
    """Every filter into one repository; each export's own steps go to ``<workdir>/<name>/export.log``."""
    from filterserve.export.pipeline import export_filter

    repo = workdir / "model_repository"
    for base, adapter, spec in filters:
        print(f"exporting {spec.name} (fp32, parity-checked against PyTorch + PEFT) ...", file=sys.stderr, flush=True)
        (workdir / spec.name).mkdir(parents=True, exist_ok=True)
        with open(workdir / spec.name / "export.log", "w", encoding="utf-8") as log:
            export_filter(base, adapter, repo, spec, precisions="fp32", force=True, stream=log)
    print(f"  logs: {workdir}/<name>/export.log", file=sys.stderr)
    return repo


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[Any]], first_width: int, left: int = 1) -> str:
    """The first column ``first_width`` wide (a longer cell is cut with "..."), the next ``left - 1`` left-aligned
    and the rest right-aligned, each as wide as its widest cell; columns that would pass :data:`WIDTH`
    continue in a block below, the first column repeated."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [first_width] + [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header) if i]
    blocks: list[list[int]] = [[]]
    used = first_width
    for i in range(1, len(header)):
        if blocks[-1] and used + 1 + widths[i] > WIDTH:
            blocks.append([])
            used = first_width
        blocks[-1].append(i)
        used += 1 + widths[i]

    def line(values: list[str], columns: list[int]) -> str:
        first = values[0] if len(values[0]) <= first_width else values[0][: first_width - 3] + "..."
        return " ".join([f"{first:<{first_width}}",
                         *(f"{values[i]:<{widths[i]}}" if i < left else f"{values[i]:>{widths[i]}}" for i in columns)]).rstrip()

    out = []
    for columns in blocks:
        top = line(header, columns)
        out.append("\n".join([top, "-" * len(top), *(line(row, columns) for row in cells)]))
    return "\n\n".join(out)


def _print_results(filters: list[FilterSpec], articles: list[dict[str, str]], results: list[dict[str, FilterResult]]) -> None:
    """The decision of every filter per article (one row each), then each filter's final scores, articles side by side."""
    rows = []
    for article, by_filter in zip(articles, results):
        for k, spec in enumerate(filters):
            r = by_filter[spec.name]
            rows.append([f"{article['id']} {article['title']}" if k == 0 else "", spec.name, r.tier,
                         "yes" if r.gatekeeper_applied else "no", r.weighted_average])
    print(_table(["article", "filter", "tier", "gated", "average"], rows, ARTICLE_WIDTH, left=3))
    for spec in filters:
        print(f"\n{spec.name}: final scores (calibrated, clamped to 0-10) per article")
        by_dimension = [[dim, *(r[spec.name].final_scores[dim] for r in results)] for dim in spec.dimensions]
        by_dimension.append(["average", *(r[spec.name].weighted_average for r in results)])
        print(_table(["dimension", *(a["id"] for a in articles)], by_dimension, max(len(d) for d in (*spec.dimensions, "dimension"))))


def demo_command(args: argparse.Namespace) -> int:
    return run_demo(demo_options(args))


def run_demo(options: DemoOptions) -> int:
    from filterserve.client import FilterResult, MultiFilterClient, ScoreError
    from filterserve.data import sample_articles
    from filterserve.serve import TritonServer

    if options.base:
        filters = [(options.base, adapter, spec) for adapter, spec in options.filters]
    else:
        filters = _train(options.workdir)
    repo = _export(filters, options.workdir)

    articles = sample_articles()
    print(f"starting tritonserver on {repo} ...", file=sys.stderr)
    with TritonServer(repo) as server:
        url = server.grpc_url if options.protocol == "grpc" else server.http_url
        with MultiFilterClient(url, options.protocol, [spec.name for _, _, spec in filters]) as client:
            scored = list(client.score_iter([(a["title"], a["content"]) for a in articles], concurrency=len(articles)))
    results: list[dict[str, FilterResult]] = []
    for article, by_filter in zip(articles, scored):
        failed = [f"{name}: {r.message}" for name, r in by_filter.items() if isinstance(r, ScoreError)]
        if failed:
            raise FilterServeError(f"scoring {article['id']} failed: {'; '.join(failed)}")
        results.append({name: r for name, r in by_filter.items() if isinstance(r, FilterResult)})

    _print_results([spec for _, _, spec in filters], articles, results)
    if not options.base:
        print("\n(small filters trained on the sample articles' cue words: their scores follow\n"
              " those words, not the real filters' judgement)", file=sys.stderr)
    print(f"server stopped; the repository stays in {repo}", file=sys.stderr)
    return 0
