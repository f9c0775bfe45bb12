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
from pathlib import Path
from typing import Any

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export.manifest import fingerprint
from filterserve.manifest import (
    REPOSITORY_FORMAT,
    REPOSITORY_MANIFEST,
    filter_record_name,
    group_record_name,
    is_repository,
    read_filter_records,
    read_group_records,
    repository_filters,
    repository_groups,
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
    for group, record in read_group_records(repo).items():
        clash = models & set(record["models"])
        if clash:
            raise FilterServeError(
                f"filter {name!r} would overwrite {', '.join(sorted(clash))} of shared-base group {group} in {repo}; choose another --name"
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


def commit(
    repo: Path, staging: Path, record: dict[str, Any], force: bool, update_of: dict[str, Any] | None = None
) -> None:
    """Swap the filter built in ``staging`` (its model folders) into ``repo`` with its record.

    The ensemble moves in last, so a server polling the repository finds its composing models
    first. On any failure the moves and record writes done so far are undone, in reverse.

    ``update_of`` is the filter's record as read before an amendment was built (build-engine adds
    an engine to an export): only the record's models that are in ``staging`` move in, the others
    stay, and the commit is refused if the record changed since (another export committed: the
    amendment was made from models that are no longer there).
    """
    name, models = record["filter"]["name"], list(record["models"])
    staged = models if update_of is None else [m for m in models if (staging / m).is_dir()]
    repo.mkdir(parents=True, exist_ok=True)
    with _locked(repo):
        replaced = plan_replacement(repo, name, set(models), record, force)
        if update_of is not None:
            if read_filter_records(repo).get(name) != update_of:
                raise FilterServeError(
                    f"filter {name!r} in {repo} changed while this was being built (another export committed); "
                    "nothing was written: run it again"
                )
            replaced = [f for f in replaced if f in staged]
        filters = repository_filters(repo) if is_repository(repo) else {}
        _swap(repo, staging, replaced, [m for m in staged if m != name] + [m for m in staged if m == name], {
            repo / filter_record_name(name): record,
            repo / REPOSITORY_MANIFEST: _index({*filters, name}, repository_groups(repo)),
        }, [])


def _index(filters: Iterable[str], groups: dict[str, str]) -> dict[str, Any]:
    """The repository manifest: every filter's record, and (when there are any) every shared-base group's."""
    index: dict[str, Any] = {"format": REPOSITORY_FORMAT, "filters": {n: filter_record_name(n) for n in sorted(filters)}}
    if groups:
        index["groups"] = dict(sorted(groups.items()))
    return index



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


def commit_changes(
    repo: Path,
    staging: Path,
    *,
    group: str | None,
    group_record: dict[str, Any] | None,
    records: dict[str, dict[str, Any]],
    leaving: list[str],
    expected: dict[str, dict[str, Any]],
    expected_group: dict[str, Any] | None = None,
) -> None:
    """Swap a shared-base group's change into ``repo`` at once: its tensor model, every member's steps, the records.

    ``records``: member → its new record, its folders built in ``staging``; ``group_record``: the
    group's new record (its tensor model in ``staging``), or None to drop ``group`` (or when no
    group is involved: a merged filter's removal); ``leaving``: filters whose folders and records
    go. ``expected`` and ``expected_group``: the records the change was planned from (the group's:
    None for a new group): the commit is refused if one changed since (another export committed),
    as it is when a member's folders would overwrite another filter's. Members' ensembles move in last, so a polling server finds their steps first.
    """
    repo.mkdir(parents=True, exist_ok=True)
    with _locked(repo):
        current = read_filter_records(repo) if is_repository(repo) else {}
        groups = repository_groups(repo)
        changed = [n for n, r in expected.items() if current.get(n) != r]
        if group is not None and read_group_records(repo).get(group) != expected_group:
            changed.append(f"group {group}")
        if changed:
            raise FilterServeError(
                f"{', '.join(changed)} in {repo} changed while this was being built (another export committed); "
                "nothing was written: run it again"
            )
        owners = {m: n for n, r in current.items() for m in r.get("models", []) if n not in records and n not in leaving}
        into = [m for r in records.values() for m in r["models"]]
        clash = sorted(m for m in into if m in owners)
        if clash:
            raise FilterServeError(f"{', '.join(clash)} in {repo} belong to filter {owners[clash[0]]!r}; nothing was written")
        tensor = [contract.tensor_model(group)] if group is not None else []
        gone = {m for n in [*leaving, *records] for m in current.get(n, {}).get("models", [])}
        out = sorted((gone | set(into) | set(tensor)) & {p.name for p in repo.iterdir() if p.is_dir()})
        ensembles = set(records)
        order = (tensor if group_record is not None else []) + [m for m in into if m not in ensembles] + [m for m in into if m in ensembles]
        if group is not None:
            groups.pop(group, None)
            if group_record is not None:
                groups[group] = group_record_name(group)
        index = _index((set(current) - set(leaving)) | set(records), groups)
        writes: dict[Path, Any] = {repo / filter_record_name(n): r for n, r in records.items()}
        if group_record is not None:
            writes[repo / group_record_name(group)] = group_record
        writes[repo / REPOSITORY_MANIFEST] = index
        deletes = [repo / filter_record_name(n) for n in leaving]
        if group is not None and group_record is None:
            deletes.append(repo / group_record_name(group))
        _swap(repo, staging, out, order, writes, deletes)
