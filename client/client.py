"""A thin scoring client over Triton's gRPC and HTTP protocols.

It reads the filter (dimension names, weights, max_length) from the served ensemble's config,
so the same client scores any filter the export wrote, and it imports only tritonclient,
numpy, tokenizers and tqdm so that the bare install stays free of torch.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Literal, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tokenizers import Tokenizer
from tqdm import tqdm
from tritonclient.utils import InferenceServerException

from filterserve.errors import FilterServeError

Protocol = Literal["grpc", "http"]
Item = str | tuple[str, str] | dict[str, Any]
T = TypeVar("T")

TEXT_INPUT = "TEXT"
# Only these mean "the server is not there (yet)"; retrying anything else repeats a sure failure.
RETRYABLE_GRPC = {"StatusCode.UNAVAILABLE"}
RETRYABLE_HTTP = {"502", "503", "504"}
BAD_INPUT = {"StatusCode.INVALID_ARGUMENT", "400"}
TIMED_OUT = {"StatusCode.DEADLINE_EXCEEDED"}
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0


class ClientError(FilterServeError):
    """A request the server refused or could not answer; the message says which and why."""


class ServerUnavailable(ClientError):
    """The server could not be reached, even after retries."""


@dataclass(frozen=True)
class Scores:
    """One article's scores, keyed by the served filter's dimension names in its output order."""

    dimensions: dict[str, float]
    weighted_score: float

    def as_dict(self) -> dict[str, float]:
        return {**self.dimensions, "weighted_score": self.weighted_score}


@dataclass(frozen=True)
class ScoreError:
    """Stands in for the :class:`Scores` of an item that failed, so a batch never aborts halfway."""

    index: int
    message: str


def article_text(title: object, content: object) -> str:
    """The model card's input, ``title + ". " + content``; both parts must be non-empty strings."""
    for field, value in (("title", title), ("content", content)):
        if not isinstance(value, str):
            raise ClientError(f"bad input: {field} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ClientError(f"bad input: {field} is empty")
    return f"{title}. {content}"


def item_text(item: Item) -> str:
    """Text of a :meth:`FilterClient.score_many` item: a text, a (title, content) pair or an article."""
    if isinstance(item, str):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return article_text(*item)
    if isinstance(item, dict):
        missing = [key for key in ("title", "content") if key not in item]
        if missing:
            raise ClientError(f"bad input: missing {' and '.join(missing)}")
        return article_text(item["title"], item["content"])
    raise ClientError(f"bad input: expected a text, a (title, content) pair or a dict, got {type(item).__name__}")


def _strip_scheme(url: str) -> tuple[str, bool]:
    """tritonclient wants bare ``host:port``; ``https://`` also asks for TLS."""
    for scheme, secure in (("https://", True), ("http://", False), ("grpc://", False), ("grpcs://", True)):
        if url.startswith(scheme):
            return url[len(scheme) :], secure
    return url, False


class FilterClient:
    """Scores articles with a filter served by Triton.

    ``tokenizer`` (a ``tokenizer.json``) tokenizes here and calls the tensor model
    ``<model>_onnx`` directly, for callers who run without the server's tokenizer step.
    The gRPC client is shared by all threads; the HTTP client is not thread-safe (gevent), so
    each thread gets its own.
    """

    def __init__(
        self,
        url: str,
        protocol: Protocol = "grpc",
        model: str | None = None,
        *,
        timeout_s: float = 30.0,
        retries: int = 3,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        ssl_options: dict[str, Any] | None = None,
        insecure: bool = False,
        tokenizer: str | None = None,
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
            self._connect(model, tokenizer)
        except BaseException:
            self.close()
            raise

    def _connect(self, model: str | None, tokenizer: str | None) -> None:
        """Reads the filter from the server, so a misconfigured one fails here, not mid-batch."""
        if not self._call(lambda c: c.is_server_live(**self._timeout_kw()), "liveness check"):
            raise ServerUnavailable(f"server at {self.url} answers but is not live ({self.protocol})")
        self.model = model or self._find_filter_model()
        self._require_ready(self.model)
        params = self._parameters(self.model)
        if "dimensions" not in params:
            raise ClientError(f"model {self.model} has no 'dimensions' parameter: it is not a filterserve ensemble")
        self.dimensions: tuple[str, ...] = tuple(params["dimensions"].split(","))
        self.weights: tuple[float, ...] = tuple(float(w) for w in params.get("weights", "").split(",") if w)
        self.max_length = int(params.get("max_length", 512))
        if len(self.weights) != len(self.dimensions):
            raise ClientError(f"model {self.model} has {len(self.dimensions)} dimensions but {len(self.weights)} weights")

        self.tensor_model = f"{self.model}_onnx"
        self._tokenizer: Tokenizer | None = None
        if tokenizer is not None:
            try:
                self._tokenizer = Tokenizer.from_file(str(tokenizer))
            except Exception as exc:  # tokenizers raises plain Exception for missing or broken files
                raise ClientError(f"cannot load tokenizer {tokenizer}: {exc}") from None
            # As the server's tokenizer step (and transformers): the library truncates, no padding.
            self._tokenizer.enable_truncation(self.max_length)
            self._tokenizer.no_padding()
            self._require_ready(self.tensor_model)

    # --- connections -------------------------------------------------------------------------
    def __enter__(self) -> "FilterClient":
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
            transport.close()

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
        """Runs ``request`` with bounded retries on unreachable-server errors only."""
        backoff = FIRST_BACKOFF_S
        for attempt in range(self.retries + 1):
            try:
                return request(self._transport())
            except InferenceServerException as exc:
                status, message = str(exc.status()), exc.message() or str(exc)
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

    def _parameters(self, model: str) -> dict[str, str]:
        return {key: value.get("string_value", "") for key, value in self._config(model).get("parameters", {}).items()}

    def _find_filter_model(self) -> str:
        if self.protocol == "grpc":
            index = self._call(lambda c: c.get_model_repository_index(as_json=True, client_timeout=self.timeout_s), "model index")
            entries = index.get("models", [])
        else:
            entries = self._call(lambda c: c.get_model_repository_index(), "model index")
        names = sorted({entry["name"] for entry in entries if entry.get("state") == "READY"})
        candidates = []
        for name in names:
            config = self._config(name)
            if config.get("platform") == "ensemble" and "dimensions" in config.get("parameters", {}):
                candidates.append(name)
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ClientError(f"server at {self.url} serves no ready filter ensemble (models: {', '.join(names) or 'none'})")
        raise ClientError(f"server at {self.url} serves several filters, pick one with model=: {', '.join(candidates)}")

    def _require_ready(self, model: str) -> None:
        if not self._call(lambda c: c.is_model_ready(model, **self._timeout_kw()), "readiness check"):
            raise ClientError(f"model {model} is not ready on the server at {self.url} ({self.protocol})")

    # --- scoring -----------------------------------------------------------------------------
    def _module(self) -> Any:
        return grpcclient if self.protocol == "grpc" else httpclient

    def _infer(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, str]) -> Scores:
        module = self._module()
        tensors = []
        for name, data in inputs.items():
            tensor = module.InferInput(name, list(data.shape), "BYTES" if data.dtype == object else "INT64")
            tensor.set_data_from_numpy(data)
            tensors.append(tensor)
        requested = [module.InferRequestedOutput(name) for name in outputs]
        result = self._call(
            lambda c: c.infer(model, tensors, outputs=requested, **self._timeout_kw()), f"inference on {model}"
        )
        scores = result.as_numpy(outputs[0]).reshape(-1)
        if scores.shape[0] != len(self.dimensions):
            raise ClientError(f"model {model} returned {scores.shape[0]} scores for {len(self.dimensions)} dimensions")
        weighted = float(result.as_numpy(outputs[1]).reshape(-1)[0])
        return Scores(dict(zip(self.dimensions, map(float, scores))), weighted)

    def score(self, title: str, content: str) -> Scores:
        return self.score_text(article_text(title, content))

    def score_text(self, text: str) -> Scores:
        if not isinstance(text, str):
            raise ClientError(f"bad input: text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ClientError("bad input: empty text")
        if self._tokenizer is not None:
            ids = self._tokenizer.encode(text).ids
            return self.score_tokens(ids)
        data = np.array([[text.encode("utf-8")]], dtype=object)
        return self._infer(self.model, {TEXT_INPUT: data}, ("scores", "weighted_score"))

    def score_tokens(self, input_ids: Sequence[int]) -> Scores:
        """Scores token ids on the tensor model; ids must come from the filter's own tokenizer."""
        if not input_ids:
            raise ClientError("bad input: no tokens")
        ids = np.asarray(input_ids, dtype=np.int64)[: self.max_length].reshape(1, -1)
        inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        return self._infer(self.tensor_model, inputs, ("logits", "weighted_score"))

    def score_iter(self, items: Iterable[Item], concurrency: int = 16) -> Iterator[Scores | ScoreError]:
        """Yields results in input order while up to ``concurrency`` requests are in flight.

        Items are read lazily, so a large input never sits in memory. Once the server is found
        unreachable, the items not yet sent fail at once instead of each waiting out the retries.
        """
        if concurrency < 1:
            raise ClientError(f"concurrency must be at least 1, got {concurrency}")
        down: list[str] = []

        def one(index: int, item: Item) -> Scores | ScoreError:
            if down:
                return ScoreError(index, f"not sent: {down[0]}")
            try:
                return self.score_text(item_text(item))
            except ServerUnavailable as exc:
                down.append(str(exc))
                return ScoreError(index, str(exc))
            except ClientError as exc:
                return ScoreError(index, str(exc))
            except Exception as exc:  # an unforeseen failure of one item must not abort the others
                return ScoreError(index, f"{type(exc).__name__}: {exc}")

        pending: deque[Future[Scores | ScoreError]] = deque()
        with ThreadPoolExecutor(concurrency, thread_name_prefix="filterserve-score") as pool:
            for index, item in enumerate(items):
                pending.append(pool.submit(one, index, item))
                if len(pending) >= 2 * concurrency:  # a little look-ahead keeps every worker busy
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def score_many(
        self, items: Iterable[Item], concurrency: int = 16, progress: bool = False
    ) -> list[Scores | ScoreError]:
        """All results in input order; failures are :class:`ScoreError` entries, never exceptions."""
        total = len(items) if isinstance(items, Sequence) else None
        with tqdm(total=total, disable=not progress, unit="item") as bar:
            results = []
            for result in self.score_iter(items, concurrency):
                results.append(result)
                bar.update()
        return results
