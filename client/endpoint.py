"""A connection to one Triton server: transport, TLS, timeouts, retries, and the filters it serves.

Every request goes through :meth:`TritonEndpoint._call`, the one place that decides what a failure
means: unreachable or stopping (retried, then :class:`ServerUnavailable`, so a pool fails over),
bad input, timed out, or refused (a :class:`ClientError` at once, since retrying repeats it).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from http.client import HTTPException
from typing import Any, Literal, TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from gevent.exceptions import InvalidThreadUseError
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from filterserve.client.errors import ClientError, ServerUnavailable
from filterserve.contract import FILTER_PARAMETER

Protocol = Literal["grpc", "http"]
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


def _strip_scheme(url: str) -> tuple[str, bool]:
    """tritonclient wants bare ``host:port``; ``https://`` also asks for TLS."""
    for scheme, secure in (("https://", True), ("http://", False), ("grpc://", False), ("grpcs://", True)):
        if url.startswith(scheme):
            return url[len(scheme) :], secure
    return url, False


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

    # --- inference ---------------------------------------------------------------------------
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
