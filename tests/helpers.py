"""What several test modules share: the test-side decision reference, and talking to a running
tritonserver with plain tritonclient (inputs, its stubs, counters that settle after the answer).

Fixtures live in conftest.py; these are plain functions, imported by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import psutil
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from filterserve.contract import (
    CONTENT_LENGTH_INPUT,
    FINAL_SCORES,
    GATEKEEPER_APPLIED,
    LOGITS,
    SCORES,
    SCREENED,
    TEXT,
    UNKNOWN_CONTENT_LENGTH,
    WEIGHTED_AVERAGE,
)
from filterserve.filters import FilterSpec
from filterserve.serve import TritonServer
from filterserve.serve.process import live_stubs

CLIENTS = {"http": httpclient, "grpc": grpcclient}
# The dict production returns per article, keys in its order: FilterBaseScorer._create_empty_result
# (filter_base_scorer.py @4d17e75), then HybridScorer's stage keys, then the consumer's three.
PRODUCTION_KEYS = ("passed_prefilter", "prefilter_reason", "scores", "weighted_average", "tier", "tier_description",
                   "gatekeeper_applied", "content_length", "short_content_cap_applied", "stage_used", "stage1_estimate",
                   "raw_weighted_average", "normalization_method", "version")
# What Triton answers a request it refuses as bad input, per protocol.
BAD_REQUEST = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}

T = TypeVar("T")


def model_rows(raw: np.ndarray, content_length: int = UNKNOWN_CONTENT_LENGTH) -> dict[str, np.ndarray]:
    """The decision step's feeds for stage-2 rows (model scores, not screened) of one content length."""
    rows = (raw.shape[0], 1)
    return {LOGITS: raw, CONTENT_LENGTH_INPUT: np.full(rows, content_length, dtype=np.int32), SCREENED: np.zeros(rows, dtype=bool)}


def decide(spec: FilterSpec, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The filter's decision on raw scores, ``(final, average, applied)``: the decision graph run
    with ONNX Runtime exactly as the server's decision step runs it (test_decision checks it by hand)."""
    import onnxruntime as ort

    from filterserve.model_repository.decision import decision_graph

    session = ort.InferenceSession(decision_graph(spec).SerializeToString(), providers=["CPUExecutionProvider"])
    raw = np.asarray(rows, dtype=np.float32)
    scores, final, average, applied = session.run([SCORES, FINAL_SCORES, WEIGHTED_AVERAGE, GATEKEEPER_APPLIED], model_rows(raw))
    assert (scores == raw).all()  # passed through for the ensemble, unchanged
    return final, average[:, 0], applied[:, 0]


def triton_client(server: TritonServer, protocol: str):
    """A plain tritonclient for one thread (neither client is shared between threads here)."""
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def bytes_input(protocol: str, name: str, values: list):
    """One BYTES input of shape [len(values), 1]: a text (or a title, a content) per row."""
    data = np.array([[v if isinstance(v, bytes) else v.encode()] for v in values], dtype=object)
    tensor = CLIENTS[protocol].InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def text_inputs(protocol: str, texts: list) -> list:
    """The ensemble's already-joined TEXT input."""
    return [bytes_input(protocol, TEXT, texts)]


def int_input(protocol: str, name: str, data: np.ndarray, datatype: str = "INT64"):
    tensor = CLIENTS[protocol].InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data.astype(np.int64) if datatype == "INT64" else data)
    return tensor


def stub_of(server: TritonServer, model: str) -> psutil.Process:
    """The live Python-backend stub process of one model (its command line names <repo>/<model>/1/model.py)."""
    stubs = [s for s in live_stubs(server.pid) if Path(s.cmdline()[1]).parents[1].name == model]
    assert len(stubs) == 1, stubs
    return stubs[0]


def settled(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 10.0) -> T:
    """``read()`` again until ``done`` holds of it or ``timeout_s`` passes; the last reading.

    Triton updates its statistics and metrics just after a response goes out, so a count read
    once, right after the last answer, can be one short."""
    deadline = time.monotonic() + timeout_s
    while not done(value := read()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def score_production(folder: Path, articles: list[dict], url: str) -> list[dict]:
    """``filterserve score --schema production`` (the real CLI, its own process) over ``articles``
    written as JSONL into ``folder``: one parsed output line per article, in order."""
    import json
    import subprocess
    import sys

    path = folder / "articles.jsonl"
    path.write_text("".join(json.dumps(a, ensure_ascii=False) + "\n" for a in articles), encoding="utf-8")
    scored = subprocess.run([sys.executable, "-m", "filterserve.cli", "score", str(path), "--url", url, "--schema", "production"],
                            capture_output=True, text=True, timeout=900)
    assert scored.returncode == 0, scored.stderr[-3000:]
    served = [json.loads(line) for line in scored.stdout.splitlines()]
    assert [s["id"] for s in served] == [a["id"] for a in articles]
    return served


def labelled_samples(path: Path, spec: FilterSpec) -> Path:
    """filterserve's sample articles as labelled validation data (every label 5): for gates that only the mechanics pass."""
    import json

    from filterserve.data import sample_articles

    rows = [{"title": a["title"], "content": a["content"], **{d: 5.0 for d in spec.dimensions}} for a in sample_articles()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
