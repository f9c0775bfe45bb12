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
member's in at once (a :class:`~filterserve.export.plan.Plan` kind, one
:func:`~filterserve.export.staging.commit`): a failure leaves the
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

import dataclasses
import gc
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export import openvino_engine
from filterserve.export.load import adapter_weights_path, load_tokenizer, locate_base
from filterserve.export.manifest import Fingerprint, describe_source, folder_checksums, versions
from filterserve.export.options import ExportOptions, RemoveOptions
from filterserve.export.parity import gate_scores
from filterserve.export.plan import Plan, execute
from filterserve.export.records import RunFigures, filter_record, now, serving_fields
from filterserve.export.shared_base import (
    GroupScorer,
    LoadedMembers,
    MemberSource,
    MixedBatch,
    check_group_parity,
    export_group,
    load_members,
    onnx_group_scorer,
    width,
)
from filterserve.export.staging import Change, plan_replacement
from filterserve.filters import FilterSpec
from filterserve.gate import AccuracyGateRefusal, LabelledSet, judge, read_labelled
from filterserve.manifest import (
    FilterRecord,
    GateRecord,
    GroupRecord,
    GroupRef,
    LoraRecord,
    ParityRecord,
    Source,
    group_record_name,
    read_repository,
)
from filterserve.model_repository.group import write_group_tensor_model, write_member_steps
from filterserve.model_repository.repository import RepositorySettings
from filterserve.model_repository.runtime.openvino import MODEL_FILE as OPENVINO_MODEL_FILE
from filterserve.progress import Steps

GROUP_PREFIX = "shared_"


def member_models(name: str) -> list[str]:
    """The folders a member owns (the group owns its tensor model)."""
    return [name, contract.tokenizer_model(name), contract.decision_model(name)]


def _slug(base: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", Path(base.rstrip("/")).name.lower()).strip("_") or "base"


def _free_name(repo: Path, base: str, records: dict[str, FilterRecord], groups: dict[str, GroupRecord]) -> str:
    """``shared_<base folder or hub name>``, with a number when another group, filter or folder has it."""
    taken = set(records) | set(groups) | {m for r in records.values() for m in r.models} | {m for g in groups.values() for m in g.models}
    stem = GROUP_PREFIX + _slug(base)
    for suffix in ["", *(f"_{i}" for i in range(2, 100))]:
        name = stem + suffix
        if name not in taken and contract.tensor_model(name) not in taken and not (repo / contract.tensor_model(name)).exists():
            return name
    raise FilterServeError(f"no free group name for base {base} in {repo}")


@dataclass(frozen=True)
class GroupChange:
    """What one add, re-export or removal makes of a group, planned before anything is loaded."""

    repo: Path
    group: str
    base: str
    base_source: Source
    members: list[MemberSource]  # after the change, in filter_index order; adapters in the repository or given
    adapter_sources: dict[str, Source]  # member → describe_source of the adapter it was exported from
    leaving: list[str]  # filters this change takes out of the repository
    validation: dict[str, Path] = field(default_factory=dict)  # member → labelled data to gate it on
    old_records: dict[str, FilterRecord] = field(default_factory=dict)  # member → its record before the change
    old_group: GroupRecord | None = None  # the group's record before the change (None: a new group)
    precision: str = "fp32"  # what the whole group runs after the change (contract.GROUP_PRECISIONS)

    @property
    def names(self) -> list[str]:
        return [m.spec.name for m in self.members]


def _existing_members(repo: Path, group: GroupRecord, records: dict[str, FilterRecord]) -> dict[str, MemberSource]:
    """The group's members as exported, from the adapter copies in the repository (checked against their records)."""
    members = {}
    for name in group.members:
        record = records.get(name)
        if record is None:
            raise FilterServeError(f"group {group.group} in {repo} lists {name}, which has no filter record")
        copy = repo / group.tensor_model / contract.GROUP_ADAPTERS / name
        adapter = record.sources.get("adapter")
        recorded = adapter.sha256 if adapter is not None else None
        if not copy.is_dir() or (recorded is not None and folder_checksums(copy) != recorded):
            raise FilterServeError(
                f"the adapter copy of {name} in {copy} is missing or differs from its record: "
                f"export it again with --share-base --adapter (its own folder)"
            )
        members[name] = MemberSource(FilterSpec.from_dict(record.filter, source=f"the record of {name} in {repo}"), copy)
    return members


def plan_add(options: ExportOptions) -> GroupPlan:
    """Add ``options.spec`` (or export it again) to the group of ``options.base`` in ``options.out``; refusals before anything loads.

    The group is rebuilt at ``options``' one precision, as the latest change's settings apply to the whole group."""
    repo, spec, name = options.out, options.spec, options.spec.name
    adapter_weights_path(options.adapter)
    locate_base(options.base)
    records, groups = read_repository(repo)
    base_source = describe_source(options.base)
    adapter_source = describe_source(str(options.adapter))
    owner = next((g for g, r in groups.items() if name in r.members), None)
    group = next((g for g, r in groups.items() if r.sources["base"].same_model(base_source)), None)
    if owner is not None and owner != group:
        raise FilterServeError(
            f"filter {name!r} is a member of group {owner} in {repo}, of another base "
            f"({groups[owner].sources['base'].where}): remove it first (filterserve export --remove {name} --out {repo})"
        )
    # The member's own folders (and, for a merged filter becoming a member, its tensor models) may be replaced.
    sources = {"base": base_source, "adapter": adapter_source}
    plan_replacement(repo, name, set(member_models(name)), Fingerprint.made(spec.to_dict(), sources), options.force)
    members = _existing_members(repo, groups[group], records) if group else {}
    group = group or _free_name(repo, options.base, records, groups)
    members[name] = MemberSource(spec, options.adapter)
    adapters = {n: records[n].sources["adapter"] for n in members if n != name} | {name: adapter_source}
    change = GroupChange(
        repo, group, options.base, base_source, [members[n] for n in sorted(members)], adapters, [],
        {name: options.validation} if options.validation else {}, {n: records[n] for n in members if n in records},
        groups.get(group), options.precisions[0],
    )
    return GroupPlan(change, options.repository, options.gate_tolerance, options.force)


def plan_removal(options: RemoveOptions) -> Plan:
    """Take ``options.name`` out of ``options.out``: a merged filter's folders go, a member's group is rebuilt without it."""
    repo, name = options.out, options.name
    records, groups = read_repository(repo)
    if name not in records:
        raise FilterServeError(f"{repo} holds no filter {name!r}; it holds: {', '.join(sorted(records)) or 'none'}")
    owner = next((g for g, r in groups.items() if name in r.members), None)
    if owner is None:
        return Removal(repo, name, records[name])
    group = groups[owner]
    recorded = group.sources["base"]
    base = options.base or recorded.where
    base_source = describe_source(base)
    if not recorded.same_model(base_source):
        raise FilterServeError(
            f"group {owner} was exported from another base than {base}: pass its base with --base (recorded: {recorded.where})"
        )
    members = _existing_members(repo, group, records)
    del members[name]
    change = GroupChange(
        repo, owner, base, base_source, [members[n] for n in sorted(members)], {n: records[n].sources["adapter"] for n in members},
        [name], {}, {n: records[n] for n in records if n in members or n == name}, group, group.precision,
    )
    # A removal keeps the group's serving settings.
    return GroupPlan(change, RepositorySettings(**dataclasses.asdict(group.serving)))


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


@dataclass(frozen=True)
class GroupBuild:
    """What a group's build stages made: every member's reference and weights, the parity per engine, the gates."""

    loaded: LoadedMembers
    parity: dict[str, dict[str, ParityRecord]]  # precision → member → parity
    execution: openvino_engine.Execution | None  # what OpenVINO ran (None on ONNX Runtime)
    gates: dict[str, GateRecord]


@dataclass(frozen=True)
class GroupPlan(Plan[GroupBuild | None]):
    """A change to a shared-base group: its tensor model rebuilt with every member, checked, swapped in at once."""

    change: GroupChange
    settings: RepositorySettings
    gate_tolerance: float = contract.GATE_TOLERANCE
    force: bool = False  # a member's folders may replace ones no record lists (--force)
    started: float = field(default_factory=time.perf_counter)

    def target(self) -> tuple[Path, str]:
        return self.change.repo, self.change.group

    def total_steps(self) -> int:
        """Per member a load; the build; a parity check per engine (bf16: OpenVINO's compile too); a gate
        per validated member, with the validation read first; the write."""
        change = self.change
        if not change.members:
            return 1
        engines = 1 + 2 * (change.precision != "fp32")
        return len(change.members) + 1 + engines + len(change.validation) + bool(change.validation) + 1

    def build(self, staging: Path, steps: Steps) -> GroupBuild | None:
        change = self.change
        if not change.members:
            return None
        labelled = _read_validation(change, steps)
        loaded = load_members(change.base, change.members, change.group, steps, {n: d.texts for n, d in labelled.items()})
        onnx_path = staging / contract.tensor_model(change.group) / "1" / "model.onnx"
        with steps.step(f"build the group's tensor model: one base, {len(change.members)} member(s), LoRA per row (fp32)"):
            batch = export_group(change.base, loaded, onnx_path)
        score_rows: GroupScorer = onnx_group_scorer(onnx_path)
        parity, execution = {"fp32": _parity(change, "ONNX Runtime fp32", score_rows, loaded, batch, steps, "fp32")}, None
        if change.precision != "fp32":
            del score_rows  # the fp32 session's weights go before OpenVINO reads and compiles its own copy
            model = _openvino_group(onnx_path, change.precision, steps)
            score_rows, execution = model.scores, model.execution
            parity[change.precision] = _parity(change, f"OpenVINO {change.precision}", score_rows, loaded, batch, steps,
                                               change.precision)
        gates = _gate(change, score_rows, loaded, labelled, self.gate_tolerance, steps)
        return GroupBuild(loaded, parity, execution, gates)

    def write_label(self) -> str:
        return f"write group {self.change.group} and its members' steps, then swap them in"

    def write(self, staging: Path, built: GroupBuild | None, steps: Steps) -> Change:
        change = self.change
        group_record, records = (None, {}) if built is None else _write(self, staging, built, steps)
        gc.collect()
        return Change(records, tuple(change.leaving), change.group, group_record, change.old_records, change.old_group, self.force)

    def written(self, change: Change) -> str:
        return f"group {self.change.group} in {self.change.repo}: " + (", ".join(self.change.names) or "removed with its last member")


@dataclass(frozen=True)
class Removal(Plan[None]):
    """A merged filter taken out of a repository: its folders and record go, nothing is built."""

    repo: Path
    name: str
    record: FilterRecord

    def target(self) -> tuple[Path, str]:
        return self.repo, self.name

    def total_steps(self) -> int:
        return 1

    def build(self, staging: Path, steps: Steps) -> None:
        return None

    def write_label(self) -> str:
        return f"take filter {self.name} out of {self.repo}"

    def write(self, staging: Path, built: None, steps: Steps) -> Change:
        return Change({}, (self.name,), expected={self.name: self.record})

    def written(self, change: Change) -> str:
        return f"filter {self.name} removed from {self.repo}"


def _gate(change: GroupChange, score_rows: GroupScorer, loaded: LoadedMembers, labelled: dict[str, LabelledSet], tolerance: float,
          steps: Steps) -> dict[str, GateRecord]:
    """Each member with validation data through the accuracy gate, on its own rows of the group's model as served."""
    records = {}
    for index, (member, reference) in enumerate(zip(change.members, loaded.references)):
        data = labelled.get(member.spec.name)
        if data is None or reference.validation is None:
            continue
        with steps.step(f"accuracy gate, member {member.spec.name}, on {change.validation[member.spec.name]}"):
            def score(ids: np.ndarray, mask: np.ndarray, index: int = index, n: int = member.spec.num_labels) -> np.ndarray:
                rows = np.full((ids.shape[0], 1), index, dtype=np.int64)
                return score_rows(ids, mask, rows)[0][:, :n]

            scored = gate_scores(score, loaded.tokenizer, data, member.spec.max_length)
            gate = judge(member.spec, data, reference.validation, {change.precision: scored}, tolerance)
            if gate.refused:
                raise AccuracyGateRefusal(gate.refused)
            records[member.spec.name] = gate.record
    return records


def _member_record(plan: GroupPlan, member: MemberSource, index: int, loaded: LoadedMembers, parity: dict[str, ParityRecord],
                   gate: GateRecord | None) -> FilterRecord:
    """``parity``: ``{precision: this member's parity record}``."""
    change, spec, name = plan.change, member.spec, member.spec.name
    previous = change.old_records.get(name)
    # The same precision in the group is the same arithmetic as before the rebuild (parity holds it): a gate run carries over.
    same = previous is not None and previous.group is not None and previous.default_precision == change.precision
    carried = previous.accuracy_gate if previous is not None and name not in change.validation and same else None
    return filter_record(
        spec, models=member_models(name), tensor_models={},  # the group's serves it: see "group"
        group=GroupRef(change.group, contract.tensor_model(change.group), index, group_record_name(change.group)),
        default_precision=change.precision, pad_token_id=loaded.pad_token_id, vocab_size=loaded.vocab_size,
        settings=plan.settings, sources={"base": change.base_source, "adapter": change.adapter_sources[name]},
        parity=parity, parity_texts=len(loaded.references[index].texts), accuracy_gate=gate or carried,
    )


def _write(plan: GroupPlan, staging: Path, built: GroupBuild, steps: Steps) -> tuple[GroupRecord, dict[str, FilterRecord]]:
    """The group's tensor model config and adapter copies, every member's steps, and the records."""
    change, settings, loaded, parity, execution = plan.change, plan.settings, built.loaded, built.parity, built.execution
    specs = [m.spec for m in change.members]
    model = contract.tensor_model(change.group)
    write_group_tensor_model(staging, change.group, specs, settings, pad_token_id=loaded.pad_token_id, vocab_size=loaded.vocab_size,
                             precision=change.precision, execution_precision=execution.precision if execution else None)
    executed = openvino_engine.execution_record(execution) if execution else None
    records = {}
    for index, member in enumerate(change.members):
        name = member.spec.name
        _copy_adapter(member.adapter, staging / model / contract.GROUP_ADAPTERS / name, change.repo)
        with tempfile.TemporaryDirectory() as tmp:
            load_tokenizer(member.adapter).save_pretrained(tmp)
            write_member_steps(staging, member.spec, settings, group=change.group, index=index, width=width(change.members),
                               tokenizer_dir=Path(tmp), pad_token_id=loaded.pad_token_id)
        own = {p: replace_execution(by_member[name], executed if p == change.precision else None) for p, by_member in parity.items()}
        records[name] = _member_record(plan, member, index, loaded, own, built.gates.get(name))
    folder = staging / model
    files = {"model": sum(p.stat().st_size for p in (folder / "1").rglob("*") if p.is_file()),
             "adapters": sum(p.stat().st_size for p in (folder / contract.GROUP_ADAPTERS).rglob("*") if p.is_file())}
    group = GroupRecord(
        group=change.group, tensor_model=model, models=[model], members=change.names, width=width(change.members),
        precision=change.precision, execution=executed, pad_token_id=loaded.pad_token_id, vocab_size=loaded.vocab_size,
        max_length=max(spec.max_length for spec in specs), **serving_fields(settings), sources={"base": change.base_source},
        lora={w.spec.name: LoraRecord(w.rank, len(w.lora), w.spec.num_labels) for w in loaded.weights}, parity=parity,
        files_bytes=files, versions=versions(), created=now(), **RunFigures.of(plan.started, steps).fields(),
    )
    return group, records


def replace_execution(record: ParityRecord, execution: dict | None) -> ParityRecord:
    """A member's parity on the engine that serves it also says what that engine ran."""
    return record if execution is None else dataclasses.replace(record, execution=execution)


def _read_validation(change: GroupChange, steps: Steps) -> dict[str, LabelledSet]:
    if not change.validation:
        return {}
    members = {m.spec.name: m for m in change.members}
    with steps.step(f"read the validation data of {', '.join(change.validation)}"):
        return {n: read_labelled(path, members[n].spec, load_tokenizer(members[n].adapter)) for n, path in change.validation.items()}


def apply_change(plan: GroupPlan, steps: Steps) -> GroupRecord | None:
    """Build the group as ``plan`` says (or drop it when no member is left), check it, and swap it in.

    Returns the group's record (None when the group was dropped).
    """
    return execute(plan, steps).group_record


def _parity(change: GroupChange, engine: str, score_rows: GroupScorer, loaded: LoadedMembers, batch: MixedBatch, steps: Steps,
            precision: str) -> dict[str, ParityRecord]:
    """Every member's rows of the mixed batch, on ``engine``, against its own PyTorch + PEFT reference."""
    with steps.step(f"parity per member ({engine}, rows mixing the members) vs its own PyTorch + PEFT"):
        parity = check_group_parity(score_rows, loaded.references, batch, precision, f"group {change.group} {precision}")
        steps.say(", ".join(f"{n} max |Δ| = {p.max_abs_diff:.2e}" for n, p in parity.items()))
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


def export_shared(options: ExportOptions, stream: TextIO | None = None) -> FilterRecord:
    """``filterserve export --share-base``: returns the filter's record as written."""
    steps = _planning(stream)
    return execute(plan_add(options), steps).records[options.spec.name]


def refuse_member(repo: Path, name: str) -> None:
    """A merged export of a group's member would leave the group serving a filter whose steps are gone."""
    owner = next((g for g, r in read_repository(repo)[1].items() if name in r.members), None)
    if owner is not None:
        raise FilterServeError(
            f"{name} is a member of group {owner} in {repo}: export it again with --share-base, or take it out first "
            f"(filterserve export --remove {name} --out {repo}) to export it merged"
        )


def build_group(base: str, members: list[MemberSource], repo: Path, settings: RepositorySettings | None = None,
                stream: TextIO | None = None, precision: str = "fp32") -> GroupRecord | None:
    """A group of exactly ``members`` in a new repository ``repo`` (benchmarks build one per N this way)."""
    if read_repository(Path(repo)) != ({}, {}):
        raise FilterServeError(f"{repo} already holds filters: build_group writes a new repository")
    ordered = sorted(members, key=lambda m: m.spec.name)
    change = GroupChange(Path(repo), _free_name(Path(repo), base, {}, {}), base, describe_source(base), ordered,
                         {m.spec.name: describe_source(str(m.adapter)) for m in ordered}, [], precision=precision)
    return apply_change(GroupPlan(change, settings or RepositorySettings()), Steps(total=0, stream=stream))


def remove_filter(options: RemoveOptions, stream: TextIO | None = None) -> GroupRecord | None:
    """``filterserve export --remove NAME``: a merged filter's folders and record go; a member's group is rebuilt without it.

    Returns the group's record after the removal (None for a merged filter, or a group left empty).
    """
    steps = _planning(stream)
    return execute(plan_removal(options), steps).group_record
