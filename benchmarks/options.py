"""What each ``filterserve bench`` command runs on: one frozen value per command.

The CLI builds it from the command line and checks it once (:meth:`check`); the benchmark takes
it whole, so a new option is one field here and one argument in :mod:`filterserve.benchmarks.cli`,
never a tenth positional parameter threaded through. Standard library only: the CLI imports it
to build its parser, and the client-only install builds that parser too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from filterserve import defaults
from filterserve.contract import GATE_TOLERANCE
from filterserve.errors import FilterServeError
from filterserve.filters import UPLIFTING_V4, FilterSpec

if TYPE_CHECKING:
    from filterserve.client.endpoint import Protocol as WireProtocol
    from filterserve.export.standin import StandinShape


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise FilterServeError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _levels(name: str, values: Sequence[int]) -> None:
    if not values or min(values) < 1:
        raise FilterServeError(f"--{name} takes positive integers, got {','.join(map(str, values)) or 'none'}")


class BenchOptions(Protocol):
    """What every command's options value has: a report folder, and a check run once before any work."""

    @property
    def out(self) -> Path: ...

    def check(self) -> None: ...


@dataclass(frozen=True)
class RepositoryChoice:
    """One filter of an exported repository, and the sources its reference runs from (default: those its record names)."""

    path: Path
    name: str | None = None
    base: str | None = None
    adapter: Path | None = None


@dataclass(frozen=True)
class ServerChoice:
    """A running server (``url``), or none: latency and throughput then start their own, accuracy skips the served model."""

    url: str | None = None
    protocol: WireProtocol = defaults.BENCH_PROTOCOL


@dataclass(frozen=True)
class FixtureOptions:
    out: Path
    spec: FilterSpec = UPLIFTING_V4
    steps: int = defaults.FIXTURE_STEPS
    seed: int = defaults.FIXTURE_SEED

    def check(self) -> None:
        _positive(steps=self.steps)


@dataclass(frozen=True)
class AccuracyOptions:
    repository: RepositoryChoice
    data: Path
    server: ServerChoice = ServerChoice()
    tolerance: float = GATE_TOLERANCE
    out: Path = Path(defaults.BENCH_OUT)

    def check(self) -> None:
        if not self.data.is_file():
            raise FilterServeError(f"labelled data not found: {self.data}")
        if not self.tolerance >= 0:
            raise FilterServeError(f"--tolerance must be a non-negative number, got {self.tolerance}")


@dataclass(frozen=True)
class LatencyOptions:
    repository: RepositoryChoice
    server: ServerChoice = ServerChoice()
    requests: int = defaults.LATENCY_REQUESTS
    out: Path = Path(defaults.BENCH_OUT)

    def check(self) -> None:
        _positive(requests=self.requests)


@dataclass(frozen=True)
class ThroughputOptions:
    repository: RepositoryChoice
    server: ServerChoice = ServerChoice()
    requests: int = defaults.THROUGHPUT_REQUESTS
    concurrency: tuple[int, ...] = defaults.THROUGHPUT_CONCURRENCY
    mixes: tuple[str, ...] = defaults.MIXES
    out: Path = Path(defaults.BENCH_OUT)

    def check(self) -> None:
        _positive(requests=self.requests)
        _levels("concurrency", self.concurrency)
        unknown = [m for m in self.mixes if m not in defaults.MIXES]
        if not self.mixes or unknown:
            raise FilterServeError(f"--mix takes {' and/or '.join(defaults.MIXES)}, got {','.join(self.mixes) or 'none'}")


@dataclass(frozen=True)
class MemoryOptions:
    repository: Path
    batch: int = defaults.MEMORY_BATCH
    tokens: int = defaults.MEMORY_TOKENS
    out: Path = Path(defaults.BENCH_OUT)

    def check(self) -> None:
        _positive(batch=self.batch, tokens=self.tokens)


@dataclass(frozen=True)
class FamilyOptions:
    out: Path
    shape: StandinShape
    count: int = defaults.FAMILY_COUNT
    tokenizer: Path | None = None

    def check(self) -> None:
        _positive(count=self.count)
        if self.tokenizer is not None and not self.tokenizer.is_file():
            raise FilterServeError(f"tokenizer file not found: {self.tokenizer}")


@dataclass(frozen=True)
class SharedBaseOptions:
    family: Path
    counts: tuple[int, ...] = defaults.SHARED_BASE_COUNTS
    batch: int = defaults.MEMORY_BATCH
    tokens: int = defaults.MEMORY_TOKENS
    articles: int = defaults.SHARED_BASE_ARTICLES
    concurrency: int = defaults.CONCURRENCY
    requests: int = defaults.SHARED_BASE_REQUESTS
    work: Path | None = None
    out: Path = Path(defaults.BENCH_OUT)

    def check(self) -> None:
        _levels("counts", self.counts)
        _positive(batch=self.batch, tokens=self.tokens, articles=self.articles, concurrency=self.concurrency,
                  requests=self.requests)



@dataclass(frozen=True)
class DeterminismOptions:
    repository: RepositoryChoice
    articles: int = defaults.DETERMINISM_ARTICLES
    out: Path = Path(defaults.BENCH_OUT)

    def check(self) -> None:
        _positive(articles=self.articles)
