"""``filterserve serve``'s flags: the defaults it shows, and what it refuses before tritonserver starts.

None of these starts a tritonserver: a refusal here must come first, in one line.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from toy_onnx import build_toy_export

from filterserve import defaults
from filterserve.cli import main

CLI = "import sys\nfrom filterserve.cli import main\nsys.exit(main(['serve', *sys.argv[1:]]))\n"
PORT_FLAGS = ("--http-port", "--grpc-port", "--metrics-port", "--supervisor-port")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_toy_export(tmp_path_factory.mktemp("serve-cli")).repo


def _option_help(text: str, flag: str) -> str:
    """The help of one option, its wrapped lines joined."""
    block = re.search(rf"^  {flag}\b.*?(?=^  -|\Z)", text, re.M | re.S)
    assert block, f"{flag} is not in --help"
    return " ".join(block.group(0).split())


def test_serve_help_shows_every_default_from_the_defaults_module(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    shown = {
        "--host": defaults.SERVE_HOST,
        "--http-port": defaults.SERVE_HTTP_PORT,
        "--grpc-port": defaults.SERVE_GRPC_PORT,
        "--metrics-port": defaults.SERVE_METRICS_PORT,
        "--supervisor-port": defaults.SERVE_SUPERVISOR_PORT,
        "--check-interval": defaults.SERVE_CHECK_INTERVAL_S,
        "--probe-timeout": defaults.SERVE_PROBE_TIMEOUT_S,
        "--grace-period": defaults.SERVE_GRACE_PERIOD_S,
        "--max-restarts": defaults.SERVE_MAX_RESTARTS,
        "--startup-timeout": defaults.SERVE_STARTUP_TIMEOUT_S,
    }
    for flag, value in shown.items():
        assert f"(default: {value})" in _option_help(text, flag), _option_help(text, flag)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags, says", [
    (["--http-port", "9123", "--grpc-port", "9123"], "--grpc-port 9123 is also the --http-port"),
    (["--supervisor-port", "70000"], "--supervisor-port 70000 is not a port number"),
    (["--check-interval", "0"], "--check-interval must be more than 0 seconds"),
    (["--probe-timeout", "-1"], "--probe-timeout must be more than 0 seconds"),
    (["--max-restarts", "-1"], "--max-restarts must be 0 or more"),
])
def test_impossible_settings_are_one_line_before_anything_starts(repo, capsys, flags, says):
    assert main(["serve", "--model-repository", str(repo), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {says}") and err.count("\n") == 1, err


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("taken", PORT_FLAGS)
def test_a_port_in_use_is_refused_in_one_line_before_tritonserver_starts(repo, tmp_path, taken):
    """Stumble 8: a clash on the supervisor port was reported only once tritonserver had started
    (6 s later, its log written). Every port serve will bind is checked first."""
    log = tmp_path / "tritonserver.log"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        given = {flag: port if flag == taken else _unused_port() if flag == "--http-port" else 0 for flag in PORT_FLAGS}
        flags = [arg for flag, number in given.items() for arg in (flag, str(number))]
        run = subprocess.run([sys.executable, "-c", CLI, "--model-repository", str(repo), *flags, "--log-file", str(log)],
                             capture_output=True, text=True, timeout=100)
    assert run.returncode == 2, run.stderr
    assert run.stdout == "" and run.stderr == f"error: {taken} {port} is already in use on 127.0.0.1: stop what listens there, " \
                                              "or pick another port (0: a free one)\n", run.stdout + run.stderr
    assert not log.exists(), "tritonserver was started"
    assert not _listening(given["--http-port"])
    started = [p for p in psutil.process_iter(["cmdline"]) if f"--model-repository={repo}" in (p.info["cmdline"] or [])]
    assert started == []
