"""FilterClient against the real tritonserver serving the real export of the stand-in."""

from __future__ import annotations

import ast
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXED_ARTICLES
from helpers import PRODUCTION_KEYS, decide

from filterserve.client import ClientError, FilterClient, FilterResult, ScoreError, ServerUnavailable
from filterserve.contract import (
    CONTENT_LENGTH,
    ENSEMBLE_OUTPUTS,
    FINAL_SCORES,
    GATEKEEPER_APPLIED,
    N_TOKENS,
    RAW_WEIGHTED_AVERAGE,
    SCORES,
    SHORT_CONTENT_CAP_APPLIED,
    TIER,
    TRUNCATED,
    WEIGHTED_AVERAGE,
    WEIGHTED_SCORE,
)
from filterserve.data import sample_articles
from filterserve.filters import UPLIFTING_V4
from filterserve.serve import TritonServer

PROTOCOLS = ["grpc", "http"]
LONG_TEXT = " ".join(["Volunteers rebuilt the village school after the flood."] * 120)  # > max_length tokens


SERVED_DIMENSIONS = tuple(f"served_{name}" for name in UPLIFTING_V4.dimensions)


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory: pytest.TempPathFactory):
    """The export with its dimensions renamed in the ensemble config: the client must show those names."""
    repo = tmp_path_factory.mktemp("client") / "repo"
    shutil.copytree(exported[0], repo)
    config = repo / UPLIFTING_V4.name / "config.pbtxt"
    text = config.read_text(encoding="utf-8")
    for name, served in zip(UPLIFTING_V4.dimensions, SERVED_DIMENSIONS):
        assert f'\\"{name}\\"' in text  # inside the JSON filter description
        text = text.replace(f'\\"{name}\\"', f'\\"{served}\\"')
    config.write_text(text, encoding="utf-8")
    with TritonServer(repo) as running:
        yield running


def _url(server: TritonServer, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(scope="module", params=PROTOCOLS)
def client(request, server):
    with FilterClient(_url(server, request.param), request.param) as opened:
        yield opened


def _vector(result: FilterResult) -> np.ndarray:
    return np.array(list(result.scores.values()))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_scores_match_the_reference(client, reference):
    articles = sample_articles()
    results = [client.score(a["title"], a["content"]) for a in articles]
    expected = reference([UPLIFTING_V4.input_text(a["title"], a["content"]) for a in articles])
    np.testing.assert_allclose(np.stack([_vector(r) for r in results]), expected, rtol=0, atol=1e-4)
    final, average, applied = decide(UPLIFTING_V4, expected)
    for i, result in enumerate(results):
        assert result.weighted_score == pytest.approx(float(np.dot(_vector(result), client.weights)), abs=1e-5)
        assert list(result.final_scores.values()) == pytest.approx(final[i].tolist(), abs=1e-4)
        assert result.weighted_average == pytest.approx(float(average[i]), abs=1e-4)
        assert result.gatekeeper_applied == bool(applied[i])
        assert list(result.as_dict()) == [
            "scores", "weighted_score", "final_scores", "weighted_average", "raw_weighted_average", "tier", "tier_description",
            "gatekeeper_applied", "n_tokens", "truncated", "content_length", "short_content_cap_applied",
            "normalization_method", "stage_used", "stage1_estimate", "version",
        ]
        # The stamps (issue 26): the content measured as production measures it; no hybrid here.
        assert result.content_length == len(articles[i]["content"]) and not result.short_content_cap_applied
        assert (result.stage_used, result.stage1_estimate, result.normalization_method, result.version) == ("stage2", None, "none", "4.0")
        # Uplifting v4 has tiers and no normalization: the tier is read on the (raw) average.
        assert result.raw_weighted_average == result.weighted_average
        reached = next(t for t in UPLIFTING_V4.tiers if result.weighted_average >= t.threshold)
        assert (result.tier, result.tier_description) == (reached.name, reached.description)
        assert list(result.as_dict("production")) == list(PRODUCTION_KEYS)
        assert result.as_dict("production")["scores"] == result.final_scores
        assert list(result.as_dict()["scores"]) == list(client.dimensions)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_filter_comes_from_the_server(client):
    assert client.model == UPLIFTING_V4.name  # found without being named
    assert client.dimensions == SERVED_DIMENSIONS
    assert client.weights == UPLIFTING_V4.weights
    assert client.spec.max_length == UPLIFTING_V4.max_length
    assert client.spec.text_template == UPLIFTING_V4.text_template


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_score_many_keeps_order_and_isolates_failures(client):
    texts = [f"Story {i}: volunteers rebuilt {i} schools after the flood." for i in range(40)]
    items: list = [*texts[:20], ("A title", ""), *texts[20:]]
    results = client.score_many(items, concurrency=16)
    assert len(results) == 41
    assert isinstance(results[20], ScoreError) and results[20].index == 20 and "content is empty" in results[20].message
    scored = results[:20] + results[21:]
    sequential = [client.score_text(text) for text in texts]
    for got, want in zip(scored, sequential):
        assert isinstance(got, FilterResult)
        np.testing.assert_allclose(_vector(got), _vector(want), atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_tokenize_on_client_matches_the_ensemble(client, exported):
    tokenizer = Path(exported[0]) / f"{UPLIFTING_V4.name}_tokenizer" / "1" / "tokenizer" / "tokenizer.json"
    with FilterClient(client.url, client.protocol, tokenizer=str(tokenizer)) as local:
        for title, content in MIXED_ARTICLES:
            here, there = local.score(title, content), client.score(title, content)
            np.testing.assert_allclose(_vector(here), _vector(there), atol=1e-5)
            assert here.weighted_average == pytest.approx(there.weighted_average, abs=1e-5)
            assert (here.n_tokens, here.truncated) == (there.n_tokens, there.truncated)
        np.testing.assert_allclose(_vector(local.score_text(LONG_TEXT)), _vector(client.score_text(LONG_TEXT)), atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_bad_input_gets_a_clear_error(client):
    with pytest.raises(ClientError, match="empty text"):
        client.score_text("   ")
    with pytest.raises(ClientError, match="content is empty"):
        client.score("A title", "")
    with pytest.raises(ClientError, match=r"bad input: .*vocabulary"):  # the server's own message
        client.score_tokens([1, 10**6])


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_unknown_model_is_not_ready(server):
    with pytest.raises(ClientError, match="model nope is not ready"):
        FilterClient(server.grpc_url, model="nope")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_no_server_fails_fast_and_says_where(protocol):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: nothing answers here
        start = time.monotonic()
        with pytest.raises(ServerUnavailable, match=rf"server at 127.0.0.1:{port} is not reachable \({protocol}\)"):
            FilterClient(f"127.0.0.1:{port}", protocol, timeout_s=2, retries=1)
    assert time.monotonic() - start < 5


@pytest.mark.timeout(60)
def test_bare_client_import_needs_no_torch():
    check = ("import filterserve.client, filterserve.client.cli, sys; "
             "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", check], check=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_silent_server_times_out(protocol):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # connections are accepted by the kernel but never answered
        with pytest.raises(ClientError, match=rf"timed out after 0.5 s \({protocol}\)"):
            FilterClient(f"127.0.0.1:{sock.getsockname()[1]}", protocol, timeout_s=0.5, retries=0)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_triton_client.py"


def test_plain_triton_client_example_needs_only_tritonclient():
    tree = ast.parse(EXAMPLE.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported == {"json", "sys", "numpy", "tritonclient"}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("article", [MIXED_ARTICLES[2], MIXED_ARTICLES[-1]], ids=["non-latin", "truncated"])
def test_plain_triton_client_example_prints_what_filter_client_returns(server, article):
    """The example, run as a newcomer runs it, against a live server: every ensemble output, exactly."""
    title, content = article
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), UPLIFTING_V4.name, server.grpc_url, title, content],
        capture_output=True, text=True, encoding="utf-8", timeout=60, check=True,
    )
    printed = {name: json.loads(value) for name, value in (line.split(": ", 1) for line in run.stdout.splitlines())}
    with FilterClient(server.grpc_url, "grpc") as client:
        want = client.score(title, content)
    expected = {
        SCORES: list(want.scores.values()),
        WEIGHTED_SCORE: [want.weighted_score],
        FINAL_SCORES: list(want.final_scores.values()),
        WEIGHTED_AVERAGE: [want.weighted_average],
        GATEKEEPER_APPLIED: [want.gatekeeper_applied],
        RAW_WEIGHTED_AVERAGE: [want.raw_weighted_average],
        TIER: [[t.name for t in UPLIFTING_V4.tiers].index(want.tier)],  # an index into the filter parameter's tiers
        N_TOKENS: [want.n_tokens],
        TRUNCATED: [want.truncated],
        SHORT_CONTENT_CAP_APPLIED: [want.short_content_cap_applied],
        CONTENT_LENGTH: [want.content_length],
    }
    assert set(expected) == set(ENSEMBLE_OUTPUTS)  # a new output must be added here, and to the schema
    assert printed == {"dimensions": list(SERVED_DIMENSIONS), **expected}
    assert want.truncated == (article == MIXED_ARTICLES[-1])  # both kinds of article are covered
