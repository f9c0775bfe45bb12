"""``ServeOptions``: everything ``filterserve serve`` can be told, as one value checked once.

The CLI builds it from its flags; tests, benchmarks and the demo build it (or hand
:class:`~filterserve.serve.server.TritonServer` a repository path) without one. Every default
comes from :mod:`filterserve.defaults`, except the ports: a server started from Python gets free
ports and no supervisor endpoint, so that several can run side by side (the tests do).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from filterserve import defaults
from filterserve.errors import FilterServeError

# What listens → the flag that names its port: refusals name the flag the user can change.
PORT_FLAGS = {"http": "--http-port", "grpc": "--grpc-port", "metrics": "--metrics-port", "supervisor": "--supervisor-port"}
TRITON_PORTS = ("http", "grpc", "metrics")  # tritonserver's own; the supervisor's endpoint is serve's
MAX_PORT = 65535


@dataclass(frozen=True)
class ServeOptions:
    """A repository and how to serve it. A port of 0 is picked free; ``supervisor_port`` None runs no endpoint."""

    repo: Path
    host: str = defaults.SERVE_HOST
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    supervisor_port: int | None = None
    check_interval_s: float = defaults.SERVE_CHECK_INTERVAL_S
    probe_timeout_s: float = defaults.SERVE_PROBE_TIMEOUT_S
    grace_period_s: float = defaults.SERVE_GRACE_PERIOD_S
    max_restarts: int = defaults.SERVE_MAX_RESTARTS
    startup_timeout_s: float = defaults.SERVE_STARTUP_TIMEOUT_S
    log_file: Path | None = None

    def __post_init__(self) -> None:
        named: dict[int, str] = {}
        for what, port in self.ports().items():
            flag = PORT_FLAGS[what]
            if port is None:
                continue
            if not 0 <= port <= MAX_PORT:
                raise FilterServeError(f"{flag} {port} is not a port number (0 to {MAX_PORT}; 0 picks a free one)")
            if port and port in named:
                raise FilterServeError(f"{flag} {port} is also the {named[port]}: each needs a port of its own")
            named[port] = flag
        for flag, seconds in (("--check-interval", self.check_interval_s), ("--probe-timeout", self.probe_timeout_s),
                              ("--startup-timeout", self.startup_timeout_s)):
            if not seconds > 0:
                raise FilterServeError(f"{flag} must be more than 0 seconds, not {seconds}")
        if not self.grace_period_s >= 0:
            raise FilterServeError(f"--grace-period must be 0 seconds or more, not {self.grace_period_s}")
        if self.max_restarts < 0:
            raise FilterServeError(f"--max-restarts must be 0 or more, not {self.max_restarts}")

    def ports(self) -> dict[str, int | None]:
        """What listens → its port as given (0: pick a free one; the supervisor's None: none)."""
        return {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port,
                "supervisor": self.supervisor_port}
