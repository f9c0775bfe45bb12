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
from pathlib import Path
from typing import Any

from filterserve.errors import FilterServeError

REPOSITORY_MANIFEST = "filterserve.json"
REPOSITORY_FORMAT = "filterserve.repository/1"
FILTER_FORMAT = "filterserve.manifest/1"
GROUP_FORMAT = "filterserve.group/1"


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


def _read_record(path: Path) -> dict[str, Any]:
    record = read_json_object(path, "filter record")
    if not isinstance(record.get("filter"), dict):
        raise FilterServeError(f"filter record {path} is malformed: it has no \"filter\" object")
    return record


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


def read_filter_record(repo: Path, name: str | None = None) -> dict[str, Any]:
    """One filter's record (``name`` may be left out when the repository holds one filter)."""
    filters = repository_filters(repo)
    return _read_record(repo / filters[pick_filter(repo, filters, name)])


def read_filter_records(repo: Path) -> dict[str, dict[str, Any]]:
    """Every filter's record, by name."""
    return {name: _read_record(repo / file) for name, file in sorted(repository_filters(repo).items())}



def group_record_name(group: str) -> str:
    return f"{group}.group.json"


def repository_groups(repo: Path) -> dict[str, str]:
    """Shared-base group name → its record's file name (none in a repository of merged filters only)."""
    index_path = repo / REPOSITORY_MANIFEST
    if not index_path.is_file():
        return {}
    groups = read_json_object(index_path, "repository manifest").get("groups", {})
    if not isinstance(groups, dict) or not all(isinstance(v, str) for v in groups.values()):
        raise FilterServeError(f"{index_path} is malformed: expected {{\"groups\": {{\"<group>\": \"<group>.group.json\"}}}}")
    return dict(groups)


def read_group_records(repo: Path) -> dict[str, dict[str, Any]]:
    """Every shared-base group's record, by name: its members, in filter_index order, and its tensor model."""
    records = {}
    for name, file in sorted(repository_groups(repo).items()):
        record = read_json_object(repo / file, "group record")
        if not isinstance(record.get("members"), list) or not isinstance(record.get("tensor_model"), str):
            raise FilterServeError(f"group record {repo / file} is malformed: it needs \"members\" and \"tensor_model\"")
        records[name] = record
    return records
