"""Score a corpus with Ray Data: ``map_batches`` with the thin client against several Triton servers.

Ray's convention for batch inference is a callable class given to ``Dataset.map_batches``: Ray
builds one instance per worker (actor) and feeds it batches, so each worker keeps one client,
and its connections, for the whole run. The models stay on the Triton servers; the workers only
send articles, which keeps them light (no torch, no model memory) and lets the servers' dynamic
batchers see the whole cluster's requests.

    import ray
    from filterserve.client.ray_data import FilterScorer

    ds = ray.data.read_json("articles.jsonl")
    scored = ds.map_batches(FilterScorer, fn_constructor_kwargs={"urls": ["a:8001", "b:8001"]},
                            concurrency=4, batch_size=64, batch_format="pandas")
    scored.write_json("scored/")

Each output row is its input row plus one column per filter holding the result object of
``filterserve score`` (or ``None``) and ``filterserve_error`` (``None``, or why the row failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from filterserve import defaults
from filterserve.client.endpoint import Protocol
from filterserve.client.results import ScoreError
from filterserve.client.servers import ServerPool

ERROR_COLUMN = "filterserve_error"


class FilterScorer:
    """The per-worker callable for ``map_batches``: a :class:`ServerPool` over ``urls``, built once."""

    def __init__(self, urls: str | Sequence[str], protocol: Protocol | None = None, model: str | None = None,
                 concurrency: int = defaults.RAY_CONCURRENCY, timeout_s: float = defaults.RAY_TIMEOUT_S) -> None:
        self.pool = ServerPool(urls, protocol, model, timeout_s=timeout_s)
        self.concurrency = concurrency

    def __call__(self, batch: Any) -> Any:
        """A pandas DataFrame with ``title`` and ``content`` columns; the same frame with results added."""
        items = [{"title": title, "content": content} for title, content in zip(batch["title"], batch["content"])]
        results = self.pool.score_many(items, concurrency=self.concurrency)
        name = self.pool.spec.name
        batch = batch.copy()
        batch[name] = [None if isinstance(r, ScoreError) else r.as_dict() for r in results]
        batch[ERROR_COLUMN] = [r.message if isinstance(r, ScoreError) else None for r in results]
        return batch
