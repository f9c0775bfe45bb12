"""The supervisor: tells a busy tritonserver from a broken one, and recovers the broken one.

Every signal has its own short deadline, and none waits behind the inference queue:

- **tritonserver exited** (the thread that started it reaps it): restart on the same ports, with
  a backoff and at most ``max_restarts`` within :data:`RESTART_WINDOW_S`; then :class:`ServerGaveUp`.
- **A Python backend stub exited or is stopped** (psutil; stubs are tritonserver's children): its
  model fails every request while Triton still calls it ready. The model alone is reloaded with a
  changed config, which Triton swaps in while the old instance finishes what it runs, so requests
  running in other models, and in the ensembles, are not failed.
- **A test inference per filter ensemble** (:mod:`probes`), sent asynchronously every
  ``check_interval_s``. If it fails, the ensemble's steps are replayed to find the model that
  fails, which is reloaded. If it is late, the statistics API tells whether the ensemble's models
  complete requests (busy: count it, do nothing) or not for :data:`STALL_S` (stalled: reported
  not ready; nothing is restarted, which would fail the requests it holds).

Every recovery is printed and counted in ``filterserve_recoveries_total``; :mod:`status_http`
serves that and the readiness.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from filterserve.errors import FilterServeError
from filterserve.serve.assembly import PYTHON_STUB, ensemble_steps, filter_ensembles
from filterserve.serve.options import ServeOptions
from filterserve.serve.probes import Probe, completed_requests, is_late, probe_tensors, replay_steps
from filterserve.serve.process import TritonProcess

EXIT_GAVE_UP = 3  # `filterserve serve`'s exit code when tritonserver keeps dying (2 is a user error)
RESTART_WINDOW_S = 600.0  # --max-restarts counts the restarts within this window
STALL_S = 300.0  # a late test inference with no request completed for this long: stalled, not busy
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


@dataclass(frozen=True)
class SupervisorStatus:
    """What ``GET /ready`` answers, and why when not ready."""

    ready: bool
    tritonserver: str  # "running" or "down"
    failing: dict[str, str]  # model → why
    stalled: list[str]


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


class Supervisor:
    """Watches one :class:`TritonProcess`; :meth:`check` is one round, :meth:`supervise` the loop."""

    def __init__(
        self, process: TritonProcess, configs: dict[str, mc.ModelConfig], options: ServeOptions,
        report: Callable[[str], None] = _print,
    ) -> None:
        """``options``: its deadlines (check interval, probe timeout) and restart limit."""
        self.process = process
        self.configs = configs
        self.options = options
        self.ensembles = filter_ensembles(configs)
        self.report = report
        self.recoveries: list[Recovery] = []
        self.late_probes: Counter[str] = Counter()  # test inferences that waited behind a moving queue
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._client: grpcclient.InferenceServerClient | None = None
        self._stubs: dict[psutil.Process, str] = {}
        self._retired: set[psutil.Process] = set()  # stubs of a replaced instance: their exit is expected
        self._failing: dict[str, _Failing] = {}
        self._stalled: set[str] = set()
        self._probes: dict[str, Probe] = {}
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

    def status(self) -> SupervisorStatus:
        return SupervisorStatus(
            ready=self.ready,
            tritonserver="running" if self.process.running else "down",
            failing={model: failing.reason for model, failing in dict(self._failing).items()},
            stalled=sorted(self._stalled),
        )

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
                self._client.infer(name, probe_tensors(), client_timeout=self.process.startup_timeout_s)
            except InferenceServerException as exc:
                if is_late(exc):  # requests that arrived first queue ahead of the probe: busy, not broken
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
            except Exception:  # noqa: BLE001 - a supervisor that dies takes the service down with it
                self.report(f"supervisor: a check failed; still serving. The bug, for a report:\n{traceback.format_exc()}")

    # --- tritonserver ----------------------------------------------------------------------
    def _restart_server(self) -> list[Recovery]:
        how = _describe_exit(self.process.returncode)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW_S]
        if len(self._restarts) >= self.options.max_restarts:
            raise ServerGaveUp(
                f"tritonserver {how}, after {len(self._restarts)} restarts within {RESTART_WINDOW_S:.0f} s "
                f"(limit {self.options.max_restarts}): giving up; its log: {self.process.log_path}"
            )
        delay = min(2.0 ** (len(self._restarts) - 1), MAX_BACKOFF_S) if self._restarts else 0.0
        self._restarts.append(now)
        self.report(f"supervisor: tritonserver {how}; restarting it"
                    f"{f' in {delay:.0f} s' if delay else ''} ({len(self._restarts)} of {self.options.max_restarts} "
                    f"restarts allowed within {RESTART_WINDOW_S:.0f} s)")
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
            return self._client.is_server_ready(client_timeout=self.options.probe_timeout_s)
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
            config = self._client.get_model_config(model, as_json=True, client_timeout=self.options.probe_timeout_s)["config"]
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
        self.report(f"supervisor: {done if ok else failed} {target} in {recovery.seconds:.1f} s ({reason})"
                    f"{f': {detail}' if detail else ''}")
        return recovery

    # --- test inferences -------------------------------------------------------------------
    def _probe_round(self) -> list[Recovery]:
        made: list[Recovery] = []
        now = time.monotonic()
        for name in self.ensembles:
            probe = self._probes.get(name)
            if probe is None:
                if now - self._last_probe.get(name, float("-inf")) >= self.options.check_interval_s:
                    self._send_probe(name, now)
            elif probe.done.is_set():
                del self._probes[name]
                self._stalled.discard(name)
                if probe.error is not None and not self._outdated(name, probe):
                    made += self._diagnose(name, probe.error)
            elif now - probe.sent_at > self.options.probe_timeout_s:
                self._judge_late(name, probe, now)
        return made

    def _outdated(self, name: str, probe: Probe) -> bool:
        """Sent to an earlier tritonserver, or before one of the ensemble's models was reloaded."""
        reloaded = max(self._reloaded_at.get(m, 0.0) for m in [name, *ensemble_steps(self.configs[name])])
        return probe.launch != self.process.launches or reloaded > probe.sent_at

    def _send_probe(self, name: str, now: float) -> None:
        assert self._client is not None
        completed = self._completed(name)
        if completed is None:
            return  # no statistics within the deadline: try again next round
        probe = Probe(sent_at=now, launch=self.process.launches, completed=completed, progress_at=now)

        def answered(result: object, error: InferenceServerException | None) -> None:
            probe.error = error
            probe.done.set()

        self._client.async_infer(name, probe_tensors(), callback=answered)
        self._probes[name] = probe
        self._last_probe[name] = now

    def _completed(self, ensemble: str) -> int | None:
        """Requests the ensemble's models have answered so far (successes and failures)."""
        assert self._client is not None
        return completed_requests(self._client, set(ensemble_steps(self.configs[ensemble])), self.options.probe_timeout_s)

    def _judge_late(self, name: str, probe: Probe, now: float) -> None:
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
        elif now - probe.progress_at > STALL_S and name not in self._stalled:
            self._stalled.add(name)
            self.report(f"supervisor: {name} has completed no request for {STALL_S:.0f} s while its test "
                        "inference waits: reported not ready (nothing restarted: that would fail its queue)")

    def _diagnose(self, name: str, error: InferenceServerException) -> list[Recovery]:
        """The test inference failed: replay the steps to find the model that fails, and reload it.

        A step that answers late is busy, not broken. If every step answers, the ensemble itself
        is reloaded (it holds no stub: that costs nothing and fails nothing).
        """
        assert self._client is not None
        found = replay_steps(self._client, self.configs[name], self.options.probe_timeout_s)
        if found.late:
            return []
        if found.failed_step is not None:
            return [self._reload(found.failed_step, f"its test inference failed: {found.message}")]
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
