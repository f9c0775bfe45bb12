"""A production filter folder as it ships, read into a :class:`FilterSpec` without running any of it.

The production filters (veen-systems/llm-distillery, ``filters/<name>/v<N>/``) keep their rules in
several files, and the production system reads them this way:

- ``base_scorer.py``: the module constants ``DIMENSION_NAMES`` (the score head's output order),
  ``DIMENSION_WEIGHTS``, ``TIER_THRESHOLDS`` (ordered ``(name, threshold, description)``) and
  ``GATEKEEPER_DIMENSION`` / ``GATEKEEPER_MIN`` / ``GATEKEEPER_CAP``, which
  ``filters/common/filter_base_scorer.py`` applies. The repository calls it the runtime source:
  no scoring code reads config.yaml's tiers, and config.yaml has shipped stale values (a tier of
  3.75 against a live 4.0). It is read here with :mod:`ast`, never imported or executed (it
  imports torch and the filter's prefilter).
- ``config.yaml``: documentation, except ``preprocessing.head_tail`` and ``short_content``, which
  the base scorer does read (``_load_preprocessing_config``), and ``scoring.score_scale_factor``, the consuming
  service's fallback normalization. Everything else in it is compared with base_scorer.py, and
  every disagreement is reported; base_scorer.py wins. A folder without base_scorer.py (uplifting
  v4's, from before the common scorer) takes its rules from config.yaml alone, gatekeeper
  exception included.
- ``calibration.json``: per-dimension isotonic breakpoints, nested under ``"dimensions"``;
  dimensions it lacks are not calibrated, as the base scorer does.
- ``normalization.json``: the consuming service's percentile lookup of the weighted average. That
  service (NexusMind's ``production_scorer.py``, as llm-distillery's ADR-018, its amendment and
  ``scripts/normalization/fit_normalization.py`` mirror it) uses it only when it holds at least
  200 articles and its ``stats.raw_min`` is at most 4.5; otherwise a ``score_scale_factor`` other
  than 1.0 in config.yaml applies (``min(10, average × factor)``); otherwise nothing.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filterserve.errors import FilterServeError
from filterserve.filters import (
    Breakpoints,
    FilterSpec,
    Gatekeeper,
    HeadTail,
    Normalization,
    ShortContent,
    Tier,
    breakpoints_from,
    calibration_dimensions,
)
from filterserve.head_tail import HEAD_TOKENS, SEPARATOR, TAIL_TOKENS
from filterserve.manifest import read_json

CONFIG, BASE_SCORER, CALIBRATION, NORMALIZATION = "config.yaml", "base_scorer.py", "calibration.json", "normalization.json"
CONSTANTS = (
    "FILTER_NAME",
    "FILTER_VERSION",
    "DIMENSION_NAMES",
    "DIMENSION_WEIGHTS",
    "TIER_THRESHOLDS",
    "GATEKEEPER_DIMENSION",
    "GATEKEEPER_MIN",
    "GATEKEEPER_CAP",
    "MAX_TOKEN_LENGTH",
)
# FilterBaseScorer's defaults for what a filter's base scorer may leave out.
DEFAULT_GATEKEEPER_MIN = DEFAULT_GATEKEEPER_CAP = 0.0
DEFAULT_MAX_LENGTH = 512
# The production scorer's input: FilterBaseScorer.score_article joins title and content so.
PRODUCTION_TEMPLATE = "{title}\n\n{content}"
# The consuming service's load guards on normalization.json (ADR-018 and its 2026-05-19 amendment).
MIN_NORMALIZATION_ARTICLES = 200
MAX_NORMALIZATION_RAW_MIN = 4.5
_CLOSE = 1e-9


def is_filter_folder(path: Path) -> bool:
    """A folder shaped like a production filter (not a model repository)."""
    return (path / CONFIG).is_file() or (path / BASE_SCORER).is_file()


@dataclass(frozen=True)
class FilterFolder:
    """The filter a folder describes, where its files disagree, and what was chosen and why."""

    path: Path
    spec: FilterSpec
    disagreements: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def report(self) -> list[str]:
        """One line per disagreement, then one per note, each naming the folder."""
        return [f"{self.path}: DISAGREEMENT: {d}" for d in self.disagreements] + [f"{self.path}: {n}" for n in self.notes]


def read_constants(path: Path) -> dict[str, tuple[Any, int]]:
    """``name → (literal value, line)`` for every constant of :data:`CONSTANTS` the file assigns.

    A name assigned twice (two classes, a subclass overriding its parent) is refused: which one
    runs cannot be told without running the file.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise FilterServeError(f"{path} is not valid Python (line {exc.lineno}: {exc.msg})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FilterServeError(f"cannot read {path}: {exc}") from None
    found: dict[str, tuple[Any, int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            if not (isinstance(target, ast.Name) and target.id in CONSTANTS):
                continue
            if target.id in found:
                raise FilterServeError(
                    f"{path} assigns {target.id} twice (lines {found[target.id][1]} and {node.lineno}): "
                    "which one the scorer uses cannot be told without running it"
                )
            try:
                found[target.id] = (ast.literal_eval(value), node.lineno)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise FilterServeError(
                    f"{path} line {node.lineno}: {target.id} is not a literal (it is read, never run)"
                ) from None
    return found


def read_config(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise FilterServeError(f"reading {path} needs PyYAML: pip install 'filterserve[export]'") from None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FilterServeError(f"{path} is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FilterServeError(f"cannot read {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FilterServeError(f"{path} must be a YAML mapping, not {type(data).__name__}")
    return data


def _section(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    found: object = data
    for key in keys:
        found = found.get(key) if isinstance(found, dict) else None
    return found if isinstance(found, dict) else {}


def _num(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FilterServeError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= _CLOSE


def _triton_name(name: str, version: str | None) -> str:
    """``uplifting`` + ``7.0`` → ``uplifting_v7``; ``7.1`` → ``uplifting_v7_1``."""
    if version:
        parts = str(version).split(".")
        while len(parts) > 1 and parts[-1] == "0":
            parts.pop()
        name = f"{name}_v{'_'.join(parts)}"
    name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return name if re.match(r"^[A-Za-z_]", name) else f"filter_{name}"


class _Reader:
    """Collects the rules of one folder, with every disagreement and note along the way."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.disagreements: list[str] = []
        self.notes: list[str] = []
        self.config = read_config(path / CONFIG) if (path / CONFIG).is_file() else {}
        self.constants = read_constants(path / BASE_SCORER) if (path / BASE_SCORER).is_file() else None
        if not (path / CONFIG).is_file():
            self.notes.append(f"no {CONFIG}: head+tail off and no score_scale_factor, as the base scorer does without it")
        if self.constants is None:
            self.notes.append(f"no {BASE_SCORER}: every rule comes from {CONFIG}")

    def constant(self, name: str) -> Any:
        return self.constants[name][0] if self.constants and name in self.constants else None

    def differ(self, what: str, ours: object, theirs: object) -> None:
        self.disagreements.append(
            f"{what}: {BASE_SCORER} has {ours!r}, {CONFIG} has {theirs!r}; using {BASE_SCORER}'s (the runtime source)"
        )

    # --- dimensions and weights

    def dimensions(self) -> tuple[tuple[str, ...], tuple[float, ...]]:
        config_dims = _section(self.config, "scoring", "dimensions")
        config_weights = {d: v.get("weight") for d, v in config_dims.items() if isinstance(v, dict)}
        if self.constants is None:
            if not config_dims:
                raise FilterServeError(f"{self.path / CONFIG} has no scoring.dimensions (and there is no {BASE_SCORER})")
            return tuple(config_dims), tuple(_num(w, f"{CONFIG} weight of {d!r}") for d, w in config_weights.items())
        names = self.constant("DIMENSION_NAMES")
        weights = self.constant("DIMENSION_WEIGHTS")
        source = self.path / BASE_SCORER
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise FilterServeError(f"{source} defines no DIMENSION_NAMES list of names")
        if not isinstance(weights, dict):
            raise FilterServeError(f"{source} defines no DIMENSION_WEIGHTS mapping")
        missing = [n for n in names if n not in weights]
        if missing:
            raise FilterServeError(f"{source}: DIMENSION_WEIGHTS has no weight for {missing} (the scorer would fail on them)")
        extra = [d for d in weights if d not in names]
        if extra:
            self.notes.append(f"{BASE_SCORER}: DIMENSION_WEIGHTS also weighs {extra}, which are not in DIMENSION_NAMES: "
                              "ignored, as the scorer does")
        values = tuple(_num(weights[n], f"{source} weight of {n!r}") for n in names)
        if config_dims and list(config_dims) != list(names):
            self.differ("the dimensions (the score head's output order)", list(names), list(config_dims))
        for name, value in zip(names, values):
            configured = config_weights.get(name)
            if configured is not None and not _same(float(configured), value):
                self.differ(f"the weight of {name}", value, configured)
        total = sum(values)
        if not _same(total, 1.0):
            self.notes.append(
                f"the weights sum to {total:g}: the production scorer's weighted sum is not divided by it, filterserve's "
                "weighted average is"
            )
        return tuple(names), values

    # --- tiers

    def tiers(self) -> tuple[Tier, ...]:
        config_tiers = []
        for name, entry in _section(self.config, "scoring", "tiers").items():
            if isinstance(entry, dict) and "threshold" in entry:
                config_tiers.append(Tier(str(name), _num(entry["threshold"], f"{CONFIG} threshold of tier {name!r}"),
                                         str(entry.get("description", ""))))
        if self.constants is None:
            return tuple(config_tiers)
        listed = self.constant("TIER_THRESHOLDS")
        source = self.path / BASE_SCORER
        if not isinstance(listed, (list, tuple)) or not listed:
            raise FilterServeError(f"{source} defines no TIER_THRESHOLDS list of (name, threshold, description)")
        tiers = []
        for entry in listed:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3 or not isinstance(entry[0], str):
                raise FilterServeError(f"{source}: every TIER_THRESHOLDS entry must be (name, threshold, description), got {entry!r}")
            tiers.append(Tier(entry[0], _num(entry[1], f"{source} threshold of tier {entry[0]!r}"), str(entry[2])))
        if config_tiers:
            ours = [(t.name, t.threshold) for t in tiers]
            theirs = [(t.name, t.threshold) for t in config_tiers]
            if [n for n, _ in ours] != [n for n, _ in theirs]:
                self.differ("the tiers", ours, theirs)
            else:
                for mine, other in zip(tiers, config_tiers):
                    if not _same(mine.threshold, other.threshold):
                        self.differ(f"the threshold of tier {mine.name}", mine.threshold, other.threshold)
                    if mine.description != other.description:
                        self.differ(f"the description of tier {mine.name}", mine.description, other.description)
        return tuple(tiers)

    # --- gatekeepers

    def _config_gatekeepers(self) -> list[Gatekeeper]:
        found: list[Gatekeeper] = []
        for name, entry in _section(self.config, "scoring", "gatekeepers").items():
            if isinstance(entry, dict) and {"dimension", "threshold", "max_score"} <= set(entry):
                found.append(Gatekeeper(str(entry["dimension"]), _num(entry["threshold"], f"{CONFIG} gatekeeper {name} threshold"),
                                        _num(entry["max_score"], f"{CONFIG} gatekeeper {name} max_score")))
        for dim, entry in _section(self.config, "scoring", "dimensions").items():
            if not (isinstance(entry, dict) and entry.get("gatekeeper")
                    and "gatekeeper_threshold" in entry and "gatekeeper_max_score" in entry):
                continue
            unless: tuple[tuple[str, float], ...] = ()
            exception = entry.get("gatekeeper_exception")
            if isinstance(exception, dict) and "dimension" in exception and "threshold" in exception:
                unless = ((str(exception["dimension"]), _num(exception["threshold"], f"{CONFIG} gatekeeper_exception threshold")),)
                if "min_collective_benefit" in exception:  # uplifting v4's name for the gated dimension's own floor
                    unless += ((str(dim), _num(exception["min_collective_benefit"], f"{CONFIG} gatekeeper_exception floor")),)
            rule = Gatekeeper(str(dim), _num(entry["gatekeeper_threshold"], f"{CONFIG} {dim} gatekeeper_threshold"),
                              _num(entry["gatekeeper_max_score"], f"{CONFIG} {dim} gatekeeper_max_score"), unless)
            same = [g for g in found if (g.dimension, g.below, g.cap) == (rule.dimension, rule.below, rule.cap)]
            if same:
                found[found.index(same[0])] = rule if rule.unless else same[0]
            else:
                found.append(rule)
        return found

    def gatekeepers(self) -> tuple[Gatekeeper, ...]:
        configured = self._config_gatekeepers()
        if self.constants is None:
            return tuple(configured)
        dimension = self.constant("GATEKEEPER_DIMENSION")
        source = self.path / BASE_SCORER
        ours: tuple[Gatekeeper, ...] = ()
        if dimension is not None:
            if not isinstance(dimension, str):
                raise FilterServeError(f"{source}: GATEKEEPER_DIMENSION must be a dimension name or None, got {dimension!r}")
            below = self.constant("GATEKEEPER_MIN")
            cap = self.constant("GATEKEEPER_CAP")
            ours = (Gatekeeper(
                dimension,
                DEFAULT_GATEKEEPER_MIN if below is None else _num(below, f"{source} GATEKEEPER_MIN"),
                DEFAULT_GATEKEEPER_CAP if cap is None else _num(cap, f"{source} GATEKEEPER_CAP"),
            ),)

        def plain(rules) -> list[tuple[str, float, float]]:
            return sorted((g.dimension, g.below, g.cap) for g in rules)

        if (configured or _section(self.config, "scoring")) and plain(ours) != plain(configured):
            self.differ("the gatekeepers (dimension, below, cap)", plain(ours), plain(configured))
        for rule in configured:
            if rule.unless:
                self.disagreements.append(
                    f"{CONFIG} gives the {rule.dimension} gatekeeper an exception {dict(rule.unless)}, which the base "
                    f"scorer's gatekeeper does not apply; not applied"
                )
        return ours

    # --- input

    def head_tail(self) -> HeadTail | None:
        entry = _section(self.config, "preprocessing", "head_tail")
        if not entry.get("enabled", False):
            return None
        made = HeadTail(entry.get("head_tokens", HEAD_TOKENS), entry.get("tail_tokens", TAIL_TOKENS), entry.get("separator", SEPARATOR))
        try:
            made.check()
        except FilterServeError as exc:
            raise FilterServeError(f"{self.path / CONFIG} preprocessing: {exc}") from None
        return made

    def short_content(self) -> ShortContent | None:
        """config.yaml ``short_content: {min_chars, cap}``: off without a cap (``_load_short_content_config``)."""
        entry = self.config.get("short_content")
        if not entry:
            return None
        try:
            made = ShortContent.from_dict(entry)
        except FilterServeError as exc:
            raise FilterServeError(f"{self.path / CONFIG} {exc}") from None
        if made is not None:
            self.notes.append(f"short-content cap: content under {made.min_chars:g} characters caps the average at {made.cap:g}")
        return made

    def max_length(self) -> int:
        value = self.constant("MAX_TOKEN_LENGTH")
        if value is None:
            return DEFAULT_MAX_LENGTH
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise FilterServeError(f"{self.path / BASE_SCORER}: MAX_TOKEN_LENGTH must be a positive whole number, got {value!r}")
        return value

    def identity(self) -> tuple[str, str]:
        """The Triton name (``<FILTER_NAME>_v<major>``) and the description."""
        info = _section(self.config, "filter")
        name, version = self.constant("FILTER_NAME"), self.constant("FILTER_VERSION")
        if self.constants is not None:
            for what, ours, key in (("FILTER_NAME", name, "name"), ("FILTER_VERSION", version, "version")):
                theirs = info.get(key)
                if ours is not None and theirs is not None and str(ours) != str(theirs):
                    self.differ(f"the filter's {key} ({what})", ours, theirs)
        name = name if name is not None else info.get("name", self.path.name)
        version = version if version is not None else info.get("version")
        self.filter_name, self.filter_version = str(name), None if version is None else str(version)
        return _triton_name(str(name), None if version is None else str(version)), str(info.get("description", ""))

    # --- calibration and normalization

    def _metadata_check(self, file: str, data: dict[str, Any]) -> None:
        for key, ours in (("filter_name", self.filter_name), ("filter_version", self.filter_version)):
            theirs = data.get(key)
            # The production fitter matches names with hyphens and underscores alike ("investment-risk").
            if theirs is not None and ours is not None and str(theirs).replace("-", "_") != ours.replace("-", "_"):
                self.disagreements.append(f"{file} was fitted for {key} {theirs!r}, the filter is {ours!r}; "
                                          "applied all the same, as the scorer does")

    def calibration(self, dimensions: tuple[str, ...]) -> tuple[tuple[str, Breakpoints], ...]:
        path = self.path / CALIBRATION
        if not path.is_file():
            return ()
        data = read_json(path, "calibration file")
        per_dim = calibration_dimensions(data, f"calibration file {path}")
        if isinstance(data.get("dimensions"), dict):
            self._metadata_check(CALIBRATION, data)
        points = []
        for dim, xy in per_dim.items():
            if dim not in dimensions:
                self.notes.append(f"{CALIBRATION} calibrates {dim!r}, which is not a dimension: ignored, as the scorer does")
                continue
            try:
                points.append((dim, breakpoints_from(xy, f"calibration of {dim!r}")))
            except FilterServeError as exc:
                raise FilterServeError(f"calibration file {path}: {exc}") from None
        uncalibrated = [d for d in dimensions if d not in per_dim]
        if uncalibrated:
            self.notes.append(f"{CALIBRATION} has no breakpoints for {uncalibrated}: not calibrated, as the scorer does")
        return tuple(points)

    def normalization(self) -> Normalization | None:
        path = self.path / NORMALIZATION
        factor = _section(self.config, "scoring").get("score_scale_factor")
        reason = f"no {NORMALIZATION}"
        if path.is_file():
            data = read_json(path, "normalization file")
            if not isinstance(data, dict):
                raise FilterServeError(f"normalization file {path} must be a JSON object")
            self._metadata_check(NORMALIZATION, data)
            usable, reason = self._percentile_usable(data)
            if usable:
                try:
                    made = Normalization("percentile", points=breakpoints_from(data, "normalization"))
                except FilterServeError as exc:
                    raise FilterServeError(f"normalization file {path}: {exc}") from None
                self.notes.append(f"normalization: percentile lookup from {NORMALIZATION} ({data.get('n_articles')} articles)")
                return made
        if factor is not None and not _same(_num(factor, f"{CONFIG} score_scale_factor"), 1.0):
            self.notes.append(f"normalization: {reason}, so score_scale_factor {factor} from {CONFIG} applies, min(10, average × {factor})")
            return Normalization("linear", score_scale_factor=float(factor))
        if path.is_file():
            self.notes.append(f"normalization: none ({reason}, and no score_scale_factor other than 1.0)")
        return None

    @staticmethod
    def _percentile_usable(data: dict[str, Any]) -> tuple[bool, str]:
        """The consuming service's load guards: percentile method, x/y present, enough articles, raw_min in range."""
        if data.get("method", "percentile") != "percentile":
            return False, f"{NORMALIZATION} has method {data.get('method')!r}, not 'percentile'"
        if "x" not in data or "y" not in data:
            return False, f"{NORMALIZATION} has no x/y lookup"
        n_articles = data.get("n_articles")
        if not isinstance(n_articles, (int, float)) or n_articles < MIN_NORMALIZATION_ARTICLES:
            return False, f"{NORMALIZATION} holds {n_articles} articles (the service needs at least {MIN_NORMALIZATION_ARTICLES})"
        stats = data.get("stats")
        if not isinstance(stats, dict):
            stats = {}
        raw_min = stats.get("raw_min", data["x"][0] if isinstance(data["x"], list) and data["x"] else None)
        if not isinstance(raw_min, (int, float)) or not math.isfinite(raw_min) or raw_min > MAX_NORMALIZATION_RAW_MIN:
            return False, f"{NORMALIZATION} has raw_min {raw_min} (the service refuses one above {MAX_NORMALIZATION_RAW_MIN})"
        return True, ""


def read_filter_folder(path: str | Path) -> FilterFolder:
    """The filter a production folder describes; see the module docstring for which file gives what."""
    path = Path(path)
    if not path.is_dir() or not is_filter_folder(path):
        raise FilterServeError(f"{path} is not a filter folder: it holds neither {CONFIG} nor {BASE_SCORER}")
    reader = _Reader(path)
    name, description = reader.identity()
    dimensions, weights = reader.dimensions()
    try:
        spec = FilterSpec(
            name=name,
            dimensions=dimensions,
            weights=weights,
            max_length=reader.max_length(),
            description=description,
            text_template=PRODUCTION_TEMPLATE,
            gatekeepers=reader.gatekeepers(),
            calibration=reader.calibration(dimensions),
            head_tail=reader.head_tail(),
            tiers=reader.tiers(),
            normalization=reader.normalization(),
            short_content=reader.short_content(),
            version=reader.filter_version,
        )
    except FilterServeError as exc:
        raise FilterServeError(f"filter folder {path}: {exc}") from None
    return FilterFolder(path, spec, tuple(reader.disagreements), tuple(reader.notes))
