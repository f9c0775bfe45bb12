"""``filterserve score`` in a subprocess against the real tritonserver."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from filterserve.data import sample_articles
from filterserve.filters import UPLIFTING_V4
from filterserve.serve import TritonServer

from conftest import MIXED_ARTICLES

RESULT_KEYS = ["scores", "weighted_score", "final_scores", "weighted_average", "gatekeeper_applied", "n_tokens", "truncated"]


@pytest.fixture(scope="module")
def server(exported):
    with TritonServer(exported[0]) as running:
        yield running


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
    assert np.abs(got - expected).max() <= 1e-3


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


@pytest.mark.timeout(120)
def test_stdin_over_http(server, tmp_path):
    articles = sample_articles()[:3]
    stdin = "".join(json.dumps(a) + "\n" for a in articles)

    done = _score("-", "--url", server.http_url, "--protocol", "http", cwd=tmp_path, stdin=stdin)

    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == [a["id"] for a in articles]
    assert not (tmp_path / "score-errors.jsonl").exists()  # nothing failed, so no error file


@pytest.mark.timeout(60)
def test_unreachable_server_is_a_usage_error(tmp_path):
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps(sample_articles()[0]) + "\n", encoding="utf-8")
    done = _score(str(source), "--url", "127.0.0.1:1", "--retries", "0", "--timeout", "2")
    assert done.returncode == 2
    assert "server at 127.0.0.1:1 is not reachable (grpc)" in done.stderr


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
