"""The real tritonserver from the nvidia-pytriton wheel serving the real export of the stand-in."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient
from conftest import MIXED_ARTICLES
from helpers import BAD_REQUEST, CLIENTS, bytes_input, decide, int_input, settled, stub_of, text_inputs, triton_client
from tritonclient.utils import InferenceServerException

from filterserve.contract import (
    CONTENT,
    DECISION_OUTPUTS,
    ENSEMBLE_OUTPUTS,
    N_TOKENS,
    PARITY_TOLERANCES,
    SCORES,
    SERVED_TOLERANCE,
    TITLE,
    TRUNCATED,
    WEIGHTED_SCORE,
    tensor_model,
    tokenizer_model,
)
from filterserve.errors import FilterServeError
from filterserve.filters import UPLIFTING_V4, FilterSpec
from filterserve.serve import ServeOptions, TritonServer

pytestmark = pytest.mark.slow  # the real tritonserver, started here

SPEC = UPLIFTING_V4
TENSOR_MODEL = tensor_model(SPEC.name)
TOKENIZER_MODEL = tokenizer_model(SPEC.name)
TEXTS = [
    "Volunteers rebuilt the village school. Classes resume on Monday after the flood.",
    "Markets fell. Investors feared a recession — «ça va mal» 📉",
    "Short.",
]


@pytest.fixture(scope="module")
def repo(exported) -> Path:
    return exported[0]


@pytest.fixture(scope="module")
def manifest(exported) -> dict:
    return exported[1]


def _score(client, protocol: str, texts: list) -> tuple[np.ndarray, np.ndarray]:
    result = client.infer(SPEC.name, text_inputs(protocol, texts))
    return result.as_numpy("scores"), result.as_numpy("weighted_score")


def _stats(client, protocol: str, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model_name=model, **({"as_json": True} if protocol == "grpc" else {}))
    entry = stats["model_stats"][0]
    return int(entry["inference_count"]), int(entry["execution_count"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_one_at_a_time_matches_reference(server, protocol, reference):
    client = triton_client(server, protocol)
    expected = reference(TEXTS)
    fp32 = PARITY_TOLERANCES["fp32"]  # one text alone, unpadded: as tight as the export's own parity check
    for i, text in enumerate(TEXTS):
        scores, weighted = _score(client, protocol, [text])
        assert scores.shape == (1, SPEC.num_labels) and weighted.shape == (1, 1)
        assert np.abs(scores[0] - expected[i]).max() <= fp32
        assert weighted[0, 0] == pytest.approx(float(scores[0] @ np.array(SPEC.weights)), abs=fp32)


@pytest.mark.timeout(60)
def test_ensemble_config_carries_the_filter(server):
    config = httpclient.InferenceServerClient(server.http_url).get_model_config(SPEC.name)
    described = json.loads(config["parameters"]["filter"]["string_value"])
    assert FilterSpec.from_dict(described) == SPEC
    assert described["text_template"] == "{title}\n\n{content}"
    assert described["gatekeepers"] == [{"dimension": "collective_benefit", "below": 5.0, "cap": 3.0,
                                         "unless": {"wonder": 7.0, "collective_benefit": 3.0}}]
    # The tier output indexes these (name, threshold, description), in order.
    assert [t["name"] for t in described["tiers"]] == ["impact", "connection", "not_uplifting"]


def _article_inputs(protocol: str, articles: list[tuple[str, str]]) -> list:
    return [bytes_input(protocol, name, [a[column] for a in articles]) for name, column in ((TITLE, 0), (CONTENT, 1))]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_plain_tritonclient_sends_title_and_content_and_gets_the_trained_input(server, protocol, reference):
    """The server owns the template: a caller that knows nothing of the join scores what PEFT scores
    on "{title}\n\n{content}", and gets the filter's decision on those scores."""
    raw = reference([SPEC.input_text(t, c) for t, c in MIXED_ARTICLES])
    final, average, applied = decide(SPEC, raw)
    client = triton_client(server, protocol)
    for i, article in enumerate(MIXED_ARTICLES):  # one request each, as services send them
        result = client.infer(SPEC.name, _article_inputs(protocol, [article]))
        assert np.abs(result.as_numpy("scores")[0] - raw[i]).max() <= SERVED_TOLERANCE, article[0]
        weighted = float(raw[i] @ np.array(SPEC.weights))
        assert result.as_numpy("weighted_score")[0, 0] == pytest.approx(weighted, abs=SERVED_TOLERANCE)
        assert np.abs(result.as_numpy("final_scores")[0] - final[i]).max() <= SERVED_TOLERANCE
        assert result.as_numpy("weighted_average")[0, 0] == pytest.approx(average[i], abs=SERVED_TOLERANCE)
        assert result.as_numpy("gatekeeper_applied")[0, 0] == applied[i]
    batched = client.infer(SPEC.name, _article_inputs(protocol, MIXED_ARTICLES))  # and as one batch
    assert np.abs(batched.as_numpy("scores") - raw).max() <= SERVED_TOLERANCE
    # The old ". " join scores differently: the check above would catch a server that used it.
    dotted = reference([f"{t}. {c}" for t, c in MIXED_ARTICLES[:2]])
    assert np.abs(dotted - raw[:2]).max() > SERVED_TOLERANCE


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_caller_naming_the_outputs_it_wants_gets_exactly_those(server, protocol):
    """Triton clients often name their outputs: the decision alone, the raw scores alone. Each
    output, and the usual subsets, come back alone and equal to the full answer (Triton 2.51
    answered "unexpected deadlock" to most subsets while an ensemble output fed a step)."""
    client, module = triton_client(server, protocol), CLIENTS[protocol]
    inputs = text_inputs(protocol, TEXTS[:2])
    full = client.infer(SPEC.name, inputs)
    subsets = [(name,) for name in ENSEMBLE_OUTPUTS] + [DECISION_OUTPUTS, (SCORES, WEIGHTED_SCORE), (N_TOKENS, TRUNCATED)]
    for wanted in subsets:
        result = client.infer(SPEC.name, inputs, outputs=[module.InferRequestedOutput(name) for name in wanted])
        for name in ENSEMBLE_OUTPUTS:
            if name in wanted:
                np.testing.assert_array_equal(result.as_numpy(name), full.as_numpy(name), err_msg=f"{wanted}: {name}")
            else:
                assert result.as_numpy(name) is None, f"{wanted}: {name} was not asked for"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_text_and_article_inputs_are_refused_when_incomplete_or_mixed(server, protocol):
    client = triton_client(server, protocol)
    title_only = _article_inputs(protocol, [("Title", "Body")])[:1]
    cases = {
        "missing CONTENT": title_only,
        "either TEXT or TITLE + CONTENT": text_inputs(protocol, ["text"]) + title_only,
        "CONTENT row 0 is empty": _article_inputs(protocol, [("Title", "  ")]),
        "TITLE row 0 is empty": _article_inputs(protocol, [("", "Body")]),
    }
    for words, inputs in cases.items():
        with pytest.raises(InferenceServerException) as caught:
            client.infer(SPEC.name, inputs)
        assert caught.value.status() == BAD_REQUEST[protocol], f"{words}: {caught.value}"
        assert words.lower() in caught.value.message().lower(), caught.value.message()


@pytest.mark.timeout(60)
def test_tokenizer_model_matches_transformers_and_pads_to_buckets(server, reference):
    long_text = " ".join(["Volunteers rebuilt the village school after the flood."] * 120)
    texts = [*TEXTS, long_text]
    client = httpclient.InferenceServerClient(server.http_url)
    result = client.infer(TOKENIZER_MODEL, text_inputs("http", texts))
    ids, mask = result.as_numpy("input_ids"), result.as_numpy("attention_mask")
    assert ids.shape == mask.shape and ids.shape[1] == SPEC.max_length  # the long text sets it, capped
    for row, text in enumerate(texts):
        expected = reference.tokenizer(text, max_length=SPEC.max_length, truncation=True)["input_ids"]
        assert ids[row, : int(mask[row].sum())].tolist() == expected
    short = client.infer(TOKENIZER_MODEL, text_inputs("http", TEXTS[2:])).as_numpy("input_ids")
    assert short.shape[1] == 16  # rounded up to the bucket


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_concurrent_requests_are_batched(server, protocol, reference):
    expected = reference([f"{TEXTS[i % 2]} Story {i}." for i in range(32)])
    stats_client = triton_client(server, protocol)
    before = _stats(stats_client, protocol, TENSOR_MODEL)
    clients = [triton_client(server, protocol) for _ in range(32)]  # a client per thread: they are not thread-safe
    start = threading.Barrier(len(clients))
    results: dict[int, object] = {}

    def send(i: int) -> None:
        inputs = text_inputs(protocol, [f"{TEXTS[i % 2]} Story {i}."])
        start.wait()
        try:
            results[i] = clients[i].infer(SPEC.name, inputs).as_numpy("scores")
        except InferenceServerException as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(r, np.ndarray) and r.shape == (1, SPEC.num_labels) for r in results.values()), results
    assert len(results) == 32
    for i, scores in results.items():
        assert np.abs(scores[0] - expected[i]).max() <= PARITY_TOLERANCES["fp32"], f"request {i} scored differently when batched"
    after = settled(lambda: _stats(stats_client, protocol, TENSOR_MODEL), lambda now: now[0] - before[0] >= 32, timeout_s=5)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 32
    assert executions < inferences, "the dynamic batcher joined no requests"


def _bad_requests(manifest: dict) -> dict[str, tuple[str, list, str]]:
    """name → (model, inputs builder, words the error message must contain)."""
    too_many = manifest["max_batch_size"] + 1
    vocab = manifest["vocab_size"]
    return {
        "empty text": (SPEC.name, lambda p: text_inputs(p, ["   "]), "text row 0 is empty"),
        "non-utf8": (SPEC.name, lambda p: text_inputs(p, [b"caf\xe9 \xff"]), "utf-8"),
        "batch too large": (SPEC.name, lambda p: text_inputs(p, ["hello"] * too_many), "batch-size"),
        "wrong dtype": (SPEC.name, lambda p: [int_input(p, "TEXT", np.ones((1, 1), np.int32), "INT32")], "data-type"),
        "wrong shape": (SPEC.name, lambda p: _text_inputs_2d(p), "shape"),
        "out of vocabulary": (
            TENSOR_MODEL,
            lambda p: [
                int_input(p, "input_ids", np.array([[5, vocab]])),
                int_input(p, "attention_mask", np.ones((1, 2))),
            ],
            "vocabulary",
        ),
        "mask mismatch": (
            TENSOR_MODEL,
            lambda p: [
                int_input(p, "input_ids", np.array([[5, 6]])),
                int_input(p, "attention_mask", np.ones((1, 3))),
            ],
            "does not match",
        ),
    }


def _text_inputs_2d(protocol: str) -> list:
    data = np.array([[b"one", b"two"]], dtype=object)  # dims [2] where the model takes [1]
    tensor = CLIENTS[protocol].InferInput("TEXT", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return [tensor]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_input_is_rejected_and_server_keeps_serving(server, manifest, protocol):
    client = triton_client(server, protocol)
    for case, (model, build, words) in _bad_requests(manifest).items():
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, build(protocol))
        assert caught.value.status() == BAD_REQUEST[protocol], f"{case}: {caught.value}"
        assert words in caught.value.message().lower(), f"{case}: {caught.value.message()}"
    scores, _ = _score(client, protocol, TEXTS[:2])
    assert scores.shape == (2, SPEC.num_labels)


def _wait_dead(process: psutil.Process, timeout_s: float = 10.0) -> None:
    """A killed stub stays a zombie until tritonserver reaps it, so wait for either."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.05)
    raise AssertionError(f"{process} did not die")


@pytest.mark.timeout(150)
def test_copied_repository_serves_and_recovers_from_a_crashed_stub(repo, tmp_path):
    copy = tmp_path / "elsewhere" / "repo"
    shutil.copytree(repo, copy)
    assert (copy / "filterserve.json").is_file()  # files at the root must not break loading
    with TritonServer(copy) as server:
        client = triton_client(server, "grpc")
        first, _ = _score(client, "grpc", TEXTS[:1])
        stub = stub_of(server, TOKENIZER_MODEL)
        stub.kill()
        _wait_dead(stub)
        with pytest.raises(InferenceServerException):
            _score(client, "grpc", TEXTS[:1])
        assert [(r.action, r.target, r.ok) for r in server.check()] == [("reload_model", TOKENIZER_MODEL, True)]
        again, _ = _score(client, "grpc", TEXTS[:1])
        np.testing.assert_allclose(again, first, atol=1e-5)
        assert stub_of(server, TOKENIZER_MODEL).pid != stub.pid


@pytest.mark.timeout(30)
def test_unusable_repository_or_port_is_a_clear_error(tmp_path, repo):
    with pytest.raises(FilterServeError, match="not found"):
        TritonServer(tmp_path / "missing")
    with pytest.raises(FilterServeError, match="no models"):
        TritonServer(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(FilterServeError, match="already in use"):
            TritonServer(ServeOptions(repo, http_port=busy.getsockname()[1])).start()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_until_ctrl_c_or_sigterm(repo, stop_signal):
    code = (
        "import argparse, sys\n"
        "from filterserve.serve.cli import add_serve_arguments, serve_command\n"
        "parser = argparse.ArgumentParser()\n"
        "add_serve_arguments(parser)\n"
        "sys.exit(serve_command(parser.parse_args(sys.argv[1:])))\n"
    )
    cli = subprocess.Popen(
        [sys.executable, "-c", code, "--model-repository", str(repo), "--check-interval", "0.5",
         "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", "--supervisor-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server_pids: list[int] = []
    try:
        lines = []
        while not any("HTTP" in line for line in lines):
            line = cli.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        url = lines[-1].split()[-1]
        assert httpclient.InferenceServerClient(url).is_server_ready()
        server_pids += [p.pid for p in psutil.Process(cli.pid).children(recursive=True)]
        time.sleep(1.5)  # a few supervision rounds pass without incident
        cli.send_signal(stop_signal)
        assert cli.wait(30) == 0
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in server_pids)
    finally:
        for pid in [cli.pid, *server_pids]:  # only after a failure is anything left to end
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        cli.wait()
