"""Runs the ``tritonserver`` binary from the nvidia-pytriton wheel on a filterserve repository.

The wheel ships the server and the Python backend but no ONNX Runtime backend and no stub on
the backend path; :func:`prepare_backends` assembles a backend directory so the repository the
export writes for NVIDIA's container loads here unchanged.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve.errors import FilterServeError

PROBE_TEXT = "Volunteers rebuilt the village school. Classes resume on Monday."
LOG_TAIL_LINES = 40


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError:
        raise FilterServeError("nvidia-pytriton is not installed: pip install 'filterserve[serve]'") from None
    return Path(pytriton.__file__).resolve().parent


def _shim_path() -> Path:
    """The shim lives in the model_repository package; resolved through it so installs work."""
    import filterserve.model_repository

    return Path(filterserve.model_repository.__file__).resolve().parent / "backends" / "onnxruntime" / "model.py"


def server_env(pytriton_dir: Path) -> dict[str, str]:
    """The server's environment: bundled libraries, and this interpreter's ``python3`` first.

    The Python backend stub ignores PYTHONPATH and imports from whichever ``python3`` is first on
    PATH, so this puts the running interpreter there to give the models its packages.
    """
    env = dict(os.environ)
    libs = str(pytriton_dir.parent / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libs, env.get("LD_LIBRARY_PATH")]))
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    return env


def _check_stub_libraries(stub: Path, env: dict[str, str]) -> None:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if shutil.which("ldd") is None:
        return  # nothing to ask; the server log names a missing library anyway
    out = subprocess.run(["ldd", str(stub)], env=env, capture_output=True, text=True).stdout
    missing = [line.split()[0] for line in out.splitlines() if "not found" in line]
    if any(name.startswith("libpython") for name in missing):
        raise FilterServeError(
            f"the Python backend stub needs libpython{version}.so.1.0, which is not installed: "
            f"install the Debian/Ubuntu package libpython{version} (apt-get install libpython{version})"
        )
    if missing:
        raise FilterServeError(f"the Python backend stub {stub} cannot find {', '.join(missing)}")


def prepare_backends(dest: Path, env: dict[str, str]) -> Path:
    """Fill ``dest`` with ``python/`` (backend + stub for this interpreter) and the ``onnxruntime`` shim."""
    pytriton_dir = _pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = pytriton_dir / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FilterServeError(f"nvidia-pytriton ships no Python backend stub for Python {version} (see {stub.parent.parent})")
    _check_stub_libraries(stub, env)
    python_dir = dest / "python"
    shutil.copytree(
        pytriton_dir / "tritonserver" / "backends" / "python",
        python_dir,
        ignore=shutil.ignore_patterns("__pycache__"),
        dirs_exist_ok=True,
    )
    shutil.copy2(stub, python_dir / "triton_python_backend_stub")
    (dest / "onnxruntime").mkdir(exist_ok=True)
    shutil.copy2(_shim_path(), dest / "onnxruntime" / "model.py")
    return dest


def read_configs(repo: Path) -> dict[str, mc.ModelConfig]:
    """Model name → parsed config for every model folder; files at the root (filter.json) are skipped."""
    configs = {}
    for config_file in sorted(repo.glob("*/config.pbtxt")):
        config = text_format.Parse(config_file.read_text(encoding="utf-8"), mc.ModelConfig())
        configs[config.name or config_file.parent.name] = config
    return configs


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _claim_port(host: str, port: int | None, what: str) -> int:
    if port is None:
        return _free_port(host)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            raise FilterServeError(f"{what} port {port} is already in use on {host}") from None
    return port


def _die_with_parent() -> None:
    """Runs in the child: the kernel sends SIGTERM to tritonserver if its parent dies.

    atexit does not run when the parent is killed by a signal; without this a killed test run
    or a crashed caller would leave an orphaned server holding its ports.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TritonServer:
    """A tritonserver process in its own process group, stopped on exit even if the caller forgets."""

    def __init__(
        self,
        repo: str | Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout_s: float = 180.0,
        request_timeout_s: float = 60.0,
    ) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise FilterServeError(f"model repository not found: {self.repo}")
        self.configs = read_configs(self.repo)
        if not self.configs:
            raise FilterServeError(f"no models in {self.repo}: expected folders holding a config.pbtxt")
        self.host = host
        self.startup_timeout_s = startup_timeout_s
        self.request_timeout_s = request_timeout_s
        self._ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._reloaded_after_crash = False
        self.log_path: Path | None = None

    # --- addresses -------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self._ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self._ports['grpc']}"

    @property
    def metrics_url(self) -> str:
        return f"{self.host}:{self._ports['metrics']}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def ensembles(self) -> list[str]:
        """Ensembles that take a TEXT input: the ones a text probe can exercise."""
        return [
            name
            for name, config in self.configs.items()
            if config.platform == "ensemble" and any(i.name == "TEXT" and i.data_type == mc.TYPE_STRING for i in config.input)
        ]

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "TritonServer":
        if self._process is not None:
            raise FilterServeError("this server is already started")
        for what, port in self._ports.items():
            self._ports[what] = _claim_port(self.host, port, what)
        pytriton_dir = _pytriton_dir()
        env = server_env(pytriton_dir)
        self._workdir = Path(tempfile.mkdtemp(prefix="filterserve-triton-"))
        try:
            backends = prepare_backends(self._workdir / "backends", env)
            self.log_path = self._workdir / "tritonserver.log"
            command = [
                str(pytriton_dir / "tritonserver" / "bin" / "tritonserver"),
                f"--model-repository={self.repo}",
                f"--backend-directory={backends}",
                "--model-control-mode=explicit",
                "--load-model=*",
                f"--http-address={self.host}",
                f"--http-port={self._ports['http']}",
                f"--grpc-address={self.host}",
                f"--grpc-port={self._ports['grpc']}",
                f"--metrics-address={self.host}",
                f"--metrics-port={self._ports['metrics']}",
                "--allow-gpu-metrics=false",
            ]
            with open(self.log_path, "wb") as log:
                self._process = subprocess.Popen(
                    command,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            atexit.register(self.stop)
            self._wait_ready()
            for name in self.ensembles:
                self._probe_ensemble(name)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGINT lets Triton unload models and end its stubs; SIGKILL the group if it hangs.

        After a crash recovery the dead stub's old instance never finishes unloading and Triton
        would wait its full exit timeout for it, so the grace period is then short.
        """
        process, self._process = self._process, None
        if process is not None:
            atexit.unregister(self.stop)
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=min(timeout_s, 3.0) if self._reloaded_after_crash else timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            try:  # stubs left behind by a killed server are still in its process group
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return "(no server log)"
        return "\n".join(self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])

    def _fail(self, message: str) -> FilterServeError:
        return FilterServeError(f"{message}; last lines of the tritonserver log:\n{self.log_tail()}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = self._process.returncode if self._process else None
                raise self._fail(f"tritonserver exited with code {code} while loading {self.repo}")
            try:
                if self._http("GET", "/v2/health/ready", timeout_s=2.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise self._fail(f"tritonserver was not ready after {self.startup_timeout_s:.0f} s")

    # --- HTTP ------------------------------------------------------------------------------
    def _http(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.request_timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def _infer(self, model: str, inputs: dict[str, dict]) -> dict[str, dict]:
        """One JSON inference; raises FilterServeError with Triton's message on failure."""
        body = {"inputs": [dict(name=name, **tensor) for name, tensor in inputs.items()]}
        status, answer = self._http("POST", f"/v2/models/{model}/infer", body)
        if status != 200:
            message = answer.get("error", answer) if isinstance(answer, dict) else answer
            raise FilterServeError(f"test inference on {model} failed (HTTP {status}): {message}")
        return {out["name"]: {k: out[k] for k in ("shape", "datatype", "data")} for out in answer["outputs"]}

    def _probe_ensemble(self, name: str) -> None:
        self._infer(name, {"TEXT": {"shape": [1, 1], "datatype": "BYTES", "data": [PROBE_TEXT]}})

    def _failing_steps(self, name: str) -> list[str]:
        """Replays the ensemble step by step to find the composing models that fail."""
        config = self.configs[name]
        tensors = {"TEXT": {"shape": [1, 1], "datatype": "BYTES", "data": [PROBE_TEXT]}}
        for step in config.ensemble_scheduling.step:
            inputs = {model_input: tensors[tensor] for model_input, tensor in step.input_map.items() if tensor in tensors}
            try:
                outputs = self._infer(step.model_name, inputs)
            except FilterServeError:
                return [step.model_name]  # later steps have no input to test with
            tensors.update({tensor: outputs[out] for out, tensor in step.output_map.items() if out in outputs})
        return []

    def _model_ready(self, model: str) -> bool:
        return self._http("GET", f"/v2/models/{model}/ready")[0] == 200

    def _reload(self, model: str) -> None:
        """Unload, then load: loading an unchanged model is a no-op that would keep the dead stub."""
        for action in ("unload", "load"):
            status, answer = self._http("POST", f"/v2/repository/models/{model}/{action}", {})
            if status != 200:
                raise self._fail(f"{action}ing {model} failed (HTTP {status}): {answer}")

    # --- supervision -----------------------------------------------------------------------
    def check(self) -> None:
        """Test inference per ensemble; reload the models behind a failure (a crashed stub stays "ready")."""
        if self._process is None or self._process.poll() is not None:
            raise self._fail("tritonserver is not running")
        for name in self.ensembles:
            try:
                self._probe_ensemble(name)
                continue
            except FilterServeError as first:
                failure = first
            if not self._model_ready(name):
                raise self._fail(f"model {name} is not ready ({failure})")
            for model in self._failing_steps(name) or [name]:
                self._reload(model)
            self._reloaded_after_crash = True
            try:
                self._probe_ensemble(name)
            except FilterServeError as again:
                raise self._fail(f"model {name} still fails after reloading its failing models: {again}") from None

    def supervise(self, interval_s: float = 30.0) -> None:
        """Blocks, checking every ``interval_s``; returns only by raising (or KeyboardInterrupt)."""
        while True:
            time.sleep(interval_s)
            self.check()
