"""One server, several filters (issue 14): one pass over gRPC and HTTP, each filter held to its own
PyTorch + PEFT reference; an export never disturbs what is served until the models are reloaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import FIVE_DIMS, MIXED_ARTICLES, peft_scorer, tree_digest
from helpers import decide

from filterserve.client import ClientError, FilterClient, FilterResult, MultiFilterClient, ScoreError
from filterserve.contract import SERVED_TOLERANCE
from filterserve.data import sample_articles
from filterserve.errors import FilterServeError
from filterserve.export.pipeline import export_filter
from filterserve.export.standin import build_standin
from filterserve.filters import UPLIFTING_V4, FilterSpec
from filterserve.serve import TritonServer
from filterserve.serve.process import ADMIN_HEADER

pytestmark = pytest.mark.slow  # the real tritonserver, started here

NAMES = ["investment_risk_v2", "uplifting_v4"]
ARTICLES = [*MIXED_ARTICLES, *((a["title"], a["content"]) for a in sample_articles())]


@pytest.fixture(scope="module")
def repo(multi_exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("multi_serve") / "repo"
    shutil.copytree(multi_exported, copy)
    return copy


@pytest.fixture(scope="module")
def server(repo):
    with TritonServer(repo) as running:
        yield running


@pytest.fixture(scope="module")
def references(reference, five_reference):
    return {UPLIFTING_V4.name: (UPLIFTING_V4, reference), FIVE_DIMS.name: (FIVE_DIMS, five_reference)}


def _score_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "filterserve.cli", "score", *args], capture_output=True, text=True, timeout=240)


def _raw(result: FilterResult, spec: FilterSpec) -> list[float]:
    return [result.scores[d] for d in spec.dimensions]


def _assert_matches(rows: list[dict], spec: FilterSpec, score, articles: list[tuple[str, str]]) -> None:
    """Raw scores within the served tolerance of PEFT on the filter's template, and the filter's decision on them."""
    expected = score([spec.input_text(t, c) for t, c in articles])
    final, average, applied = decide(spec, expected)
    got = np.array([[row["scores"][d] for d in spec.dimensions] for row in rows])
    assert np.abs(got - expected).max() <= SERVED_TOLERANCE, spec.name
    got_final = np.array([[row["final_scores"][d] for d in spec.dimensions] for row in rows])
    assert np.abs(got_final - final).max() <= SERVED_TOLERANCE
    assert np.abs(np.array([row["weighted_average"] for row in rows]) - average).max() <= SERVED_TOLERANCE
    assert [row["gatekeeper_applied"] for row in rows] == applied.tolist()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_score_writes_every_served_filter_each_within_the_served_tolerance_of_its_reference(server, references, protocol, tmp_path):
    source = tmp_path / "articles.jsonl"
    records = [{"id": i, "title": t, "content": c, "agency": 9.0} for i, (t, c) in enumerate(ARTICLES)]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    url = server.grpc_url if protocol == "grpc" else server.http_url

    done = _score_cli(str(source), "--url", url, "--protocol", protocol, "--output", str(tmp_path / "out.jsonl"))

    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [{k: v for k, v in o.items() if k not in NAMES} for o in out] == records  # records unchanged, labels kept
    assert all(list(o)[-2:] == NAMES for o in out)
    for name, (spec, score) in references.items():
        _assert_matches([o[name] for o in out], spec, score, ARTICLES)


@pytest.mark.timeout(120)
def test_filter_option_picks_the_filters(server, tmp_path):
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps(sample_articles()[0]) + "\n", encoding="utf-8")
    done = _score_cli(str(source), "--url", server.grpc_url, "--filter", "investment_risk_v2")
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert list(line["investment_risk_v2"]["scores"]) == list(FIVE_DIMS.dimensions) and "uplifting_v4" not in line
    missing = _score_cli(str(source), "--url", server.grpc_url, "--filter", "uplifting_v4,nope")
    assert missing.returncode == 2 and "model nope is not ready" in missing.stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_multi_filter_client_lists_the_served_filters_and_scores_with_all(server, references, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    with MultiFilterClient(url, protocol) as client:
        assert client.names == NAMES
        assert client.specs == {FIVE_DIMS.name: FIVE_DIMS, UPLIFTING_V4.name: UPLIFTING_V4}
        one = client.score(*ARTICLES[0])
        items = [ARTICLES[0], ("A title", " "), *ARTICLES[1:6]]
        streamed = list(client.score_iter(items, concurrency=4))
    for name, (spec, score) in references.items():
        assert np.abs(np.array(_raw(one[name], spec)) - score([spec.input_text(*ARTICLES[0])])[0]).max() <= SERVED_TOLERANCE
        assert isinstance(streamed[1][name], ScoreError) and "content is empty" in streamed[1][name].message
        _assert_matches([streamed[i][name].as_dict() for i in (0, 2, 3, 4, 5, 6)], spec, score, [ARTICLES[0], *ARTICLES[1:6]])
    with pytest.raises(ClientError, match="serves several filters, pick one with model=: investment_risk_v2, uplifting_v4"):
        FilterClient(url, protocol)
    with FilterClient(url, protocol, "investment_risk_v2") as single:
        assert single.spec == FIVE_DIMS


@pytest.mark.timeout(300)
def test_a_failed_re_export_leaves_both_filters_served_and_scoring_as_before(server, repo, standin, tmp_path):
    with MultiFilterClient(server.grpc_url) as client:
        before = [client.score(*a) for a in ARTICLES[:4]]
        files = tree_digest(repo)
        broken = tmp_path / "adapter"
        shutil.copytree(standin.adapter_dir, broken)
        (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
        with pytest.raises(FilterServeError, match="cannot read the adapter weights"):
            export_filter(str(standin.base_dir), broken, repo, force=True)
        assert tree_digest(repo) == files
        server.supervisor.verify_filters()  # the supervisor's test inference passes on every filter (raises if not)
        assert server.check() == [] and server.supervisor.ready  # and a supervision round finds nothing to recover
        assert [client.score(*a) for a in ARTICLES[:4]] == before


def _load(server: TritonServer, model: str) -> None:
    """Triton's repository API (explicit model control): load, or reload if the files changed.

    serve locks that API behind its per-server key (see test_serve_faults), so only a holder of the key may call it."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/models/{model}/load", data=b"{}", method="POST")
    request.add_header(ADMIN_HEADER, server.admin_key.value)
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200


@pytest.mark.timeout(400)
def test_a_running_server_serves_the_old_models_until_told_to_load_the_new(
    exported, reference, five_standin, five_reference, tmp_path
):
    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    retrained = build_standin(tmp_path / "retrained", UPLIFTING_V4, seed=5)
    texts = [UPLIFTING_V4.input_text(t, c) for t, c in ARTICLES[:5]]
    old, new = reference(texts), peft_scorer(retrained, UPLIFTING_V4)(texts)
    assert np.abs(old - new).max() > 0.1, "the retrained filter must score differently for the test to mean anything"

    with TritonServer(repo) as server, MultiFilterClient(server.grpc_url) as served:
        export_filter(str(five_standin.base_dir), five_standin.adapter_dir, repo, FIVE_DIMS)  # a new filter
        export_filter(str(retrained.base_dir), retrained.adapter_dir, repo, UPLIFTING_V4, force=True)  # a replaced one

        with MultiFilterClient(server.grpc_url) as before_load:
            assert before_load.names == ["uplifting_v4"], "a new filter waits for an explicit load"
        scored = np.array([_raw(served.score(t, c)["uplifting_v4"], UPLIFTING_V4) for t, c in ARTICLES[:5]])
        assert np.abs(scored - old).max() <= SERVED_TOLERANCE, "the old models serve until they are reloaded"

        for ensemble in ("investment_risk_v2", "uplifting_v4"):
            _load(server, ensemble)  # loading an ensemble (re)loads the composing models whose files changed
        with MultiFilterClient(server.http_url, "http") as reloaded:
            assert reloaded.names == NAMES
            results = [reloaded.score(t, c) for t, c in ARTICLES[:5]]
        assert np.abs(np.array([_raw(r["uplifting_v4"], UPLIFTING_V4) for r in results]) - new).max() <= SERVED_TOLERANCE
        five = five_reference([FIVE_DIMS.input_text(t, c) for t, c in ARTICLES[:5]])
        assert np.abs(np.array([_raw(r["investment_risk_v2"], FIVE_DIMS) for r in results]) - five).max() <= SERVED_TOLERANCE
