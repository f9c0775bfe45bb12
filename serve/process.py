"""The tritonserver process: its command line, ports, working folder, start, restart and drain.

What this module guarantees, and how:

- **Only the supervisor changes the server.** The APIs that change it rather than ask it
  (:data:`RESTRICTED_APIS`) need a header holding a random key made per server
  (:class:`AdminKey`); tritonserver refuses them otherwise (HTTP 403, gRPC UNAVAILABLE).
- **It dies with its parent**, through :mod:`die_with_parent`, started from a thread that lives
  exactly as long as the child (``PR_SET_PDEATHSIG`` fires when the forking *thread* exits).
- **Ports are not raced.** Ports the caller named were checked before the start
  (:func:`ports.check_ports`); ports left to us are picked free and, should something take one
  before tritonserver binds it, picked again (tritonserver reports the conflict and exits).
- **Nothing is left behind.** Shared-memory regions carry a prefix of this server's own and are
  removed at stop; the working folder records its owner, so the next start removes what a killed
  supervisor left (after letting its orphaned tritonserver drain). Logs are kept, see
  :func:`default_log_path`.
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from filterserve.errors import FilterServeError
from filterserve.serve.assembly import PYTHON_STUB, prepare_backends, server_env, tritonserver_binary
from filterserve.serve.options import ServeOptions
from filterserve.serve.ports import address, address_family, connect_host

# Everything that changes the server rather than asks it: loading and unloading models (a load
# may carry model.py source: code execution as the server's user), shared-memory registration
# (points Triton at memory the caller names: it crashed the server), trace and log settings.
# Health, metadata, inference, model configs and statistics stay open: clients read the filter
# description from the ensemble's config.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "filterserve-admin"
# tritonserver 2.51 expects this prefix on the gRPC metadata key of a restricted protocol.
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"
PORT_NAMES = ("http", "grpc", "metrics")  # tritonserver's, picked in this order when left to us
WORKDIR_PREFIX = "filterserve-triton-"
SHM_DIR = Path("/dev/shm")
DIE_WITH_PARENT = Path(__file__).resolve().with_name("die_with_parent.py")
PORT_RETRIES = 3
KEEP_LOGS = 50
EXIT_MARGIN_S = 5.0  # past the grace period, before SIGKILL: tritonserver needs a moment to exit
# After a crash recovery the dead stub's old model instance never finishes unloading, and Triton
# would wait out the whole grace period for it. Once every live stub is gone, no inference can
# still run (models unload only after in-flight requests end), so the wait is over.
UNLOAD_SETTLE_S = 1.0
_IN_USE = re.compile(r"Socket '([^']+)' already in use")


@dataclass(frozen=True)
class AdminKey:
    """The key that opens :data:`RESTRICTED_APIS`; only this process and tritonserver know it.

    It is on tritonserver's command line, so local users who may read other users' process
    arguments (no ``hidepid`` on /proc) can read it; it keeps out network clients and processes
    in other containers.
    """

    value: str = field(repr=False)

    @classmethod
    def generate(cls) -> AdminKey:
        return cls(secrets.token_hex(32))  # hex: no ':' or '=' that would break the flag's syntax

    def flags(self) -> list[str]:
        # The binary's --help says "<apis>,<key>=<value>", but it parses "<apis>:<key>=<value>".
        apis = ",".join(RESTRICTED_APIS)
        return [
            f"--http-restricted-api={apis}:{ADMIN_HEADER}={self.value}",
            f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={self.value}",
        ]

    @property
    def grpc_headers(self) -> dict[str, str]:
        return {GRPC_RESTRICTED_PREFIX + ADMIN_HEADER: self.value}


def _free_port(host: str) -> int:
    with socket.socket(address_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def default_log_path() -> Path:
    """A log per server under the temp folder, kept after stop; the oldest beyond KEEP_LOGS go."""
    folder = Path(tempfile.gettempdir()) / "filterserve-logs"
    folder.mkdir(parents=True, exist_ok=True)
    logs = sorted(folder.glob("tritonserver-*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[: max(0, len(logs) - KEEP_LOGS + 1)]:
        old.unlink(missing_ok=True)
    return folder / f"tritonserver-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}.log"


def _same_process(pid: int | None, started: float | None) -> psutil.Process | None:
    """The process if ``pid`` still names the one that started at ``started`` (pids are reused)."""
    if not pid or started is None:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE:
            return process
    except psutil.Error:
        pass
    return None


def _kill_group(pgid: int) -> None:
    """SIGKILL tritonserver's process group: stubs of a killed server outlive it there."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_regions(prefix: str) -> None:
    for region in SHM_DIR.glob(prefix + "*"):
        region.unlink(missing_ok=True)


def live_stubs(server_pid: int) -> list[psutil.Process]:
    """The Python backend stubs tritonserver runs, zombies (crashed, not yet reaped) left out."""
    stubs: list[psutil.Process] = []
    try:
        children = psutil.Process(server_pid).children()
    except psutil.Error:
        return stubs
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE and Path(child.cmdline()[0]).name == PYTHON_STUB:
                stubs.append(child)
        except (psutil.Error, IndexError):
            continue
    return stubs


def clean_stale_workdirs(root: Path, grace_s: float) -> list[Path]:
    """Remove working folders and shm regions whose supervisor died without stopping its server.

    A killed supervisor's tritonserver got SIGTERM from the kernel and drains its requests; it is
    given the grace period to finish before its group is killed. Folders of live supervisors, and
    of other users, are left alone.
    """
    removed = []
    for owner_file in root.glob(f"{WORKDIR_PREFIX}*/owner.json"):
        try:
            owner = json.loads(owner_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if _same_process(owner.get("owner_pid"), owner.get("owner_started")):
            continue
        orphan = _same_process(owner.get("server_pid"), owner.get("server_started"))
        if orphan is not None:
            print(f"waiting up to {grace_s + EXIT_MARGIN_S:.0f} s for tritonserver {orphan.pid}, left by a killed "
                  "filterserve, to finish its requests", file=sys.stderr, flush=True)
            try:
                orphan.wait(grace_s + EXIT_MARGIN_S)
            except psutil.TimeoutExpired:
                pass
            _kill_group(orphan.pid)
        _remove_regions(owner.get("shm_prefix") or owner_file.parent.name)
        shutil.rmtree(owner_file.parent, ignore_errors=True)
        removed.append(owner_file.parent)
    return removed


@dataclass
class _Child:
    """One launched tritonserver, reaped by the thread that forked it."""

    process: subprocess.Popen
    exited: threading.Event


class TritonProcess:
    """One tritonserver at a time, on ports fixed at the first start, restartable after it dies."""

    def __init__(self, options: ServeOptions, admin_key: AdminKey) -> None:
        """``options.repo`` resolved; its ports of 0 are picked at the first start."""
        self.options = options
        self.ports = {what: options.ports()[what] or 0 for what in PORT_NAMES}
        self.admin_key = admin_key
        self.startup_timeout_s = options.startup_timeout_s  # for a start, and for a reload of one model
        self.log_path = options.log_file  # None: one is picked at the first start
        self.launches = 0  # tells a probe sent to an earlier tritonserver from one sent to this
        self.cancel = threading.Event()  # set to abandon a start or restart (the caller is stopping)
        self._token = secrets.token_hex(6)
        self._workdir: Path | None = None
        self._child: _Child | None = None
        self._auto_ports = {what for what, port in self.ports.items() if not port}
        self._log_offset = 0
        self._last_exit: int | None = None

    # --- state -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._child.process.pid if self._child else None

    @property
    def running(self) -> bool:
        return self._child is not None and not self._child.exited.is_set()

    @property
    def returncode(self) -> int | None:
        """The current tritonserver's exit code, or the last one's once it was cleaned up."""
        return self._child.process.returncode if self._child else self._last_exit

    @property
    def shm_prefix(self) -> str:
        return f"filterserve_{self._token}_"

    def url(self, what: str) -> str:
        return address(connect_host(self.options.host), self.ports[what])

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the current (or last) tritonserver wrote; earlier launches left out."""
        if self.log_path is None or not self.log_path.is_file():
            return "(no server log)"
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            text = log.read().decode("utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    # --- start -----------------------------------------------------------------------------
    def start(self) -> None:
        """First start: working folder, backends, ports, then launch and wait until ready."""
        if self.log_path is not None:  # a log file the caller named: refused now, not at the launch
            try:
                with open(self.log_path, "ab"):
                    pass
            except OSError as exc:
                raise FilterServeError(f"cannot write the log file {self.log_path}: {exc.strerror or exc}") from None
        root = Path(tempfile.gettempdir())
        clean_stale_workdirs(root, self.options.grace_period_s)
        self._workdir = root / f"{WORKDIR_PREFIX}{self._token}"
        self._workdir.mkdir()
        self._write_owner()
        self.log_path = self.log_path or default_log_path()
        env = server_env()
        prepare_backends(self._workdir / "backends", env)
        for what in PORT_NAMES:
            if not self.ports[what]:
                self.ports[what] = _free_port(self.options.host)
        for attempt in range(1, PORT_RETRIES + 1):
            try:
                self._launch(env)
                return
            except _PortTaken as taken:
                if attempt == PORT_RETRIES or not self._repick(taken.address):
                    raise FilterServeError(f"port {taken.address} is already in use") from None

    def restart(self) -> None:
        """After tritonserver died: end what is left of it, then the same command on the same ports."""
        self._end_child()
        try:
            self._launch(server_env())
        except _PortTaken as taken:
            raise FilterServeError(f"restarting tritonserver: port {taken.address} is already in use") from None

    def _repick(self, taken: str) -> bool:
        """A port we picked was taken before tritonserver bound it: pick another. False if it was the caller's."""
        port = int(taken.rsplit(":", 1)[1])
        what = next((w for w in self._auto_ports if self.ports[w] == port), None)
        if what is None:
            return False
        self.ports[what] = _free_port(self.options.host)
        return True

    def _command(self) -> list[str]:
        assert self._workdir is not None
        return [
            sys.executable, "-I", "-S", str(DIE_WITH_PARENT), str(os.getpid()), str(int(signal.SIGTERM)),
            str(tritonserver_binary()),
            f"--model-repository={self.options.repo}",
            f"--backend-directory={self._workdir / 'backends'}",
            # Explicit mode so the supervisor can reload one crashed model; its API is locked below.
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--http-address={self.options.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.options.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.options.host}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            # SIGTERM: refuse new connections, let requests in flight finish for this long.
            f"--exit-timeout-secs={math.ceil(self.options.grace_period_s)}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.admin_key.flags(),
        ]

    def _launch(self, env: dict[str, str]) -> None:
        """Start tritonserver from a thread that stays blocked in waitpid for the child's whole life."""
        assert self.log_path is not None
        started: queue.SimpleQueue = queue.SimpleQueue()
        exited = threading.Event()
        command = self._command()
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"--- filterserve: starting tritonserver (launch {self.launches + 1}) ---\n".encode())
            log.flush()

            def keep() -> None:
                try:
                    process = subprocess.Popen(
                        command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True,  # its own process group: stubs included, ended together
                    )
                except OSError as exc:
                    started.put(exc)
                    return
                started.put(process)
                process.wait()
                exited.set()

            threading.Thread(target=keep, name="tritonserver-parent", daemon=True).start()
            outcome = started.get()
        if isinstance(outcome, OSError):
            raise FilterServeError(f"cannot start tritonserver: {outcome}")
        self._child = _Child(outcome, exited)
        self.launches += 1
        self._write_owner()
        try:
            self._wait_ready()
        except BaseException:
            self._end_child()
            raise

    def _wait_ready(self) -> None:
        assert self._child is not None
        client = grpcclient.InferenceServerClient(self.url("grpc"))
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._child.exited.wait(0.2):
                    taken = _IN_USE.search(self.log_tail(80))
                    if taken:
                        raise _PortTaken(taken.group(1))
                    raise self.failure(f"tritonserver exited with code {self.returncode} while loading {self.options.repo}")
                if self.cancel.is_set():
                    raise FilterServeError("stop requested while tritonserver was starting")
                try:
                    if client.is_server_ready(client_timeout=2.0) and self._http_endpoints_answer():
                        return
                except InferenceServerException:
                    pass
        finally:
            client.close()
        raise self.failure(f"tritonserver was not ready after {self.startup_timeout_s:.0f} s")

    def _http_endpoints_answer(self) -> bool:
        """tritonserver opens gRPC before HTTP and metrics, and exits if either port is taken: gRPC
        alone answering is not "started". A squatter on the port accepts but never answers 200."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for what, path in (("http", "/v2/health/ready"), ("metrics", "/metrics")):
            try:
                with opener.open(f"http://{self.url(what)}{path}", timeout=2.0) as response:
                    if response.status != 200:
                        return False
            except OSError:  # refused, timed out, or an HTTPError (a URLError, an OSError)
                return False
        return True

    def failure(self, message: str) -> FilterServeError:
        return FilterServeError(f"{message}; last lines of the tritonserver log ({self.log_path}):\n{self.log_tail()}")

    def _write_owner(self) -> None:
        """Who owns the folder, so the next start can tell it was abandoned (pid + start time)."""
        assert self._workdir is not None
        me = psutil.Process()
        owner = {"owner_pid": me.pid, "owner_started": me.create_time(), "shm_prefix": self.shm_prefix}
        if self._child is not None:
            try:
                owner |= {"server_pid": self.pid, "server_started": psutil.Process(self.pid).create_time()}
            except psutil.Error:
                pass
        (self._workdir / "owner.json").write_text(json.dumps(owner), encoding="utf-8")

    # --- stop ------------------------------------------------------------------------------
    def stop(self, grace_s: float | None = None) -> None:
        """Drain, then end the group and remove the shm regions and working folder; never raises.

        SIGTERM makes tritonserver refuse new connections and wait up to ``--exit-timeout-secs``
        for requests in flight. ``grace_s`` below the start's value shortens only our wait.
        """
        grace_s = self.options.grace_period_s if grace_s is None else grace_s
        child = self._child
        if child is not None and not child.exited.is_set():
            had_stubs = bool(live_stubs(child.process.pid))
            try:
                child.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace_s + EXIT_MARGIN_S
            drained_at = None
            while not child.exited.wait(0.1) and time.monotonic() < deadline:
                if had_stubs and not live_stubs(child.process.pid):
                    drained_at = drained_at or time.monotonic()
                    if time.monotonic() - drained_at > UNLOAD_SETTLE_S:
                        break
        self._end_child()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _end_child(self) -> None:
        """SIGKILL the group of the current (or dead) tritonserver, reap it, free its shm regions."""
        child, self._child = self._child, None
        if child is not None:
            _kill_group(child.process.pid)
            child.exited.wait(10)
            self._last_exit = child.process.returncode
        _remove_regions(self.shm_prefix)


class _PortTaken(Exception):
    """tritonserver could not bind an address (someone took it after it was checked)."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.address = address
