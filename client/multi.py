"""Several filters at once: each article goes to every filter concurrently, one scorer per filter."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from filterserve import defaults
from filterserve.client.endpoint import Protocol, Served, TritonEndpoint
from filterserve.client.errors import ClientError, ServerUnavailable
from filterserve.client.filter_client import FilterClient
from filterserve.client.items import Item
from filterserve.client.results import FilterResult, ScoreError
from filterserve.client.servers import ServerPool, parse_urls
from filterserve.filters import FilterSpec


class MultiFilterClient:
    """Several served filters at once: every article goes to each filter concurrently.

    ``filters`` names the filter ensembles; left out, every filter the server serves (ensembles
    whose config carries the ``filter`` parameter). ``url`` may name several servers
    (``"a:8001,b:8001"``): each filter then scores through a
    :class:`~filterserve.client.servers.ServerPool`. One scorer per filter does the work, so each
    filter's results are exactly what that filter's client returns. ``connection`` takes
    :class:`TritonEndpoint`'s options.
    """

    def __init__(self, url: str, protocol: Protocol | None = None, filters: Sequence[str] | None = None, **connection: Any) -> None:
        urls = parse_urls(url)
        if filters is not None and (not filters or len(set(filters)) != len(filters)):
            raise ClientError(f"filters must be distinct names, got {list(filters)}")
        # One scorer per filter: a FilterClient, or a ServerPool when several servers are given.
        self.clients: dict[str, FilterClient | ServerPool] = {}
        self._endpoint: TritonEndpoint | None = None
        try:
            if len(urls) == 1:
                # One server: one connection and one discovery, shared by every filter's client.
                self._endpoint = TritonEndpoint(urls[0], protocol, **connection)
                served = self._endpoint.discover() if filters is None else None
                for name in filters if filters is not None else self._served_filters(served, self._endpoint.url):
                    self.clients[name] = FilterClient.on(self._endpoint, name, served)
            else:
                for name in filters if filters is not None else self._discover(urls, protocol, connection):
                    self.clients[name] = ServerPool(urls, protocol, name, **connection)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(len(self.clients), thread_name_prefix="filterserve-filters")

    @staticmethod
    def _served_filters(served: Served | None, url: str) -> list[str]:
        if served is None or not served.filters:
            raise ClientError(f"server at {url} serves no ready filter ensemble")
        return served.filters

    @classmethod
    def _discover(cls, urls: list[str], protocol: Protocol | None, connection: dict[str, Any]) -> list[str]:
        """The filters of the first server that answers (every server of a pool serves the same ones)."""
        reasons = []
        for url in urls:
            try:
                with TritonEndpoint(url, protocol, **connection) as endpoint:
                    return cls._served_filters(endpoint.discover(), endpoint.url)
            except ServerUnavailable as exc:
                reasons.append(str(exc))
        raise ServerUnavailable("; ".join(reasons))

    @property
    def names(self) -> list[str]:
        return list(self.clients)

    @property
    def specs(self) -> dict[str, FilterSpec]:
        return {name: client.spec for name, client in self.clients.items()}

    def __enter__(self) -> MultiFilterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()
        if self._endpoint is not None:
            self._endpoint.close()

    def score_item(self, item: Item) -> dict[str, FilterResult]:
        """One article, every filter at once; a failure raises :class:`ClientError` naming the filter."""
        futures = {name: self._pool.submit(client.score_item, item) for name, client in self.clients.items()}
        results = {}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except ClientError as exc:
                raise type(exc)(f"{name}: {exc}") from None
        return results

    def score(self, title: str, content: str) -> dict[str, FilterResult]:
        return self.score_item((title, content))

    def score_iter(
        self, items: Iterable[Item], concurrency: int = defaults.CONCURRENCY
    ) -> Iterator[dict[str, FilterResult | ScoreError]]:
        """Per item, in input order, ``{filter: result or ScoreError}``.

        Each filter's own :meth:`FilterClient.score_iter` runs with ``concurrency`` requests in
        flight; the input is read once and shared through ``itertools.tee``, which is safe because
        every generator is advanced from this thread only.
        """
        streams = zip(self.clients.values(), itertools.tee(items, len(self.clients)))
        for results in zip(*(client.score_iter(stream, concurrency) for client, stream in streams)):
            yield dict(zip(self.clients, results))
