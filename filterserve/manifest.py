"""The model repository's records: which filters it holds, and each filter's export record.

A repository holds any number of filters side by side::

    REPO/filterserve.json        {"format": "filterserve.repository/1", "filters": {"<name>": "<name>.filter.json"}}
    REPO/<name>.filter.json      one filter's record: description, models, sources, versions, parity, gate
    REPO/<model>/config.pbtxt    Triton model folders; each belongs to exactly one filter's record
                                 or one group's
    REPO/<group>.group.json      a shared-base group (its tensor model serves every member filter
                                 of one base); listed under "groups" in filterserve.json

Triton skips files at the repository root, so the records travel with the models. Every record
is replaced with one ``os.replace``: a reader sees the old file or the new one, never half of
either. Every problem with these files (missing, unreadable, not JSON, not a JSON object) is a
:class:`FilterServeError` naming the file.

This module reads and writes only JSON, so the client-only install can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import MappingProxyType, UnionType
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from filterserve.errors import FilterServeError

REPOSITORY_MANIFEST = "filterserve.json"
REPOSITORY_FORMAT = "filterserve.repository/1"
FILTER_FORMAT = "filterserve.manifest/1"
GROUP_FORMAT = "filterserve.group/1"
EMBEDDER_FORMAT = "filterserve.embedder/1"


def filter_record_name(name: str) -> str:
    return f"{name}.filter.json"


def read_text(path: Path, what: str) -> str:
    """A file the user gave or an export wrote; unreadable or not UTF-8 is one line naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FilterServeError(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise FilterServeError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


def read_json(path: Path, what: str) -> Any:
    """A JSON file; missing, unreadable or not JSON is one line naming it."""
    if not path.is_file():
        raise FilterServeError(f"{what} not found: {path}")
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise FilterServeError(f"{what} {path} is not valid JSON: {exc}") from None


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """:func:`read_json` for files whose fields are read by name: a list or a number there is refused."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise FilterServeError(f"{what} {path} must be a JSON object, not {type(data).__name__}")
    return data


def write_json_atomic(path: Path, data: Any) -> None:
    """Write beside ``path``, flush to disk, then rename over it: a crash leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def is_repository(repo: Path) -> bool:
    """A folder that a filterserve export wrote."""
    return (repo / REPOSITORY_MANIFEST).is_file()


def repository_filters(repo: Path) -> dict[str, str]:
    """Filter name → its record's file name."""
    index_path = repo / REPOSITORY_MANIFEST
    if not index_path.is_file():
        raise FilterServeError(f"{repo} is not a filterserve model repository: {REPOSITORY_MANIFEST} is missing")
    filters = read_json_object(index_path, "repository manifest").get("filters")
    if not isinstance(filters, dict) or not all(isinstance(v, str) for v in filters.values()):
        raise FilterServeError(f"{index_path} is malformed: expected {{\"filters\": {{\"<name>\": \"<name>.filter.json\"}}}}")
    return dict(filters)


def pick_filter(repo: Path, filters: dict[str, str], name: str | None) -> str:
    """The named filter, or the only one; a repository of several needs a name."""
    if name is None:
        if len(filters) == 1:
            return next(iter(filters))
        raise FilterServeError(
            f"{repo} holds {len(filters)} filters ({', '.join(sorted(filters)) or 'none'}); name one"
        )
    if name not in filters:
        raise FilterServeError(f"{repo} holds no filter {name!r}; it holds: {', '.join(sorted(filters)) or 'none'}")
    return name


def read_filter_record(repo: Path, name: str | None = None) -> FilterRecord:
    """One filter's record (``name`` may be left out when the repository holds one filter)."""
    filters = repository_filters(repo)
    return FilterRecord.read(repo / filters[pick_filter(repo, filters, name)])


def read_filter_records(repo: Path) -> dict[str, FilterRecord]:
    """Every filter's record, by name."""
    return {name: FilterRecord.read(repo / file) for name, file in sorted(repository_filters(repo).items())}


def read_repository(repo: Path) -> tuple[dict[str, FilterRecord], dict[str, GroupRecord]]:
    """Every filter's record and every group's, by name; none where ``repo`` is not (yet) a repository."""
    if not repo.is_dir() or not is_repository(repo):
        return {}, {}
    return read_filter_records(repo), read_group_records(repo)


def group_record_name(group: str) -> str:
    return f"{group}.group.json"


def _index_section(repo: Path, key: str, example: str) -> dict[str, str]:
    """Name → record file under ``key`` in the repository manifest (none when absent)."""
    index_path = repo / REPOSITORY_MANIFEST
    if not index_path.is_file():
        return {}
    section = read_json_object(index_path, "repository manifest").get(key, {})
    if not isinstance(section, dict) or not all(isinstance(v, str) for v in section.values()):
        raise FilterServeError(f"{index_path} is malformed: expected {{\"{key}\": {{{example}}}}}")
    return dict(section)


def repository_groups(repo: Path) -> dict[str, str]:
    """Shared-base group name → its record's file name (none in a repository of merged filters only)."""
    return _index_section(repo, "groups", '"<group>": "<group>.group.json"')


def read_group_records(repo: Path) -> dict[str, GroupRecord]:
    """Every shared-base group's record, by name: its members, in filter_index order, and its tensor model."""
    return {name: GroupRecord.read(repo / file) for name, file in sorted(repository_groups(repo).items())}


def embedder_record_name(name: str) -> str:
    return f"{name}.embedder.json"


def repository_embedders(repo: Path) -> dict[str, str]:
    """Stage-1 embedder name → its record's file name (none in a repository without a hybrid filter)."""
    return _index_section(repo, "embedders", '"<name>": "<name>.embedder.json"')


def read_embedder_records(repo: Path) -> dict[str, EmbedderRecord]:
    """The repository's stage-1 embedder record, by name (at most one: docs/export.md, "Stage 1")."""
    return {name: EmbedderRecord.read(repo / file) for name, file in sorted(repository_embedders(repo).items())}


def repository_index(filters: Iterable[str], groups: dict[str, str], embedders: dict[str, str] | None = None) -> dict[str, Any]:
    """The repository manifest: every filter's record, and (when there are any) every shared-base group's
    and the stage-1 embedder's."""
    index: dict[str, Any] = {"format": REPOSITORY_FORMAT, "filters": {n: filter_record_name(n) for n in sorted(filters)}}
    if groups:
        index["groups"] = dict(sorted(groups.items()))
    if embedders:
        index["embedders"] = dict(sorted(embedders.items()))
    return index


# ---------------------------------------------------------------------------------------------
# The records, typed. One reader (``read``/``from_json``) and one writer (``to_json``) for each:
# an export builds these values, a commit writes them, every reader gets them back checked.
#
# A field whose metadata says OPTIONAL is left out of the file when it is None (a merged filter has
# no "group", a group member no "latency_ms_batch1"); keys a record holds that this version does not
# know are kept in ``extra`` and written back unchanged. Records written before a field existed read
# with its default, so every repository written since format 1 reads as it is: no migration.

OPTIONAL: Mapping[str, bool] = MappingProxyType({"optional": True})


def to_json(value: Any) -> Any:
    """A record (or any part of one) as the JSON it is written as."""
    if is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in fields(value):
            item = getattr(value, f.name)
            if f.name == "extra" or (item is None and f.metadata.get("optional")):
                continue
            out[f.name] = to_json(item)
        out |= dict(getattr(value, "extra", {}))
        return {"format": out.pop("format"), **out} if "format" in out else out
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


class _MalformedField(Exception):
    """A field of a record that is missing or of the wrong type; :func:`from_json` names the file."""

    def __init__(self, where: str, expected: str) -> None:
        super().__init__(f"{where} must be {expected}")


class _MissingField(_MalformedField):
    def __init__(self, where: str, kind: Any) -> None:
        shape = "object" if get_origin(kind) is dict or (isinstance(kind, type) and is_dataclass(kind)) else "value"
        Exception.__init__(self, f"it has no \"{where}\" {shape}")


def _decode(kind: Any, value: Any, where: str) -> Any:
    """``value`` read as ``kind`` (a record class, ``X | None``, ``dict[str, X]``, ``list[X]``, a scalar)."""
    origin, args = get_origin(kind), get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where)
    if isinstance(kind, type) and is_dataclass(kind):
        if not isinstance(value, dict):
            raise _MalformedField(where, f"a JSON object, not {type(value).__name__}")
        return _decode_record(kind, value, where)
    if origin is dict:
        if not isinstance(value, dict):
            raise _MalformedField(where, f"a JSON object, not {type(value).__name__}")
        return {k: _decode(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _MalformedField(where, f"a list, not {type(value).__name__}")
        items = [_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(kind, type) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise _MalformedField(where, f"{getattr(kind, '__name__', kind)}, not {type(value).__name__}")


R = TypeVar("R")


def _decode_record(cls: type[R], data: dict[str, Any], where: str) -> R:
    hints = get_type_hints(cls)
    known, values = set(), {}
    for f in fields(cls):  # type: ignore[arg-type]  # cls is a dataclass (checked by the callers)
        if f.name == "extra":
            continue
        known.add(f.name)
        if f.name in data:
            values[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}" if where else f.name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise _MissingField(f"{where}.{f.name}" if where else f.name, hints[f.name])
    if any(f.name == "extra" for f in fields(cls)):  # type: ignore[arg-type]
        values["extra"] = {k: v for k, v in data.items() if k not in known}
    return cls(**values)


def from_json(cls: type[R], data: Any, path: Path, what: str) -> R:
    """``data`` (a record file's contents) as ``cls``; a field of the wrong type or missing is one line naming the file."""
    if not isinstance(data, dict):
        raise FilterServeError(f"{what} {path} must be a JSON object, not {type(data).__name__}")
    try:
        return _decode_record(cls, data, "")
    except _MalformedField as exc:
        raise FilterServeError(f"{what} {path} is malformed: {exc}") from None


@dataclass(frozen=True)
class Source:
    """Where a base or an adapter came from: a folder (its path and files' checksums) or a hub id (and the revision loaded)."""

    path: str | None = field(default=None, metadata=OPTIONAL)
    sha256: dict[str, str] | None = field(default=None, metadata=OPTIONAL)
    hub_id: str | None = field(default=None, metadata=OPTIONAL)
    revision: str | None = field(default=None, metadata=OPTIONAL)

    @property
    def where(self) -> str:
        return self.path or self.hub_id or "?"

    def same_model(self, other: Source) -> bool:
        """One model: the same files (wherever they are now), or the same hub id."""
        if self.sha256 is not None and other.sha256 is not None:
            return self.sha256 == other.sha256
        return self.hub_id is not None and self.hub_id == other.hub_id


@dataclass(frozen=True)
class ParityRecord:
    """A variant's (or a group member's) scores against its reference: the figures and the bound held."""

    variant: str
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float | None  # the precision's bound (None: only the accuracy gate can admit it)
    finite: bool
    n_texts: int
    passed: bool
    relative: bool | None = field(default=None, metadata=OPTIONAL)  # bf16: the bound scales with the largest |score|
    limit: float | None = field(default=None, metadata=OPTIONAL)  # ... and came to this on these texts
    execution: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)  # what OpenVINO ran
    against: str | None = field(default=None, metadata=OPTIONAL)  # the reference, when not PyTorch + PEFT


@dataclass(frozen=True)
class SkippedLine:
    """A validation article the gate could not read as the production scorer reads articles."""

    line: int
    reason: str


@dataclass(frozen=True)
class GateRecord:
    """The accuracy gate's run on one variant set: on what data, within what tolerance, and its report."""

    tolerance: float
    data: str
    report: dict[str, Any]  # filterserve.gate.build_report
    skipped: list[SkippedLine] = field(default_factory=list)


@dataclass(frozen=True)
class Int8Record:
    """Which rung of the exclusion ladder an int8 variant was quantized on; ov_int8's calibration data."""

    rung: int
    kept_fp32: str
    fp32_matmuls: int
    calibration: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class ChildRecord:
    """One export step run in a child process (``filterserve.export.child``): its pid, its own peak RSS,
    and what the exporting process held meanwhile (it waits, so the two add up to the export's RSS then)."""

    step: str
    pid: int
    peak_rss_mb: float
    parent_rss_mb: float
    seconds: float

    @property
    def together_mb(self) -> float:
        return round(self.peak_rss_mb + self.parent_rss_mb, 1)


@dataclass(frozen=True)
class GroupRef:
    """A group member's place in its group."""

    name: str
    tensor_model: str
    filter_index: int
    record: str


@dataclass(frozen=True)
class EngineRecord:
    """A TensorRT engine build-engine added to a filter (docs/gpu.md)."""

    model: str
    ensemble_default: bool
    profile: dict[str, list[int]] | None = field(default=None, metadata=OPTIONAL)
    fp32_layers: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    parity: ParityRecord | None = field(default=None, metadata=OPTIONAL)
    accuracy_gate: GateRecord | None = field(default=None, metadata=OPTIONAL)
    tensorrt: str | None = field(default=None, metadata=OPTIONAL)
    device: str | None = field(default=None, metadata=OPTIONAL)


@dataclass(frozen=True)
class Serving:
    """What the server is told (model_repository.RepositorySettings), as a record keeps it."""

    max_batch_size: int
    max_batch_tokens: int | None
    bucket: int
    max_text_bytes: int


@dataclass(frozen=True)
class HybridRecord:
    """A filter's stage 1 as exported: its probe model, the embedder it reads, and the threshold
    routing a row on to stage 2 (filterserve.hybrid_settings reads them from the folder)."""

    threshold: float
    threshold_source: str  # the file, and the constant or key in it
    threshold_from_config: bool  # config.yaml's hybrid_inference.stage1.threshold is the runtime one
    probe: str  # the pickle it was converted from (never copied into the repository)
    probe_sha256: str
    probe_model: str  # the Triton model: embedding → probe_scores
    embedder: str  # the repository's embedder model it reads (contract.EMBEDDER)
    embedder_source: str  # the embedder the folder names (intfloat/multilingual-e5-small)
    hidden_sizes: list[int]
    parity: ParityRecord  # the ONNX probe against the scaler + MLP
    disagreements: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FilterRecord:
    """``<name>.filter.json``: one filter of the repository, merged or a group's member."""

    filter: dict[str, Any]  # the filter's description (filterserve.filters.FilterSpec.to_dict)
    models: list[str]  # every model folder the filter owns (a member's group owns its tensor model)
    ensemble: str
    tensor_models: dict[str, str]  # precision → model; empty for a member (see group)
    default_precision: str
    pad_token_id: int
    vocab_size: int
    max_length: int
    max_batch_size: int
    bucket: int
    max_text_bytes: int
    sources: dict[str, Source]  # "base", "adapter"
    versions: dict[str, str]
    parity: dict[str, ParityRecord]  # "merged" (a merged filter's merge), then every variant
    parity_texts: int
    created: str
    format: str = FILTER_FORMAT
    max_batch_tokens: int | None = None
    group: GroupRef | None = field(default=None, metadata=OPTIONAL)
    architecture: str | None = field(default=None, metadata=OPTIONAL)
    accuracy_gate: GateRecord | None = None
    refused: dict[str, list[str]] = field(default_factory=dict)
    int8: Int8Record | None = field(default=None, metadata=OPTIONAL)
    ov_int8: Int8Record | None = field(default=None, metadata=OPTIONAL)
    latency_ms_batch1: dict[str, float] | None = field(default=None, metadata=OPTIONAL)
    export_seconds: float | None = field(default=None, metadata=OPTIONAL)
    peak_rss_mb: float | None = field(default=None, metadata=OPTIONAL)  # the export's, children included (RunFigures)
    step_seconds: dict[str, float] | None = field(default=None, metadata=OPTIONAL)
    parent_peak_rss_mb: float | None = field(default=None, metadata=OPTIONAL)  # the exporting process's own
    children: list[ChildRecord] | None = field(default=None, metadata=OPTIONAL)  # the steps run in a child process
    engines: dict[str, EngineRecord] | None = field(default=None, metadata=OPTIONAL)
    hybrid: HybridRecord | None = field(default=None, metadata=OPTIONAL)  # None: stage 2 alone
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.filter.get("name"))

    @property
    def serving(self) -> Serving:
        return Serving(self.max_batch_size, self.max_batch_tokens, self.bucket, self.max_text_bytes)

    @classmethod
    def read(cls, path: Path) -> FilterRecord:
        record = from_json(cls, read_json(path, "filter record"), path, "filter record")
        if not record.filter.get("name"):
            raise FilterServeError(f"filter record {path} is malformed: its \"filter\" has no name")
        return record


@dataclass(frozen=True)
class LoraRecord:
    rank: int
    layers: int
    dimensions: int


@dataclass(frozen=True)
class GroupRecord:
    """``<group>.group.json``: a shared-base group, whose one tensor model serves every member filter."""

    group: str
    tensor_model: str
    models: list[str]
    members: list[str]  # in filter_index order
    width: int
    pad_token_id: int
    vocab_size: int
    max_length: int
    max_batch_size: int
    bucket: int
    max_text_bytes: int
    sources: dict[str, Source]  # "base"
    lora: dict[str, LoraRecord]
    parity: dict[str, dict[str, ParityRecord]]  # precision → member → parity
    files_bytes: dict[str, int]
    versions: dict[str, str]
    created: str
    format: str = GROUP_FORMAT
    precision: str = "fp32"
    max_batch_tokens: int | None = None
    execution: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)
    export_seconds: float | None = field(default=None, metadata=OPTIONAL)
    peak_rss_mb: float | None = field(default=None, metadata=OPTIONAL)
    step_seconds: dict[str, float] | None = field(default=None, metadata=OPTIONAL)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def serving(self) -> Serving:
        return Serving(self.max_batch_size, self.max_batch_tokens, self.bucket, self.max_text_bytes)

    @classmethod
    def read(cls, path: Path) -> GroupRecord:
        return from_json(cls, read_json(path, "group record"), path, "group record")


@dataclass(frozen=True)
class EmbedderRecord:
    """``<embedder>.embedder.json``: the repository's stage-1 embedder, shared by every hybrid filter in it."""

    name: str  # its ensemble (contract.EMBEDDER)
    models: list[str]  # the ensemble, its tokenizer step, its tensor model
    tensor_model: str
    model_id: str  # the embedder the filters name (intfloat/multilingual-e5-small)
    source: Source  # where it was loaded from (--stage1-model, else model_id)
    width: int
    max_length: int
    pad_token_id: int
    vocab_size: int
    normalize: bool
    parity: dict[str, ParityRecord]  # precision → against SentenceTransformer.encode
    parity_texts: int
    max_batch_size: int
    bucket: int
    max_text_bytes: int
    versions: dict[str, str]
    created: str
    format: str = EMBEDDER_FORMAT
    max_batch_tokens: int | None = None
    export_seconds: float | None = field(default=None, metadata=OPTIONAL)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> EmbedderRecord:
        return from_json(cls, read_json(path, "embedder record"), path, "embedder record")
