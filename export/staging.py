"""Atomic export: a filter is built beside the repository and swapped in only once every check passed.

The staging folder ``.<repo>.staging-<filter>-<pid>`` sits next to the repository, not inside it:
Triton treats every sub-folder that holds a ``config.pbtxt`` as a model, hidden ones included
(measured with tritonserver 2.51: a ``.staging-x/`` with a bad config inside the repository made
``--load-model=*`` exit with "failed to load all models"). Beside it, it is on the same filesystem,
so each model folder moves in with one ``rename``. The commit takes an exclusive lock on the
repository folder, checks again what it may replace (another export may have committed since the
first check), moves the filter's old folders aside, moves the new ones in, then replaces the
filter's record and the repository manifest with ``os.replace``. Any failure before or during the
commit (Ctrl-C included) leaves the repository as it was; the other filters are never touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export.manifest import fingerprint
from filterserve.manifest import (
    LEGACY_MANIFEST,
    REPOSITORY_FORMAT,
    REPOSITORY_MANIFEST,
    filter_record_name,
    is_repository,
    read_filter_records,
    repository_filters,
    write_json_atomic,
)

REPLACED = "replaced"


def candidate_models(name: str, precisions: Iterable[str]) -> set[str]:
    """Every model folder an export of ``name`` may write, whichever precision becomes the default."""
    fixed = {name, contract.tokenizer_model(name), contract.decision_model(name), contract.tensor_model(name)}
    return fixed | {contract.tensor_model(name, p) for p in precisions}


def plan_replacement(repo: Path, name: str, models: set[str], new: dict[str, Any], force: bool) -> list[str]:
    """Check that an export of filter ``name`` may write ``models`` into ``repo``; return the folders it replaces.

    Refused: a non-empty folder that is not a filterserve repository (a mistyped ``--out`` must not
    lose anyone's files, ``--force`` or not); a model folder of another filter; a different export
    of the same filter, or a folder no record owns, without ``--force``.
    """
    if not repo.exists():
        return []
    if not repo.is_dir():
        raise FilterServeError(f"--out {repo} exists and is not a folder")
    if not is_repository(repo):
        if any(repo.iterdir()):
            raise FilterServeError(
                f"--out {repo} is not empty and holds no filterserve export ({REPOSITORY_MANIFEST}); "
                "choose an empty or new folder"
            )
        return []
    records = read_filter_records(repo)
    for other, record in records.items():
        clash = models & set(record.get("models", [])) if other != name else set()
        if clash:
            raise FilterServeError(
                f"filter {name!r} would overwrite {', '.join(sorted(clash))} of filter {other!r} in {repo}; choose another --name"
            )
    old = records.get(name, {})
    if old and fingerprint(old) != fingerprint(new) and not force:
        raise FilterServeError(
            f"{repo} already holds a different export of filter {name!r} "
            f"(adapter {old.get('sources', {}).get('adapter', {}).get('path')}); pass --force to replace it"
        )
    owned = set(old.get("models", []))
    unowned = sorted(m for m in models - owned if (repo / m).exists())
    if unowned and not force:
        raise FilterServeError(f"{repo / unowned[0]} exists but no filter record lists it; pass --force to replace it")
    return sorted((owned | set(unowned)) & {p.name for p in repo.iterdir()})


def _stale(parent: Path, prefix: str) -> Iterator[Path]:
    """Staging folders whose export process is gone (killed before it could clean up)."""
    pattern = re.compile(re.escape(prefix) + r".+-(\d+)$")
    for path in parent.glob(f"{prefix}*"):
        match = pattern.match(path.name)
        if not match:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            yield path
        except PermissionError:
            continue  # alive, another user's


@contextmanager
def staging_folder(repo: Path, name: str) -> Iterator[Path]:
    """An empty folder beside ``repo`` on its filesystem, removed afterwards whatever happened."""
    parent = repo.parent
    parent.mkdir(parents=True, exist_ok=True)
    if repo.exists() and os.stat(repo).st_dev != os.stat(parent).st_dev:
        raise FilterServeError(
            f"{repo} is a mount point: the export stages beside it and moves folders in by renaming, "
            "which needs one filesystem; mount the folder above it instead"
        )
    prefix = f".{repo.name}.staging-"
    for leftover in _stale(parent, prefix):
        shutil.rmtree(leftover, ignore_errors=True)
    path = parent / f"{prefix}{name}-{os.getpid()}"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One commit at a time per repository (two exports of different filters may finish together)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def commit(repo: Path, staging: Path, record: dict[str, Any], force: bool) -> None:
    """Swap the filter built in ``staging`` (its model folders) into ``repo`` with its record.

    The ensemble moves in last, so a server polling the repository finds its composing models
    first. On any failure the moves and record writes done so far are undone, in reverse.
    """
    name, models = record["filter"]["name"], list(record["models"])
    repo.mkdir(parents=True, exist_ok=True)
    with _locked(repo):
        replaced = plan_replacement(repo, name, set(models), record, force)
        filters = repository_filters(repo) if is_repository(repo) else {}
        records = {n: repo / f for n, f in filters.items()}
        touched = [repo / REPOSITORY_MANIFEST, repo / LEGACY_MANIFEST, repo / filter_record_name(name)]
        touched += [repo / filter_record_name(n) for n, f in filters.items() if f == LEGACY_MANIFEST]
        saved = {path: path.read_bytes() for path in touched if path.is_file()}
        aside = staging / REPLACED
        aside.mkdir()
        moves: list[tuple[Path, Path]] = []
        try:
            for src, dst in [(repo / f, aside / f) for f in replaced] + [
                (staging / f, repo / f) for f in [m for m in models if m != name] + [name]
            ]:
                os.rename(src, dst)
                moves.append((src, dst))
            for other, path in records.items():  # the single-filter layout's record gets its own file
                if path.name == LEGACY_MANIFEST and other != name:
                    write_json_atomic(repo / filter_record_name(other), json.loads(saved[path]))
            write_json_atomic(repo / filter_record_name(name), record)
            index = {n: filter_record_name(n) for n in sorted({*filters, name})}
            write_json_atomic(repo / REPOSITORY_MANIFEST, {"format": REPOSITORY_FORMAT, "filters": index})
            (repo / LEGACY_MANIFEST).unlink(missing_ok=True)
        except BaseException:
            for src, dst in reversed(moves):
                os.rename(dst, src)
            for path in touched:
                if path in saved:
                    path.write_bytes(saved[path])
                else:
                    path.unlink(missing_ok=True)
            raise

