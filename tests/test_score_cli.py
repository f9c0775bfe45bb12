"""``filterserve score`` in a subprocess against the real tritonserver."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXED_ARTICLES
from helpers import PRODUCTION_KEYS

from filterserve.contract import SERVED_TOLERANCE
from filterserve.data import sample_articles
from filterserve.filters import UPLIFTING_V4
from filterserve.serve import TritonServer

RESULT_KEYS = ["scores", "weighted_score", "final_scores", "weighted_average", "raw_weighted_average", "tier",
               "tier_description", "gatekeeper_applied", "n_tokens", "truncated", "content_length",
               "short_content_cap_applied", "normalization_method", "stage_used", "stage1_estimate", "version"]


def _score(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "filterserve.cli", "score", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_file_round_trip_reports_bad_lines_and_keeps_the_rest(server, tmp_path):
    articles = [{**a, "source": f"feed-{i}"} for i, a in enumerate(sample_articles())]
    lines = [json.dumps(a) for a in articles]
    lines.insert(2, "{not json")  # line 3
    lines.insert(4, json.dumps({"id": "empty", "title": "A title", "content": ""}))  # line 5
    source = tmp_path / "articles.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")

    done = _score(str(source), "--url", server.grpc_url, "--concurrency", "4")

    assert done.returncode == 1, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["id"] for o in out] == [a["id"] for a in articles]
    for got, article in zip(out, articles):
        assert {k: v for k, v in got.items() if k != UPLIFTING_V4.name} == article  # the record unchanged
        result = got[UPLIFTING_V4.name]
        assert list(result) == RESULT_KEYS
        assert list(result["scores"]) == list(result["final_scores"]) == list(UPLIFTING_V4.dimensions)
    assert "line 3: bad JSON" in done.stderr and "line 5: bad input: content is empty" in done.stderr
    assert "2 failed" in done.stderr
    errors = _jsonl(tmp_path / "articles.jsonl.errors.jsonl")
    assert [(e["line"], e["input"]) for e in errors] == [(3, lines[2]), (5, lines[4])]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_production_schema_writes_exactly_the_production_scorers_fields(server, tmp_path):
    source = tmp_path / "two.jsonl"
    source.write_text("".join(json.dumps({"id": i, "title": t, "content": c}, ensure_ascii=False) + "\n"
                              for i, (t, c) in enumerate(MIXED_ARTICLES[:2])), encoding="utf-8")
    ours = [json.loads(line)[UPLIFTING_V4.name] for line in _score(str(source), "--url", server.grpc_url).stdout.splitlines()]
    done = _score(str(source), "--url", server.grpc_url, "--schema", "production")
    assert done.returncode == 0, done.stderr
    for line, mine in zip(done.stdout.splitlines(), ours, strict=True):
        produced = json.loads(line)[UPLIFTING_V4.name]
        assert list(produced) == list(PRODUCTION_KEYS)
        assert produced["scores"] == mine["final_scores"]  # production's scores are calibrated and clamped
        shared = [k for k in PRODUCTION_KEYS if k in mine and k != "scores"]
        assert {k: produced[k] for k in shared} == {k: mine[k] for k in shared}
        assert (produced["passed_prefilter"], produced["prefilter_reason"]) == (True, None)
        assert produced["tier"] in {t.name for t in UPLIFTING_V4.tiers}


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_scores_are_the_reference_on_the_trained_input(server, tmp_path, reference, protocol):
    """Multilingual snippets and articles far past 512 tokens: what PEFT scores on "{title}\n\n{content}"."""
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps({"title": t, "content": c}, ensure_ascii=False) + "\n" for t, c in MIXED_ARTICLES),
                      encoding="utf-8")
    url = server.grpc_url if protocol == "grpc" else server.http_url
    done = _score(str(source), "--url", url, "--protocol", protocol, "--concurrency", "4")
    assert done.returncode == 0, done.stderr
    got = np.array([list(json.loads(line)[UPLIFTING_V4.name]["scores"].values()) for line in done.stdout.splitlines()])
    expected = reference([UPLIFTING_V4.input_text(t, c) for t, c in MIXED_ARTICLES])
    assert np.abs(got - expected).max() <= SERVED_TOLERANCE


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_labelled_records_keep_their_labels(server, tmp_path):
    """Scoring the project's own validation format must not overwrite the labels named like dimensions."""
    labelled = {"title": "Volunteers rebuild the library", "content": "Residents reshelved the books.",
                **{dim: 7.5 for dim in UPLIFTING_V4.dimensions}, "weighted_score": "label"}
    source = tmp_path / "val.jsonl"
    source.write_text(json.dumps(labelled) + "\n", encoding="utf-8")
    done = _score(str(source), "--url", server.grpc_url)
    assert done.returncode == 0, done.stderr
    (got,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert {k: got[k] for k in labelled} == labelled
    assert set(got[UPLIFTING_V4.name]["scores"]) == set(UPLIFTING_V4.dimensions)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_stdin_over_http(server, tmp_path):
    articles = sample_articles()[:3]
    stdin = "".join(json.dumps(a) + "\n" for a in articles)

    done = _score("-", "--url", server.http_url, "--protocol", "http", cwd=tmp_path, stdin=stdin)

    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [a["id"] for a in articles]
    assert not list(tmp_path.iterdir()), "stdin to stdout: no hidden errors file in the working folder"


@pytest.mark.timeout(60)
def test_unreachable_server_is_a_usage_error(tmp_path):
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps(sample_articles()[0]) + "\n", encoding="utf-8")
    done = _score(str(source), "--url", "127.0.0.1:1", "--retries", "0", "--timeout", "2")
    assert done.returncode == 2
    assert "server at 127.0.0.1:1 is not reachable (grpc)" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_server_stopped_mid_run_loses_no_line(exported, tmp_path):
    total = 1000
    source = tmp_path / "many.jsonl"
    source.write_text(
        "".join(json.dumps({"n": i, "title": f"Story {i}", "content": "The school reopened. " * 5}) + "\n" for i in range(total)),
        encoding="utf-8",
    )
    out_path = tmp_path / "out.jsonl"
    with TritonServer(exported[0]) as dedicated, open(out_path, "w", encoding="utf-8") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "filterserve.cli", "score", str(source), "--url", dedicated.grpc_url,
             "--concurrency", "1", "--retries", "1"],
            stdout=out, stderr=subprocess.PIPE, text=True,
        )

        def stop_after_a_few_lines() -> None:
            while process.poll() is None and len(out_path.read_text(encoding="utf-8").splitlines()) < 10:
                time.sleep(0.01)
            dedicated.stop(grace_s=0)  # no grace period: the server vanishes like a crash

        watcher = threading.Thread(target=stop_after_a_few_lines)
        watcher.start()
        _, stderr = process.communicate(timeout=100)
        watcher.join()

    assert process.returncode == 1, stderr
    scored = [record["n"] for record in _jsonl(out_path)]
    failed = [error["line"] - 1 for error in _jsonl(tmp_path / "many.jsonl.errors.jsonl")]
    assert scored == list(range(len(scored))) and 10 <= len(scored) < total
    assert sorted(scored + failed) == list(range(total))  # each line exactly once: scored or listed
    assert f"{len(failed)} failed" in stderr and "is not reachable (grpc)" in stderr


# --- bulk scoring that survives anything (issue 10, item 5) -------------------------------

BAD_LINES = {5: "{not json", 40: '{"title": "No content", "content": ""}', 400: "[1, 2]"}


def _many(path: Path, total: int) -> list[int]:
    """``total`` input lines: articles numbered ``n``, bad lines at BAD_LINES, a blank line; returns the good ``n``s."""
    lines, good = [], []
    for number in range(1, total + 1):
        if number in BAD_LINES:
            lines.append(BAD_LINES[number])
        elif number == 77:
            lines.append("")
        else:
            lines.append(json.dumps({"n": number, "title": f"Story {number}", "content": "The school reopened. " * 4}))
            good.append(number)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return good


def _assert_each_line_once_in_order(out_path: Path, errors_path: Path, good: list[int]) -> None:
    scored = [record["n"] for record in _jsonl(out_path)]
    assert scored == good, "every good line scored exactly once, in input order"
    assert [e["line"] for e in _jsonl(errors_path)] == sorted(BAD_LINES), "every bad line listed exactly once"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_output_file_puts_the_errors_beside_it_and_a_clean_run_leaves_none(server, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(sample_articles()[0]) + "\n", encoding="utf-8")
    out = tmp_path / "scored" / "out.jsonl"
    out.parent.mkdir()
    errors = out.parent / "out.jsonl.errors.jsonl"
    errors.write_text('{"line": 9, "error": "from an earlier run"}\n')
    done = _score(str(source), "--url", server.grpc_url, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert len(_jsonl(out)) == 1 and done.stdout == ""
    # An earlier run's errors are not this run's, and an empty errors file says nothing (issue 25, stumble 4).
    assert not errors.exists(), "a clean run leaves no errors file"
    assert done.stderr.strip().splitlines()[-1] == "scored 1 lines; 0 failed"


@pytest.mark.timeout(120)
def test_unwritable_output_or_errors_fail_before_scoring_with_exit_3(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(sample_articles()[0]) + "\n", encoding="utf-8")
    nowhere = "127.0.0.1:1"  # never contacted: the files are checked first
    cases = {
        "output": ["--output", str(tmp_path)],  # a folder
        "missing folder": ["--output", str(tmp_path / "no" / "out.jsonl")],
        "errors": ["--output", str(tmp_path / "out.jsonl"), "--errors", str(tmp_path)],
    }
    for case, options in cases.items():
        done = _score(str(source), "--url", nowhere, "--retries", "0", *options)
        assert done.returncode == 3, (case, done.stderr)
        assert done.stderr.strip().splitlines()[-1].startswith("error: cannot write the "), (case, done.stderr)
        assert "not reachable" not in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_full_disk_stops_the_run_with_exit_3(server, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(sample_articles()[0]) + "\n", encoding="utf-8")
    done = _score(str(source), "--url", server.grpc_url, "--output", "/dev/full", "--errors", str(tmp_path / "e.jsonl"))
    assert done.returncode == 3, done.stderr
    assert "error: cannot write /dev/full: No space left on device" in done.stderr
    assert "Traceback" not in done.stderr


def _nan_decision(path: Path, n_dims: int) -> None:
    """A decision step that answers NaN: finite raw scores, non-finite final scores."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["logits"], ["scores"]),
            helper.make_node("Mul", ["logits", "nan"], ["final_scores"]),
            helper.make_node("ReduceSum", ["final_scores", "axes"], ["weighted_average"], keepdims=1),
            helper.make_node("Greater", ["weighted_average", "zero"], ["gatekeeper_applied"]),
            helper.make_node("Identity", ["weighted_average"], ["raw_weighted_average"]),
            helper.make_node("Cast", ["gatekeeper_applied"], ["tier"], to=TensorProto.INT32),
            helper.make_node("Identity", ["screened"], ["short_content_cap_applied"]),
            helper.make_node("Identity", ["CONTENT_LENGTH"], ["content_length"]),
        ],
        "nan_decision",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, n_dims]),
         helper.make_tensor_value_info("CONTENT_LENGTH", TensorProto.INT32, [None, 1]),
         helper.make_tensor_value_info("screened", TensorProto.BOOL, [None, 1])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, n_dims]),
            helper.make_tensor_value_info("final_scores", TensorProto.FLOAT, [None, n_dims]),
            helper.make_tensor_value_info("weighted_average", TensorProto.FLOAT, [None, 1]),
            helper.make_tensor_value_info("gatekeeper_applied", TensorProto.BOOL, [None, 1]),
            helper.make_tensor_value_info("raw_weighted_average", TensorProto.FLOAT, [None, 1]),
            helper.make_tensor_value_info("tier", TensorProto.INT32, [None, 1]),
            helper.make_tensor_value_info("short_content_cap_applied", TensorProto.BOOL, [None, 1]),
            helper.make_tensor_value_info("content_length", TensorProto.INT32, [None, 1]),
        ],
        [
            helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_non_finite_numbers_never_reach_the_output(exported, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    _nan_decision(repo / f"{UPLIFTING_V4.name}_decision" / "1" / "model.onnx", UPLIFTING_V4.num_labels)
    source = tmp_path / "in.jsonl"
    article = sample_articles()[0]
    source.write_text(json.dumps(article) + "\n" + json.dumps(article).replace("}", ', "x": NaN}') + "\n", encoding="utf-8")
    with TritonServer(repo) as nan_server:
        done = _score(str(source), "--url", nan_server.grpc_url, "--output", str(tmp_path / "out.jsonl"))
    assert done.returncode == 1, done.stderr
    assert (tmp_path / "out.jsonl").read_text() == ""
    errors = _jsonl(tmp_path / "out.jsonl.errors.jsonl")
    assert [e["line"] for e in errors] == [1, 2]
    assert errors[0]["error"].startswith("the server returned a non-finite final_scores.agency (nan)")
    assert errors[1]["error"] == "bad JSON: NaN is not valid JSON"


def _stopped_mid_file(server: TritonServer, tmp_path: Path, stop_signal: int) -> tuple[Path, Path, list[int], int, str]:
    """Scores 3,000 lines into an output file and sends ``stop_signal`` once 60 are written."""
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = _many(source, 3000)
    process = subprocess.Popen(
        [sys.executable, "-m", "filterserve.cli", "score", str(source), "--url", server.grpc_url, "--output", str(out),
         "--concurrency", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while (not out.exists() or out.read_bytes().count(b"\n") < 60) and process.poll() is None:
        assert time.monotonic() < deadline, "scoring did not start"
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be stopped: make the input longer"
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=60)
    return source, out, good, process.returncode, stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_ctrl_c_writes_the_finished_lines_says_where_and_resume_finishes(server, tmp_path):
    source, out, good, code, stderr = _stopped_mid_file(server, tmp_path, signal.SIGINT)
    assert code == 130, stderr
    match = re.search(r"interrupted: input lines 1–(\d+) are written", stderr)
    assert match and f"filterserve score {source} --output {out} --resume" in stderr, stderr
    written = [record["n"] for record in _jsonl(out)]  # every line complete JSON
    assert written == [n for n in good if n <= int(match.group(1))] and written[-1] == int(match.group(1))

    # The hint runs as printed (issue 25, stumble 3): it carries --url and the rest.
    hint = re.search(r"continue with: (.+)$", stderr, re.MULTILINE)
    assert hint, stderr
    command = shlex.split(hint.group(1))
    assert command[:2] == ["filterserve", "score"] and "--url" in command, command
    done = _score(*command[2:])
    assert done.returncode == 1, done.stderr  # the bad lines are still bad
    assert f"resuming at input line {int(match.group(1)) + 1}" in done.stderr
    _assert_each_line_once_in_order(out, tmp_path / "out.jsonl.errors.jsonl", good)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_resume_after_the_scoring_process_is_killed_scores_each_line_exactly_once(server, tmp_path):
    source, out, good, code, _ = _stopped_mid_file(server, tmp_path, signal.SIGKILL)  # no handler, no flush, no goodbye
    assert code == -signal.SIGKILL
    with open(out, "a", encoding="utf-8") as torn:
        torn.write('{"n": 99999, "title": "torn by the ki')  # as a kill in the middle of a write would leave it

    done = _score(str(source), "--url", server.grpc_url, "--output", str(out), "--resume", "--concurrency", "4")
    assert done.returncode == 1, done.stderr
    _assert_each_line_once_in_order(out, tmp_path / "out.jsonl.errors.jsonl", good)
    again = _score(str(source), "--url", server.grpc_url, "--output", str(out), "--resume")  # nothing left to do
    # The bad lines the errors file keeps are still failed lines: counted, and the exit says so (issue 25, stumble 3).
    assert again.returncode == 1 and "scored 0 lines" in again.stderr, again.stderr
    assert f"; {len(BAD_LINES)} failed, listed in {tmp_path / 'out.jsonl.errors.jsonl'}" in again.stderr
    _assert_each_line_once_in_order(out, tmp_path / "out.jsonl.errors.jsonl", good)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resume_refuses_what_it_cannot_continue(server, tmp_path):
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _many(source, 10)
    out.write_text(json.dumps({"n": 1, "title": "Another input", "content": "x", "uplifting_v4": {}}) + "\n")
    done = _score(str(source), "--url", server.grpc_url, "--output", str(out), "--resume")
    assert done.returncode == 2
    assert "cannot resume: the last line of" in done.stderr and "is not input line 1 scored" in done.stderr
    no_file = _score(str(source), "--url", server.grpc_url, "--resume")
    assert no_file.returncode == 2 and "--resume continues a partial output file: give it with --output FILE" in no_file.stderr
