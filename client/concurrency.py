"""Many articles through any one-article scorer: requests in flight together, results in input order.

Apart from the transport so that one server (:class:`~filterserve.client.filter_client.FilterClient`)
and several (:class:`~filterserve.client.servers.ServerPool`) share the same engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice

from tqdm import tqdm  # type: ignore[import-untyped]

from filterserve import defaults
from filterserve.client.errors import ClientError, ServerUnavailable
from filterserve.client.items import Item, item_length
from filterserve.client.results import FilterResult, ScoreError

# Items read ahead per worker thread, to be sent in order of length (see ``score_iter``).
WINDOW_PER_WORKER = 4


class Scorer:
    """Scores many items concurrently with any ``score_item``: one server (:class:`FilterClient`)
    or several (:class:`~filterserve.client.servers.ServerPool`)."""

    def score_item(self, item: Item) -> FilterResult:
        raise NotImplementedError

    def score_iter(self, items: Iterable[Item], concurrency: int = defaults.CONCURRENCY) -> Iterator[FilterResult | ScoreError]:
        """Yields results in input order while up to ``concurrency`` requests are in flight.

        Items are read lazily, a window of ``WINDOW_PER_WORKER × concurrency`` at a time, and each
        window is sent longest first: requests in flight together are then of similar length, so
        the server's batcher finds requests of the same padded shape to join, and the longest
        articles do not trail at the end. Once the server is found unreachable, the items not
        yet sent fail at once instead of each waiting out the retries.

        Only a :class:`ClientError` (the server refused or could not answer, or the item is bad
        input) becomes a :class:`ScoreError`; any other exception is a bug and is raised here, with
        its traceback, rather than reported as one more failed item.
        """
        if concurrency < 1:
            raise ClientError(f"concurrency must be at least 1, got {concurrency}")
        down: list[str] = []

        def one(index: int, item: Item) -> FilterResult | ScoreError:
            if down:
                return ScoreError(index, f"not sent: {down[0]}")
            try:
                return self.score_item(item)
            except ServerUnavailable as exc:
                down.append(str(exc))
                return ScoreError(index, str(exc))
            except ClientError as exc:  # this item failed (bad input, refused, timed out); anything else is a bug
                return ScoreError(index, str(exc))

        window = WINDOW_PER_WORKER * concurrency
        numbered = enumerate(items)
        pending: dict[int, Future[FilterResult | ScoreError]] = {}
        next_index, exhausted = 0, False
        with ThreadPoolExecutor(concurrency, thread_name_prefix="filterserve-score") as pool:
            while True:
                if not exhausted and len(pending) < window:  # refill before the workers run dry
                    batch = list(islice(numbered, window))
                    exhausted = not batch
                    for index, item in sorted(batch, key=lambda numbered_item: -item_length(numbered_item[1])):
                        pending[index] = pool.submit(one, index, item)
                if next_index not in pending:
                    return
                yield pending.pop(next_index).result()
                next_index += 1

    def score_many(
        self, items: Iterable[Item], concurrency: int = defaults.CONCURRENCY, progress: bool = False
    ) -> list[FilterResult | ScoreError]:
        """All results in input order; an item that failed is a :class:`ScoreError` entry."""
        total = len(items) if isinstance(items, Sequence) else None
        with tqdm(total=total, disable=not progress, unit="item") as bar:
            results = []
            for result in self.score_iter(items, concurrency):
                results.append(result)
                bar.update()
        return results
