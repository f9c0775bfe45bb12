"""The ways one exported filter can be run, behind one call: ``run(texts, concurrency) → scores``.

Benchmarks compare the card's recipe with every exported variant and the served model on the
same texts; giving them one interface keeps each comparison a loop rather than a special case.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filterserve.errors import FilterServeError
from filterserve.manifest import read_filter_record
from filterserve.filters import FilterSpec

# In-process engines score at most this many texts in one padded batch when not told otherwise.
ACCURACY_BATCH = 16


@dataclass(frozen=True)
class Repository:
    """One filter of a model repository and the sources its export came from (or the ones the user named)."""

    path: Path
    manifest: dict[str, Any]
    spec: FilterSpec
    base: str
    adapter: Path

    @property
    def tensor_models(self) -> dict[str, Path]:
        """``{precision: model.onnx}`` for every exported tensor variant."""
        return {p: self.path / folder / "1" / "model.onnx" for p, folder in self.manifest.get("tensor_models", {}).items()}


def open_repository(
    path: str | Path, base: str | None = None, adapter: str | Path | None = None, filter_name: str | None = None
) -> Repository:
    """One filter of a repository (the only one, or ``filter_name``), with the base and adapter its
    record names unless given, so a plain repository path suffices."""
    repo = Path(path).expanduser()
    record = read_filter_record(repo, filter_name)
    name = record["filter"]["name"]
    sources = record.get("sources", {})
    base = base or sources.get("base", {}).get("path") or sources.get("base", {}).get("hub_id")
    adapter = adapter or sources.get("adapter", {}).get("path")
    if not base or not adapter:
        raise FilterServeError(f"the record of filter {name!r} in {repo} names no base or adapter path; pass --base and --adapter")
    spec = FilterSpec.from_dict(record["filter"], f"the record of filter {name!r} in {repo}")
    return Repository(repo, record, spec, str(base), Path(adapter))


class BatchEngine:
    """In process, on right-padded batches of ``concurrency`` texts (the server's tokenizer step pads the same way)."""

    def __init__(self, name: str, tokenizer: Any, max_length: int) -> None:
        self.name, self.tokenizer, self.max_length = name, tokenizer, max_length

    def _batch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def one(self, text: str) -> np.ndarray:
        return self.run([text], 1)

    def run(self, texts: list[str], concurrency: int = ACCURACY_BATCH) -> np.ndarray:
        from filterserve.export.parity import score_in_batches

        return score_in_batches(self._batch, self.tokenizer, texts, self.max_length, concurrency)


class TorchEngine(BatchEngine):
    def __init__(self, name: str, model: Any, tokenizer: Any, max_length: int) -> None:
        super().__init__(name, tokenizer, max_length)
        self.model = model

    def _batch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from filterserve.export.parity import torch_scores

        return torch_scores(self.model, ids, mask)


class OrtEngine(BatchEngine):
    def __init__(self, name: str, onnx_path: Path, tokenizer: Any, max_length: int) -> None:
        from filterserve.export.parity import ort_session

        if not onnx_path.is_file():
            raise FilterServeError(f"{name}: exported model not found at {onnx_path}")
        super().__init__(name, tokenizer, max_length)
        self.session = ort_session(onnx_path)

    def _batch(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from filterserve.export.parity import ort_scores

        return ort_scores(self.session, ids, mask)[0]


# A benchmark measures how long requests take under load: at 1.5B on a CPU, 16 queued 256-token
# requests wait well past the client's 30 s default, and timing them out would measure nothing.
SERVED_TIMEOUT_S = 3600.0


class ServedEngine:
    """The served ensemble through the project's client, ``concurrency`` requests in flight."""

    def __init__(self, name: str, url: str, protocol: str, spec: FilterSpec) -> None:
        from filterserve.client import FilterClient

        self.name, self.spec = name, spec
        self.client = FilterClient(url, protocol, model=spec.name, timeout_s=SERVED_TIMEOUT_S)

    def one(self, text: str) -> np.ndarray:
        """A plain request: batch-1 latency must not include a thread pool's start-up."""
        scores = self.client.score_text(text)
        return np.array([[scores.scores[d] for d in self.spec.dimensions]], dtype=np.float64)

    def run(self, texts: list[str], concurrency: int = ACCURACY_BATCH) -> np.ndarray:
        from filterserve.client import ScoreError

        results = self.client.score_many(texts, concurrency=concurrency)
        failed = [r for r in results if isinstance(r, ScoreError)]
        if failed:
            raise FilterServeError(f"{self.name}: {len(failed)} of {len(texts)} requests failed, first: {failed[0].message}")
        return np.array([[r.scores[d] for d in self.spec.dimensions] for r in results], dtype=np.float64)


Engine = BatchEngine | ServedEngine


def served_engines(repo: Repository, url: str | None, protocol: str) -> Iterator[ServedEngine]:
    """The given server, or one started here on the repository (both protocols) and stopped after."""
    if url:
        yield ServedEngine(f"served_{protocol}", url, protocol, repo.spec)
        return
    from filterserve.serve import TritonServer

    with TritonServer(repo.path) as server:
        yield ServedEngine("served_grpc", server.grpc_url, "grpc", repo.spec)
        yield ServedEngine("served_http", server.http_url, "http", repo.spec)


def ort_engines(repo: Repository, tokenizer: Any) -> Iterator[OrtEngine]:
    for precision, path in repo.tensor_models.items():
        yield OrtEngine(f"onnx_{precision}", path, tokenizer, repo.spec.max_length)
