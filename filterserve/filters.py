"""Filter descriptions: what a model scores, how its input is written, and what consumers read.

The tools never hard-code uplifting's eight dimensions, its input template or its gatekeeper:
the export, the repository, the server, the client and the benchmarks all read them from a
:class:`FilterSpec`, so a 5-dimension sibling filter (or a retrained one with another rule)
works the same way.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from filterserve.errors import FilterServeError
from filterserve.manifest import read_filter_record, read_json

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
TEMPLATE_FIELDS = ("title", "content")
# Every consumer reads scores on the filter's 0–10 scale; the production scorer clamps to it.
SCORE_RANGE = (0.0, 10.0)


def _number(value: object, what: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FilterServeError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise FilterServeError(f"{what} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class Gatekeeper:
    """Caps the weighted average when one dimension is low, as the filter's production scorer does.

    The cap applies when ``dimension < below``, unless every ``unless`` dimension is at least
    its threshold. All comparisons read the calibrated, clamped scores.
    """

    dimension: str
    below: float
    cap: float
    unless: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"dimension": self.dimension, "below": self.below, "cap": self.cap, "unless": dict(self.unless)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Gatekeeper":
        unless = data.get("unless") or {}
        if not isinstance(unless, dict):
            raise FilterServeError(f"gatekeeper 'unless' must map dimensions to thresholds, got {unless!r}")
        return cls(
            dimension=str(data["dimension"]),
            below=_number(data["below"], "gatekeeper 'below'"),
            cap=_number(data["cap"], "gatekeeper 'cap'"),
            unless=tuple((str(d), _number(t, f"gatekeeper 'unless' threshold of {d}")) for d, t in unless.items()),
        )


@dataclass(frozen=True)
class Breakpoints:
    """One dimension's isotonic calibration: ``x → y``, interpolated linearly, flat past the ends."""

    x: tuple[float, ...]
    y: tuple[float, ...]

    def check(self, dimension: str) -> None:
        if len(self.x) != len(self.y) or len(self.x) < 2:
            raise FilterServeError(
                f"calibration of {dimension!r} needs as many x as y breakpoints, at least 2 (got {len(self.x)} and {len(self.y)})"
            )
        if any(b <= a for a, b in zip(self.x, self.x[1:])):
            raise FilterServeError(f"calibration of {dimension!r}: x breakpoints must be strictly increasing, got {list(self.x)}")


@dataclass(frozen=True)
class FilterSpec:
    """A scoring filter: Triton name, dimensions in output order, weights, input and decision rules."""

    name: str
    dimensions: tuple[str, ...]
    weights: tuple[float, ...]
    max_length: int = 512
    description: str = ""
    # How an article becomes the model's input: the training dataset's format, never guessed.
    text_template: str = "{title}\n\n{content}"
    gatekeeper: Gatekeeper | None = None
    # (dimension, breakpoints) for the calibrated dimensions; the others pass through unchanged.
    calibration: tuple[tuple[str, Breakpoints], ...] = field(default=())

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
            if not math.isfinite(weight) or weight < 0:
                raise FilterServeError(f"weight of {dim!r} must be a finite non-negative number, got {weight}")
        if sum(self.weights) <= 0:
            raise FilterServeError(f"filter {self.name!r}: the weights sum to {sum(self.weights)}; the weighted average needs a positive sum")
        if self.max_length < 1:
            raise FilterServeError(f"max_length must be positive, got {self.max_length}")
        self._check_template()
        if self.gatekeeper is not None:
            for dim in (self.gatekeeper.dimension, *(d for d, _ in self.gatekeeper.unless)):
                if dim not in self.dimensions:
                    raise FilterServeError(f"gatekeeper names {dim!r}, which is not one of the dimensions {self.dimensions}")
        for dim, points in self.calibration:
            if dim not in self.dimensions:
                raise FilterServeError(f"calibration names {dim!r}, which is not one of the dimensions {self.dimensions}")
            points.check(dim)

    def _check_template(self) -> None:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(self.text_template) if f is not None]
        except ValueError as exc:
            raise FilterServeError(f"text_template {self.text_template!r} is not a format string: {exc}") from None
        unknown = [n for n in names if n not in TEMPLATE_FIELDS]
        if unknown or not names:
            raise FilterServeError(
                f"text_template {self.text_template!r} may only use {{title}} and {{content}} (and at least one of them)"
            )

    @property
    def num_labels(self) -> int:
        return len(self.dimensions)

    def input_text(self, title: object, content: object) -> str:
        """The model's input for an article; refuses an empty title or content, as the production scorer does."""
        for name, value in (("title", title), ("content", content)):
            if not isinstance(value, str):
                raise FilterServeError(f"bad input: {name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise FilterServeError(f"bad input: {name} is empty")
        return self.text_template.format(title=title, content=content)

    def with_calibration(self, path: str | Path) -> "FilterSpec":
        """This filter with the per-dimension breakpoints of a ``calibration.json``."""
        return replace(self, calibration=read_calibration(Path(path), self))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dimensions": [{"name": d, "weight": w} for d, w in zip(self.dimensions, self.weights)],
            "max_length": self.max_length,
            "description": self.description,
            "text_template": self.text_template,
            "gatekeeper": self.gatekeeper.to_dict() if self.gatekeeper else None,
            "calibration": {d: {"x": list(p.x), "y": list(p.y)} for d, p in self.calibration} or None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "filter description") -> "FilterSpec":
        try:
            dims = data["dimensions"]
            gatekeeper = data.get("gatekeeper")
            return cls(
                name=str(data["name"]),
                dimensions=tuple(str(d["name"]) for d in dims),
                weights=tuple(float(d["weight"]) for d in dims),
                max_length=int(data.get("max_length", 512)),
                description=str(data.get("description", "")),
                text_template=str(data.get("text_template", cls.text_template)),
                gatekeeper=Gatekeeper.from_dict(gatekeeper) if gatekeeper else None,
                calibration=_breakpoints(data.get("calibration") or {}, source),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FilterServeError(
                f"{source} is malformed ({type(exc).__name__}: {exc}); expected "
                '{"name": ..., "dimensions": [{"name": ..., "weight": ...}, ...], "max_length": 512, '
                '"text_template": "{title}\\n\\n{content}", "gatekeeper": {...} or null}'
            ) from None


def _breakpoints(data: dict[str, Any], source: str) -> tuple[tuple[str, Breakpoints], ...]:
    if not isinstance(data, dict):
        raise FilterServeError(f"{source}: calibration must map dimension names to {{\"x\": [...], \"y\": [...]}}")
    points = []
    for dim, xy in data.items():
        if not isinstance(xy, dict) or "x" not in xy or "y" not in xy:
            raise FilterServeError(f'{source}: calibration of {dim!r} must be {{"x": [...], "y": [...]}}, got {xy!r}')
        x = tuple(_number(v, f"calibration x of {dim!r}") for v in xy["x"])
        y = tuple(_number(v, f"calibration y of {dim!r}") for v in xy["y"])
        points.append((str(dim), Breakpoints(x, y)))
    return tuple(points)


def read_calibration(path: Path, spec: FilterSpec) -> tuple[tuple[str, Breakpoints], ...]:
    """``{"<dimension>": {"x": [...], "y": [...]}, ...}``: the production scorer's isotonic breakpoints."""
    data = read_json(path, "calibration file")
    calibration = _breakpoints(data, f"calibration file {path}")
    replace(spec, calibration=calibration)  # validates names and breakpoints against the filter
    return calibration


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
    # The filter's training dataset class and its production scorer join title and content with a
    # blank line; the card's "Article title. Article content..." is a placeholder, not the format.
    text_template="{title}\n\n{content}",
    # Uplifting v4's filter configuration, as its production scorer applies it: low collective
    # benefit caps the average at 3, unless the article is wondrous and not without benefit.
    gatekeeper=Gatekeeper(dimension="collective_benefit", below=5.0, cap=3.0,
                          unless=(("wonder", 7.0), ("collective_benefit", 3.0))),
)


def load_filter(path: str | Path | None, name: str | None = None) -> FilterSpec:
    """A filter description: ``None`` is uplifting v4; a folder is a model repository (its filter
    ``name``, which may be left out when it holds one); a file is a description or a filter record."""
    if path is None:
        return UPLIFTING_V4
    p = Path(path)
    if p.is_dir():
        return FilterSpec.from_dict(read_filter_record(p, name)["filter"], source=f"the record of {name or 'the filter'} in {p}")
    data = read_json(p, "filter description")
    if isinstance(data, dict) and "filter" in data and "dimensions" not in data:
        data = data["filter"]  # a filter record (<name>.filter.json) also works as a description
    if not isinstance(data, dict):
        raise FilterServeError(f"filter description {p} must be a JSON object")
    return FilterSpec.from_dict(data, source=f"filter description {p}")
