"""Health supervision: tells a busy tritonserver from a broken one, and recovers the broken one.

Every signal has its own short deadline, and none waits behind the inference queue:

- **tritonserver exited** (the thread that started it reaps it): restart on the same ports, with
  a backoff and at most ``max_restarts`` within ``restart_window_s``; then :class:`ServerGaveUp`.
- **A Python backend stub exited or is stopped** (psutil; stubs are tritonserver's children): its
  model fails every request while Triton still calls it ready. The model alone is reloaded with a
  changed config, which Triton swaps in while the old instance finishes what it runs, so requests
  running in other models, and in the ensembles, are not failed.
- **A test inference per filter ensemble**, sent asynchronously every ``probe_interval_s``. If it
  fails, the ensemble's steps are replayed to find the model that fails, which is reloaded. If it
  is late, the statistics API tells whether the ensemble's models complete requests (busy: count
  it, do nothing) or not for ``stall_s`` (stalled: reported not ready; nothing is restarted, which
  would fail the requests it holds).

Every recovery is printed and counted in ``filterserve_recoveries_total``, served with readiness
by :class:`SupervisorEndpoint`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.serve.assembly import PYTHON_STUB, ensemble_steps, filter_ensembles
from filterserve.serve.process import TritonProcess, address, address_family

EXIT_GAVE_UP = 3  # `filterserve serve`'s exit code when tritonserver keeps dying (2 is a user error)
PROBE_TEXT = "Volunteers rebuilt the village school. Classes resume on Monday."
# Triton reloads a model only when its config changed: each reload sets this parameter anew.
RELOAD_PARAMETER = "filterserve_reload"
MAX_BACKOFF_S = 60.0
STUB_BROKEN = {psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD, psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP}
SERVER = "tritonserver"


class ServerGaveUp(FilterServeError):
    """tritonserver died more often than the restart limit allows."""

    exit_code = EXIT_GAVE_UP


@dataclass(frozen=True)
class Recovery:
    """One action the supervisor took: ``reload_model`` of a model, or ``restart_server``."""

    action: str
    target: str
    reason: str
    ok: bool
    started: float  # time.monotonic() when it began
    seconds: float


@dataclass
class _Probe:
    """A test inference in flight, and how much work the ensemble's models had completed."""

    sent_at: float
    launch: int
    completed: int
    progress_at: float
    late: bool = False
    error: InferenceServerException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Failing:
    reason: str
    attempts: int
    retry_at: float


def _print(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _is_late(error: InferenceServerException) -> bool:
    return "DEADLINE_EXCEEDED" in str(error.status())


def _tensor(name: str, data: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(data.shape), np_to_triton_dtype(data.dtype))
    tensor.set_data_from_numpy(data)
    return tensor


def _probe_inputs() -> dict[str, np.ndarray]:
    return {contract.TEXT: np.array([[PROBE_TEXT.encode()]], dtype=object)}


def _probe_tensors() -> list[grpcclient.InferInput]:
    return [_tensor(name, data) for name, data in _probe_inputs().items()]


class Supervisor:
    """Watches one :class:`TritonProcess`; :meth:`check` is one round, :meth:`supervise` the loop."""

    def __init__(
        self,
        process: TritonProcess,
        configs: dict[str, mc.ModelConfig],
        *,
        probe_timeout_s: float = 5.0,
        probe_interval_s: float = 10.0,
        stall_s: float = 300.0,
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
        report: Callable[[str], None] = _print,
    ) -> None:
        self.process = process
        self.configs = configs
        self.ensembles = filter_ensembles(configs)
        self.probe_timeout_s = probe_timeout_s
        self.probe_interval_s = probe_interval_s
        self.stall_s = stall_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.report = report
        self.recoveries: list[Recovery] = []
        self.late_probes: Counter[str] = Counter()  # test inferences that waited behind a moving queue
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._client: grpcclient.InferenceServerClient | None = None
        self._stubs: dict[psutil.Process, str] = {}
        self._retired: set[psutil.Process] = set()  # stubs of a replaced instance: their exit is expected
        self._failing: dict[str, _Failing] = {}
        self._stalled: set[str] = set()
        self._probes: dict[str, _Probe] = {}
        self._last_probe: dict[str, float] = {}
        self._restarts: list[float] = []
        self._reloads = 0
        self._reloaded_at: dict[str, float] = {}  # a probe sent before its model was reloaded says nothing
        self._triton_ready = False
        self._attached_launch = 0  # the launch whose stubs and client this supervisor knows

    # --- state -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Serving: tritonserver up, attached to and ready, and no model failing or stalled."""
        return (
            self.process.running
            and self._attached_launch == self.process.launches
            and self._triton_ready
            and not self._failing
            and not self._stalled
        )

    def status(self) -> dict:
        return {
            "ready": self.ready,
            "tritonserver": "running" if self.process.running else "down",
            "failing": {model: failing.reason for model, failing in dict(self._failing).items()},
            "stalled": sorted(self._stalled),
        }

    def attach(self) -> None:
        """After every (re)start: a fresh client, the stubs as they are now, no probe in flight."""
        if self._client is not None:
            self._client.close()
        self._client = grpcclient.InferenceServerClient(self.process.url("grpc"))
        self._stubs.clear()
        self._retired.clear()
        self._probes.clear()
        self._failing.clear()
        self._stalled.clear()
        self._scan_stubs()
        self._triton_ready = True
        self._attached_launch = self.process.launches

    def verify_filters(self) -> None:
        """A test inference per filter, waited for: at start, a filter that cannot score is an error."""
        assert self._client is not None
        for name in self.ensembles:
            try:
                self._client.infer(name, _probe_tensors(), client_timeout=self.process.startup_timeout_s)
            except InferenceServerException as exc:
                if _is_late(exc):  # requests that arrived first queue ahead of the probe: busy, not broken
                    self.report(f"test inference on {name} waited {self.process.startup_timeout_s:.0f} s behind "
                                "queued requests: busy, not broken; the supervisor keeps checking it")
                    continue
                raise self.process.failure(f"test inference on {name} failed: {exc.message()}") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # --- one round -------------------------------------------------------------------------
    def check(self) -> list[Recovery]:
        """One supervision round; returns what it recovered. Raises only :class:`ServerGaveUp`."""
        if not self.process.running:
            return self._restart_server()
        made = [self._reload(model, reason) for model, reason in self._broken_stubs().items()]
        now = time.monotonic()
        made += [self._reload(model, failing.reason) for model, failing in list(self._failing.items())
                 if now >= failing.retry_at and model not in {r.target for r in made}]
        made += self._probe_round()
        self._triton_ready = self._ask_ready()
        return made

    def supervise(self, stop: threading.Event, interval_s: float) -> None:
        """Rounds every ``interval_s`` until ``stop`` is set; nothing but ServerGaveUp escapes."""
        while not stop.wait(interval_s):
            try:
                self.check()
            except ServerGaveUp:
                raise
            except Exception as exc:  # noqa: BLE001 - a supervisor that dies takes the service down with it
                self.report(f"supervisor: a check failed ({type(exc).__name__}: {exc}); still serving")

    # --- tritonserver ----------------------------------------------------------------------
    def _restart_server(self) -> list[Recovery]:
        how = _describe_exit(self.process.returncode)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < self.restart_window_s]
        if len(self._restarts) >= self.max_restarts:
            raise ServerGaveUp(
                f"tritonserver {how}, after {len(self._restarts)} restarts within {self.restart_window_s:.0f} s "
                f"(limit {self.max_restarts}): giving up; its log: {self.process.log_path}"
            )
        delay = min(2.0 ** (len(self._restarts) - 1), MAX_BACKOFF_S) if self._restarts else 0.0
        self._restarts.append(now)
        self.report(f"supervisor: tritonserver {how}; restarting it"
                    f"{f' in {delay:.0f} s' if delay else ''} ({len(self._restarts)} of {self.max_restarts} "
                    f"restarts allowed within {self.restart_window_s:.0f} s)")
        if self.process.cancel.wait(delay):
            return []
        started = time.monotonic()
        try:
            self.process.restart()
        except FilterServeError as exc:
            if self.process.cancel.is_set():
                return []  # stopping: not a failed recovery
            return [self._record("restart_server", SERVER, how, False, started, str(exc).splitlines()[0])]
        self.attach()
        return [self._record("restart_server", SERVER, how, True, started)]

    def _ask_ready(self) -> bool:
        assert self._client is not None
        try:
            return self._client.is_server_ready(client_timeout=self.probe_timeout_s)
        except InferenceServerException:
            return False

    # --- stubs -----------------------------------------------------------------------------
    def _scan_stubs(self) -> None:
        """Learn the stubs started since the last scan (a zombie's command line cannot be read)."""
        if self.process.pid is None:
            return
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.Error:
            return
        for child in children:
            if child in self._stubs or child in self._retired:
                continue
            try:
                command = child.cmdline()
            except psutil.Error:
                continue
            if len(command) > 1 and Path(command[0]).name == PYTHON_STUB:
                self._stubs[child] = Path(command[1]).parents[1].name  # <repo>/<model>/<version>/<file>

    def _broken_stubs(self) -> dict[str, str]:
        """Model → why, for every known stub that exited or is stopped (a stopped one is killed)."""
        self._scan_stubs()
        broken = {}
        for stub, model in list(self._stubs.items()):
            try:
                state = stub.status()
            except psutil.NoSuchProcess:
                state = psutil.STATUS_DEAD
            if state not in STUB_BROKEN:
                continue
            del self._stubs[stub]
            if state in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
                with contextlib.suppress(psutil.Error):
                    stub.kill()  # Triton already fails its requests; it would hold its memory forever
                broken[model] = f"its stub (pid {stub.pid}) was stopped"
            else:
                broken[model] = f"its stub (pid {stub.pid}) exited"
        return broken

    # --- models ----------------------------------------------------------------------------
    def _reload(self, model: str, reason: str) -> Recovery:
        """Swap in a fresh instance of ``model``; on failure, report it failing and retry with backoff."""
        assert self._client is not None
        started = time.monotonic()
        attempts = self._failing[model].attempts if model in self._failing else 0
        self._failing[model] = _Failing(reason, attempts, float("inf"))  # not ready while it reloads
        for stub in [s for s, m in self._stubs.items() if m == model]:
            del self._stubs[stub]
            self._retired.add(stub)
        try:
            config = self._client.get_model_config(model, as_json=True, client_timeout=self.probe_timeout_s)["config"]
            self._reloads += 1
            config.setdefault("parameters", {})[RELOAD_PARAMETER] = {"string_value": str(self._reloads)}
            self._client.load_model(
                model,
                config=json.dumps(config),
                headers=self.process.admin_key.grpc_headers,
                client_timeout=self.process.startup_timeout_s,
            )
        except InferenceServerException as exc:
            backoff = min(2.0 ** (attempts + 1), MAX_BACKOFF_S)
            self._failing[model] = _Failing(reason, attempts + 1, time.monotonic() + backoff)
            return self._record("reload_model", model, reason, False, started,
                                f"{exc.message()}; next try in {backoff:.0f} s")
        finally:
            self._reloaded_at[model] = time.monotonic()
        self._failing.pop(model, None)
        self._scan_stubs()
        return self._record("reload_model", model, reason, True, started)

    def _record(self, action: str, target: str, reason: str, ok: bool, started: float, detail: str = "") -> Recovery:
        recovery = Recovery(action, target, reason, ok, started, time.monotonic() - started)
        self.recoveries.append(recovery)
        self._counts[(action, target, "ok" if ok else "failed")] += 1
        done, failed = {"reload_model": ("reloaded model", "could not reload model"),
                        "restart_server": ("restarted", "could not restart")}[action]
        self.report(f"supervisor: {done if ok else failed} {target} in {recovery.seconds:.1f} s ({reason}){f': {detail}' if detail else ''}")
        return recovery

    # --- test inferences -------------------------------------------------------------------
    def _probe_round(self) -> list[Recovery]:
        made: list[Recovery] = []
        now = time.monotonic()
        for name in self.ensembles:
            probe = self._probes.get(name)
            if probe is None:
                if now - self._last_probe.get(name, float("-inf")) >= self.probe_interval_s:
                    self._send_probe(name, now)
            elif probe.done.is_set():
                del self._probes[name]
                self._stalled.discard(name)
                if probe.error is not None and not self._outdated(name, probe):
                    made += self._diagnose(name, probe.error)
            elif now - probe.sent_at > self.probe_timeout_s:
                self._judge_late(name, probe, now)
        return made

    def _outdated(self, name: str, probe: _Probe) -> bool:
        """Sent to an earlier tritonserver, or before one of the ensemble's models was reloaded."""
        reloaded = max(self._reloaded_at.get(m, 0.0) for m in [name, *ensemble_steps(self.configs[name])])
        return probe.launch != self.process.launches or reloaded > probe.sent_at

    def _send_probe(self, name: str, now: float) -> None:
        assert self._client is not None
        completed = self._completed(name)
        if completed is None:
            return  # no statistics within the deadline: try again next round
        probe = _Probe(sent_at=now, launch=self.process.launches, completed=completed, progress_at=now)

        def answered(result: object, error: InferenceServerException | None) -> None:
            probe.error = error
            probe.done.set()

        self._client.async_infer(name, _probe_tensors(), callback=answered)
        self._probes[name] = probe
        self._last_probe[name] = now

    def _completed(self, ensemble: str) -> int | None:
        """Requests the ensemble's models have answered so far (successes and failures)."""
        assert self._client is not None
        steps = set(ensemble_steps(self.configs[ensemble]))
        try:
            stats = self._client.get_inference_statistics(as_json=True, client_timeout=self.probe_timeout_s)
        except InferenceServerException:
            return None
        total = 0
        for entry in stats.get("model_stats", []):
            if entry.get("name") in steps:
                counts = entry.get("inference_stats", {})
                total += sum(int(counts.get(kind, {}).get("count", 0)) for kind in ("success", "fail"))
        return total

    def _judge_late(self, name: str, probe: _Probe, now: float) -> None:
        """A late test inference: busy if the models complete requests meanwhile, stalled if not."""
        completed = self._completed(name)
        if completed is None:
            return
        if completed > probe.completed:
            probe.completed, probe.progress_at = completed, now
            if not probe.late:
                probe.late = True
                self.late_probes[name] += 1
            if name in self._stalled:
                self._stalled.discard(name)
                self.report(f"supervisor: {name} completes requests again")
        elif now - probe.progress_at > self.stall_s and name not in self._stalled:
            self._stalled.add(name)
            self.report(f"supervisor: {name} has completed no request for {self.stall_s:.0f} s while its test "
                        "inference waits: reported not ready (nothing restarted: that would fail its queue)")

    def _diagnose(self, name: str, error: InferenceServerException) -> list[Recovery]:
        """The test inference failed: replay the steps to find the model that fails, and reload it.

        A step that answers late is busy, not broken. If every step answers, the ensemble itself
        is reloaded (it holds no stub: that costs nothing and fails nothing).
        """
        assert self._client is not None
        tensors = _probe_inputs()
        for step in self.configs[name].ensemble_scheduling.step:
            inputs = [_tensor(model_input, tensors[tensor]) for model_input, tensor in step.input_map.items()
                      if tensor in tensors]
            try:
                result = self._client.infer(step.model_name, inputs, client_timeout=self.probe_timeout_s)
            except InferenceServerException as exc:
                if _is_late(exc):
                    return []
                return [self._reload(step.model_name, f"its test inference failed: {exc.message()}")]
            tensors.update({tensor: result.as_numpy(out) for out, tensor in step.output_map.items()})
        return [self._reload(name, f"its test inference failed ({error.message()}) while every step answers")]

    # --- exposition ------------------------------------------------------------------------
    def metrics_text(self) -> str:
        """Prometheus text exposition of the supervisor's counters and readiness."""
        lines = [
            "# HELP filterserve_recoveries_total Recoveries by the supervisor: a model reloaded after its "
            "stub died or its test inference failed, or tritonserver restarted after it exited.",
            "# TYPE filterserve_recoveries_total counter",
            *(f'filterserve_recoveries_total{{action="{a}",target="{t}",outcome="{o}"}} {n}'
              for (a, t, o), n in sorted(self._counts.items())),
            "# HELP filterserve_late_probes_total Test inferences past their deadline while the queue moved "
            "(busy, not broken).",
            "# TYPE filterserve_late_probes_total counter",
            *(f'filterserve_late_probes_total{{model="{m}"}} {n}' for m, n in sorted(self.late_probes.items())),
            "# HELP filterserve_ready 1 when tritonserver is up and ready and no model is failing or stalled.",
            "# TYPE filterserve_ready gauge",
            f"filterserve_ready {int(self.ready)}",
        ]
        return "\n".join(lines) + "\n"


class SupervisorEndpoint:
    """``GET /metrics`` (Prometheus text) and ``GET /ready`` (200, or 503 with why) on a port of its own.

    Triton's own ``/v2/health/ready`` stays 200 while a crashed stub fails every request; this
    readiness does not.
    """

    def __init__(self, supervisor: Supervisor, host: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                if self.path == "/metrics":
                    status, body, kind = 200, supervisor.metrics_text(), "text/plain; version=0.0.4"
                elif self.path == "/ready":
                    state = supervisor.status()
                    status, body, kind = (200 if state["ready"] else 503), json.dumps(state), "application/json"
                else:
                    status, body, kind = 404, "not found: GET /metrics or /ready\n", "text/plain"
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - scrapes are not news
                pass

        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": address_family(host), "daemon_threads": True})
        try:
            self._server = server_class((host, port), Handler)
        except OSError as exc:
            raise FilterServeError(f"supervisor port {port} is not free on {host}: {exc.strerror}") from None
        self.host, self.port = host, self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="supervisor-endpoint", daemon=True).start()

    @property
    def url(self) -> str:
        return address(self.host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
