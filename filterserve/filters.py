"""Filter descriptions: which dimensions a model scores, in which order, with which weights.

The tools never hard-code uplifting's eight dimensions: the export, the repository, the
client and the benchmarks all read them from a :class:`FilterSpec`, so a 5-dimension
sibling filter works the same way.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filterserve.errors import FilterServeError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class FilterSpec:
    """A scoring filter: its Triton model name, dimensions in output order, and weights."""

    name: str
    dimensions: tuple[str, ...]
    weights: tuple[float, ...]
    max_length: int = 512
    description: str = ""
    gatekeeper: str | None = field(default=None)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise FilterServeError(
                f"filter name {self.name!r} is not a valid Triton model name "
                "(letters, digits and underscores, not starting with a digit)"
            )
        if not self.dimensions:
            raise FilterServeError(f"filter {self.name!r} has no dimensions")
        if len(self.dimensions) != len(self.weights):
            raise FilterServeError(
                f"filter {self.name!r} has {len(self.dimensions)} dimensions "
                f"but {len(self.weights)} weights"
            )
        if len(set(self.dimensions)) != len(self.dimensions):
            raise FilterServeError(f"filter {self.name!r} repeats a dimension name: {self.dimensions}")
        for dim in self.dimensions:
            if not _NAME.match(dim):
                raise FilterServeError(f"dimension name {dim!r} must be an identifier")
        for dim, weight in zip(self.dimensions, self.weights):
            if not math.isfinite(weight):
                raise FilterServeError(f"weight of {dim!r} is not a finite number: {weight}")
        if self.max_length < 1:
            raise FilterServeError(f"max_length must be positive, got {self.max_length}")
        if self.gatekeeper is not None and self.gatekeeper not in self.dimensions:
            raise FilterServeError(f"gatekeeper {self.gatekeeper!r} is not one of the dimensions")

    @property
    def num_labels(self) -> int:
        return len(self.dimensions)

    def weighted(self, scores: list[float]) -> float:
        """The card's weighted score: the dot product of the scores with the weights."""
        return float(sum(s * w for s, w in zip(scores, self.weights)))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dimensions"] = [{"name": d, "weight": w} for d, w in zip(self.dimensions, self.weights)]
        del data["weights"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "filter description") -> "FilterSpec":
        try:
            dims = data["dimensions"]
            return cls(
                name=str(data["name"]),
                dimensions=tuple(str(d["name"]) for d in dims),
                weights=tuple(float(d["weight"]) for d in dims),
                max_length=int(data.get("max_length", 512)),
                description=str(data.get("description", "")),
                gatekeeper=data.get("gatekeeper"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FilterServeError(
                f"{source} is malformed ({type(exc).__name__}: {exc}); expected "
                '{"name": ..., "dimensions": [{"name": ..., "weight": ...}, ...], "max_length": 512}'
            ) from None


UPLIFTING_V4 = FilterSpec(
    name="uplifting_v4",
    dimensions=(
        "agency",
        "progress",
        "collective_benefit",
        "connection",
        "innovation",
        "justice",
        "resilience",
        "wonder",
    ),
    weights=(0.14, 0.19, 0.38, 0.10, 0.08, 0.03, 0.03, 0.05),
    max_length=512,
    description="Uplifting v4 (knowledge distillation): Qwen2.5-1.5B + LoRA, 8 regression scores",
    gatekeeper=None,
)


def load_filter(path: str | Path | None) -> FilterSpec:
    """Read a filter description from JSON; ``None`` means the default, uplifting v4."""
    if path is None:
        return UPLIFTING_V4
    p = Path(path)
    if not p.is_file():
        raise FilterServeError(f"filter description not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FilterServeError(f"filter description {p} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "filter" in data and "dimensions" not in data:
        data = data["filter"]  # a manifest (filter.json) also works as a description
    if not isinstance(data, dict):
        raise FilterServeError(f"filter description {p} must be a JSON object")
    return FilterSpec.from_dict(data, source=f"filter description {p}")
