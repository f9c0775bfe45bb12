"""Several Triton servers serving the same filter, scored through as one.

One CPU box scores about 0.4 articles/s per 1.5B filter in fp32: a day's news for several filters
soon needs several servers. The pool sends each article to the live server with the least
outstanding work (a slow or busy server gets less, not an equal share as with round robin), and
when a server dies, the article goes to another: each is scored once, and the output keeps input
order (:meth:`~filterserve.client.concurrency.Scorer.score_iter`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from filterserve.client.concurrency import Scorer
from filterserve.client.endpoint import Protocol, parse_address
from filterserve.client.errors import ClientError, ServerUnavailable
from filterserve.client.filter_client import FilterClient
from filterserve.client.items import Item
from filterserve.client.results import FilterResult
from filterserve.filters import FilterSpec

# A server that failed is left alone this long before it is tried again.
COOL_DOWN_S = 5.0
# With every server down, a request waits this long in all for one to come back.
ALL_DOWN_WAIT_S = 30.0


def parse_urls(urls: str | Sequence[str]) -> list[str]:
    """``"a:8001,b:8001"`` or a list, without blanks or repeats."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    found = list(dict.fromkeys(u.strip() for u in items if u.strip()))
    if not found:
        raise ClientError("no server URL given")
    return found


class _Server:
    """One URL: its client once connected, its outstanding requests, and when it may be tried again."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: FilterClient | None = None
        self.outstanding = 0
        self.retry_at = 0.0
        self.last_error = ""


class ServerPool(Scorer):
    """Scores with whichever of ``urls`` is least busy; fails over when one is unreachable.

    Every server must serve the same filter (dimensions, weights, template, rules): the pool
    checks on connecting. Servers down at the start are tried again after a cool-down, so one
    that comes back later takes its share again.
    """

    def __init__(self, urls: str | Sequence[str], protocol: Protocol | None = None, model: str | None = None,
                 **client_options: Any) -> None:
        self.model = model
        self._asked_protocol = protocol  # each URL's scheme may still say it
        self._servers = [_Server(url) for url in parse_urls(urls)]
        self.protocol = parse_address(self._servers[0].url, protocol).protocol
        # Failover is the pool's job: a dead server should cost one attempt, not the client's retries.
        self._options = {**client_options, "retries": 0}
        self._lock = threading.Lock()
        self._spec: FilterSpec | None = None
        for server in self._servers:
            self._connect(server)
        if self._spec is None:
            reasons = "; ".join(f"{s.url}: {s.last_error}" for s in self._servers)
            raise ServerUnavailable(f"none of the servers is reachable ({self.protocol}): {reasons}")

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self._servers]

    @property
    def spec(self) -> FilterSpec:
        """The filter every server serves (read from the first one that answered)."""
        if self._spec is None:
            raise ServerUnavailable(f"none of the servers is reachable ({self.protocol})")
        return self._spec

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.spec.dimensions

    def _connect(self, server: _Server) -> FilterClient | None:
        """The server's client, connected now; None while it is unreachable (it cools down)."""
        try:
            client = FilterClient(server.url, self._asked_protocol, self.model, **self._options)
        except ServerUnavailable as exc:
            server.retry_at, server.last_error = time.monotonic() + COOL_DOWN_S, str(exc)
            return None
        if self._spec is None:
            self._spec, self.model = client.spec, client.model
        elif client.spec != self._spec:
            client.close()
            raise ClientError(f"server {server.url} serves filter {client.spec.name!r} differently from the others")
        server.client = client
        return client

    def _pick(self) -> _Server | None:
        """The least busy server that is up (or due for another try); None while all cool down."""
        now = time.monotonic()
        with self._lock:
            candidates = [s for s in self._servers if s.retry_at <= now]
            if not candidates:
                return None
            server = min(candidates, key=lambda s: s.outstanding)
            server.outstanding += 1
            return server

    def _failed(self, server: _Server, error: ServerUnavailable) -> None:
        with self._lock:
            server.retry_at, server.last_error = time.monotonic() + COOL_DOWN_S, str(error)

    def score_item(self, item: Item) -> FilterResult:
        deadline = time.monotonic() + ALL_DOWN_WAIT_S
        while True:
            server = self._pick()
            if server is None:
                if time.monotonic() > deadline:
                    reasons = "; ".join(f"{s.url}: {s.last_error}" for s in self._servers)
                    raise ServerUnavailable(f"no server reachable ({self.protocol}) for {ALL_DOWN_WAIT_S:g} s: {reasons}")
                time.sleep(0.2)
                continue
            try:
                client = server.client or self._connect(server)
                if client is None:
                    continue
                return client.score_item(item)
            except ServerUnavailable as exc:
                self._failed(server, exc)  # the item goes to another server on the next turn
            finally:
                with self._lock:
                    server.outstanding -= 1

    def close(self) -> None:
        for server in self._servers:
            if server.client is not None:
                server.client.close()

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
