"""Bad input ends a command with one line that names the file and the problem, never a traceback.

Each case runs the real ``filterserve`` command in a subprocess and reads its exit code and
stderr, as a user would see them. Exit codes are README's: 2 a user error, 3 (``score``) an output
or errors file that cannot be written. Tests run as root, who may write anywhere, so an unwritable
place is a path through a regular file (``a-file/x``): no permission bit lets even root make a
folder under a file.

Last, the other side of the net: an unexpected exception still shows its traceback.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from filterserve.errors import FilterServeError
from filterserve.manifest import REPOSITORY_MANIFEST, read_filter_records
from filterserve.serve.memory import estimate

TENSOR_CONFIG = ('name: "f_onnx"\nbackend: "onnxruntime"\nmax_batch_size: 8\n'
                 'parameters { key: "precision" value { string_value: "fp32" } }\n')


def filterserve(*args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """The command as a user runs it: its own process, its exit code, its stderr."""
    return subprocess.run([sys.executable, "-m", "filterserve.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def in_process(capsys: pytest.CaptureFixture[str]):
    """The same through ``main(argv)``, for commands whose imports (torch) this process already paid
    for; an exception escaping main fails the test, so a traceback cannot pass either."""
    from filterserve.cli import main

    def run(*args: str | Path) -> subprocess.CompletedProcess:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)

    return run


def error_line(result: subprocess.CompletedProcess, code: int, *names: str | Path, alone: bool = True) -> str:
    """The run's error line, after checking the exit code, that it names ``names``, and that it is
    all of stderr (``alone``), or else the last line, after the command's progress and notices."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert (len(lines) == 1) if alone else not [line for line in lines[:-1] if line.startswith("error")], result.stderr
    for name in names:
        assert str(name) in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A regular file where a caller puts a folder."""
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


def tiny_repository(root: Path, config: str | bytes = TENSOR_CONFIG) -> Path:
    """A repository of one model folder (nothing Triton could run: every case fails before the launch)."""
    repo = root / "repo"
    (repo / "f_onnx" / "1").mkdir(parents=True)
    data = config.encode() if isinstance(config, str) else config
    (repo / "f_onnx" / "config.pbtxt").write_bytes(data)
    return repo


# --- export: the adapter and --out ----------------------------------------------------------


@pytest.mark.parametrize(
    "text, problem",
    [("{\"peft_type\": \"LORA\",", "is not valid JSON"), ("[\"LORA\"]", "must be a JSON object, not list")],
    ids=["truncated", "a list"],
)
def test_a_malformed_adapter_config_is_named(standin, in_process, tmp_path: Path, text: str, problem: str) -> None:
    adapter = tmp_path / "adapter"
    shutil.copytree(standin.adapter_dir, adapter)
    (adapter / "adapter_config.json").write_text(text)
    result = in_process("export", "--base", standin.base_dir, "--adapter", adapter, "--out", tmp_path / "repo")
    line = error_line(result, 2, adapter / "adapter_config.json", alone=False)  # after the export's progress
    assert problem in line
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("below", ["", "sub"], ids=["parent is a file", "a file above the parent"])
def test_an_out_whose_parent_cannot_be_made_is_refused_before_loading(standin, in_process, a_file: Path, below: str) -> None:
    out = a_file / below / "repo" if below else a_file / "repo"
    result = in_process("export", "--base", standin.base_dir, "--adapter", standin.adapter_dir, "--out", out)
    line = error_line(result, 2, out, alone=False)
    assert ("exists and is not a folder" if not below else "Not a directory") in line
    assert not [line for line in result.stderr.splitlines() if "] load " in line], "it fails before loading the model"


# --- serve: the repository's files ----------------------------------------------------------


@pytest.mark.parametrize(
    "config, problem",
    [
        ('name: "f_onnx"\nmax_batch_size: "eight"\n', "is not valid: 2:"),
        ('name: "f_onnx"\nnme: 1\n', 'has no field named "nme"'),
        (b"name: \"f_onnx\"\n\xff\xfe\n", "is not UTF-8 text"),
    ],
    ids=["bad value", "unknown field", "not UTF-8"],
)
def test_serve_names_a_malformed_config_pbtxt(tmp_path: Path, config: str | bytes, problem: str) -> None:
    repo = tiny_repository(tmp_path, config)
    result = filterserve("serve", "--model-repository", repo, "--http-port", "0", "--grpc-port", "0",
                         "--metrics-port", "0", "--supervisor-port", "0")
    line = error_line(result, 2, repo / "f_onnx" / "config.pbtxt")
    assert problem in line


def test_the_memory_check_names_a_malformed_config_pbtxt(tmp_path: Path) -> None:
    repo = tiny_repository(tmp_path, 'name: "f_onnx"\nmax_batch_size: -\n')
    with pytest.raises(FilterServeError, match="Triton model config " + re.escape(str(repo / "f_onnx" / "config.pbtxt")) + " is not valid"):
        estimate(repo, available=1 << 40)


@pytest.mark.parametrize(
    "index, record, named, problem",
    [
        ({"filters": {"f": "f.filter.json"}}, [1, 2], "f.filter.json", "filter record .* must be a JSON object, not list"),
        ({"filters": {"f": "f.filter.json"}}, "{\"filter\": ", "f.filter.json", "filter record .* is not valid JSON"),
        ({"filters": {"f": "f.filter.json"}}, {"models": ["f_onnx"]}, "f.filter.json", "has no \"filter\" object"),
        (["f.filter.json"], {}, REPOSITORY_MANIFEST, "repository manifest .* must be a JSON object, not list"),
    ],
    ids=["record is a list", "record is cut short", "record without its filter", "index is a list"],
)
def test_serve_names_a_record_that_is_not_a_json_object(tmp_path: Path, index, record, named: str, problem: str) -> None:
    repo = tiny_repository(tmp_path)
    (repo / REPOSITORY_MANIFEST).write_text(json.dumps(index))
    (repo / "f.filter.json").write_text(record if isinstance(record, str) else json.dumps(record))
    result = filterserve("serve", "--model-repository", repo, "--http-port", "0", "--grpc-port", "0",
                         "--metrics-port", "0", "--supervisor-port", "0")
    assert re.search(problem, error_line(result, 2, repo / named))


def test_the_single_filter_layout_is_not_read(tmp_path: Path) -> None:
    """A root filter.json (the layout before several filters; never released) is no repository."""
    repo = tiny_repository(tmp_path)
    (repo / "filter.json").write_text(json.dumps([{"filter": {"name": "f"}}]))
    missing = f"{re.escape(str(repo))} is not a filterserve model repository: {REPOSITORY_MANIFEST} is missing"
    with pytest.raises(FilterServeError, match=missing):
        read_filter_records(repo)


# --- output paths -------------------------------------------------------------------------


@pytest.fixture
def articles(tmp_path: Path) -> Path:
    path = tmp_path / "articles.jsonl"
    path.write_text(json.dumps({"title": "Volunteers rebuild the library", "content": "Shelves are full again."}) + "\n")
    return path


@pytest.mark.parametrize("option, what", [("--output", "output"), ("--errors", "errors file")])
@pytest.mark.parametrize("where", ["missing", "through a file"])
def test_score_refuses_an_output_it_cannot_create_before_sending_anything(
    articles: Path, a_file: Path, tmp_path: Path, option: str, what: str, where: str
) -> None:
    target = (tmp_path / "missing" / "dir" if where == "missing" else a_file) / "out.jsonl"
    # Port 9 (discard) on loopback: nothing answers, and nothing needs to, since the files are checked first.
    result = filterserve("score", articles, "--url", "127.0.0.1:9", option, target)
    line = error_line(result, 3, target)
    assert f"cannot write the {what}" in line


def test_serve_refuses_a_log_file_in_a_missing_folder(tmp_path: Path) -> None:
    repo = tiny_repository(tmp_path)
    log = tmp_path / "missing" / "tritonserver.log"
    result = filterserve("serve", "--model-repository", repo, "--log-file", log, "--http-port", "0", "--grpc-port", "0",
                         "--metrics-port", "0", "--supervisor-port", "0")
    assert "cannot write the log file" in error_line(result, 2, log)


@pytest.mark.parametrize(
    "command",
    [
        ["bench", "memory", "--model-repository", "{repo}", "--out", "{out}"],
        ["bench", "fixture", "--out", "{out}", "--steps", "1"],
    ],
    ids=["bench memory", "bench fixture"],
)
def test_an_output_folder_under_a_file_is_named(tmp_path: Path, a_file: Path, command: list[str]) -> None:
    """Output folders are made with their parents; one that cannot be made fails before the work."""
    repo = tiny_repository(tmp_path)
    out = a_file / "report"
    result = filterserve(*[part.format(repo=repo, out=out) for part in command])
    assert "Not a directory" in error_line(result, 2, out)


def test_the_net_catches_an_output_folder_no_check_foresaw(in_process, a_file: Path) -> None:
    """``standin`` has no check of its own: the top-level net turns the OSError into the line."""
    out = a_file / "standin"
    result = in_process("standin", "--out", out)
    assert "Not a directory" in error_line(result, 2, out, alone=False)  # standin first says what it builds


# --- what the net lets through --------------------------------------------------------------


def test_a_genuine_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, articles: Path) -> None:
    import filterserve.client.cli
    from filterserve.cli import main

    def broken(args: object) -> int:
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(filterserve.client.cli, "score_command", broken)
    with pytest.raises(RuntimeError, match="a bug, not bad input"):
        main(["score", str(articles), "--url", "127.0.0.1:9"])


def test_an_os_error_about_no_file_is_not_swallowed(monkeypatch: pytest.MonkeyPatch, articles: Path) -> None:
    """The net takes OSErrors that name a file; a socket's (or a bug's) keeps its traceback."""
    import filterserve.client.cli
    from filterserve.cli import main

    def reset(args: object) -> int:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(filterserve.client.cli, "score_command", reset)
    with pytest.raises(ConnectionResetError):
        main(["score", str(articles), "--url", "127.0.0.1:9"])


def test_the_net_names_the_file_of_an_os_error(monkeypatch: pytest.MonkeyPatch, articles: Path, capsys) -> None:
    import filterserve.client.cli
    from filterserve.cli import main

    def unreadable(args: object) -> int:
        raise PermissionError(13, "Permission denied", "/srv/articles.jsonl")

    monkeypatch.setattr(filterserve.client.cli, "score_command", unreadable)
    assert main(["score", str(articles), "--url", "127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == "error: /srv/articles.jsonl: Permission denied\n"
