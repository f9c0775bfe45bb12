"""``TritonServer``: the tritonserver binary from nvidia-pytriton on a filterserve repository,
locked, supervised and stopped cleanly.

It puts together the parts of ``serve/``: :mod:`options` (what to serve, and how), :mod:`ports`
and :mod:`assembly` (what the server needs before it starts), :mod:`process` (its process life),
:mod:`supervisor` (telling busy from broken, and recovering) and :mod:`status_http` (the
supervisor's ``/ready`` and ``/metrics``). Tests, benchmarks and the demo use it as a context
manager; ``filterserve serve`` adds :meth:`TritonServer.supervise` and the supervisor's endpoint.
"""

from __future__ import annotations

import atexit
import dataclasses
import threading
from pathlib import Path

from filterserve.errors import FilterServeError
from filterserve.serve.assembly import filter_ensembles, read_configs
from filterserve.serve.memory import check_memory
from filterserve.serve.options import ServeOptions
from filterserve.serve.ports import address, check_ports
from filterserve.serve.process import AdminKey, TritonProcess
from filterserve.serve.status_http import SupervisorEndpoint
from filterserve.serve.supervisor import Recovery, Supervisor

WATCH_INTERVAL_S = 0.5  # stub and process checks: cheap, local, and what makes recovery take seconds


class TritonServer:
    """A supervised tritonserver: its own process group, its own admin key, stopped on exit."""

    def __init__(self, options: ServeOptions | str | Path) -> None:
        """A repository alone is served on free ports, without the supervisor's endpoint."""
        if not isinstance(options, ServeOptions):
            options = ServeOptions(Path(options))
        self.options = dataclasses.replace(options, repo=Path(options.repo).resolve())
        self.repo = self.options.repo
        if not self.repo.is_dir():
            raise FilterServeError(f"model repository not found: {self.repo}")
        self.configs = read_configs(self.repo)
        if not self.configs:
            raise FilterServeError(f"no models in {self.repo}: expected folders holding a config.pbtxt")
        self.admin_key = AdminKey.generate()
        self.process = TritonProcess(self.options, self.admin_key)
        self.supervisor = Supervisor(self.process, self.configs, self.options)
        self._endpoint: SupervisorEndpoint | None = None
        self._started = False
        self._stop_requested = threading.Event()
        self._supervising = threading.Lock()  # held by supervise(): stop() waits for its round to end

    # --- addresses -------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return address(self.options.host, self.process.ports["http"])

    @property
    def grpc_url(self) -> str:
        return address(self.options.host, self.process.ports["grpc"])

    @property
    def metrics_url(self) -> str:
        return address(self.options.host, self.process.ports["metrics"])

    @property
    def supervisor_url(self) -> str | None:
        return self._endpoint.url if self._endpoint else None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def log_path(self) -> Path | None:
        return self.process.log_path

    @property
    def ensembles(self) -> list[str]:
        """The filter ensembles (a TEXT input): the ones a text probe can exercise."""
        return filter_ensembles(self.configs)

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> TritonServer:
        """Start, wait until ready, and check every filter with a test inference."""
        if self._started:
            raise FilterServeError("this server is already started")
        check_ports(self.options)  # a port in use is refused now, not after tritonserver's start
        check_memory(self.repo)  # a clear refusal now rather than the kernel's OOM kill mid-load
        self._started = True
        atexit.register(self.stop)
        try:
            self.process.start()
            self.supervisor.attach()
            self.supervisor.verify_filters()
            if self.options.supervisor_port is not None:
                self._endpoint = SupervisorEndpoint(self.supervisor, self.options.host, self.options.supervisor_port)
        except BaseException:
            self.stop()
            raise
        return self

    def request_stop(self) -> None:
        """Ends :meth:`supervise` and abandons a restart under way; safe from a signal handler."""
        self._stop_requested.set()
        self.process.cancel.set()

    def stop(self, grace_s: float | None = None) -> None:
        """Drain requests in flight (up to the grace period), end the server, clean up; keeps the log."""
        self.request_stop()
        atexit.unregister(self.stop)
        with self._supervising:
            if self._endpoint is not None:
                self._endpoint.close()
                self._endpoint = None
            self.supervisor.close()
            self.process.stop(grace_s)

    # --- supervision -----------------------------------------------------------------------
    def check(self) -> list[Recovery]:
        """One supervision round (see :mod:`filterserve.serve.supervisor`); returns the recoveries it made."""
        return self.supervisor.check()

    def supervise(self, interval_s: float = WATCH_INTERVAL_S) -> None:
        """Blocks, one round every ``interval_s``, until :meth:`request_stop`; raises only ServerGaveUp."""
        with self._supervising:
            self.supervisor.supervise(self._stop_requested, interval_s)
