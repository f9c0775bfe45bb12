"""Same article, same score: one article served alone, batched with others, shuffled, at any
concurrency and over either protocol must get the same scores and the same verdicts.

The filters' production system measured the opposite on its own boxes (:data:`PRODUCTION_MAX_DELTA`):
an article's score moved with what it was batched with, and verdicts near the threshold flipped.
Each way below sends the same articles differently; every way is compared with the first.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from filterserve.errors import FilterServeError

if TYPE_CHECKING:
    from filterserve.client import FilterClient, FilterResult
    from filterserve.client.endpoint import Protocol as WireProtocol
    from filterserve.client.items import Item
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
