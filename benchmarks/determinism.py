"""Same article, same score: one article served alone, batched with others, shuffled, at any
concurrency and over either protocol must get the same scores and the same verdicts.

The filters' production system measured the opposite on its own boxes (:data:`PRODUCTION_MAX_DELTA`):
an article's score moved with what it was batched with, and verdicts near the threshold flipped.
Each way below sends the same articles differently; every way is compared with the first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from filterserve.errors import FilterServeError

if TYPE_CHECKING:
    from filterserve.benchmarks.engines import Repository
    from filterserve.benchmarks.options import DeterminismOptions
    from filterserve.client import FilterClient, FilterResult
    from filterserve.client.endpoint import Protocol as WireProtocol
    from filterserve.client.items import Item
    from filterserve.filters import FilterSpec
    from filterserve.serve import TritonServer


@dataclass(frozen=True)
class Way:
    """One way of sending the articles to the server.

    ``rows`` articles go in each request (the server pads them together to the longest one's
    length); ``concurrency`` requests are in flight at once (the dynamic batcher joins those of
    one padded length); ``shuffle_seed`` sends them in a shuffled order (None: in input order).
    """

    name: str
    protocol: WireProtocol
    rows: int = 1
    concurrency: int = 1
    shuffle_seed: int | None = None


# The first is the reference every other way is compared with: each article alone, one request at a time.
WAYS: tuple[Way, ...] = (
    Way("alone, gRPC", "grpc"),
    Way("alone, HTTP", "http"),
    Way("mixed batches of 16, shuffled, gRPC", "grpc", rows=16, shuffle_seed=1),
    Way("mixed batches of 5, HTTP", "http", rows=5),
    Way("shuffled, concurrency 1, HTTP", "http", shuffle_seed=2),
    Way("shuffled, concurrency 16, gRPC", "grpc", concurrency=16, shuffle_seed=3),
    Way("shuffled, concurrency 16, HTTP", "http", concurrency=16, shuffle_seed=4),
)


def score_way(client: FilterClient, articles: Sequence[Item], way: Way) -> list[FilterResult]:
    """Every article's result, in input order, sent ``way``'s way."""
    from filterserve.client import ScoreError

    order = list(range(len(articles)))
    if way.shuffle_seed is not None:
        random.Random(way.shuffle_seed).shuffle(order)
    sent = [articles[i] for i in order]
    if way.rows > 1:
        got: list = [r for start in range(0, len(sent), way.rows) for r in client.score_batch(sent[start : start + way.rows])]
    else:
        got = client.score_many(sent, concurrency=way.concurrency)
    failed = [r for r in got if isinstance(r, ScoreError)]
    if failed:
        raise FilterServeError(f"{way.name}: {len(failed)} of {len(got)} articles failed, first: {failed[0].message}")
    results: list = [None] * len(articles)
    for index, result in zip(order, got):
        results[index] = result
    return results


def _score_fields(result: FilterResult) -> np.ndarray:
    return np.array([*result.scores.values(), *result.final_scores.values(), result.weighted_score])


def _average_fields(result: FilterResult) -> np.ndarray:
    return np.array([result.weighted_average, result.raw_weighted_average])


@dataclass(frozen=True)
class Divergence:
    """How far one way's results are from the reference's, over the same articles.

    ``max_score_delta``: over the raw and final scores and the weighted score; ``max_average_delta``:
    over the weighted average and the raw weighted average; flips count articles whose tier, or
    whether the gatekeeper capped them, changed; ``flipped`` those with either.
    """

    articles: int
    max_score_delta: float
    max_average_delta: float
    tier_flips: int
    gatekeeper_flips: int
    flipped: int

    @property
    def max_delta(self) -> float:
        return max(self.max_score_delta, self.max_average_delta)


def divergence(reference: Sequence[FilterResult], other: Sequence[FilterResult]) -> Divergence:
    if len(reference) != len(other) or not reference:
        raise FilterServeError(f"cannot compare {len(other)} results with {len(reference)}")
    pairs = list(zip(reference, other))
    tiers = [a.tier != b.tier for a, b in pairs]
    gates = [a.gatekeeper_applied != b.gatekeeper_applied for a, b in pairs]
    return Divergence(
        articles=len(pairs),
        max_score_delta=max(float(np.abs(_score_fields(a) - _score_fields(b)).max()) for a, b in pairs),
        max_average_delta=max(float(np.abs(_average_fields(a) - _average_fields(b)).max()) for a, b in pairs),
        tier_flips=sum(tiers),
        gatekeeper_flips=sum(gates),
        flipped=sum(t or g for t, g in zip(tiers, gates)),
    )


@dataclass(frozen=True)
class WayRun:
    """One way's results, and how the server ran them: ``requests`` the tensor model answered in
    ``runs`` executions (fewer when the dynamic batcher joined requests), computing
    ``computed_tokens`` (rows × padded length) for ``real_tokens`` article tokens."""

    way: Way
    results: list[FilterResult]
    requests: int
    runs: int
    real_tokens: int
    computed_tokens: int


def _counters(metrics_url: str, tensor: str, counted: str) -> np.ndarray:
    """Requests the tensor model answered, its executions (Triton's counters of ``tensor``), and the
    real and computed tokens the tokenizer step counted under ``counted``."""
    import re
    import urllib.request

    from filterserve.contract import COMPUTED_TOKENS_METRIC, REAL_TOKENS_METRIC

    text = urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=30).read().decode()

    def value(metric: str, labels: str) -> int:
        found = re.search(rf"^{metric}{{{labels}}} (\S+)$", text, re.MULTILINE)
        return int(float(found.group(1))) if found else 0

    version = f'model="{tensor}",version="[^"]*"'
    return np.array([value("nv_inference_request_success", version), value("nv_inference_exec_count", version),
                     value(REAL_TOKENS_METRIC, f'model="{counted}"'), value(COMPUTED_TOKENS_METRIC, f'model="{counted}"')])


def score_every_way(server: TritonServer, model: str, articles: Sequence[Item], ways: Sequence[Way] = WAYS) -> list[WayRun]:
    """Every way in turn against ``server`` (a started :class:`~filterserve.serve.TritonServer`), serving ``model``."""
    from filterserve.client import FilterClient
    from filterserve.contract import tensor_model

    urls: dict[WireProtocol, str] = {"grpc": server.grpc_url, "http": server.http_url}
    clients = {protocol: FilterClient(url, protocol, model=model) for protocol, url in urls.items()}
    counted = tensor_model(model)  # the tokenizer step counts tokens under the ensemble's own tensor model
    runs = []
    try:
        for way in ways:
            client = clients[way.protocol]
            tensor = client.tensor_model or counted
            before = _counters(server.metrics_url, tensor, counted)
            results = score_way(client, articles, way)
            requests, executions, real, computed = (int(v) for v in _counters(server.metrics_url, tensor, counted) - before)
            runs.append(WayRun(way, results, requests, executions, real, computed))
    finally:
        for client in clients.values():
            client.close()
    return runs


# ---- `filterserve bench determinism` -----------------------------------------------------------------

# The filters' production system on its own boxes (veen-systems/llm-distillery's box-parity study, as the
# project's MODEL_CARD.md, "The system's own noise", records it): one article moved by up to 0.162 with
# batch composition alone, flipping 7–9% of the verdicts near the threshold.
PRODUCTION_MAX_DELTA = 0.162
PRODUCTION_FLIP_SHARE = (0.07, 0.09)
PRODUCTION_SOURCE = ("veen-systems/llm-distillery's box-parity study (MODEL_CARD.md, \"The system's own noise\"): "
                     "batch composition alone, verdicts near the threshold")


def _bench_articles(repo: Repository, count: int) -> list[tuple[str, str]]:
    """The demo's articles and ``count`` drawn from the realistic mix (about 10% past max_length)."""
    from filterserve.benchmarks.articles import articles_of_lengths, realistic_lengths
    from filterserve.data import sample_articles
    from filterserve.export.load import load_tokenizer

    tokenizer = load_tokenizer(repo.adapter)
    drawn = articles_of_lengths(tokenizer, repo.spec, realistic_lengths(count, seed=27), seed=27)
    return [(a["title"], a["content"]) for a in sample_articles()] + drawn


def _not_run(repo: Repository) -> dict[str, str]:
    """Why each precision filterserve can export is missing from this run."""
    from filterserve.export.openvino_engine import cpu_support
    from filterserve.export.options import BUILD_ORDER

    support = cpu_support()
    reasons = {}
    for precision in (p for p in BUILD_ORDER if p not in repo.manifest.tensor_models):
        refused = repo.manifest.refused.get(precision)
        if precision == "bf16" and not support.bf16:
            reasons[precision] = f"this CPU ({support.device}) has no bf16 arithmetic: the export refuses bf16 here"
        else:
            reasons[precision] = "refused by the accuracy gate" if refused else "not in this repository"
    return reasons


def _cpu() -> dict[str, Any]:
    from filterserve.export.openvino_engine import cpu_support

    support = cpu_support()
    return {"model": support.device, "flags": list(support.flags), "bf16": support.bf16}


def near_threshold(result: FilterResult, spec: FilterSpec, within: float) -> bool:
    """Whether production's own noise could flip this result: its weighted average within ``within`` of
    a tier's threshold, or a gatekeeper's dimension within ``within`` of where it caps."""
    tiers = any(abs(result.weighted_average - tier.threshold) <= within for tier in spec.tiers if tier.threshold > 0)
    gates = any(abs(result.final_scores[gate.dimension] - gate.below) <= within for gate in spec.gatekeepers)
    return tiers or gates


def _figures(runs: list[WayRun], spec: FilterSpec) -> dict[str, Any]:
    """One precision's figures: the worst way, and every way against the first."""
    alone = runs[0]
    ways = {}
    for run in runs:
        found = divergence(alone.results, run.results)
        ways[run.way.name] = {**asdict(found), "requests": run.requests, "runs": run.runs,
                              "computed_per_real": run.computed_tokens / run.real_tokens if run.real_tokens else None}
    others = [w for name, w in ways.items() if name != alone.way.name]
    return {
        "max_score_delta": max(w["max_score_delta"] for w in others),
        "max_average_delta": max(w["max_average_delta"] for w in others),
        "tier_flips": max(w["tier_flips"] for w in others),
        "gatekeeper_flips": max(w["gatekeeper_flips"] for w in others),
        "flipped_share": max(w["flipped"] for w in others) / len(alone.results),
        "truncated": sum(r.truncated for r in alone.results),
        "tiers_seen": sorted({r.tier for r in alone.results}),
        "gatekeeper_applied": sum(r.gatekeeper_applied for r in alone.results),
        "near_threshold": sum(near_threshold(r, spec, PRODUCTION_MAX_DELTA) for r in alone.results),
        "ways": ways,
    }


def run_determinism(options: DeterminismOptions) -> dict[str, Any]:
    """Every precision of the repository served in turn (one server each, through the filter's ensemble),
    every way of :data:`WAYS`; each way compared with the articles scored alone over gRPC."""
    import tempfile

    from tqdm import tqdm  # type: ignore[import-untyped]

    from filterserve.benchmarks.engines import open_choice, variant_repository
    from filterserve.benchmarks.report import machine, write_report
    from filterserve.contract import DETERMINISM_TOLERANCE
    from filterserve.serve import TritonServer

    repo = open_choice(options.repository)
    articles = _bench_articles(repo, options.articles)
    precisions: dict[str, Any] = {}
    for precision in tqdm(list(repo.manifest.tensor_models), desc="determinism", unit="precision"):
        with tempfile.TemporaryDirectory(prefix=f"filterserve-{precision}-") as tmp, \
                TritonServer(variant_repository(repo, precision, Path(tmp) / "repo")) as server:
            precisions[precision] = _figures(score_every_way(server, repo.spec.name, articles), repo.spec)
    report = {
        "filter": repo.spec.name,
        "repository": str(repo.path),
        "articles": len(articles),
        "cpu": _cpu(),
        "reference_way": WAYS[0].name,
        "ways": [asdict(way) for way in WAYS],
        "tolerance": DETERMINISM_TOLERANCE,
        "production": {"max_delta": PRODUCTION_MAX_DELTA, "flip_share": list(PRODUCTION_FLIP_SHARE), "source": PRODUCTION_SOURCE},
        "precisions": precisions,
        "not_run": _not_run(repo),
        "machine": machine(),
    }
    report["summary"] = {p: {"max_delta": max(f["max_score_delta"], f["max_average_delta"]), "flipped_share": f["flipped_share"]}
                         for p, f in precisions.items()}
    write_report(options.out, "determinism", report, _markdown(report), _figure(report))
    return report


def _markdown(report: dict[str, Any]) -> str:
    from filterserve.benchmarks.report import table

    production = report["production"]
    low, high = production["flip_share"]
    parts = [
        f"# Same article, same score: {report['filter']}, {report['articles']} articles\n\n"
        f"Each way below sends the same articles; each is compared with the first ({report['reference_way']}). "
        f"max |Δ| over the raw and final scores and the weighted score, and over the weighted average (before and "
        f"after any normalization); a flip is an article whose tier, or whether the gatekeeper capped it, changed. "
        f"fp32 is held to {report['tolerance']:g} and no flip. CPU: {report['cpu']['model']} "
        f"({report['machine']['cpu_count']} cores).\n\n",
        table(["precision", "max \\|Δ\\| scores", "max \\|Δ\\| weighted average", "tier flips", "gatekeeper flips", "articles flipped",
               f"articles within {production['max_delta']} of a threshold"],
              [[p, f["max_score_delta"], f["max_average_delta"], f["tier_flips"], f["gatekeeper_flips"],
                f"{100 * f['flipped_share']:.1f}%", f["near_threshold"]] for p, f in report["precisions"].items()]
              + [["production (its own boxes)", production["max_delta"], "", "", "", f"{100 * low:.0f}–{100 * high:.0f}%", ""]]),
        f"\nProduction's figures: {production['source']}. Requests, tensor-model runs and computed/real tokens are the "
        f"server's counters (the tokenizer step's padding); an int8 tensor model runs each row at its own length.\n",
    ]
    if report["not_run"]:
        parts.append("\nNot run: " + "; ".join(f"{p}: {why}" for p, why in report["not_run"].items()) + ".\n")
    for precision, figures in report["precisions"].items():
        parts.append(f"\n## {precision}: tiers {', '.join(figures['tiers_seen'])}; gatekeeper applied to "
                     f"{figures['gatekeeper_applied']}; {figures['truncated']} past max_length; "
                     f"{figures['near_threshold']} within production's {production['max_delta']} of a tier or "
                     f"gatekeeper threshold\n\n")
        parts.append(table(["way", "max \\|Δ\\| scores", "max \\|Δ\\| average", "tier flips", "gatekeeper flips", "requests",
                            "tensor-model runs", "computed/real tokens"],
                           [[way, w["max_score_delta"], w["max_average_delta"], w["tier_flips"], w["gatekeeper_flips"],
                             w["requests"], w["runs"], w["computed_per_real"]] for way, w in figures["ways"].items()]))
    return "".join(parts)


# A max |Δ| of exactly 0 is drawn at this height on the log axis.
ZERO_DRAWN_AT = 1e-9


def _figure(report: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["precisions"])
    figures = list(report["precisions"].values())
    production = report["production"]
    fig, (delta, flips) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(names))
    for offset, key, label in ((-0.2, "max_score_delta", "scores"), (0.2, "max_average_delta", "weighted average")):
        delta.bar(x + offset, [max(f[key], ZERO_DRAWN_AT) for f in figures], 0.4, label=label)
    delta.axhline(production["max_delta"], color="crimson", linestyle="--", label=f"production {production['max_delta']}")
    delta.axhline(report["tolerance"], color="grey", linestyle=":", label=f"fp32 bound {report['tolerance']:g}")
    delta.set_yscale("log")
    delta.set_xticks(x, names)
    delta.set_ylabel(f"max |Δ| across ways (0 drawn at {ZERO_DRAWN_AT:g})")
    delta.legend(fontsize=7)
    flips.bar(x, [100 * f["flipped_share"] for f in figures], 0.5)
    flips.axhspan(100 * production["flip_share"][0], 100 * production["flip_share"][1], color="crimson", alpha=0.2,
                  label=f"production {100 * production['flip_share'][0]:.0f}–{100 * production['flip_share'][1]:.0f}% (near the threshold)")
    flips.set_xticks(x, names)
    flips.set_ylabel("articles whose verdict flipped (%)")
    flips.legend(fontsize=7)
    fig.suptitle(f"{report['filter']}: same article, same score ({report['articles']} articles)")
    fig.tight_layout()
    return fig
