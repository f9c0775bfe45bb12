"""A thin scoring client over Triton's gRPC and HTTP protocols.

It reads the filter (dimension names, weights, template, rules) from the served ensemble's config,
so the same client scores any filter the export wrote, and it imports only tritonclient,
numpy, tokenizers and tqdm so that the bare install stays free of torch.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Literal, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from gevent.exceptions import InvalidThreadUseError
import tritonclient.http as httpclient
from tokenizers import Tokenizer
from tqdm import tqdm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from filterserve.contract import (
    CONTENT,
    DECISION_OUTPUTS,
    ENSEMBLE_OUTPUTS,
    FILTER_PARAMETER,
    LOGITS,
    N_TOKENS,
    SCORES,
    TENSOR_OUTPUTS,
    TEXT,
    TITLE,
    TOKEN_INPUTS,
    TRUNCATED,
)
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec

Protocol = Literal["grpc", "http"]
Item = str | tuple[str, str] | dict[str, Any]
T = TypeVar("T")
E = TypeVar("E", bound="TritonEndpoint")

# Only these mean "the server is not there (yet)"; retrying anything else repeats a sure failure.
RETRYABLE_GRPC = {"StatusCode.UNAVAILABLE"}
RETRYABLE_HTTP = {"502", "503", "504"}
# A server that is stopping unloads its models first: for a moment it answers, but the model has
# "no available versions" (gRPC NOT_FOUND, HTTP 400). That is a server going away, not bad input.
UNLOADING = "has no available versions"
BAD_INPUT = {"StatusCode.INVALID_ARGUMENT", "400"}
TIMED_OUT = {"StatusCode.DEADLINE_EXCEEDED"}
# Items read ahead per worker thread, to be sent in order of length (see ``score_iter``).
WINDOW_PER_WORKER = 4
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0


class ClientError(FilterServeError):
    """A request the server refused or could not answer; the message says which and why."""


class ServerUnavailable(ClientError):
    """The server could not be reached, even after retries."""


@dataclass(frozen=True)
class FilterResult:
    """One article scored by one filter: the raw outputs and the filter's decision on them.

    ``scores`` and ``weighted_score`` are the model's raw outputs (what parity is checked on);
    ``final_scores``, ``weighted_average`` and ``gatekeeper_applied`` are what the filter's
    consumers read (calibrated, clamped to 0–10, gated).
    """

    scores: dict[str, float]
    weighted_score: float
    final_scores: dict[str, float]
    weighted_average: float
    gatekeeper_applied: bool
    # Tokens the model read, and whether the article ran past max_length (it read only the start).
    n_tokens: int
    truncated: bool

    def non_finite(self) -> tuple[str, float] | None:
        """The first number that is NaN or infinite, as (field, value), or None."""
        fields = {**{f"scores.{d}": v for d, v in self.scores.items()}, "weighted_score": self.weighted_score,
                  **{f"final_scores.{d}": v for d, v in self.final_scores.items()}, "weighted_average": self.weighted_average}
        return next(((field, value) for field, value in fields.items() if not math.isfinite(value)), None)

    def as_dict(self) -> dict[str, Any]:
        """The object ``filterserve score`` writes under the filter's name."""
        return {
            "scores": dict(self.scores),
            "weighted_score": self.weighted_score,
            "final_scores": dict(self.final_scores),
            "weighted_average": self.weighted_average,
            "gatekeeper_applied": self.gatekeeper_applied,
            "n_tokens": self.n_tokens,
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class ScoreError:
    """Stands in for the :class:`FilterResult` of an item that failed, so a batch never aborts halfway."""

    index: int
    message: str


def article_inputs(item: Item) -> dict[str, str]:
    """A :meth:`FilterClient.score_many` item as the ensemble's inputs: TEXT, or TITLE + CONTENT.

    An article goes as TITLE and CONTENT so that the server applies the filter's own template;
    an empty title or content is refused here, as the filter's production scorer refuses it.
    """
    if isinstance(item, str):
        if not item.strip():
            raise ClientError("bad input: empty text")
        return {TEXT: item}
    if isinstance(item, tuple) and len(item) == 2:
        title, content = item
    elif isinstance(item, dict):
        missing = [key for key in ("title", "content") if key not in item]
        if missing:
            raise ClientError(f"bad input: missing {' and '.join(missing)}")
        title, content = item["title"], item["content"]
    else:
        raise ClientError(f"bad input: expected a text, a (title, content) pair or a dict, got {type(item).__name__}")
    for name, value in (("title", title), ("content", content)):
        if not isinstance(value, str):
            raise ClientError(f"bad input: {name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ClientError(f"bad input: {name} is empty")
    return {TITLE: title, CONTENT: content}


def item_length(item: object) -> int:
    """Characters of an item's text: the client's stand-in for its token length (no tokenizer needed)."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, tuple):
        return sum(len(part) for part in item if isinstance(part, str))
    if isinstance(item, dict):
        return sum(len(item.get(key) or "") for key in ("title", "content") if isinstance(item.get(key, ""), str))
    return 0


def _strip_scheme(url: str) -> tuple[str, bool]:
    """tritonclient wants bare ``host:port``; ``https://`` also asks for TLS."""
    for scheme, secure in (("https://", True), ("http://", False), ("grpc://", False), ("grpcs://", True)):
        if url.startswith(scheme):
            return url[len(scheme) :], secure
    return url, False


class Scorer:
    """Scores many items concurrently with any ``score_item``: one server (:class:`FilterClient`)
    or several (:class:`~filterserve.client.servers.ServerPool`)."""

    def score_item(self, item: Item) -> FilterResult:
        raise NotImplementedError

    def score_iter(self, items: Iterable[Item], concurrency: int = 16) -> Iterator[FilterResult | ScoreError]:
        """Yields results in input order while up to ``concurrency`` requests are in flight.

        Items are read lazily, a window of ``WINDOW_PER_WORKER × concurrency`` at a time, and each
        window is sent longest first: requests in flight together are then of similar length, so
        the server's batcher finds requests of the same padded shape to join, and the longest
        articles do not trail at the end. Once the server is found unreachable, the items not
        yet sent fail at once instead of each waiting out the retries.
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
            except ClientError as exc:
                return ScoreError(index, str(exc))
            except Exception as exc:  # an unforeseen failure of one item must not abort the others
                return ScoreError(index, f"{type(exc).__name__}: {exc}")

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
        self, items: Iterable[Item], concurrency: int = 16, progress: bool = False
    ) -> list[FilterResult | ScoreError]:
        """All results in input order; failures are :class:`ScoreError` entries, never exceptions."""
        total = len(items) if isinstance(items, Sequence) else None
        with tqdm(total=total, disable=not progress, unit="item") as bar:
            results = []
            for result in self.score_iter(items, concurrency):
                results.append(result)
                bar.update()
        return results


class TritonEndpoint:
    """A connection to a Triton server (retries, timeouts, TLS) and the filters it serves.

    The gRPC client is shared by all threads; the HTTP client is not thread-safe (gevent), so
    each thread gets its own.
    """

    def __init__(
        self,
        url: str,
        protocol: Protocol = "grpc",
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        ssl_options: dict[str, Any] | None = None,
        insecure: bool = False,
    ) -> None:
        if protocol not in ("grpc", "http"):
            raise ClientError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        if retries < 0 or timeout_s <= 0:
            raise ClientError(f"retries must be >= 0 and timeout_s > 0, got {retries} and {timeout_s}")
        self.url, secure = _strip_scheme(url)
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.retries = retries
        self._transport_options: dict[str, Any] = (
            {
                "ssl": ssl or secure,
                "root_certificates": root_certificates,
                "private_key": private_key,
                "certificate_chain": certificate_chain,
            }
            if protocol == "grpc"
            else {"ssl": ssl or secure, "ssl_options": ssl_options, "insecure": insecure}
        )
        self._local = threading.local()
        # Weak, so a finished worker thread's HTTP client is collected with the thread.
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()
        self._opened_lock = threading.Lock()
        self._grpc = grpcclient.InferenceServerClient(self.url, **self._transport_options) if protocol == "grpc" else None
        try:
            if not self._call(lambda c: c.is_server_live(**self._timeout_kw()), "liveness check"):
                raise ServerUnavailable(f"server at {self.url} answers but is not live ({self.protocol})")
        except BaseException:
            self.close()
            raise

    # --- connections -------------------------------------------------------------------------
    def __enter__(self: E) -> E:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._opened_lock:
            opened = list(self._opened)
            self._opened.clear()
        if self._grpc is not None:
            opened.append(self._grpc)
        for transport in opened:
            try:
                transport.close()
            except InvalidThreadUseError:
                # An HTTP client made in a worker thread belongs to that thread's gevent hub and
                # cannot be closed from here; it closes when that thread's objects are collected.
                continue

    def _transport(self) -> Any:
        if self._grpc is not None:
            return self._grpc
        transport = getattr(self._local, "transport", None)
        if transport is None:
            transport = httpclient.InferenceServerClient(
                self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s, **self._transport_options
            )
            self._local.transport = transport
            with self._opened_lock:
                self._opened.add(transport)
        return transport

    def _timeout_kw(self) -> dict[str, float]:
        """gRPC takes a per-call deadline; HTTP's timeouts are set on the connection."""
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}

    def _timed_out(self, what: str) -> ClientError:
        return ClientError(f"{what} timed out after {self.timeout_s:g} s ({self.protocol}); raise the timeout for slow servers")

    def _call(self, request: Callable[[Any], T], what: str) -> T:
        """Runs ``request`` with bounded retries on unreachable (or stopping) server errors only."""
        backoff = FIRST_BACKOFF_S
        for attempt in range(self.retries + 1):
            try:
                return request(self._transport())
            except InferenceServerException as exc:
                status, message = str(exc.status()), exc.message() or str(exc)
                if UNLOADING not in message:  # a stopping server is retried like an unreachable one
                    if status in BAD_INPUT:
                        raise ClientError(f"bad input: {message}") from None
                    if status in TIMED_OUT:
                        raise self._timed_out(what) from None
                    if status not in RETRYABLE_GRPC | RETRYABLE_HTTP:
                        raise ClientError(f"{what} failed ({self.protocol}, {status}): {message}") from None
                reason = message
            except TimeoutError:
                raise self._timed_out(what) from None
            except (OSError, HTTPException) as exc:  # how the HTTP client reports refused or dropped connections
                reason = f"{type(exc).__name__}: {exc}"
            if attempt < self.retries:
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
        raise ServerUnavailable(
            f"server at {self.url} is not reachable ({self.protocol}) after {self.retries + 1} attempt(s): {reason}"
        )

    # --- model discovery ---------------------------------------------------------------------
    def _config(self, model: str) -> dict[str, Any]:
        if self.protocol == "grpc":
            answer = self._call(lambda c: c.get_model_config(model, as_json=True, client_timeout=self.timeout_s), "model config")
            return answer.get("config", {})
        return self._call(lambda c: c.get_model_config(model), "model config")

    def served_filters(self) -> list[str]:
        """Names of the loaded filter ensembles: ensembles whose config carries the filter description.

        The loaded models come from the statistics API: ``filterserve serve`` locks the repository
        index (it belongs to the API that loads code), while statistics stay open to every caller.
        """
        if self.protocol == "grpc":
            stats = self._call(lambda c: c.get_inference_statistics(as_json=True, client_timeout=self.timeout_s), "model list")
        else:
            stats = self._call(lambda c: c.get_inference_statistics(), "model list")
        names = sorted({entry["name"] for entry in stats.get("model_stats", [])})
        return [
            name
            for name in names
            if (config := self._config(name)).get("platform") == "ensemble" and FILTER_PARAMETER in config.get("parameters", {})
        ]

    def _require_ready(self, model: str) -> None:
        if not self._call(lambda c: c.is_model_ready(model, **self._timeout_kw()), "readiness check"):
            # Not ready here (loading, stopping): a pool tries another server.
            raise ServerUnavailable(f"model {model} is not ready on the server at {self.url} ({self.protocol})")

class FilterClient(TritonEndpoint, Scorer):
    """Scores articles with one filter served by Triton.

    ``model`` names the filter's ensemble; left out, the server must serve exactly one filter.
    ``tokenizer`` (a ``tokenizer.json``) tokenizes here with the filter's template and calls the
    ensemble's tensor model and decision step directly, for callers who skip the tokenizer step.
    ``connection`` takes :class:`TritonEndpoint`'s options (timeout_s, retries, TLS).
    """

    def __init__(
        self, url: str, protocol: Protocol = "grpc", model: str | None = None, *, tokenizer: str | None = None, **connection: Any
    ) -> None:
        super().__init__(url, protocol, **connection)
        try:
            self._connect(model, tokenizer)
        except BaseException:
            self.close()
            raise

    def _connect(self, model: str | None, tokenizer: str | None) -> None:
        """Reads the filter from the server, so a misconfigured one fails here, not mid-batch."""
        self.model = model or self._only_filter()
        self._require_ready(self.model)
        config = self._config(self.model)
        described = config.get("parameters", {}).get(FILTER_PARAMETER, {}).get("string_value")
        if not described:
            raise ClientError(f"model {self.model} has no '{FILTER_PARAMETER}' parameter: it is not a filterserve ensemble")
        try:
            self.spec = FilterSpec.from_dict(json.loads(described), source=f"the '{FILTER_PARAMETER}' parameter of {self.model}")
        except json.JSONDecodeError as exc:
            raise ClientError(f"model {self.model}: its '{FILTER_PARAMETER}' parameter is not JSON ({exc})") from None
        # The composing models, as the ensemble names them: the step fed by token ids, the one fed by logits.
        steps = config.get("ensemble_scheduling", {}).get("step", [])
        by_input = {key: step["model_name"] for step in steps for key in step.get("input_map", {})}
        self.tensor_model, self.decision_model = by_input.get(TOKEN_INPUTS[0]), by_input.get(LOGITS)

        self._tokenizer: Tokenizer | None = None
        if tokenizer is not None:
            if not self.tensor_model or not self.decision_model:
                raise ClientError(f"model {self.model} names no tensor model or decision step to call with tokens")
            try:
                self._tokenizer = Tokenizer.from_file(str(tokenizer))
            except Exception as exc:  # tokenizers raises plain Exception for missing or broken files
                raise ClientError(f"cannot load tokenizer {tokenizer}: {exc}") from None
            # As the server's tokenizer step (and transformers): the library truncates, no padding.
            self._tokenizer.enable_truncation(self.spec.max_length)
            self._tokenizer.no_padding()
            self._require_ready(self.tensor_model)
            self._require_ready(self.decision_model)

    @property
    def dimensions(self) -> tuple[str, ...]:
        return self.spec.dimensions

    @property
    def weights(self) -> tuple[float, ...]:
        return self.spec.weights

    def _only_filter(self) -> str:
        candidates = self.served_filters()
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ServerUnavailable(f"server at {self.url} serves no ready filter ensemble")
        raise ClientError(f"server at {self.url} serves several filters, pick one with model=: {', '.join(candidates)}")

    # --- scoring -----------------------------------------------------------------------------
    def _module(self) -> Any:
        return grpcclient if self.protocol == "grpc" else httpclient

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        module = self._module()
        tensors = []
        for name, data in inputs.items():
            tensor = module.InferInput(name, list(data.shape), "BYTES" if data.dtype == object else np_to_triton_dtype(data.dtype))
            tensor.set_data_from_numpy(data)
            tensors.append(tensor)
        requested = [module.InferRequestedOutput(name) for name in outputs]
        result = self._call(
            lambda c: c.infer(model, tensors, outputs=requested, **self._timeout_kw()), f"inference on {model}"
        )
        return {name: result.as_numpy(name) for name in outputs}

    def _result(
        self, model: str, raw: np.ndarray, weighted: np.ndarray, decided: dict[str, np.ndarray], n_tokens: int, truncated: bool
    ) -> FilterResult:
        raw, final = raw.reshape(-1), decided[DECISION_OUTPUTS[0]].reshape(-1)
        if raw.shape[0] != len(self.dimensions) or final.shape[0] != len(self.dimensions):
            raise ClientError(f"model {model} returned {raw.shape[0]} scores for {len(self.dimensions)} dimensions")
        result = FilterResult(
            scores=dict(zip(self.dimensions, map(float, raw))),
            weighted_score=float(weighted.reshape(-1)[0]),
            final_scores=dict(zip(self.dimensions, map(float, final))),
            weighted_average=float(decided[DECISION_OUTPUTS[1]].reshape(-1)[0]),
            gatekeeper_applied=bool(decided[DECISION_OUTPUTS[2]].reshape(-1)[0]),
            n_tokens=n_tokens,
            truncated=truncated,
        )
        bad = result.non_finite()
        if bad:  # JSON has no NaN or Infinity, and a NaN score would pass every comparison silently
            raise ClientError(f"the server returned a non-finite {bad[0]} ({bad[1]}); refusing to report this result")
        return result

    def score(self, title: str, content: str) -> FilterResult:
        """One article; the server joins title and content with the filter's template."""
        return self.score_item((title, content))

    def score_text(self, text: str) -> FilterResult:
        """Text already joined as the filter expects (see ``spec.text_template``)."""
        if not isinstance(text, str):
            raise ClientError(f"bad input: text must be a string, got {type(text).__name__}")
        return self.score_item(text)

    def score_item(self, item: Item) -> FilterResult:
        inputs = article_inputs(item)
        if self._tokenizer is not None:
            text = inputs[TEXT] if TEXT in inputs else self.spec.input_text(inputs[TITLE], inputs[CONTENT])
            encoding = self._tokenizer.encode(text)
            return self.score_tokens(encoding.ids, truncated=bool(encoding.overflowing))
        data = {name: np.array([[value.encode("utf-8")]], dtype=object) for name, value in inputs.items()}
        out = self._infer(self.model, data, ENSEMBLE_OUTPUTS)
        n_tokens, truncated = int(out[N_TOKENS].reshape(-1)[0]), bool(out[TRUNCATED].reshape(-1)[0])
        return self._result(self.model, out[SCORES], out[TENSOR_OUTPUTS[1]], out, n_tokens, truncated)

    def score_tokens(self, input_ids: Sequence[int], truncated: bool = False) -> FilterResult:
        """Scores token ids on the tensor model, then the decision step; ids must come from the filter's tokenizer.

        Ids past max_length are cut here (and the result says ``truncated``).
        """
        if not input_ids or not self.tensor_model or not self.decision_model:
            raise ClientError("bad input: no tokens" if not input_ids else f"model {self.model} has no tensor model step")
        truncated = truncated or len(input_ids) > self.spec.max_length
        ids = np.asarray(input_ids, dtype=np.int64)[: self.spec.max_length].reshape(1, -1)
        logits, weighted = self._infer(self.tensor_model, dict(zip(TOKEN_INPUTS, (ids, np.ones_like(ids)))), TENSOR_OUTPUTS).values()
        decided = self._infer(self.decision_model, {LOGITS: logits.astype(np.float32)}, DECISION_OUTPUTS)
        return self._result(self.tensor_model, logits, weighted, decided, ids.shape[1], truncated)


class MultiFilterClient:
    """Several served filters at once: every article goes to each filter concurrently.

    ``filters`` names the filter ensembles; left out, every filter the server serves (ensembles
    whose config carries the ``filter`` parameter). ``url`` may name several servers
    (``"a:8001,b:8001"``): each filter then scores through a
    :class:`~filterserve.client.servers.ServerPool`. One scorer per filter does the work, so each
    filter's results are exactly what that filter's client returns. ``connection`` takes
    :class:`TritonEndpoint`'s options.
    """

    def __init__(self, url: str, protocol: Protocol = "grpc", filters: Sequence[str] | None = None, **connection: Any) -> None:
        from filterserve.client.servers import connect, parse_urls  # servers builds on this module

        urls = parse_urls(url)
        if filters is None:
            filters = self._discover(urls, protocol, connection)
        elif not filters or len(set(filters)) != len(filters):
            raise ClientError(f"filters must be distinct names, got {list(filters)}")
        # One scorer per filter: a FilterClient, or a ServerPool when several servers are given.
        self.clients: dict[str, Scorer] = {}
        try:
            for name in filters:
                self.clients[name] = connect(urls, protocol, name, **connection)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(len(self.clients), thread_name_prefix="filterserve-filters")

    @staticmethod
    def _discover(urls: list[str], protocol: Protocol, connection: dict[str, Any]) -> list[str]:
        """The filters of the first server that answers (every server of a pool serves the same ones)."""
        reasons = []
        for url in urls:
            try:
                with TritonEndpoint(url, protocol, **connection) as endpoint:
                    found = endpoint.served_filters()
            except ServerUnavailable as exc:
                reasons.append(str(exc))
                continue
            if not found:
                raise ClientError(f"server at {url} serves no ready filter ensemble")
            return found
        raise ServerUnavailable("; ".join(reasons))

    @property
    def names(self) -> list[str]:
        return list(self.clients)

    @property
    def specs(self) -> dict[str, FilterSpec]:
        return {name: client.spec for name, client in self.clients.items()}

    def __enter__(self) -> "MultiFilterClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for client in self.clients.values():
            client.close()

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
        self, items: Iterable[Item], concurrency: int = 16
    ) -> Iterator[dict[str, FilterResult | ScoreError]]:
        """Per item, in input order, ``{filter: result or ScoreError}``.

        Each filter's own :meth:`FilterClient.score_iter` runs with ``concurrency`` requests in
        flight; the input is read once and shared through ``itertools.tee``, which is safe because
        every generator is advanced from this thread only.
        """
        streams = zip(self.clients.values(), itertools.tee(items, len(self.clients)))
        for results in zip(*(client.score_iter(stream, concurrency) for client, stream in streams)):
            yield dict(zip(self.clients, results))
