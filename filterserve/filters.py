"""Filter descriptions: what a model scores, how its input is written, and what consumers read.

The tools never hard-code uplifting's eight dimensions, its input template or its gatekeeper:
the export, the repository, the server, the client and the benchmarks all read them from a
:class:`FilterSpec`, so a 5-dimension sibling filter (or a retrained one with another rule)
works the same way.

The description holds the production scorer's whole rulebook (veen-systems/llm-distillery,
``filters/common/filter_base_scorer.py`` and the consuming service's normalization): input template
and head+tail cut, per-dimension calibration, clamp, weighted average, any number of gatekeepers,
an optional short-content cap, ordered tiers read on the calibrated raw average, and an optional
normalization of that average (ranking metadata, never a second cut). A filter
folder as it ships (config.yaml, base_scorer.py, calibration.json, normalization.json) is turned
into one by :mod:`filterserve.filter_folder`.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from filterserve.contract import NO_TIER_INDEX
from filterserve.errors import FilterServeError
from filterserve.head_tail import HEAD_TOKENS, SEPARATOR, TAIL_TOKENS, head_tail
from filterserve.manifest import read_json

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
    def from_dict(cls, data: dict[str, Any]) -> Gatekeeper:
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

    def check(self, what: str) -> None:
        """``what`` names the table in the message ("calibration of 'wonder'", "normalization")."""
        if len(self.x) != len(self.y) or len(self.x) < 2:
            raise FilterServeError(
                f"{what} needs as many x as y breakpoints, at least 2 (got {len(self.x)} and {len(self.y)})"
            )
        if any(b <= a for a, b in zip(self.x, self.x[1:])):
            raise FilterServeError(f"{what}: x breakpoints must be strictly increasing, got {list(self.x)[:12]}")


def breakpoints_from(xy: object, what: str) -> Breakpoints:
    """``{"x": [...], "y": [...]}`` (a calibration's dimension, a normalization) as checked breakpoints; ``what`` names it."""
    if not isinstance(xy, dict) or "x" not in xy or "y" not in xy:
        raise FilterServeError(f'{what} must be {{"x": [...], "y": [...]}}, got {xy!r}')
    if not isinstance(xy["x"], list) or not isinstance(xy["y"], list):
        raise FilterServeError(f"{what}: x and y must be lists of numbers")
    points = Breakpoints(
        tuple(_number(v, f"{what}: x") for v in xy["x"]), tuple(_number(v, f"{what}: y") for v in xy["y"])
    )
    points.check(what)
    return points


@dataclass(frozen=True)
class HeadTail:
    """The production filters' head+tail cut (their config.yaml ``preprocessing.head_tail``).

    An article longer than ``head_tokens + tail_tokens`` tokens (encoded without special tokens)
    is read as its first ``head_tokens`` and last ``tail_tokens`` tokens, decoded and joined by
    ``separator``; the result is then tokenized as usual. :mod:`filterserve.head_tail` holds the
    one implementation.
    """

    head_tokens: int = HEAD_TOKENS
    tail_tokens: int = TAIL_TOKENS
    separator: str = SEPARATOR

    def check(self) -> None:
        for what, value in (("head_tokens", self.head_tokens), ("tail_tokens", self.tail_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FilterServeError(f"head_tail {what} must be a positive whole number, got {value!r}")
        if not isinstance(self.separator, str):
            raise FilterServeError(f"head_tail separator must be a string, got {self.separator!r}")

    def apply(self, text: str, tokenizer: Any) -> tuple[str, bool]:
        """``(model text, whether it was cut)``; ``tokenizer``: a ``tokenizers.Tokenizer`` without truncation."""
        return head_tail(text, tokenizer, self.head_tokens, self.tail_tokens, self.separator)

    def to_dict(self) -> dict[str, Any]:
        return {"head_tokens": self.head_tokens, "tail_tokens": self.tail_tokens, "separator": self.separator}

    @classmethod
    def from_dict(cls, data: object) -> HeadTail:
        if not isinstance(data, dict):
            raise FilterServeError(f'head_tail must be {{"head_tokens": 256, "tail_tokens": 256, "separator": " [...] "}}, got {data!r}')
        made = cls(data.get("head_tokens", HEAD_TOKENS), data.get("tail_tokens", TAIL_TOKENS), data.get("separator", SEPARATOR))
        made.check()
        return made


@dataclass(frozen=True)
class Tier:
    """One entry of the ordered tier list: an article is in the first tier whose threshold its raw average reaches."""

    name: str
    threshold: float
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "threshold": self.threshold, "description": self.description}

    @classmethod
    def from_dict(cls, data: object) -> Tier:
        if not isinstance(data, dict) or "name" not in data or "threshold" not in data:
            raise FilterServeError(f'a tier must be {{"name": ..., "threshold": ..., "description": ...}}, got {data!r}')
        return cls(str(data["name"]), _number(data["threshold"], f"threshold of tier {data['name']!r}"), str(data.get("description", "")))


@dataclass(frozen=True)
class ShortContent:
    """The production scorer's short-content cap (config.yaml ``short_content: {min_chars, cap}``, #93).

    An article whose ``content_length`` (characters of its content, as
    ``BasePreFilter.content_length`` counts them) is below ``min_chars`` has its weighted average
    lowered to ``cap``: after the gatekeeper, before the tier, and on stage-1 rows as well
    (``FilterBaseScorer._apply_short_content_cap``). Without a ``cap`` there is no rule (None).
    """

    cap: float
    min_chars: float = 300.0

    def check(self) -> None:
        for what, value in (("cap", self.cap), ("min_chars", self.min_chars)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FilterServeError(f"short_content {what} must be a finite number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"cap": self.cap, "min_chars": self.min_chars}

    @classmethod
    def from_dict(cls, data: object) -> ShortContent | None:
        """``{"min_chars": 300, "cap": 2.0}``; a missing or null cap is no rule, as the scorer reads it."""
        if not isinstance(data, dict):
            raise FilterServeError(f'short_content must be {{"min_chars": 300, "cap": 2.0}}, got {data!r}')
        if data.get("cap") is None:
            return None
        made = cls(data["cap"], data.get("min_chars", 300.0))
        made.check()
        return cls(float(made.cap), float(made.min_chars))


# What the production scorer answers when no tier's threshold is reached (its ``_assign_tier``);
# the server's tier output is then contract.NO_TIER_INDEX.
NO_TIER = Tier("low", -math.inf, "No tier matched")
NORMALIZATION_METHODS = ("percentile", "linear")


@dataclass(frozen=True)
class Normalization:
    """The consuming service's normalization of the (gated, capped) weighted average: ranking metadata.

    ``percentile``: ``np.interp(average, x, y)`` (flat past the ends; a non-finite average → 0);
    ``linear``: ``min(10, average × score_scale_factor)``. The tier is not re-assigned on it: it
    stays the op-point tier of the calibrated raw average (ADR-022, NM#280), which is served as
    ``raw_weighted_average``.
    """

    method: str
    points: Breakpoints | None = None
    score_scale_factor: float | None = None

    def check(self) -> None:
        if self.method == "percentile":
            if self.points is None or self.score_scale_factor is not None:
                raise FilterServeError('a percentile normalization needs "x" and "y", and no score_scale_factor')
            self.points.check("normalization")
        elif self.method == "linear":
            if self.points is not None or self.score_scale_factor is None:
                raise FilterServeError("a linear normalization needs a score_scale_factor, and no x/y")
            if not math.isfinite(self.score_scale_factor) or self.score_scale_factor <= 0:
                raise FilterServeError(f"score_scale_factor must be a positive number, got {self.score_scale_factor}")
        else:
            raise FilterServeError(f"normalization method {self.method!r} is not one of {', '.join(NORMALIZATION_METHODS)}")

    def to_dict(self) -> dict[str, Any]:
        if self.points is not None:
            return {"method": self.method, "x": list(self.points.x), "y": list(self.points.y)}
        return {"method": self.method, "score_scale_factor": self.score_scale_factor}

    @classmethod
    def from_dict(cls, data: object) -> Normalization:
        if not isinstance(data, dict) or data.get("method") not in NORMALIZATION_METHODS:
            raise FilterServeError(
                'normalization must be {"method": "percentile", "x": [...], "y": [...]} or '
                f'{{"method": "linear", "score_scale_factor": ...}}, got {data!r}'[:300]
            )
        if data["method"] == "percentile":
            made = cls("percentile", points=breakpoints_from(data, "normalization"))
        else:
            made = cls("linear", score_scale_factor=_number(data.get("score_scale_factor"), "score_scale_factor"))
        made.check()
        return made

    @property
    def method_name(self) -> str:
        """The consumer's ``normalization_method`` for this rule (``"none"`` stands for no rule)."""
        return {"percentile": "percentile", "linear": "scale_factor"}[self.method]


# The consumer's normalization_method for a filter without a normalization.
NO_NORMALIZATION = "none"


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
    # Each caps the weighted average; together they cap it at the lowest cap that applies.
    gatekeepers: tuple[Gatekeeper, ...] = ()
    # (dimension, breakpoints) for the calibrated dimensions; the others pass through unchanged.
    calibration: tuple[tuple[str, Breakpoints], ...] = field(default=())
    # None: the text is truncated from the right only (what uplifting v4 was trained on).
    head_tail: HeadTail | None = None
    # In order: the first whose threshold the calibrated raw average (after the gatekeeper and the
    # short-content cap, before any normalization) reaches: the op-point decides once.
    tiers: tuple[Tier, ...] = ()
    normalization: Normalization | None = None
    # None: no short-content cap (every live filter today).
    short_content: ShortContent | None = None
    # The filter's version string as its scorer stamps it (base_scorer.py FILTER_VERSION, "3.0").
    version: str | None = None

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
            raise FilterServeError(
                f"filter {self.name!r}: the weights sum to {sum(self.weights)}; the weighted average needs a positive sum"
            )
        if self.max_length < 1:
            raise FilterServeError(f"max_length must be positive, got {self.max_length}")
        self._check_template()
        for rule in self.gatekeepers:
            for dim in (rule.dimension, *(d for d, _ in rule.unless)):
                if dim not in self.dimensions:
                    raise FilterServeError(f"gatekeeper names {dim!r}, which is not one of the dimensions {self.dimensions}")
        for dim, points in self.calibration:
            if dim not in self.dimensions:
                raise FilterServeError(f"calibration names {dim!r}, which is not one of the dimensions {self.dimensions}")
            points.check(f"calibration of {dim!r}")
        if self.head_tail is not None:
            self.head_tail.check()
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names) or not all(names):
            raise FilterServeError(f"filter {self.name!r}: tier names must be distinct and non-empty, got {names}")
        for tier in self.tiers:
            if not math.isfinite(tier.threshold):
                raise FilterServeError(f"threshold of tier {tier.name!r} must be finite, got {tier.threshold}")
        if self.normalization is not None:
            self.normalization.check()
        if self.short_content is not None:
            self.short_content.check()

    @property
    def normalization_method(self) -> str:
        """What the consumer stamps as ``normalization_method``: percentile, scale_factor or none."""
        return self.normalization.method_name if self.normalization else NO_NORMALIZATION

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
        """The joined article (the template); refuses an empty title or content, as the production scorer does.

        Before the model reads it, a head+tail filter cuts it: see :meth:`model_texts`.
        """
        for name, value in (("title", title), ("content", content)):
            if not isinstance(value, str):
                raise FilterServeError(f"bad input: {name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise FilterServeError(f"bad input: {name} is empty")
        return self.text_template.format(title=title, content=content)

    def model_texts(self, texts: list[str], tokenizer: Any) -> list[str]:
        """Joined articles as the model reads them: cut to head+tail where this filter says so.

        ``tokenizer``: the filter's transformers tokenizer, or a ``tokenizers.Tokenizer``. The
        result is then tokenized as usual (special tokens, max_length, truncation from the right).
        """
        if self.head_tail is None:
            return list(texts)
        counting = getattr(tokenizer, "backend_tokenizer", None)
        if counting is None:
            counting = tokenizer
        else:  # transformers sets its backend's truncation and padding anew on every call: clearing them changes none
            counting.no_truncation()
            counting.no_padding()
        return [self.head_tail.apply(text, counting)[0] for text in texts]

    def tier(self, index: int) -> Tier:
        """The tier the server's ``tier`` output names (:data:`NO_TIER_INDEX`: none reached)."""
        if index == NO_TIER_INDEX:
            return NO_TIER
        if not 0 <= index < len(self.tiers):
            raise FilterServeError(f"tier index {index} is outside filter {self.name!r}'s {len(self.tiers)} tiers")
        return self.tiers[index]

    def with_calibration(self, path: str | Path) -> FilterSpec:
        """This filter with the per-dimension breakpoints of a ``calibration.json`` (flat or nested)."""
        return replace(self, calibration=read_calibration(Path(path), self))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dimensions": [{"name": d, "weight": w} for d, w in zip(self.dimensions, self.weights)],
            "max_length": self.max_length,
            "description": self.description,
            "text_template": self.text_template,
            "head_tail": self.head_tail.to_dict() if self.head_tail else None,
            "gatekeepers": [g.to_dict() for g in self.gatekeepers],
            "calibration": {d: {"x": list(p.x), "y": list(p.y)} for d, p in self.calibration} or None,
            "normalization": self.normalization.to_dict() if self.normalization else None,
            "tiers": [t.to_dict() for t in self.tiers],
            "short_content": self.short_content.to_dict() if self.short_content else None,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "filter description") -> FilterSpec:
        """Also reads records written before head_tail, tiers, normalization, short_content and version (and with one ``gatekeeper``)."""
        try:
            dims = data["dimensions"]
            if "gatekeepers" in data:
                gatekeepers = tuple(Gatekeeper.from_dict(g) for g in data["gatekeepers"] or ())
            else:
                gatekeepers = (Gatekeeper.from_dict(data["gatekeeper"]),) if data.get("gatekeeper") else ()
            return cls(
                name=str(data["name"]),
                dimensions=tuple(str(d["name"]) for d in dims),
                weights=tuple(float(d["weight"]) for d in dims),
                max_length=int(data.get("max_length", 512)),
                description=str(data.get("description", "")),
                text_template=str(data.get("text_template", cls.text_template)),
                gatekeepers=gatekeepers,
                calibration=_breakpoints(data.get("calibration") or {}),
                head_tail=HeadTail.from_dict(data["head_tail"]) if data.get("head_tail") else None,
                tiers=tuple(Tier.from_dict(t) for t in data.get("tiers") or ()),
                normalization=Normalization.from_dict(data["normalization"]) if data.get("normalization") else None,
                short_content=ShortContent.from_dict(data["short_content"]) if data.get("short_content") else None,
                version=None if data.get("version") is None else str(data["version"]),
            )
        except FilterServeError as exc:
            raise FilterServeError(f"{source}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FilterServeError(
                f"{source} is malformed ({type(exc).__name__}: {exc}); expected "
                '{"name": ..., "dimensions": [{"name": ..., "weight": ...}, ...], "max_length": 512, '
                '"text_template": "{title}\\n\\n{content}", "head_tail": {...} or null, "gatekeepers": [...], '
                '"tiers": [{"name": ..., "threshold": ..., "description": ...}, ...], "normalization": {...} or null}'
            ) from None


def _breakpoints(data: dict[str, Any]) -> tuple[tuple[str, Breakpoints], ...]:
    if not isinstance(data, dict):
        raise FilterServeError('calibration must map dimension names to {"x": [...], "y": [...]}')
    return tuple((str(dim), breakpoints_from(xy, f"calibration of {dim!r}")) for dim, xy in data.items())


def calibration_dimensions(data: object, source: str) -> dict[str, Any]:
    """The per-dimension breakpoints of a calibration file, in either format.

    The production scorer's files nest them beside metadata, ``{"method": "isotonic", "fitted_on":
    ..., "n_samples": ..., "dimensions": {dim: {"x": [...], "y": [...]}}, "stats": ...}``;
    filterserve's earlier flat format is ``{dim: {"x": [...], "y": [...]}}``.
    """
    if not isinstance(data, dict):
        raise FilterServeError(f"{source} must be a JSON object")
    if isinstance(data.get("dimensions"), dict):
        method = data.get("method", "isotonic")
        if method != "isotonic":
            raise FilterServeError(f"{source}: calibration method {method!r} is not supported (the production scorer's is 'isotonic')")
        return data["dimensions"]
    return data


def read_calibration(path: Path, spec: FilterSpec) -> tuple[tuple[str, Breakpoints], ...]:
    """A ``calibration.json`` (nested or flat, see :func:`calibration_dimensions`): isotonic breakpoints per dimension."""
    source = f"calibration file {path}"
    data = calibration_dimensions(read_json(path, "calibration file"), source)
    try:
        calibration = _breakpoints(data)
        replace(spec, calibration=calibration)  # validates names and breakpoints against the filter
    except FilterServeError as exc:
        raise FilterServeError(f"{source}: {exc}") from None
    return calibration


# Uplifting v4's rules. Sources (veen-systems/llm-distillery unless said otherwise):
UPLIFTING_V4 = FilterSpec(
    name="uplifting_v4",
    # Output order of the score head: the model card's table, the filter's training code.
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
    # filters/uplifting/v4/config.yaml, scoring.dimensions.*.weight: justice 0.04 and resilience 0.02
    # (the card's 0.03/0.03 are called "WRONG" by docs/reports/postfilter_verification_2025-11-17.md,
    # which names config.yaml the source of truth).
    weights=(0.14, 0.19, 0.38, 0.10, 0.08, 0.04, 0.02, 0.05),
    # FilterBaseScorer.MAX_TOKEN_LENGTH (filters/common/filter_base_scorer.py) and the card.
    max_length=512,
    description="Uplifting v4 (knowledge distillation): Qwen2.5-1.5B + LoRA, 8 regression scores",
    # The filter's training dataset class and its production scorer join title and content with a
    # blank line; the card's "Article title. Article content..." is a placeholder, not the format.
    text_template="{title}\n\n{content}",
    # filters/uplifting/v4/config.yaml, scoring.dimensions.collective_benefit: gatekeeper_threshold 5,
    # gatekeeper_max_score 3, and gatekeeper_exception (wonder >= 7 with collective_benefit >= 3).
    gatekeepers=(Gatekeeper(dimension="collective_benefit", below=5.0, cap=3.0,
                            unless=(("wonder", 7.0), ("collective_benefit", 3.0))),),
    # filters/uplifting/v4/config.yaml has no preprocessing section: v4 reads the first 512 tokens.
    head_tail=None,
    # filters/uplifting/v4/config.yaml, scoring.tiers, in its order.
    tiers=(
        Tier("impact", 7.0, "High-impact solutions and progress"),
        Tier("connection", 4.0, "Moderate collective benefit or connection"),
        Tier("not_uplifting", 0.0, "Low collective benefit"),
    ),
    # filters/uplifting/v4/config.yaml, filter.version.
    version="4.0",
)
