"""A connection to one Triton server: transport, TLS, timeouts, retries, and the filters it serves.

Every request goes through :meth:`TritonEndpoint._call`, the one place that decides what a failure
means: unreachable or stopping (retried, then :class:`ServerUnavailable`, so a pool fails over),
bad input, timed out, or refused (a :class:`ClientError` at once, since retrying repeats it).
"""

from __future__ import annotations

import difflib
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gevent.exceptions import InvalidThreadUseError  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from filterserve import defaults
from filterserve.client.errors import ClientError, ServerUnavailable
from filterserve.contract import FILTER_PARAMETER

Protocol = Literal["grpc", "http"]
PROTOCOLS: tuple[Protocol, ...] = get_args(Protocol)
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
FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0


# A URL's scheme says the protocol (and TLS); a bare HOST:PORT is spoken in the protocol asked for.
SCHEMES: dict[str, tuple[Protocol, bool]] = {
    "http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True),
}


@dataclass(frozen=True)
class Address:
    """One server as tritonclient wants it: bare ``HOST:PORT``, the protocol, and whether TLS is asked for."""

    host_port: str
    protocol: Protocol
    secure: bool


def parse_address(url: str, protocol: Protocol | None = None) -> Address:
    """``url`` as the user wrote it (``host``, ``host:port``, ``http://host:port``...), checked once.

    tritonclient takes a bare ``host`` for port 443 and an ``http://`` URL as a gRPC target, and
    fails later with a message about neither: the port defaults by protocol here, the scheme picks
    the protocol, and a scheme that contradicts ``protocol`` is refused.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ClientError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    scheme, separator, rest = url.strip().partition("://")
    if not separator:
        scheme, rest = "", url.strip()
    spoken, secure = protocol or defaults.PROTOCOL, False
    if scheme:
        if scheme.lower() not in SCHEMES:
            raise ClientError(f"server URL {url}: unknown scheme {scheme}://; use {', '.join(s + '://' for s in SCHEMES)} "
                              "or a bare HOST:PORT")
        spoken, secure = SCHEMES[scheme.lower()]
        if protocol is not None and protocol != spoken:
            raise ClientError(f"server URL {url} is a {spoken} address, but the protocol asked for is {protocol}: drop one of them")
    parts = urlsplit(f"//{rest}")
    try:
        port = parts.port
    except ValueError:
        raise ClientError(f"server URL {url}: the port is not a number from 0 to 65535") from None
    if not parts.hostname or parts.path.strip("/") or parts.query or parts.fragment:
        raise ClientError(f"server URL {url}: expected HOST[:PORT], optionally after http://, https://, grpc:// or grpcs://")
    host_port = parts.netloc if port is not None else f"{parts.netloc}:{defaults.PORTS[spoken]}"
    return Address(host_port, spoken, secure)


@dataclass(frozen=True)
class Served:
    """What one server serves, read once: every loaded model's config, by name.

    A served filter is an ensemble whose config carries the filter description; its clients read
    their config (and a group member its indexing step's) from here instead of asking again.
    """

    configs: dict[str, dict[str, Any]]

    @property
    def filters(self) -> list[str]:
        return sorted(
            name
            for name, config in self.configs.items()
            if config.get("platform") == "ensemble" and FILTER_PARAMETER in config.get("parameters", {})
        )

    def not_served(self, name: str, url: str) -> str:
        """Why ``name`` cannot be scored here, naming what can (and the closest name, for a typo)."""
        if not self.filters:
            return f"the server at {url} serves no filter"
        closest = difflib.get_close_matches(name, self.filters, n=1)
        hint = f"; did you mean {closest[0]}?" if closest else ""
        return f"the filters it serves: {', '.join(self.filters)}{hint}"


class TritonEndpoint:
    """A connection to a Triton server (retries, timeouts, TLS) and the filters it serves.

    The gRPC client is shared by all threads; the HTTP client is not thread-safe (gevent), so
    each thread gets its own.
    """

    def __init__(
        self,
        url: str,
        protocol: Protocol | None = None,
        *,
        timeout_s: float = defaults.TIMEOUT_S,
        retries: int = defaults.RETRIES,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        ssl_options: dict[str, Any] | None = None,
        insecure: bool = False,
    ) -> None:
        if retries < 0 or timeout_s <= 0:
            raise ClientError(f"retries must be >= 0 and timeout_s > 0, got {retries} and {timeout_s}")
        address = parse_address(url, protocol)
        self.url, self.protocol = address.host_port, address.protocol
        self.timeout_s = timeout_s
        self.retries = retries
        self._transport_options: dict[str, Any] = (
            {
                "ssl": ssl or address.secure,
                "root_certificates": root_certificates,
                "private_key": private_key,
                "certificate_chain": certificate_chain,
            }
            if self.protocol == "grpc"
            else {"ssl": ssl or address.secure, "ssl_options": ssl_options, "insecure": insecure}
        )
        self._local = threading.local()
        # Weak, so a finished worker thread's HTTP client is collected with the thread.
        self._opened: weakref.WeakSet[Any] = weakref.WeakSet()
        self._opened_lock = threading.Lock()
        self._grpc = grpcclient.InferenceServerClient(self.url, **self._transport_options) if self.protocol == "grpc" else None
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
    def config(self, model: str) -> dict[str, Any]:
        """One model's config, as JSON."""
        if self.protocol == "grpc":
            answer = self._call(lambda c: c.get_model_config(model, as_json=True, client_timeout=self.timeout_s), "model config")
            return answer.get("config", {})
        return self._call(lambda c: c.get_model_config(model), "model config")

    def discover(self) -> Served:
        """Every loaded model's config, each read once.

        The loaded models come from the statistics API: ``filterserve serve`` locks the repository
        index (it belongs to the API that loads code), while statistics stay open to every caller.
        """
        if self.protocol == "grpc":
            stats = self._call(lambda c: c.get_inference_statistics(as_json=True, client_timeout=self.timeout_s), "model list")
        else:
            stats = self._call(lambda c: c.get_inference_statistics(), "model list")
        names = sorted({entry["name"] for entry in stats.get("model_stats", [])})
        return Served({name: self.config(name) for name in names})

    def served_filters(self) -> list[str]:
        """Names of the loaded filter ensembles: ensembles whose config carries the filter description."""
        return self.discover().filters

    def is_ready(self, model: str) -> bool:
        return bool(self._call(lambda c: c.is_model_ready(model, **self._timeout_kw()), "readiness check"))

    # --- inference ---------------------------------------------------------------------------
    def _module(self) -> Any:
        return grpcclient if self.protocol == "grpc" else httpclient

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
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
