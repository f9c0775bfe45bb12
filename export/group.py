"""``filterserve export --share-base`` and ``--remove``: the filters of one base as one group in a repository.

A group lives in the repository beside merged filters::

    REPO/<group>_onnx/                  the group's tensor model (filterserve.export.shared_base)
    REPO/<group>_onnx/adapters/<name>/  each member's adapter folder as exported: a later add,
                                        re-export or removal rebuilds the group from these, whatever
                                        became of the folders the adapters came from
    REPO/<name>/, <name>_tokenizer/, <name>_decision/   each member's own steps (model_repository.group)
    REPO/<group>.group.json             members in filter_index order, base, parity per member
    REPO/<name>.filter.json             each member's record; its "group" names the group and index

There is one group per base in a repository (the base is told by its files' checksums, or its hub
id). Every change rebuilds the group's tensor model with all its members, holds each member to its
own PyTorch + PEFT reference on a batch mixing them, and swaps the group's folders and every
member's in at once (:func:`filterserve.export.staging.commit_changes`): a failure leaves the
repository as it was. Members are indexed in name order; the settings of the latest change
(batch sizes, bucket, text limit) apply to the whole group.

A group runs one precision (:data:`contract.GROUP_PRECISIONS`): fp32 on ONNX Runtime, or bf16 on
OpenVINO (the CPU engine, :mod:`filterserve.export.openvino_engine`), compiled from the fp32 file
as Triton's OpenVINO backend compiles it; the whole graph then runs bf16, the LoRA paths too, and
each member's parity (bf16's relative bound) and gate are measured as it will be served. The
fp32 file is always checked first, so a bf16 failure is bf16's. fp16 and int8 are not built for a
group (one line says so): their gate would have to admit every member at once.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export import openvino_engine
from filterserve.export.load import adapter_weights_path, load_tokenizer
from filterserve.export.manifest import describe_source, folder_checksums, new_record, versions
from filterserve.export.options import ExportOptions
from filterserve.export.parity import score_in_batches
from filterserve.export.shared_base import (
    GroupScorer,
    MemberSource,
    check_group_parity,
    export_group,
    load_members,
    onnx_group_scorer,
    width,
)
from filterserve.export.staging import commit_changes, plan_replacement, staging_folder
from filterserve.filters import FilterSpec
from filterserve.gate import AccuracyGateRefusal, build_report, read_labelled, refusals
from filterserve.manifest import (
    GROUP_FORMAT,
    group_record_name,
    is_repository,
    read_filter_records,
    read_group_records,
)
from filterserve.model_repository.group import write_group_tensor_model, write_member_steps
from filterserve.model_repository.repository import RepositorySettings
from filterserve.model_repository.runtime.openvino import MODEL_FILE as OPENVINO_MODEL_FILE
from filterserve.progress import Steps

GROUP_PREFIX = "shared_"
GATE_BATCH = 16


def member_models(name: str) -> list[str]:
    """The folders a member owns (the group owns its tensor model)."""
    return [name, contract.tokenizer_model(name), contract.decision_model(name)]


def same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two bases described by :func:`describe_source` are one model: same files, or the same hub id."""
    if "sha256" in a and "sha256" in b:
        return a["sha256"] == b["sha256"]
    return "hub_id" in a and a.get("hub_id") == b.get("hub_id")


def _slug(base: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", Path(base.rstrip("/")).name.lower()).strip("_") or "base"


def _free_name(repo: Path, base: str, records: dict[str, dict], groups: dict[str, dict]) -> str:
    """``shared_<base folder or hub name>``, with a number when another group, filter or folder has it."""
    taken = set(records) | set(groups) | {m for r in [*records.values(), *groups.values()] for m in r.get("models", [])}
    stem = GROUP_PREFIX + _slug(base)
    for suffix in ["", *(f"_{i}" for i in range(2, 100))]:
        name = stem + suffix
        if name not in taken and contract.tensor_model(name) not in taken and not (repo / contract.tensor_model(name)).exists():
            return name
    raise FilterServeError(f"no free group name for base {base} in {repo}")


def _repository(repo: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    if not repo.exists() or not is_repository(repo):
        return {}, {}
    return read_filter_records(repo), read_group_records(repo)


def _spec(record: dict[str, Any], where: str) -> FilterSpec:
    return FilterSpec.from_dict(record["filter"], source=where)


@dataclass(frozen=True)
class GroupChange:
    """What one add, re-export or removal makes of a group, planned before anything is loaded."""

    repo: Path
    group: str
    base: str
    base_source: dict[str, Any]
    members: list[MemberSource]  # after the change, in filter_index order; adapters in the repository or given
    adapter_sources: dict[str, dict[str, Any]]  # member → describe_source of the adapter it was exported from
    leaving: list[str]  # filters this change takes out of the repository
    validation: dict[str, Path] = field(default_factory=dict)  # member → labelled data to gate it on
    old_records: dict[str, dict[str, Any]] = field(default_factory=dict)  # member → its record before the change
    old_group: dict[str, Any] | None = None  # the group's record before the change (None: a new group)
    precision: str = "fp32"  # what the whole group runs after the change (contract.GROUP_PRECISIONS)

    @property
    def names(self) -> list[str]:
        return [m.spec.name for m in self.members]


def _existing_members(repo: Path, group: dict[str, Any], records: dict[str, dict]) -> dict[str, MemberSource]:
    """The group's members as exported, from the adapter copies in the repository (checked against their records)."""
    members = {}
    for name in group["members"]:
        record = records.get(name)
        if record is None:
            raise FilterServeError(f"group {group['group']} in {repo} lists {name}, which has no filter record")
        copy = repo / group["tensor_model"] / contract.GROUP_ADAPTERS / name
        recorded = record.get("sources", {}).get("adapter", {}).get("sha256")
        if not copy.is_dir() or (recorded is not None and folder_checksums(copy) != recorded):
            raise FilterServeError(
                f"the adapter copy of {name} in {copy} is missing or differs from its record: "
                f"export it again with --share-base --adapter (its own folder)"
            )
        members[name] = MemberSource(_spec(record, f"the record of {name} in {repo}"), copy)
    return members


def plan_add(base: str, adapter: Path, repo: Path, spec: FilterSpec, force: bool, validation: Path | None,
             precision: str = "fp32") -> GroupChange:
    """Add ``spec`` (or export it again) to the group of ``base`` in ``repo``; refusals before anything loads.

    The group is rebuilt at ``precision``, as the latest change's settings apply to the whole group."""
    adapter_weights_path(adapter)
    records, groups = _repository(repo)
    base_source = describe_source(base)
    adapter_source = describe_source(str(adapter))
    name = spec.name
    owner = next((g for g, r in groups.items() if name in r["members"]), None)
    group = next((g for g, r in groups.items() if same_base(r["sources"]["base"], base_source)), None)
    if owner is not None and owner != group:
        raise FilterServeError(
            f"filter {name!r} is a member of group {owner} in {repo}, of another base "
            f"({groups[owner]['sources']['base'].get('path') or groups[owner]['sources']['base'].get('hub_id')}): "
            f"remove it first (filterserve export --remove {name} --out {repo})"
        )
    # The member's own folders (and, for a merged filter becoming a member, its tensor models) may be replaced.
    plan_replacement(repo, name, set(member_models(name)), {"filter": spec.to_dict(), "sources": {"base": base_source, "adapter": adapter_source}}, force)
    members = _existing_members(repo, groups[group], records) if group else {}
    group = group or _free_name(repo, base, records, groups)
    members[name] = MemberSource(spec, adapter)
    sources = {n: records[n]["sources"]["adapter"] for n in members if n != name}
    sources[name] = adapter_source
    ordered = [members[n] for n in sorted(members)]
    old = {n: records[n] for n in members if n in records}
    return GroupChange(repo, group, base, base_source, ordered, sources, [], {name: validation} if validation else {}, old,
                       groups.get(group), precision)


def plan_removal(repo: Path, name: str, base: str | None) -> GroupChange | None:
    """Take ``name`` out of ``repo``; for a member, the group left behind (None: a merged filter, nothing to rebuild)."""
    records, groups = _repository(repo)
    if name not in records:
        raise FilterServeError(f"{repo} holds no filter {name!r}; it holds: {', '.join(sorted(records)) or 'none'}")
    owner = next((g for g, r in groups.items() if name in r["members"]), None)
    if owner is None:
        return None
    group = groups[owner]
    recorded = group["sources"]["base"]
    base = base or recorded.get("path") or recorded.get("hub_id")
    base_source = describe_source(base)
    if not same_base(recorded, base_source):
        raise FilterServeError(
            f"group {owner} was exported from another base than {base}: pass its base with --base "
            f"(recorded: {recorded.get('path') or recorded.get('hub_id')})"
        )
    members = _existing_members(repo, group, records)
    del members[name]
    ordered = [members[n] for n in sorted(members)]
    sources = {n: records[n]["sources"]["adapter"] for n in members}
    return GroupChange(repo, owner, base, base_source, ordered, sources, [name], {}, {n: records[n] for n in records if n in members
                       or n == name}, group, group.get("precision", "fp32"))


# ---------------------------------------------------------------------------------------------
# Building and writing


def _copy_adapter(source: Path, dest: Path, repo: Path) -> None:
    """The adapter folder's files (not its sub-folders: training checkpoints).

    The repository's own copies are hard-linked (nothing writes them in place); a user's folder is
    copied, since saving over a file there (safetensors does) would change a linked copy too.
    """
    dest.mkdir(parents=True)
    ours = source.resolve().is_relative_to(repo.resolve())
    for path in sorted(source.iterdir()):
        if path.is_file():
            try:
                if not ours:
                    raise OSError
                os.link(path, dest / path.name)
            except OSError:
                shutil.copy2(path, dest / path.name)


def _gate(change: GroupChange, score_rows: GroupScorer, loaded: Any, labelled: dict[str, Any], tolerance: float,
          steps: Steps) -> dict[str, Any]:
    """Each member with validation data through the accuracy gate, on its own rows of the group's model as served."""
    reports = {}
    for index, (member, reference) in enumerate(zip(change.members, loaded.references)):
        data = labelled.get(member.spec.name)
        if data is None:
            continue
        with steps.step(f"accuracy gate, member {member.spec.name}, on {change.validation[member.spec.name]}"):
            def score(ids, mask):
                rows = np.full((ids.shape[0], 1), index, dtype=np.int64)
                return score_rows(ids, mask, rows)[0][:, : member.spec.num_labels]

            scored = score_in_batches(score, loaded.tokenizer, data.texts, member.spec.max_length, GATE_BATCH)
            report = build_report(member.spec, data.truth, reference.validation, {change.precision: scored})
            refused = refusals(report, tolerance)
            if refused:
                raise AccuracyGateRefusal(refused)
            reports[member.spec.name] = {"tolerance": tolerance, "data": str(change.validation[member.spec.name]),
                                         "skipped": [{"line": l, "reason": r} for l, r in data.skipped], "report": report}
    return reports


def _member_record(change: GroupChange, member: MemberSource, index: int, loaded: Any, settings: RepositorySettings,
                   parity: dict[str, Any], gate: dict[str, Any] | None) -> dict[str, Any]:
    """``parity``: ``{precision: this member's parity record}``."""
    spec, name = member.spec, member.spec.name
    previous = change.old_records.get(name, {})
    # The same precision in the group is the same arithmetic as before the rebuild (parity holds it): a gate run carries over.
    same = "group" in previous and previous.get("default_precision") == change.precision
    carried = previous.get("accuracy_gate") if name not in change.validation and same else None
    return new_record({
        "filter": spec.to_dict(),
        "models": member_models(name),
        "ensemble": name,
        "tensor_models": {},  # the group's serves it: see "group"
        "group": {"name": change.group, "tensor_model": contract.tensor_model(change.group), "filter_index": index,
                  "record": group_record_name(change.group)},
        "default_precision": change.precision,
        "pad_token_id": loaded.pad_token_id,
        "vocab_size": loaded.vocab_size,
        "max_length": spec.max_length,
        **settings.record_fields(),
        "sources": {"base": change.base_source, "adapter": change.adapter_sources[name]},
        "versions": versions(),
        "parity": parity,
        "parity_texts": len(loaded.references[index].texts),
        "accuracy_gate": gate or carried,
        "refused": {},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def _write(change: GroupChange, staging: Path, loaded: Any, settings: RepositorySettings, parity: dict[str, Any],
           execution: Any, gates: dict[str, Any], steps: Steps, started: float) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The group's tensor model config and adapter copies, every member's steps, and the records.

    ``parity``: ``{precision: {member: record}}``; ``execution``: what OpenVINO ran (None on ONNX Runtime)."""
    specs = [m.spec for m in change.members]
    model = contract.tensor_model(change.group)
    write_group_tensor_model(staging, change.group, specs, settings, pad_token_id=loaded.pad_token_id, vocab_size=loaded.vocab_size,
                             precision=change.precision, execution_precision=execution.precision if execution else None)
    executed = {"execution": openvino_engine.execution_record(execution)} if execution else {}
    records = {}
    for index, member in enumerate(change.members):
        name = member.spec.name
        _copy_adapter(member.adapter, staging / model / contract.GROUP_ADAPTERS / name, change.repo)
        with tempfile.TemporaryDirectory() as tmp:
            load_tokenizer(member.adapter).save_pretrained(tmp)
            write_member_steps(staging, member.spec, settings, group=change.group, index=index, width=width(change.members),
                               tokenizer_dir=Path(tmp), pad_token_id=loaded.pad_token_id)
        own = {p: by_member[name] | (executed if p == change.precision else {}) for p, by_member in parity.items()}
        records[name] = _member_record(change, member, index, loaded, settings, own, gates.get(name))
    folder = staging / model
    files = {"model": sum(p.stat().st_size for p in (folder / "1").rglob("*") if p.is_file()),
             "adapters": sum(p.stat().st_size for p in (folder / contract.GROUP_ADAPTERS).rglob("*") if p.is_file())}
    group = new_record({
        "format": GROUP_FORMAT,
        "group": change.group,
        "tensor_model": model,
        "models": [model],
        "members": change.names,
        "width": width(change.members),
        "precision": change.precision,
        **executed,
        "pad_token_id": loaded.pad_token_id,
        "vocab_size": loaded.vocab_size,
        "max_length": max(spec.max_length for spec in specs),
        **settings.record_fields(),
        "sources": {"base": change.base_source},
        "lora": {w.spec.name: {"rank": w.rank, "layers": len(w.lora), "dimensions": w.spec.num_labels} for w in loaded.weights},
        "parity": parity,
        "files_bytes": files,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "step_seconds": steps.timings,
    })
    return group, records


def total_steps(change: GroupChange) -> int:
    """Per member a load, then build, parity, a gate per validated member, and the write (with the validation read first)."""
    if not change.members:
        return 1
    return len(change.members) + 3 + (change.precision != "fp32") + len(change.validation) + bool(change.validation)


def _read_validation(change: GroupChange, steps: Steps) -> dict[str, Any]:
    if not change.validation:
        return {}
    members = {m.spec.name: m for m in change.members}
    with steps.step(f"read the validation data of {', '.join(change.validation)}"):
        return {n: read_labelled(path, members[n].spec, load_tokenizer(members[n].adapter)) for n, path in change.validation.items()}


def apply_change(change: GroupChange, settings: RepositorySettings, steps: Steps,
                 gate_tolerance: float = contract.GATE_TOLERANCE) -> dict[str, Any] | None:
    """Build the group as ``change`` says (or drop it when no member is left), check it, and swap it in.

    Returns the group's record (None when the group was dropped).
    """
    started = time.perf_counter()
    steps.total = total_steps(change)
    with staging_folder(change.repo, change.group) as staging:
        group_record, records = None, {}
        if change.members:
            labelled = _read_validation(change, steps)
            loaded = load_members(change.base, change.members, change.group, steps, {n: d.texts for n, d in labelled.items()})
            onnx_path = staging / contract.tensor_model(change.group) / "1" / "model.onnx"
            with steps.step(f"build the group's tensor model: one base, {len(change.members)} member(s), LoRA per row (fp32)"):
                batch = export_group(change.base, loaded, onnx_path)
            score_rows = onnx_group_scorer(onnx_path)
            parity, execution = {"fp32": _parity(change, "ONNX Runtime fp32", score_rows, loaded, batch, steps, "fp32")}, None
            if change.precision != "fp32":
                del score_rows  # the fp32 session's weights go before OpenVINO reads and compiles its own copy
                model = _openvino_group(onnx_path, change.precision, steps)
                score_rows, execution = model.scores, model.execution
                parity[change.precision] = _parity(change, f"OpenVINO {change.precision}", score_rows, loaded, batch, steps,
                                                   change.precision)
            gates = _gate(change, score_rows, loaded, labelled, gate_tolerance, steps)
            del score_rows
        with steps.step(f"write group {change.group} and its members' steps, then swap them in"):
            if change.members:
                group_record, records = _write(change, staging, loaded, settings, parity, execution, gates, steps, started)
                del loaded
                gc.collect()
            commit_changes(change.repo, staging, group=change.group, group_record=group_record, records=records,
                           leaving=change.leaving, expected=change.old_records, expected_group=change.old_group)
            steps.say(f"group {change.group} in {change.repo}: " + (", ".join(change.names) or "removed with its last member"))
    return group_record


def _parity(change: GroupChange, engine: str, score_rows: GroupScorer, loaded: Any, batch: Any, steps: Steps,
            precision: str) -> dict[str, Any]:
    """Every member's rows of the mixed batch, on ``engine``, against its own PyTorch + PEFT reference."""
    with steps.step(f"parity per member ({engine}, rows mixing the members) vs its own PyTorch + PEFT"):
        parity = check_group_parity(score_rows, loaded.references, batch, precision, f"group {change.group} {precision}")
        steps.say(", ".join(f"{n} max |Δ| = {p['max_abs_diff']:.2e}" for n, p in parity.items()))
    return parity


def _openvino_group(onnx_path: Path, precision: str, steps: Steps) -> openvino_engine.OpenVinoModel:
    """The group's fp32 file as OpenVINO IR in its place (Triton's OpenVINO backend reads ``model.xml``),
    compiled as that backend compiles the config written for it, and refused unless it runs ``precision``."""
    with steps.step(f"{precision}: the group's fp32 file as OpenVINO IR, compiled as Triton's OpenVINO backend compiles it"):
        xml = openvino_engine.onnx_to_ir(onnx_path, onnx_path.with_name(OPENVINO_MODEL_FILE))
        for onnx_file in onnx_path.parent.glob("model.onnx*"):
            onnx_file.unlink()
        model = openvino_engine.served_model(precision, xml)
        steps.say(f"OpenVINO runs {model.execution.precision} (CPU flags {', '.join(model.execution.cpu.flags) or 'none'})")
    return model


def _planning(stream: TextIO | None) -> Steps:
    """The plan reads and checksums the sources before the steps can be counted: it is announced, not numbered."""
    steps = Steps(total=0, stream=stream)
    steps.say("check the inputs and the repository, checksum the sources")
    return steps


def export_shared(options: ExportOptions, stream: TextIO | None = None) -> dict[str, Any]:
    """``filterserve export --share-base``: returns the filter's record as written."""
    steps = _planning(stream)
    change = plan_add(options.base, options.adapter, options.out, options.spec, options.force, options.validation,
                      options.precisions[0])
    apply_change(change, options.repository, steps, options.gate_tolerance)
    return read_filter_records(options.out)[options.spec.name]


def refuse_member(repo: Path, name: str) -> None:
    """A merged export of a group's member would leave the group serving a filter whose steps are gone."""
    owner = next((g for g, r in _repository(repo)[1].items() if name in r["members"]), None)
    if owner is not None:
        raise FilterServeError(
            f"{name} is a member of group {owner} in {repo}: export it again with --share-base, or take it out first "
            f"(filterserve export --remove {name} --out {repo}) to export it merged"
        )


def build_group(base: str, members: list[MemberSource], repo: Path, settings: RepositorySettings = RepositorySettings(),
                stream: TextIO | None = None, precision: str = "fp32") -> dict[str, Any]:
    """A group of exactly ``members`` in a new repository ``repo`` (benchmarks build one per N this way)."""
    if _repository(Path(repo)) != ({}, {}):
        raise FilterServeError(f"{repo} already holds filters: build_group writes a new repository")
    base_source = describe_source(base)
    ordered = sorted(members, key=lambda m: m.spec.name)
    change = GroupChange(Path(repo), _free_name(Path(repo), base, {}, {}), base, base_source, ordered,
                         {m.spec.name: describe_source(str(m.adapter)) for m in ordered}, [], precision=precision)
    return apply_change(change, settings, Steps(total=0, stream=stream))


def remove_filter(repo: Path, name: str, base: str | None = None, stream: TextIO | None = None) -> dict[str, Any] | None:
    """``filterserve export --remove NAME``: a merged filter's folders and record go; a member's group is rebuilt without it.

    Returns the group's record after the removal (None for a merged filter, or a group left empty).
    """
    repo = Path(repo)
    steps = _planning(stream)
    change = plan_removal(repo, name, base)
    if change is None:
        with staging_folder(repo, name) as staging:
            commit_changes(repo, staging, group=None, group_record=None, records={}, leaving=[name],
                           expected={name: read_filter_records(repo)[name]})
        return None
    return apply_change(change, RepositorySettings(**_settings_of(read_group_records(repo)[change.group])), steps)


def _settings_of(group: dict[str, Any]) -> dict[str, Any]:
    """A removal keeps the group's serving settings."""
    return {k: group[k] for k in RepositorySettings().record_fields() if k in group}
