"""The model repository's records: which filters it holds, and each filter's export record.

A repository holds any number of filters side by side::

    REPO/filterserve.json        {"format": "filterserve.repository/1", "filters": {"<name>": "<name>.filter.json"}}
    REPO/<name>.filter.json      one filter's record: description, models, sources, versions, parity, gate
    REPO/<model>/config.pbtxt    Triton model folders; each belongs to exactly one filter's record

Triton skips files at the repository root, so the records travel with the models. Every record
is replaced with one ``os.replace``: a reader sees the old file or the new one, never half of
either. A repository written before several filters were supported holds one root
``filter.json``; it is read as a one-filter repository and the next export migrates it.

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
# The single-filter layout's record, at the repository root.
LEGACY_MANIFEST = "filter.json"


def filter_record_name(name: str) -> str:
    return f"{name}.filter.json"


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FilterServeError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FilterServeError(f"{what} {path} is not valid JSON: {exc}") from None


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
    """A folder that a filterserve export wrote (either layout)."""
    return (repo / REPOSITORY_MANIFEST).is_file() or (repo / LEGACY_MANIFEST).is_file()


def repository_filters(repo: Path) -> dict[str, str]:
    """Filter name → its record's file name, for either layout."""
    index_path = repo / REPOSITORY_MANIFEST
    if index_path.is_file():
        index = read_json(index_path, "repository manifest")
        filters = index.get("filters") if isinstance(index, dict) else None
        if not isinstance(filters, dict) or not all(isinstance(v, str) for v in filters.values()):
            raise FilterServeError(f"{index_path} is malformed: expected {{\"filters\": {{\"<name>\": \"<name>.filter.json\"}}}}")
        return dict(filters)
    legacy = repo / LEGACY_MANIFEST
    if legacy.is_file():
        name = (read_json(legacy, "filter record").get("filter") or {}).get("name")
        if not isinstance(name, str):
            raise FilterServeError(f"{legacy} names no filter")
        return {name: LEGACY_MANIFEST}
    raise FilterServeError(f"{repo} is not a filterserve model repository: {REPOSITORY_MANIFEST} is missing")


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
    return read_json(repo / filters[pick_filter(repo, filters, name)], "filter record")


def read_filter_records(repo: Path) -> dict[str, dict[str, Any]]:
    """Every filter's record, by name."""
    return {name: read_json(repo / file, "filter record") for name, file in sorted(repository_filters(repo).items())}


def write_filter_record(repo: Path, record: dict[str, Any]) -> None:
    """Replace an existing filter's record in place (wherever its layout keeps it)."""
    name = record["filter"]["name"]
    filters = repository_filters(repo)
    write_json_atomic(repo / filters[pick_filter(repo, filters, name)], record)
