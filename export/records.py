"""The filter and group records an export writes, made in one place from what every kind of plan knows.

The record types are :mod:`filterserve.manifest`'s (one reader, one writer); this module fills
the fields every export fills the same way: the filter's description, the serving settings, the
library versions, the time, and the run's own figures.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from filterserve.export.manifest import versions
from filterserve.filters import FilterSpec
from filterserve.manifest import ChildRecord, FilterRecord, GateRecord, GroupRef, ParityRecord, Source
from filterserve.model_repository.repository import RepositorySettings
from filterserve.progress import Steps


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunFigures:
    """How long an export took and how much memory it held: kept in the record it wrote.

    ``peak_rss_mb`` is the most the export held at once: the exporting process's own peak, or, while
    a step ran in a child process (:mod:`filterserve.export.child`), the child's peak plus what the
    exporting process held as it waited, whichever is larger.
    """

    export_seconds: float
    peak_rss_mb: float
    step_seconds: dict[str, float]
    parent_peak_rss_mb: float
    children: tuple[ChildRecord, ...] = ()

    @classmethod
    def of(cls, started: float, steps: Steps, children: Sequence[ChildRecord] = ()) -> RunFigures:
        """``started``: time.perf_counter() when the export began."""
        parent = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        peak = max([parent, *(c.together_mb for c in children)])
        return cls(round(time.perf_counter() - started, 2), peak, dict(steps.timings), parent, tuple(children))

    def fields(self) -> dict[str, Any]:
        return {"export_seconds": self.export_seconds, "peak_rss_mb": self.peak_rss_mb, "step_seconds": self.step_seconds}

    def child_fields(self) -> dict[str, Any]:
        """A merged filter's record also says which steps ran in a child process and what they held."""
        return {"parent_peak_rss_mb": self.parent_peak_rss_mb, "children": list(self.children)}

    def summary(self) -> str:
        """The line printed at the end of an export."""
        line = f"peak RSS {self.peak_rss_mb / 1024:.1f} GB (this process {self.parent_peak_rss_mb / 1024:.1f} GB"
        ran = "; ".join(f"{c.step} in child {c.pid}: {c.peak_rss_mb / 1024:.1f} GB" for c in self.children)
        return line + (f"; {ran})" if ran else ")") + f", {self.export_seconds / 60:.1f} min"


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
