"""The filter and group records an export writes, made in one place from what every kind of plan knows.

The record types are :mod:`filterserve.manifest`'s (one reader, one writer); this module fills
the fields every export fills the same way: the filter's description, the serving settings, the
library versions, the time, and the run's own figures.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from filterserve.export.manifest import versions
from filterserve.filters import FilterSpec
from filterserve.manifest import FilterRecord, GateRecord, GroupRef, ParityRecord, Source
from filterserve.model_repository.repository import RepositorySettings
from filterserve.progress import Steps


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunFigures:
    """How long an export took and how much memory it held: kept in the record it wrote."""

    export_seconds: float
    peak_rss_mb: float
    step_seconds: dict[str, float]

    @classmethod
    def of(cls, started: float, steps: Steps) -> RunFigures:
        """``started``: time.perf_counter() when the export began."""
        return cls(round(time.perf_counter() - started, 2), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   dict(steps.timings))

    def fields(self) -> dict[str, Any]:
        return {"export_seconds": self.export_seconds, "peak_rss_mb": self.peak_rss_mb, "step_seconds": self.step_seconds}


def serving_fields(settings: RepositorySettings) -> dict[str, Any]:
    """The record's copy of what the server is told (build-engine sizes its engine from it)."""
    return dict(settings.record_fields())


def filter_record(
    spec: FilterSpec, *, models: list[str], tensor_models: dict[str, str], default_precision: str, pad_token_id: int,
    vocab_size: int, settings: RepositorySettings, sources: dict[str, Source], parity: dict[str, ParityRecord],
    parity_texts: int, accuracy_gate: GateRecord | None, group: GroupRef | None = None, **kind: Any,
) -> FilterRecord:
    """A filter's record; ``kind``: the fields only one kind of export has (a merged filter's latency, int8 rung, run figures)."""
    return FilterRecord(
        filter=spec.to_dict(), models=models, ensemble=spec.name, tensor_models=tensor_models, group=group,
        default_precision=default_precision, pad_token_id=pad_token_id, vocab_size=vocab_size, max_length=spec.max_length,
        **serving_fields(settings), sources=sources, versions=versions(), parity=parity, parity_texts=parity_texts,
        accuracy_gate=accuracy_gate, created=now(), **kind,
    )
