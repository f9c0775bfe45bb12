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
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export.manifest import Fingerprint
from filterserve.manifest import (
    REPOSITORY_MANIFEST,
    EmbedderRecord,
    FilterRecord,
    GroupRecord,
    embedder_record_name,
    filter_record_name,
    group_record_name,
    is_repository,
    read_embedder_records,
    read_filter_records,
    read_group_records,
    repository_embedders,
    repository_groups,
    repository_index,
    to_json,
    write_json_atomic,
)

REPLACED = "replaced"


def candidate_models(name: str, precisions: Iterable[str]) -> set[str]:
    """Every model folder an export of ``name`` may write, whichever precision becomes the default."""
    fixed = {name, contract.tokenizer_model(name), contract.decision_model(name), contract.tensor_model(name),
             contract.probe_model(name), contract.stage2_model(name), contract.hybrid_model(name)}
    return fixed | {contract.tensor_model(name, p) for p in precisions}


def plan_replacement(repo: Path, name: str, models: set[str], new: Fingerprint, force: bool) -> list[str]:
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
    owners: list[tuple[str, list[str]]] = [(f"filter {other!r}", r.models) for other, r in records.items() if other != name]
    owners += [(f"shared-base group {group}", r.models) for group, r in read_group_records(repo).items()]
    owners += [(f"the stage-1 embedder {embedder}", r.models) for embedder, r in read_embedder_records(repo).items()]
    for owner, held in owners:
        clash = models & set(held)
        if clash:
            raise FilterServeError(
                f"filter {name!r} would overwrite {', '.join(sorted(clash))} of {owner} in {repo}; choose another --name"
            )
    old = records.get(name)
    if old is not None and Fingerprint.of(old) != new and not force:
        adapter = old.sources.get("adapter")
        raise FilterServeError(
            f"{repo} already holds a different export of filter {name!r} "
            f"(adapter {adapter.path if adapter else None}); pass --force to replace it"
        )
    owned = set(old.models) if old is not None else set()
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
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise FilterServeError(f"--out {repo}: {parent} exists and is not a folder") from None
    except OSError as exc:  # a file above it, a read-only or full filesystem, no permission
        raise FilterServeError(f"--out {repo}: cannot create the folder {exc.filename or parent}: {exc.strerror or exc}") from None
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
    try:
        path.mkdir()
    except OSError as exc:
        raise FilterServeError(f"--out {repo}: cannot write beside it in {parent}: {exc.strerror or exc}") from None
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


@dataclass(frozen=True)
class Change:
    """What one commit swaps into a repository: every kind of export (a merged filter, a shared-base
    group's change, an engine added to a filter, a removal) ends in one of these.

    ``records``: the filters written, by name; the model folders of theirs that are in the staging
    folder move in (a listed folder that is not there stays as it is: build-engine adds one model to
    a filter). ``leaving``: filters whose folders and records go. ``group``: the shared-base group
    this change rebuilds, with its new record, or None as the record to drop it. ``embedder``: the
    stage-1 embedder this change adds (its model folders are in the staging folder); the repository
    must not hold one of that name yet.
    ``expected``: the records the change was planned from (and ``expected_group``, the group's: None
    for a new group); the commit is refused when one changed since (another export committed). A
    written filter not in ``expected`` is checked again as it was before it was built
    (:func:`plan_replacement`, with ``force``).
    """

    records: dict[str, FilterRecord]
    leaving: tuple[str, ...] = ()
    group: str | None = None
    group_record: GroupRecord | None = None
    expected: dict[str, FilterRecord] = field(default_factory=dict)
    expected_group: GroupRecord | None = None
    force: bool = False
    embedder: EmbedderRecord | None = None


def commit(repo: Path, staging: Path, change: Change) -> None:
    """Swap ``change``, built in ``staging``, into ``repo`` at once: its folders, its records, the manifest.

    A group's tensor model moves in first and each filter's ensemble last, so a server polling the
    repository finds the composing models first. On any failure the moves and record writes done so
    far are undone, in reverse.
    """
    repo.mkdir(parents=True, exist_ok=True)
    with _locked(repo):
        current = read_filter_records(repo) if is_repository(repo) else {}
        changed = [n for n, r in change.expected.items() if current.get(n) != r]
        if change.group is not None and read_group_records(repo).get(change.group) != change.expected_group:
            changed.append(f"group {change.group}")
        embedders = repository_embedders(repo) if is_repository(repo) else {}
        if change.embedder is not None and change.embedder.name in embedders:
            changed.append(f"stage-1 embedder {change.embedder.name}")
        if changed:
            raise FilterServeError(
                f"{', '.join(changed)} in {repo} changed while this was being built (another export committed); "
                "nothing was written: run it again"
            )
        for name, record in change.records.items():
            if name not in change.expected:
                plan_replacement(repo, name, set(record.models), Fingerprint.of(record), change.force)
        owners = {m: n for n, r in current.items() for m in r.models if n not in change.records and n not in change.leaving}
        staged = [m for r in change.records.values() for m in r.models if (staging / m).is_dir()]
        clash = sorted(m for m in staged if m in owners)
        if clash:
            raise FilterServeError(f"{', '.join(clash)} in {repo} belong to filter {owners[clash[0]]!r}; nothing was written")
        tensor = [contract.tensor_model(change.group)] if change.group is not None else []
        embedder = [m for m in change.embedder.models if (staging / m).is_dir()] if change.embedder is not None else []
        kept = {m for r in change.records.values() for m in r.models if m not in staged}
        gone = {m for n in [*change.leaving, *change.records] if n in current for m in current[n].models} - kept
        out = sorted((gone | set(staged) | set(tensor) | set(embedder)) & {p.name for p in repo.iterdir() if p.is_dir()})
        # The embedder's folders go in first: the filters whose probes read it follow.
        into = embedder + (tensor if change.group_record is not None else []) + \
            [m for m in staged if m not in change.records] + [m for m in staged if m in change.records]
        groups = repository_groups(repo)
        if change.group is not None:
            groups.pop(change.group, None)
            if change.group_record is not None:
                groups[change.group] = group_record_name(change.group)
        writes: dict[Path, Any] = {repo / filter_record_name(n): to_json(r) for n, r in change.records.items()}
        if change.group is not None and change.group_record is not None:
            writes[repo / group_record_name(change.group)] = to_json(change.group_record)
        if change.embedder is not None:
            embedders[change.embedder.name] = embedder_record_name(change.embedder.name)
            writes[repo / embedder_record_name(change.embedder.name)] = to_json(change.embedder)
        writes[repo / REPOSITORY_MANIFEST] = repository_index(
            (set(current) - set(change.leaving)) | set(change.records), groups, embedders)
        deletes = [repo / filter_record_name(n) for n in change.leaving]
        if change.group is not None and change.group_record is None:
            deletes.append(repo / group_record_name(change.group))
        _swap(repo, staging, out, into, writes, deletes)


def _swap(repo: Path, staging: Path, out: list[str], into: list[str], writes: dict[Path, Any], deletes: list[Path]) -> None:
    """Move the folders ``out`` of ``repo`` aside and ``into`` in from ``staging`` (in that order), write and delete
    the records; on any failure, undo what was done, in reverse. The caller holds the lock."""
    touched = [*writes, *deletes]
    saved = {path: path.read_bytes() for path in touched if path.is_file()}
    aside = staging / REPLACED
    aside.mkdir()
    moves: list[tuple[Path, Path]] = []
    try:
        for src, dst in [(repo / f, aside / f) for f in out] + [(staging / f, repo / f) for f in into]:
            os.rename(src, dst)
            moves.append((src, dst))
        for path, data in writes.items():
            write_json_atomic(path, data)
        for path in deletes:
            path.unlink(missing_ok=True)
    except BaseException:
        for src, dst in reversed(moves):
            os.rename(dst, src)
        for path in touched:
            if path in saved:
                path.write_bytes(saved[path])
            else:
                path.unlink(missing_ok=True)
        raise
