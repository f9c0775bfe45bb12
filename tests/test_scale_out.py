"""Past one server: the pool's least-busy dispatch and failover, and Ray Data over two servers.

Two real tritonservers serve the same export of the stand-in on loopback; one is stopped
mid-run like a crash. Every article must be scored exactly once, in input order, with the
scores a single server gives.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import settled

from filterserve.client import FilterClient, FilterResult, ScoreError, ServerUnavailable
from filterserve.client.servers import ServerPool
from filterserve.filters import UPLIFTING_V4
from filterserve.serve import TritonServer

ARTICLES = [{"id": i, "title": f"Story {i}", "content": f"Volunteers rebuilt {i} homes. " * (1 + i % 40)} for i in range(400)]


@pytest.fixture(scope="module")
def expected(exported) -> np.ndarray:
    """What one server scores, article by article."""
    with TritonServer(exported[0]) as one, FilterClient(one.grpc_url) as client:
        results = client.score_many(ARTICLES, concurrency=8)
    return np.array([list(r.scores.values()) for r in results])


def _vectors(results: list) -> np.ndarray:
    return np.array([list(r.scores.values()) for r in results])


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_pool_fails_over_when_a_server_dies_mid_run(exported, expected, protocol):
    with TritonServer(exported[0]) as first, TritonServer(exported[0]) as second:
        urls = [first.grpc_url, second.grpc_url] if protocol == "grpc" else [first.http_url, second.http_url]
        with ServerPool(urls, protocol) as pool:
            results: list = []

            def kill_second_after_some() -> None:
                while len(results) < 60:
                    time.sleep(0.01)
                second.stop(grace_s=0)  # no grace: the server vanishes like a crash

            killer = threading.Thread(target=kill_second_after_some)
            killer.start()
            for result in pool.score_iter(ARTICLES, concurrency=8):
                results.append(result)
            killer.join()
    assert len(results) == len(ARTICLES)
    assert not [r for r in results if isinstance(r, ScoreError)], [r for r in results if isinstance(r, ScoreError)][:3]
    np.testing.assert_allclose(_vectors(results), expected, atol=1e-5)  # each in its place: input order kept


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_pool_spreads_by_outstanding_work_and_skips_a_dead_url(exported, expected):
    with TritonServer(exported[0]) as first, TritonServer(exported[0]) as second:
        dead = "127.0.0.1:1"
        before = [_inference_count(server) for server in (first, second)]  # the servers' own start-up probes
        with ServerPool([dead, first.grpc_url, second.grpc_url], "grpc") as pool:
            results = pool.score_many(ARTICLES[:200], concurrency=8)
        counts = _settled_counts((first, second), before, 200)
    assert all(isinstance(r, FilterResult) for r in results)
    np.testing.assert_allclose(_vectors(results), expected[:200], atol=1e-5)
    # Both servers took a real share. Least-outstanding dispatch follows how fast each answers, and
    # the two share 2 cores with the rest of the suite: 28 of 200 has been seen, so 10% is the bar.
    assert sum(counts) == 200 and min(counts) >= 20, counts


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_server_unloading_its_models_is_failed_over_not_blamed_on_the_input(exported, expected, protocol):
    """A stopping server unloads its models before it closes its ports: for a moment it answers
    "no available versions" (gRPC NOT_FOUND, HTTP 400). That is a server going away: the pool
    sends the article elsewhere, and a single client says the server is unavailable, not "bad input"."""
    import tritonclient.grpc as grpcclient

    with TritonServer(exported[0]) as first, TritonServer(exported[0]) as second:
        urls = [second.grpc_url, first.grpc_url] if protocol == "grpc" else [second.http_url, first.http_url]
        with FilterClient(urls[0], protocol, UPLIFTING_V4.name) as connected:  # connected while it still served
            grpcclient.InferenceServerClient(second.grpc_url).unload_model(UPLIFTING_V4.name, headers=second.admin_key.grpc_headers)
            with pytest.raises(ServerUnavailable, match="has no available versions"):
                connected.score_item(ARTICLES[0])
        with pytest.raises(ServerUnavailable, match=f"model {UPLIFTING_V4.name} is not ready"):
            FilterClient(urls[0], protocol, UPLIFTING_V4.name)
        with ServerPool(urls, protocol) as pool:
            results = pool.score_many(ARTICLES[:100], concurrency=8)
        assert all(isinstance(r, FilterResult) for r in results), [r for r in results if isinstance(r, ScoreError)][:3]
        np.testing.assert_allclose(_vectors(results), expected[:100], atol=1e-5)


def _inference_count(server: TritonServer) -> int:
    import tritonclient.grpc as grpcclient

    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(UPLIFTING_V4.name, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def _settled_counts(servers: tuple[TritonServer, ...], before: list[int], answered: int) -> list[int]:
    """Each server's successes since ``before``, read until they add up to the ``answered`` requests
    (or 10 s pass): Triton counts a success just after it answers, so one read right after the last
    answer can come out one short."""
    return settled(lambda: [_inference_count(server) - b for server, b in zip(servers, before)],
                   lambda counts: sum(counts) >= answered)


@pytest.mark.timeout(120)
def test_pool_with_no_reachable_server_says_so():
    from filterserve.client import ServerUnavailable

    with pytest.raises(ServerUnavailable, match=r"none of the servers is reachable \(grpc\): 127.0.0.1:1: .*127.0.0.1:2: "):
        ServerPool("127.0.0.1:1,127.0.0.1:2", "grpc", timeout_s=2)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_score_cli_takes_several_urls(exported, tmp_path, expected):
    source = tmp_path / "articles.jsonl"
    source.write_text("".join(json.dumps(a) + "\n" for a in ARTICLES[:100]), encoding="utf-8")
    with TritonServer(exported[0]) as first, TritonServer(exported[0]) as second:
        done = subprocess.run(
            [sys.executable, "-m", "filterserve.cli", "score", str(source), "--url", f"{first.grpc_url},{second.grpc_url}"],
            capture_output=True, text=True, timeout=240,
        )
    assert done.returncode == 0, done.stderr
    out = [json.loads(line) for line in done.stdout.splitlines()]
    assert [o["id"] for o in out] == list(range(100))
    scored = np.array([list(o[UPLIFTING_V4.name]["scores"].values()) for o in out])
    np.testing.assert_allclose(scored, expected[:100], atol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_data_scores_a_corpus_across_two_servers_exactly_once(exported, expected):
    import ray

    from filterserve.client.ray_data import ERROR_COLUMN, FilterScorer

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with TritonServer(exported[0]) as first, TritonServer(exported[0]) as second:
            before = [_inference_count(server) for server in (first, second)]
            ds = ray.data.from_items(ARTICLES[:300])
            scored = ds.map_batches(
                FilterScorer,
                fn_constructor_kwargs={"urls": [first.grpc_url, second.grpc_url], "concurrency": 4},
                concurrency=2,  # two workers (actors), each with one client
                batch_size=50,
                batch_format="pandas",
            )
            rows = scored.take_all()
            counts = _settled_counts((first, second), before, 300)
    finally:
        ray.shutdown()
    ids = sorted(row["id"] for row in rows)
    assert ids == list(range(300)), "every article exactly once"
    assert all(row[ERROR_COLUMN] is None for row in rows)
    by_id = {row["id"]: row[UPLIFTING_V4.name] for row in rows}
    got = np.array([[by_id[i]["scores"][d] for d in UPLIFTING_V4.dimensions] for i in range(300)])
    np.testing.assert_allclose(got, expected[:300], atol=1e-5)  # the same scores as one server, whatever the order
    assert sum(counts) == 300 and min(counts) > 0, counts
