"""The client as a newcomer meets it (issue 25): one discovery per client, bugs that keep their
traceback, addresses and names said the way people type them, a resume hint that runs as printed,
and no file left behind that says nothing."""

from __future__ import annotations

import json
import re
import secrets
import shlex
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import settled

from filterserve import defaults
from filterserve.cli import build_parser
from filterserve.client import ClientError, FilterResult, MultiFilterClient, ScoreError
from filterserve.client.cli import ScoreOptions
from filterserve.client.concurrency import Scorer
from filterserve.client.endpoint import parse_address
from filterserve.client.items import Item
from filterserve.data import sample_articles
from filterserve.filters import UPLIFTING_V4
from filterserve.serve import TritonServer


def _score(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "filterserve.cli", "score", *args], input=stdin, capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def _articles(path: Path, bad: bool = False) -> Path:
    lines = [json.dumps(a) for a in sample_articles()[:3]]
    if bad:
        lines.insert(1, "{not json")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- discovery once: counted in the server's own log --------------------------------------------

GRPC_REQUEST = re.compile(r'"Process for (\w+), rpc_ok=1, \d+ step START"')
HTTP_REQUEST = re.compile(r'"HTTP request: \d+ (\S+)"')


def _requests_seen(server: TritonServer, act: Callable[[], object]) -> Counter[str]:
    """The requests tritonserver logged while ``act`` ran, by gRPC method or HTTP path: what the
    server really received, read from its verbose log (switched on for the occasion)."""
    admin = grpcclient.InferenceServerClient(server.grpc_url)
    headers = server.admin_key.grpc_headers
    assert server.log_path is not None
    admin.update_log_settings({"log_verbose_level": 1}, headers=headers)
    try:
        start = server.log_path.stat().st_size
        act()
        # A request nobody else sends, after the last one counted: once it is in the log, so is every earlier line.
        marker = f"/v2/models/end-of-count-{secrets.token_hex(4)}/ready"
        httpclient.InferenceServerClient(server.http_url).is_model_ready(marker.split("/")[3])
        text = settled(lambda: server.log_path.read_bytes()[start:].decode("utf-8", errors="replace"),  # type: ignore[union-attr]
                       lambda logged: marker in logged)
    finally:
        admin.update_log_settings({"log_verbose_level": 0}, headers=headers)
    text = text[: text.index(marker)]
    return Counter(GRPC_REQUEST.findall(text)) + Counter(path for path in HTTP_REQUEST.findall(text) if path != marker)


def _connect_and_close(url: str, protocol: str, filters: list[str] | None = None) -> Callable[[], object]:
    def act() -> None:
        with MultiFilterClient(url, protocol, filters) as client:  # type: ignore[arg-type]
            assert client.names == [UPLIFTING_V4.name]
    return act


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_multi_filter_client_discovers_once_on_one_connection_grpc(server):
    seen = _requests_seen(server, _connect_and_close(server.grpc_url, "grpc"))
    # One liveness check (one connection), one model list, and each loaded model's config read once.
    assert seen == Counter({"ServerLive": 1, "ModelStatistics": 1, "ModelConfig": len(server.configs)}), seen


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_multi_filter_client_discovers_once_on_one_connection_http(server):
    seen = _requests_seen(server, _connect_and_close(server.http_url, "http"))
    assert seen == Counter({"/v2/health/live": 1, "/v2/models/stats": 1,
                            **{f"/v2/models/{name}/config": 1 for name in server.configs}}), seen


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_named_filters_skip_discovery_and_read_their_config_once(server):
    seen = _requests_seen(server, _connect_and_close(server.grpc_url, "grpc", [UPLIFTING_V4.name]))
    assert seen == Counter({"ServerLive": 1, "ModelReady": 1, "ModelConfig": 1}), seen


# --- no blanket catch -------------------------------------------------------------------------


class _Buggy(Scorer):
    """A scorer with a bug on one item and a refused request on another."""

    def score_item(self, item: Item) -> FilterResult:
        if item == "refused":
            raise ClientError("bad input: refused by the server")
        raise TypeError("a bug in the client")


@pytest.mark.timeout(60)
def test_a_refused_item_is_a_score_error_but_a_bug_keeps_its_traceback():
    (refused,) = _Buggy().score_many(["refused"])
    assert isinstance(refused, ScoreError) and refused.message == "bad input: refused by the server"
    with pytest.raises(TypeError, match="a bug in the client"):
        _Buggy().score_many(["refused", "anything else"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_result_that_cannot_be_built_surfaces_from_score_as_the_exception(server, tmp_path, monkeypatch):
    """A bug on the way from the server's answer to the output line is raised, not written as a failed line."""
    from filterserve.cli import main

    def broken(*args: object, **kwargs: object) -> FilterResult:
        raise TypeError("cannot build the result")

    monkeypatch.setattr(FilterResult, "from_outputs", broken)
    source = _articles(tmp_path / "in.jsonl")
    with pytest.raises(TypeError, match="cannot build the result"):
        main(["score", str(source), "--url", server.grpc_url, "--output", str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl.errors.jsonl").exists()


def test_a_lone_surrogate_is_bad_input_not_a_crash():
    """JSON can escape a lone surrogate; such a str has no UTF-8 bytes: the line fails as bad input."""
    from filterserve.client.items import article_inputs

    with pytest.raises(ClientError, match="bad input: title is not valid Unicode text"):
        article_inputs(json.loads('{"title": "A \\ud800 title", "content": "Text."}'))


# --- addresses, names, folders ------------------------------------------------------------------


def test_addresses_are_read_as_people_write_them():
    assert parse_address("localhost") == parse_address("localhost", "grpc")
    assert parse_address("localhost").host_port == f"localhost:{defaults.PORTS['grpc']}"
    assert parse_address("localhost", "http").host_port == f"localhost:{defaults.PORTS['http']}"
    http = parse_address("http://127.0.0.1:8000")
    assert (http.host_port, http.protocol, http.secure) == ("127.0.0.1:8000", "http", False)
    assert parse_address("grpcs://example.org").host_port == "example.org:8001" and parse_address("grpcs://example.org").secure
    assert parse_address("[::1]").host_port == "[::1]:8001"
    with pytest.raises(ClientError, match="is a http address, but the protocol asked for is grpc"):
        parse_address("http://127.0.0.1:8000", "grpc")
    with pytest.raises(ClientError, match="unknown scheme ftp://"):
        parse_address("ftp://host:1")
    with pytest.raises(ClientError, match="the port is not a number"):
        parse_address("host:port")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_url_without_port_is_tried_on_the_protocols_port(tmp_path, monkeypatch, capsys, protocol):
    """Not on [::1]:443, tritonclient's own default. The default port is moved to one where nothing
    listens: this machine may well be serving on 8001."""
    from filterserve.cli import main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound but not listening: nothing answers here
        port = sock.getsockname()[1]
        monkeypatch.setitem(defaults.PORTS, protocol, port)
        source = _articles(tmp_path / "in.jsonl")
        code = main(["score", str(source), "--url", "127.0.0.1", "--protocol", protocol, "--retries", "0", "--timeout", "2"])
    assert code == 2
    assert f"server at 127.0.0.1:{port} is not reachable ({protocol})" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_scheme_that_contradicts_protocol_is_one_clear_error(tmp_path):
    source = _articles(tmp_path / "in.jsonl")
    done = _score(str(source), "--url", "http://127.0.0.1:8000", "--protocol", "grpc")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: server URL http://127.0.0.1:8000 is a http address, but the protocol asked for "
                                   "is grpc: drop one of them")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_http_url_is_spoken_in_http(server, tmp_path):
    source = _articles(tmp_path / "in.jsonl")
    done = _score(str(source), "--url", f"http://{server.http_url}")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_mistyped_filter_names_what_is_served(server, tmp_path):
    source = _articles(tmp_path / "in.jsonl")
    done = _score(str(source), "--url", server.grpc_url, "--filter", "upliftin_v4")
    assert done.returncode == 2
    assert f"the filters it serves: {UPLIFTING_V4.name}; did you mean {UPLIFTING_V4.name}?" in done.stderr, done.stderr


@pytest.mark.timeout(60)
def test_a_folder_as_input_is_called_a_folder(tmp_path):
    done = _score(str(tmp_path), "--url", "127.0.0.1:1")
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: the input {tmp_path} is a folder: give a JSONL file (or - for stdin)"


# --- files left behind --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_an_unreachable_server_leaves_no_file_and_resume_keeps_the_output(tmp_path):
    source = _articles(tmp_path / "in.jsonl")
    out = tmp_path / "out.jsonl"
    done = _score(str(source), "--url", "127.0.0.1:1", "--retries", "0", "--output", str(out))
    assert done.returncode == 2 and "not reachable" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
    to_stdout = _score(str(source), "--url", "127.0.0.1:1", "--retries", "0")
    assert to_stdout.returncode == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]

    out.write_text('{"a partial output": 1}\n{"torn', encoding="utf-8")
    before = out.read_bytes()
    resumed = _score(str(source), "--url", "127.0.0.1:1", "--retries", "0", "--output", str(out), "--resume")
    assert resumed.returncode == 2 and out.read_bytes() == before


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("to_file", [True, False], ids=["output", "stdout"])
def test_a_clean_run_leaves_no_errors_file(server, tmp_path, to_file):
    source = _articles(tmp_path / "in.jsonl")
    output = ["--output", str(tmp_path / "out.jsonl")] if to_file else []
    done = _score(str(source), "--url", server.grpc_url, *output)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in.jsonl", "out.jsonl"] if to_file else ["in.jsonl"])
    assert done.stderr.strip().splitlines()[-1] == "scored 3 lines; 0 failed"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_resume_counts_the_failed_lines_its_errors_file_keeps(server, tmp_path):
    """The choice documented in docs/scoring.md: a resumed run keeps the earlier run's failed lines
    (they are not retried) and its report and exit code count them."""
    source = _articles(tmp_path / "in.jsonl", bad=True)
    out, errors = tmp_path / "out.jsonl", tmp_path / "out.jsonl.errors.jsonl"
    first = _score(str(source), "--url", server.grpc_url, "--output", str(out))
    assert first.returncode == 1 and "1 failed" in first.stderr
    again = _score(str(source), "--url", server.grpc_url, "--output", str(out), "--resume")
    assert again.returncode == 1, again.stderr
    assert [json.loads(line)["line"] for line in errors.read_text().splitlines()] == [2]
    assert again.stderr.strip().splitlines()[-1] == (
        f"scored 0 lines (3 in {out} with the earlier run's); 1 failed, listed in {errors} (1 of them by the earlier run)"
    )


# --- one CLI shape, its defaults and its resume hint ---------------------------------------------


def _options(*argv: str) -> ScoreOptions:
    return ScoreOptions.from_args(build_parser().parse_args(["score", *argv]))


def test_score_help_shows_the_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["score"].format_help()  # type: ignore[union-attr]
    text = " ".join(text.split())
    for shown in (f"(default: {defaults.CONCURRENCY})", f"(default: {defaults.TIMEOUT_S})", f"(default: {defaults.RETRIES})",
                  f"(default: {defaults.SCHEMA})", f"default: the URL's scheme, else {defaults.PROTOCOL}"):
        assert shown in text, shown


def test_the_resume_hint_carries_every_option_that_matters_quoted(tmp_path):
    source = _articles(tmp_path / "in put.jsonl")
    options = _options(str(source), "--url", "http://host:8000", "--protocol", "http", "--output", str(tmp_path / "o u t.jsonl"),
                       "--errors", str(tmp_path / "e.jsonl"), "--concurrency", "4", "--timeout", "60", "--schema", "production")
    hint = options.resume_hint(["uplifting_v4"])
    assert hint.startswith("continue with: ")
    again = _options(*shlex.split(hint.removeprefix("continue with: "))[2:])
    assert again == ScoreOptions(source, "http://host:8000", "http", ("uplifting_v4",), tmp_path / "o u t.jsonl",
                                 tmp_path / "e.jsonl", True, 4, 60.0, defaults.RETRIES, "production")
