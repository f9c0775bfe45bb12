"""Real article lengths and bounded input: per-request padding, the waste counters, n_tokens and
truncation, cutting over-long text before tokenizing, and the tensor model's input rules.

All against the real tritonserver serving the real export of the stand-in.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import MIXED_ARTICLES, export_into
from helpers import BAD_REQUEST, bytes_input, int_input, stub_of, triton_client
from tritonclient.utils import InferenceServerException

from filterserve.client import FilterClient
from filterserve.client.concurrency import WINDOW_PER_WORKER
from filterserve.contract import COMPUTED_TOKENS_METRIC, REAL_TOKENS_METRIC, SERVED_TOLERANCE, tensor_model, tokenizer_model
from filterserve.filters import UPLIFTING_V4
from filterserve.model_repository.repository import DEFAULT_MAX_TEXT_BYTES
from filterserve.serve import TritonServer

pytestmark = pytest.mark.slow  # the real tritonserver, started here

SPEC = UPLIFTING_V4
TOKENIZER_MODEL = tokenizer_model(SPEC.name)
TENSOR_MODEL = tensor_model(SPEC.name)


def _counters(server: TritonServer) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{server.metrics_url}/metrics", timeout=10).read().decode()
    found = {}
    for name in (REAL_TOKENS_METRIC, COMPUTED_TOKENS_METRIC):
        match = re.search(rf'^{name}{{model="{TENSOR_MODEL}"}} (\S+)$', text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else 0.0
    return found


@pytest.mark.timeout(120)
def test_each_request_is_padded_to_its_own_bucket(server, reference):
    """Concurrent short and long requests reach one execute; neither is padded to the other."""
    texts = ["Short one.", "A bit longer: volunteers rebuilt the school after the flood in the valley.", "word " * 2000]
    results: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(texts))

    def send(i: int) -> None:
        client = httpclient.InferenceServerClient(server.http_url)
        start.wait()
        results[i] = client.infer(TOKENIZER_MODEL, [bytes_input("http", "TEXT", [texts[i]])]).as_numpy("input_ids")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for i, text in enumerate(texts):
        n = len(reference.tokenizer(text, max_length=SPEC.max_length, truncation=True)["input_ids"])
        assert results[i].shape == (1, min(-(-n // 16) * 16, SPEC.max_length)), (text[:20], results[i].shape)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_results_say_how_much_the_model_read_and_the_counters_add_up(server, protocol, reference):
    before = _counters(server)
    client = triton_client(server, protocol)
    expected_real = expected_computed = 0
    for title, content in MIXED_ARTICLES:
        result = client.infer(SPEC.name, [bytes_input(protocol, "TITLE", [title]), bytes_input(protocol, "CONTENT", [content])])
        full = len(reference.tokenizer(SPEC.input_text(title, content))["input_ids"])
        assert int(result.as_numpy("n_tokens")[0, 0]) == min(full, SPEC.max_length)
        assert bool(result.as_numpy("truncated")[0, 0]) == (full > SPEC.max_length), title
        expected_real += min(full, SPEC.max_length)
        expected_computed += min(-(-full // 16) * 16, SPEC.max_length)
    after = _counters(server)
    assert after[REAL_TOKENS_METRIC] - before[REAL_TOKENS_METRIC] == expected_real
    assert after[COMPUTED_TOKENS_METRIC] - before[COMPUTED_TOKENS_METRIC] == expected_computed
    assert any(SPEC.max_length < len(reference.tokenizer(SPEC.input_text(*a))["input_ids"]) for a in MIXED_ARTICLES)


@pytest.mark.timeout(180)
def test_over_long_text_is_cut_before_tokenizing_with_the_same_first_tokens(server, reference):
    """The cut must never change the tokens the model reads: words, one endless word, CJK without
    spaces, special tokens straddling the first cut, runs of spaces and newlines."""
    texts = [
        "word " * 20000,
        "x" * 60000,
        "河流清理行动，数百名志愿者周末清理了河岸。" * 2000,
        ("Hello <|endoftext|> world. " * 300) + "<|im_start|>" * 50 + " tail" * 4000,
        "a" * 4095 + " " * 3000 + "\n\n" * 500 + "end " * 3000,
        "Ünïcödé cömbining: e\u0301 a\u0308 " * 3000,
    ]
    client = httpclient.InferenceServerClient(server.http_url)
    for text in texts:
        result = client.infer(TOKENIZER_MODEL, [bytes_input("http", "TEXT", [text])])
        ids, n = result.as_numpy("input_ids")[0], int(result.as_numpy("n_tokens")[0, 0])
        assert ids[:n].tolist() == reference.tokenizer(text, max_length=SPEC.max_length, truncation=True)["input_ids"], text[:30]
        assert bool(result.as_numpy("truncated")[0, 0])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_oversize_text_is_refused_early_and_memory_does_not_grow(server, protocol):
    client = triton_client(server, protocol)
    stub = stub_of(server, TOKENIZER_MODEL)
    oversize = "x" * (DEFAULT_MAX_TEXT_BYTES + 1)
    rss_before = stub.memory_info().rss
    for name in ("TEXT", "CONTENT"):
        inputs = [bytes_input(protocol, name, [oversize])]
        if name == "CONTENT":
            inputs.append(bytes_input(protocol, "TITLE", ["A title"]))
        for _ in range(10):
            start = time.monotonic()
            with pytest.raises(InferenceServerException) as caught:
                client.infer(SPEC.name, inputs)
            assert time.monotonic() - start < 10
            assert caught.value.status() == BAD_REQUEST[protocol]
            assert f"{name} row 0 has {DEFAULT_MAX_TEXT_BYTES + 1} bytes; the limit is {DEFAULT_MAX_TEXT_BYTES}" in caught.value.message()
    assert stub.memory_info().rss - rss_before < 50 << 20, "oversize attempts left memory behind"
    ok = client.infer(SPEC.name, [bytes_input(protocol, "TEXT", ["Still serving."])])
    assert ok.as_numpy("scores").shape == (1, SPEC.num_labels)


def _tensor_cases(vocab: int, pad: int) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    ids = np.array([[5, 6, 7, pad]])
    return {
        "too long": (np.full((1, SPEC.max_length + 1), 5), np.ones((1, SPEC.max_length + 1)), "exceeds max_length"),
        "mask value 7": (ids, np.array([[1, 7, 1, 0]]), "right-padded prefix of ones"),
        "negative mask": (ids, np.array([[1, -3, 1, 0]]), "right-padded prefix of ones"),
        "hole in the mask": (ids, np.array([[1, 0, 1, 0]]), "right-padded prefix of ones"),
        "left padding": (np.array([[pad, 5, 6, 7]]), np.array([[0, 1, 1, 1]]), "right-padded prefix of ones"),
        "all padding": (np.array([[pad, pad]]), np.zeros((1, 2)), "all padding"),
        "padding with another id": (np.array([[5, 6, 7, 0 if pad else 1]]), np.array([[1, 1, 1, 0]]), "pad token id"),
        "out of vocabulary": (np.array([[5, vocab]]), np.ones((1, 2)), "vocabulary"),
    }


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tensor_model_refuses_inputs_it_would_score_wrongly(server, manifest_of, protocol):
    client = triton_client(server, protocol)
    for case, (ids, mask, words) in _tensor_cases(manifest_of["vocab_size"], manifest_of["pad_token_id"]).items():
        with pytest.raises(InferenceServerException) as caught:
            client.infer(TENSOR_MODEL, [int_input(protocol, "input_ids", ids), int_input(protocol, "attention_mask", mask)])
        assert caught.value.status() == BAD_REQUEST[protocol], f"{case}: {caught.value}"
        assert words in caught.value.message(), f"{case}: {caught.value.message()}"
    good = client.infer(TENSOR_MODEL, [int_input(protocol, "input_ids", np.array([[5, 6, 7, manifest_of["pad_token_id"]]])),
                                       int_input(protocol, "attention_mask", np.array([[1, 1, 1, 0]]))])
    assert np.isfinite(good.as_numpy("logits")).all()


@pytest.fixture(scope="module")
def manifest_of(exported) -> dict:
    return exported[1]


@pytest.mark.timeout(300)
def test_token_budget_splits_runs_and_keeps_scores(standin, tmp_path, reference):
    repo = tmp_path / "repo"
    export_into(repo, standin, SPEC, max_batch_tokens=SPEC.max_length)
    texts = [SPEC.input_text(t, c) for t, c in MIXED_ARTICLES]
    expected = reference(texts)
    with TritonServer(repo) as running:
        client = httpclient.InferenceServerClient(running.http_url)
        ids, mask = [], []
        encoded = [reference.tokenizer(t, max_length=SPEC.max_length, truncation=True)["input_ids"] for t in texts]
        for row in encoded:  # one batch of every article padded to max_length: 9 × 512 tokens, budget 512
            ids.append(row + [int(reference.tokenizer.pad_token_id)] * (SPEC.max_length - len(row)))
            mask.append([1] * len(row) + [0] * (SPEC.max_length - len(row)))
        inputs = [int_input("http", "input_ids", np.array(ids)), int_input("http", "attention_mask", np.array(mask))]
        result = client.infer(TENSOR_MODEL, inputs)
    assert np.abs(result.as_numpy("logits") - expected).max() <= SERVED_TOLERANCE


class RecordingClient(FilterClient):
    """Records the order in which items are sent (the server still scores them)."""

    sent: list[int]

    def score_item(self, item):
        self.sent.append(int(item["n"]))
        return super().score_item(item)


@pytest.mark.timeout(120)
def test_score_iter_sends_each_window_longest_first_and_keeps_input_order(server, reference):
    lengths = [5, 300, 40, 1200, 80, 2, 700, 10, 150, 60, 900, 20]
    items = [{"n": i, "title": f"Story {i}", "content": "w " * n} for i, n in enumerate(lengths)]
    with RecordingClient(server.grpc_url) as client:
        client.sent = []
        results = list(client.score_iter(items, concurrency=1))
    window = WINDOW_PER_WORKER
    for start in range(0, len(items), window):
        chunk = client.sent[start : start + window]
        assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)
        assert sorted(chunk) == list(range(start, min(start + window, len(items))))
    expected = [min(len(reference.tokenizer(SPEC.input_text(a["title"], a["content"]))["input_ids"]), SPEC.max_length) for a in items]
    assert [r.n_tokens for r in results] == expected  # results come back in input order
