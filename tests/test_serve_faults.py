"""The real tritonserver under load, faults and hostile callers: it lets no one in, tells busy from
broken, recovers what breaks, and stops without failing what it runs.

Toy repositories only (a toy filter, and a model that sleeps on purpose), loopback only; every
server started here is stopped here.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import CLIENTS, stub_of, text_inputs
from slow_model import ENSEMBLE as SLOW
from slow_model import SLEEP_MODEL, build_slow_repository
from toy_onnx import TOY_SPEC, build_toy_export
from tritonclient.utils import InferenceServerException

from filterserve.serve import EXIT_GAVE_UP, ServeOptions, TritonServer
from filterserve.serve.assembly import ensemble_steps
from filterserve.serve.process import live_stubs

pytestmark = pytest.mark.slow  # every test here starts a tritonserver

DELAY_S = 0.1  # per request of the slow model: N queued requests take N × 0.1 s
PROBE_S = 0.5  # the supervisor's probe deadline and interval in these tests
DRAIN_REQUESTS = 16  # in flight at SIGTERM: 1.6 s of work, half over HTTP, half over gRPC
REFUSED = {"http": "403", "grpc": "StatusCode.UNAVAILABLE"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy filter and the slow model side by side, as one repository."""
    root = tmp_path_factory.mktemp("faults")
    toy = build_toy_export(root)
    return build_slow_repository(toy.repo, DELAY_S)


@pytest.fixture(scope="module")
def served(repo: Path):
    """A server supervised in the background, as `filterserve serve` does, with short deadlines."""
    server = TritonServer(ServeOptions(repo, probe_timeout_s=PROBE_S, check_interval_s=PROBE_S, supervisor_port=0)).start()
    supervising = threading.Thread(target=server.supervise, daemon=True)
    supervising.start()
    try:
        yield server
    finally:
        server.stop()
        supervising.join(10)


def _text(protocol: str):
    return text_inputs(protocol, [b"Volunteers rebuilt the school."])


def _send_many(server: TritonServer, model: str, n: int) -> tuple[list, threading.Event]:
    """n requests at once over gRPC; the list fills with "ok" or the error, the event fires at n."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    outcomes: list = []
    all_done = threading.Event()

    def answered(result, error) -> None:
        outcomes.append("ok" if error is None else error)
        if len(outcomes) == n:
            all_done.set()
            client.close()

    for _ in range(n):
        client.async_infer(model, _text("grpc"), callback=answered)
    return outcomes, all_done


def _wait_until(condition, timeout_s: float, what: str) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if condition():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s} s")


def _scores(server: TritonServer) -> bool:
    try:
        grpcclient.InferenceServerClient(server.grpc_url).infer(TOY_SPEC.name, _text("grpc"))
        return True
    except InferenceServerException:
        return False


def _supervisor_metrics(server: TritonServer) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{server.supervisor_url}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


def _ready(supervisor_url: str) -> bool:
    """The supervisor's readiness: 200 once a (re)started server is attached and ready, and no model fails."""
    try:
        return urllib.request.urlopen(f"http://{supervisor_url}/ready", timeout=2).status == 200
    except OSError:
        return False


class _ReadinessLog:
    """Polls the supervisor's /ready every 50 ms while the block runs: what a load balancer saw."""

    def __init__(self, server: TritonServer) -> None:
        self.seen: list[bool] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(server.supervisor_url,), daemon=True)

    def _poll(self, url: str) -> None:
        while not self._stop.wait(0.05):
            self.seen.append(_ready(url))

    def __enter__(self) -> _ReadinessLog:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


# --- no one gets in ------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_admin_apis_refuse_callers_without_the_key(served, protocol, tmp_path):
    """Load (code execution through a file override), unload, shm registration, repository
    index, trace and log settings: refused without the key and with a wrong one."""
    client = CLIENTS[protocol].InferenceServerClient(served.grpc_url if protocol == "grpc" else served.http_url)
    marker = tmp_path / "intruder-ran"
    intruder = f"open({str(marker)!r}, 'w').close()\nclass TritonPythonModel:\n    pass\n".encode()
    config = json.dumps({"name": SLEEP_MODEL, "backend": "python", "max_batch_size": 1})
    wrong_key = {"filterserve-admin": "guess", "triton-grpc-protocol-filterserve-admin": "guess"}
    attempts = {
        "load with code": lambda h: client.load_model(SLEEP_MODEL, headers=h, config=config, files={"file:1/model.py": intruder}),
        "unload": lambda h: client.unload_model(TOY_SPEC.name, headers=h),
        "shared memory": lambda h: client.register_system_shared_memory("intruder", f"/{served.process.shm_prefix}x", 64, headers=h),
        "repository index": lambda h: client.get_model_repository_index(headers=h),
        "trace settings": lambda h: client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}, headers=h),
        "log settings": lambda h: client.update_log_settings(settings={"log_verbose_level": 1}, headers=h),
    }
    for what, attempt in attempts.items():
        for headers in (None, wrong_key):
            with pytest.raises(InferenceServerException) as refused:
                attempt(headers)
            assert refused.value.status() == REFUSED[protocol], f"{what}: {refused.value}"
            assert "restricted" in refused.value.message(), f"{what}: {refused.value.message()}"
    assert not marker.exists()
    assert all(client.is_model_ready(name) for name in served.configs)
    assert _scores(served)
    assert client.get_model_config(TOY_SPEC.name)  # clients still read the filter from the config


@pytest.mark.timeout(60)
def test_hostile_http_bodies_never_get_other_scores_and_never_take_the_server_down(served):
    """What tritonserver 2.51's own HTTP parser does with bodies no client library sends (docs/design.md,
    "Bounded input"): a batch dimension of 2**32 or more is cut to its low 32 bits on the way in
    (2**32 + 1 is one row, 2**32 is read as one row too); the data must still fill the shape Triton
    read, so the one text sent is the one scored, never more and never another. Other shapes the
    data does not fill, negative dimensions and broken JSON are refused; the server stays up."""

    def post(body: bytes) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://{served.http_url}/v2/models/{TOY_SPEC.name}/infer", data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    def one_text(shape: list[int]) -> bytes:
        tensor = {"name": "TEXT", "shape": shape, "datatype": "BYTES", "data": ["Volunteers rebuilt the school."]}
        return json.dumps({"inputs": [tensor]}).encode()

    def scores(answer: dict) -> list[float]:
        (out,) = [out for out in answer["outputs"] if out["name"] == "scores"]
        return out["data"]

    status, plain = post(one_text([1, 1]))
    assert status == 200, plain
    for shape in ([2**32 + 1, 1], [2**32, 1], [2**33, 1]):
        status, answer = post(one_text(shape))
        assert status == 200 and scores(answer) == scores(plain), (shape, answer)
    for shape in ([2**32 + 2, 1], [2**31, 1], [2**32 - 1, 1], [1, 2**32 + 1]):
        status, answer = post(one_text(shape))
        assert status == 400 and "expected" in answer["error"], (shape, answer)
    status, answer = post(one_text([-1, 1]))
    assert status == 500 and "Unable to parse 'shape'" in answer["error"]
    status, answer = post(b'{"inputs": [')
    assert status == 500 and "failed to parse the request JSON buffer" in answer["error"]
    assert _scores(served) and served.supervisor.ready


# --- busy is not broken --------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_a_queue_far_deeper_than_the_probe_deadline_fails_nothing_and_restarts_nothing(served):
    requests = 80  # 8 s of work in one queue, 16 probe deadlines deep
    recoveries_before = len(served.supervisor.recoveries)
    late_before = served.supervisor.late_probes[SLOW]
    with _ReadinessLog(served) as readiness:
        outcomes, all_done = _send_many(served, SLOW, requests)
        assert all_done.wait(60)
    assert outcomes.count("ok") == requests, [o for o in outcomes if o != "ok"][:3]
    assert served.supervisor.recoveries[recoveries_before:] == []
    assert served.supervisor.late_probes[SLOW] > late_before  # the probe did wait, and was judged busy
    assert readiness.seen and all(readiness.seen)  # busy is ready


@pytest.mark.timeout(120)
def test_requests_queued_before_serve_is_ready_neither_fail_nor_fail_its_start(repo, monkeypatch, capsys):
    """Clients that start sending when tritonserver answers, before serve's own start-up test
    inference: that inference waits behind them past its deadline. Busy, not broken: start goes on,
    every queued request is answered, nothing is restarted. (600 queued long articles once took
    serve down this way.)"""
    from filterserve.serve.supervisor import Supervisor

    requests = 60  # 6 s of work queued ahead of the test inference
    burst: dict = {}
    original = Supervisor.verify_filters

    def verify_behind_a_queue(supervisor: Supervisor) -> None:
        client = grpcclient.InferenceServerClient(supervisor.process.url("grpc"))
        outcomes: list = []
        burst.update(outcomes=outcomes, done=threading.Event())
        for _ in range(requests):
            client.async_infer(SLOW, _text("grpc"), callback=lambda result, error: (
                outcomes.append("ok" if error is None else error),
                len(outcomes) == requests and burst["done"].set()))
        supervisor.process.startup_timeout_s = 2.0  # the start-up deadline, shorter than the queue
        time.sleep(0.5)  # the queue is built before the test inference joins it
        original(supervisor)

    monkeypatch.setattr(Supervisor, "verify_filters", verify_behind_a_queue)
    with TritonServer(repo) as server:
        assert burst["done"].wait(60)
        assert burst["outcomes"].count("ok") == requests, [o for o in burst["outcomes"] if o != "ok"][:3]
        assert server.supervisor.recoveries == []
        assert server.process.running and server.process.launches == 1
        assert _scores(server)
    assert f"test inference on {SLOW} waited 2 s behind queued requests: busy, not broken" in capsys.readouterr().err


# --- broken is recovered -------------------------------------------------------------------
@pytest.mark.timeout(90)
@pytest.mark.parametrize("step, how", [(0, "kill"), (1, "kill"), (2, "kill"), (0, "stop")])
def test_a_killed_stub_is_recovered_within_seconds_without_failing_running_requests(served, step, how):
    """kill -9 of each stub of the filter, and a stopped (SIGSTOP) one, which Triton also fails."""
    model = ensemble_steps(served.configs[TOY_SPEC.name])[step]  # tokenizer, tensor model, decision
    counted = f'filterserve_recoveries_total{{action="reload_model",target="{model}",outcome="ok"}}'
    before = _supervisor_metrics(served).get(counted, 0)
    recoveries_before = len(served.supervisor.recoveries)
    running, all_done = _send_many(served, SLOW, 30)  # 3 s of work in another model, in flight throughout
    time.sleep(0.3)
    with _ReadinessLog(served) as readiness:
        stub = stub_of(served, model)
        stub.kill() if how == "kill" else stub.suspend()
        killed_at = time.monotonic()
        took = _wait_until(lambda: _scores(served), 15, f"{TOY_SPEC.name} scoring again after its {model} stub was killed")
        _wait_until(lambda: readiness.seen[-1:] == [True], 5, "ready again")
    assert False in readiness.seen  # not ready while the model failed
    assert all_done.wait(30)
    assert running.count("ok") == 30, [o for o in running if o != "ok"][:3]
    made = served.supervisor.recoveries[recoveries_before:]
    assert [(r.action, r.target, r.ok) for r in made] == [("reload_model", model, True)]
    assert made[0].reason == f"its stub (pid {stub.pid}) {'exited' if how == 'kill' else 'was stopped'}"
    assert stub.status() == psutil.STATUS_ZOMBIE  # a stopped stub is killed, not left holding memory
    assert _supervisor_metrics(served)[counted] == before + 1
    # Detection takes a watch interval; the rest is the model's own load time, which on these
    # shared 2-core machines ranged 1.5-3.7 s for the toy models.
    assert made[0].started - killed_at < 1.0, f"noticed after {made[0].started - killed_at:.1f} s"
    assert took < 8.0, f"recovered after {took:.1f} s"
    print(f"{model}: stub {'killed' if how == 'kill' else 'stopped'} → noticed after {made[0].started - killed_at:.2f} s, reloaded in "
          f"{made[0].seconds:.2f} s, scoring again after {took:.2f} s")


@pytest.mark.timeout(120)
def test_a_killed_tritonserver_is_restarted_on_the_same_ports(served):
    old_pid, urls = served.pid, (served.http_url, served.grpc_url, served.metrics_url)
    os.kill(old_pid, signal.SIGKILL)
    took = _wait_until(lambda: served.pid not in (None, old_pid) and served.supervisor.ready, 60, "restart")
    assert (served.http_url, served.grpc_url, served.metrics_url) == urls
    assert _scores(served)
    assert httpclient.InferenceServerClient(served.http_url).is_server_ready()
    last = served.supervisor.recoveries[-1]
    assert (last.action, last.target, last.ok, last.reason) == ("restart_server", "tritonserver", True, "was killed by SIGKILL")
    metrics = _supervisor_metrics(served)
    assert metrics['filterserve_recoveries_total{action="restart_server",target="tritonserver",outcome="ok"}'] == 1
    assert metrics["filterserve_ready"] == 1
    # The dead server's shared memory is gone: one region per live stub remains.
    regions = list(Path("/dev/shm").glob(served.process.shm_prefix + "*"))
    assert len(regions) == len(live_stubs(served.pid)) == 4
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    print(f"tritonserver killed → ready again after {took:.2f} s")


# --- clean process life --------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


CLI = (
    "import sys\n"
    "from filterserve.cli import main\n"
    "sys.exit(main(['serve', *sys.argv[1:]]))\n"
)


def _start_cli(repo: Path, ports: list[int], *extra: str) -> tuple[subprocess.Popen, list[str]]:
    cli = subprocess.Popen(
        [sys.executable, "-c", CLI, "--model-repository", str(repo), "--http-port", str(ports[0]),
         "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--supervisor-port", str(ports[3]), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    while not any(line.lstrip().startswith("log") for line in lines):
        line = cli.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    return cli, lines


def _tritonserver_of(cli: subprocess.Popen) -> psutil.Process:
    return next(p for p in psutil.Process(cli.pid).children() if p.name() == "tritonserver")


def _end(cli: subprocess.Popen) -> None:
    """Only after a failure is anything left to end: the CLI and its server group."""
    if cli.poll() is None:
        for child in psutil.Process(cli.pid).children():
            os.killpg(child.pid, signal.SIGKILL)
        cli.kill()
    cli.wait()


def _sleep_model_counts(metrics_port: int) -> tuple[int, int]:
    """(queued, answered) requests of the sleeping model, from Triton's metrics port."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    counts = {}
    for line in text.splitlines():
        if f'model="{SLEEP_MODEL}"' in line and not line.startswith("#"):
            counts[line.split("{")[0]] = int(float(line.rsplit(" ", 1)[1]))
    return counts["nv_inference_pending_request_count"], counts["nv_inference_request_success"]


@pytest.mark.timeout(120)
def test_sigterm_drains_requests_in_flight_and_a_restart_on_the_same_ports_works(repo):
    ports = _free_ports(4)
    cli, lines = _start_cli(repo, ports)
    try:
        server = _tritonserver_of(cli)
        options = dict(a.split("=", 1) for a in server.cmdline()[1:] if "=" in a)
        workdir = Path(options["--backend-directory"]).parent
        prefix = options["--backend-config"].split("shm-region-prefix-name=")[1]
        log = Path(lines[-1].split()[1])
        outcomes: dict[int, object] = {}

        def send(i: int) -> None:
            protocol = ("http", "grpc")[i % 2]
            client = CLIENTS[protocol].InferenceServerClient(f"127.0.0.1:{ports[i % 2]}")
            try:
                outcomes[i] = client.infer(SLOW, _text(protocol)).as_numpy("LENGTH")[0, 0]
            except InferenceServerException as exc:
                outcomes[i] = exc

        senders = [threading.Thread(target=send, args=(i,)) for i in range(DRAIN_REQUESTS)]
        for sender in senders:
            sender.start()
        # SIGTERM once every request has reached the server (new connections are refused after it).
        _wait_until(lambda: sum(_sleep_model_counts(ports[2])) >= DRAIN_REQUESTS - 1, 20, "all requests queued")
        in_flight = DRAIN_REQUESTS - _sleep_model_counts(ports[2])[1]
        stopped_at = time.monotonic()
        cli.send_signal(signal.SIGTERM)
        for sender in senders:
            sender.join(30)
        assert cli.wait(40) == 0
        took = time.monotonic() - stopped_at
        output = cli.stdout.read()
        assert outcomes == {i: len(b"Volunteers rebuilt the school.") for i in range(DRAIN_REQUESTS)}
        assert in_flight >= DRAIN_REQUESTS // 2
        assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
        assert not workdir.exists() and not list(Path("/dev/shm").glob(prefix + "*"))
        assert log.is_file() and f"log stays at {log}" in output and "Traceback" not in output
        print(f"SIGTERM with {in_flight} requests in flight: all answered, serve exited after {took:.2f} s")
    finally:
        _end(cli)
    again, _ = _start_cli(repo, ports)  # at once, same ports: TIME_WAIT connections must not block it
    try:
        assert httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}").is_server_ready()
        again.send_signal(signal.SIGINT)
        assert again.wait(40) == 0
    finally:
        _end(again)


@pytest.mark.timeout(150)
def test_serve_gives_up_with_its_own_exit_code_when_tritonserver_keeps_dying(repo):
    ports = _free_ports(4)
    cli, _ = _start_cli(repo, ports, "--max-restarts", "1")
    try:
        first = _tritonserver_of(cli)
        first.kill()
        first.wait(10)  # reaped by serve: from here on its readiness says 503 until the restart is up
        _wait_until(lambda: _ready(f"127.0.0.1:{ports[3]}"), 60, "the first restart")
        second = _tritonserver_of(cli)
        assert second.pid != first.pid
        second.kill()
        assert cli.wait(60) == EXIT_GAVE_UP
        output = cli.stdout.read()
        assert "Traceback" not in output
        assert re.search(r"^error: tritonserver was killed by SIGKILL, after 1 restarts .* giving up", output, re.M), output
        assert "supervisor: restarted tritonserver" in output
    finally:
        _end(cli)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("which", ["http", "metrics"])
def test_a_picked_port_taken_before_tritonserver_binds_it_is_picked_again(repo, monkeypatch, which):
    """The race of find-free, release, bind: someone takes the port in between. tritonserver
    reports the conflict; serve picks another port and starts again. gRPC opens first, so a server
    answering on gRPC alone is not started yet: it may still exit on the HTTP or metrics port."""
    import filterserve.serve.process as process

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    calls = iter(process.PORT_NAMES)
    real_free_port = process._free_port
    monkeypatch.setattr(
        process, "_free_port", lambda host: taken if next(calls, None) == which else real_free_port(host)
    )
    try:
        with TritonServer(repo) as server:
            assert not getattr(server, f"{which}_url").endswith(f":{taken}")
            assert httpclient.InferenceServerClient(server.http_url).is_server_ready()
            assert _scores(server)
            assert f"127.0.0.1:{taken}' already in use" in server.log_path.read_text()
    finally:
        squatter.close()


@pytest.mark.timeout(120)
def test_server_outlives_the_thread_that_started_it_and_dies_with_its_process(repo):
    """PR_SET_PDEATHSIG fires when the forking thread exits: the server must survive that thread,
    die with a SIGKILLed parent process, and what the parent left behind goes at the next start."""
    code = (
        "import sys, threading, time\n"
        "from filterserve.serve import TritonServer\n"
        "holder = []\n"
        "starter = threading.Thread(target=lambda: holder.append(TritonServer(sys.argv[1]).start()))\n"
        "starter.start(); starter.join()\n"
        "print(holder[0].pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code, str(repo)], stdout=subprocess.PIPE, text=True)
    server_pid = int(parent.stdout.readline())
    try:
        server = psutil.Process(server_pid)
        options = dict(a.split("=", 1) for a in server.cmdline()[1:] if "=" in a)
        workdir = Path(options["--backend-directory"]).parent
        prefix = options["--backend-config"].split("shm-region-prefix-name=")[1]
        time.sleep(1.0)  # the starting thread is long gone
        assert server.is_running() and server.status() != psutil.STATUS_ZOMBIE
        parent.kill()
        parent.wait()
        server.wait(40)  # SIGTERM from the kernel: it drains and exits
        assert workdir.exists()  # nobody was left to remove it ...
        with TritonServer(repo):
            assert not workdir.exists()  # ... until the next start
            assert not list(Path("/dev/shm").glob(prefix + "*"))
    finally:
        if psutil.pid_exists(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
