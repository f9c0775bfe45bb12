"""``filterserve bench``'s command line: one typed options value per command, defaults in --help, bad values in one line.

Fast: nothing here trains, exports or starts a server (the benchmarks themselves run in test_benchmarks.py
and test_shared_bench.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from filterserve import defaults
from filterserve.benchmarks import options as bench
from filterserve.benchmarks.cli import COMMANDS, bench_options
from filterserve.cli import build_parser, main
from filterserve.contract import GATE_TOLERANCE
from filterserve.errors import EXIT_USER_ERROR
from filterserve.filters import UPLIFTING_V4

REPO = ["--model-repository", "repo"]
# The fewest arguments each command takes, and the options value it must parse into.
MINIMAL = {
    "fixture": (["--out", "fixture"], bench.FixtureOptions),
    "accuracy": (["--data", "val.jsonl", *REPO], bench.AccuracyOptions),
    "memory": (REPO, bench.MemoryOptions),
    "family": (["--out", "family"], bench.FamilyOptions),
    "shared-base": (["--family", "family"], bench.SharedBaseOptions),
    "latency": (REPO, bench.LatencyOptions),
    "throughput": (REPO, bench.ThroughputOptions),
    "determinism": (REPO, bench.DeterminismOptions),
}


def _parse(*argv: str):
    return build_parser().parse_args(["bench", *argv])


def test_every_bench_command_is_listed() -> None:
    assert set(MINIMAL) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_each_command_parses_into_one_frozen_options_value_with_the_defaults(command: str, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("val.jsonl").write_text("", encoding="utf-8")
    argv, kind = MINIMAL[command]
    options = COMMANDS[command][0](_parse(command, *argv))
    assert type(options) is kind and dataclasses.is_dataclass(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.out = Path("elsewhere")  # type: ignore[misc]
    fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    if "requests" in fields:
        assert fields["requests"] == {"latency": defaults.LATENCY_REQUESTS, "throughput": defaults.THROUGHPUT_REQUESTS,
                                      "shared-base": defaults.SHARED_BASE_REQUESTS}[command]
    if "repository" in fields and command != "memory":
        assert fields["repository"] == bench.RepositoryChoice(Path("repo"))
    if "server" in fields:
        assert fields["server"] == bench.ServerChoice(None, defaults.BENCH_PROTOCOL)
    if command != "fixture" and command != "family":
        assert fields["out"] == Path(defaults.BENCH_OUT)


def test_list_options_parse_into_the_defaults_typed_values() -> None:
    throughput = COMMANDS["throughput"][0](_parse("throughput", *REPO))
    assert (throughput.concurrency, throughput.mixes) == (defaults.THROUGHPUT_CONCURRENCY, defaults.MIXES)
    given = COMMANDS["throughput"][0](_parse("throughput", *REPO, "--concurrency", "16,1,16", "--mix", "realistic"))
    assert (given.concurrency, given.mixes) == ((16, 1), ("realistic",))
    shared = COMMANDS["shared-base"][0](_parse("shared-base", "--family", "f"))
    assert (shared.counts, shared.concurrency) == (defaults.SHARED_BASE_COUNTS, defaults.CONCURRENCY)
    accuracy = COMMANDS["accuracy"][0](_parse("accuracy", "--data", "d", *REPO))
    assert accuracy.tolerance == GATE_TOLERANCE
    fixture = COMMANDS["fixture"][0](_parse("fixture", "--out", "o"))
    assert (fixture.spec, fixture.steps, fixture.seed) == (UPLIFTING_V4, defaults.FIXTURE_STEPS, defaults.FIXTURE_SEED)


@pytest.mark.parametrize("command", sorted(MINIMAL))
def test_help_of_every_bench_command_shows_its_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    expected = {
        "fixture": f"(default: {defaults.FIXTURE_STEPS})",
        "accuracy": f"(default: {GATE_TOLERANCE})",
        "memory": f"(default: {defaults.MEMORY_BATCH})",
        "family": f"(default: {defaults.FAMILY_COUNT})",
        "shared-base": f"(default: {','.join(map(str, defaults.SHARED_BASE_COUNTS))})",
        "latency": f"(default: {defaults.LATENCY_REQUESTS})",
        "throughput": f"(default: {','.join(defaults.MIXES)})",
        "determinism": f"(default: {defaults.DETERMINISM_ARTICLES})",
    }[command]
    assert expected in text, text


@pytest.mark.parametrize(("argv", "message"), [
    (["throughput", *REPO, "--requests", "0"], "--requests must be a positive integer, got 0"),
    (["throughput", *REPO, "--concurrency", "0,4"], "--concurrency takes positive integers, got 0,4"),
    (["throughput", *REPO, "--mix", "uniform,news"], "--mix takes uniform and/or realistic, got uniform,news"),
    (["latency", *REPO, "--requests", "-1"], "--requests must be a positive integer, got -1"),
    (["memory", *REPO, "--tokens", "0"], "--tokens must be a positive integer, got 0"),
    (["shared-base", "--family", "f", "--counts", "0"], "--counts takes positive integers, got 0"),
    (["fixture", "--out", "o", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["accuracy", "--data", "missing.jsonl", *REPO], "labelled data not found: missing.jsonl"),
    (["determinism", *REPO, "--articles", "0"], "--articles must be a positive integer, got 0"),
])
def test_a_bad_value_fails_in_one_line_before_any_work(argv: list[str], message: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # "repo" does not exist: the options are checked before the repository is opened or any report folder made.
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *argv]) == EXIT_USER_ERROR
    assert capsys.readouterr().err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_checked_options_come_back_whole() -> None:
    options = bench_options(_parse("latency", *REPO, "--requests", "3", "--url", "127.0.0.1:8001"))
    assert options == bench.LatencyOptions(bench.RepositoryChoice(Path("repo")), bench.ServerChoice("127.0.0.1:8001"), 3)
