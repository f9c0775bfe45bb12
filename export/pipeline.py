"""``filterserve export``: base + adapter → merged → ONNX variants → parity → accuracy gate → repository.

A merged filter is one kind of :class:`~filterserve.export.plan.Plan`, :class:`MergedPlan` (a
shared-base group's change is another, :mod:`filterserve.export.group`); its stages run under
:func:`~filterserve.export.plan.execute`, which stages, writes and commits every kind alike. The
stages are named, each taking what it needs and returning what it
made, so every step can be read and tested alone. What the caller asked for is one value,
:class:`~filterserve.export.options.ExportOptions`, checked when it is made (before anything is
read) and read by every stage; what the stages share besides it is one :class:`Run`.

- options: the caller's arguments → :class:`ExportOptions` (:mod:`filterserve.export.options`)
- check: the options → the sources' checksums; the repository must accept this filter
- load: → :class:`Loaded` (PyTorch + PEFT in fp32, the tokenizer)
- reference: the PEFT model → :class:`Reference` (the card's scores, before the merge)
- pytorch: merge, then the variants built from the PyTorch model (fp32, fp16) → :class:`Variants`
- int8: the fp32 file → INT8 on the exclusion ladder's first rung, added to the variants
- openvino: the fp32 file → OpenVINO IR (bf16, ov_fp32) and NNCF's static int8 (ov_int8, on the
  ladder's first rung), each checked as Triton's OpenVINO backend will compile it

  Those files are made from the fp32 file in a child process each (:mod:`filterserve.export.child`),
  after the PyTorch model is released: the quantizers' copies of the whole graph never share a
  process with anything else, and the record keeps every child's pid and peak RSS.
- gate: variants, labelled validation data → :class:`Admission` (:func:`filterserve.gate.judge`'s
  outcome); a refused variant that has a :data:`CLIMBS` entry (INT8) is rebuilt closer to fp32 and
  gated again first
- default: admitted variants → :class:`DefaultPick` (batch-1 latency per variant, the served precision)
- write: all of the above → the filter's record (:class:`~filterserve.manifest.FilterRecord`),
  swapped into the repository by the one commit

Everything is built in a staging folder beside the repository (:mod:`filterserve.export.staging`)
and swapped in only after every check passed: a failure at any stage leaves the repository,
and every other filter in it, as it was. fp32 and fp16 must stay within their parity tolerance of
the PyTorch + PEFT reference; INT8, whose drift only trained weights can judge, must pass the
accuracy gate on labelled validation data, as every variant must when such data is given.

A new variant (another engine or precision) is a build stage that adds a :class:`Variant` to the
:class:`Variants`, a :data:`~filterserve.export.options.MADE_FROM` entry when it is made from
another variant's file, and a :data:`CLIMBS` entry when the gate may retry it: the gate, the
default pick and the write stage take every built variant as it comes.
"""

from __future__ import annotations

import gc
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export import child, openvino_engine, quantization_data
from filterserve.export.group import export_shared, refuse_member
from filterserve.export.load import Loaded, adapter_weights_path, load_reference, locate_base
from filterserve.export.manifest import Fingerprint, describe_source
from filterserve.export.merge import merge
from filterserve.export.onnx_export import export_onnx
from filterserve.export.options import MADE_FROM, ExportOptions
from filterserve.export.options import parse_precisions as parse_precisions  # its name here before options.py
from filterserve.export.parity import (
    compare_outputs,
    encode,
    gate_scores,
    ort_scores,
    ort_session,
    parity_record,
    parity_texts,
    reference_scores,
)
from filterserve.export.plan import Plan, execute
from filterserve.export.quantize import EXCLUSION_LADDER
from filterserve.export.records import RunFigures, filter_record
from filterserve.export.stage1 import ensure_embedder, probe_stage, repository_embedder
from filterserve.export.staging import Change, candidate_models, plan_replacement
from filterserve.filters import FilterSpec
from filterserve.gate import AccuracyGateRefusal, GateOutcome, LabelledSet, judge, read_labelled
from filterserve.manifest import ChildRecord, EmbedderRecord, FilterRecord, HybridRecord, Int8Record, ParityRecord, Source, to_json
from filterserve.model_repository import tensor_model_name, write_repository
from filterserve.model_repository.gpu import TENSORRT_PRECISION
from filterserve.model_repository.repository import hybrid_models, write_hybrid, write_probe
from filterserve.model_repository.runtime.openvino import MODEL_FILE
from filterserve.progress import Steps

TOLERANCES = contract.PARITY_TOLERANCES
LATENCY_REPEATS = 5


@dataclass(frozen=True)
class Run:
    """One export in progress, as every stage after the check sees it."""

    options: ExportOptions
    steps: Steps
    staging: Path  # beside the repository: what the write stage swaps in
    started: float  # time.perf_counter() when the export began, for the record's export_seconds
    children: list[ChildRecord] = field(default_factory=list)  # the steps run in a child process, as they ran

    def in_child(self, step: str, job: child.Job) -> child.Done:
        """``job`` in a child process (:mod:`filterserve.export.child`), recorded; says which process ran it."""
        done, record = child.run(step, job)
        self.children.append(record)
        self.steps.say(f"child process {record.pid}: peak RSS {record.peak_rss_mb / 1024:.1f} GB "
                       f"(this process {record.parent_rss_mb / 1024:.1f} GB meanwhile)")
        return done


def total_steps(options: ExportOptions) -> int:
    """check, load, reference, merge, default and write; a build and a parity step per variant; the
    validation data's reference and the gate; the stage-1 probe."""
    return 6 + 2 * len(options.build) + 2 * (options.validation is not None) + (options.hybrid is not None)


def variant_path(staging: Path, spec: FilterSpec, precision: str) -> Path:
    """Where a variant is built before the default is known (renamed to ``<name>_onnx`` after):
    ``model.onnx``, or OpenVINO's ``model.xml`` (+ ``model.bin``)."""
    filename = MODEL_FILE if precision in contract.OPENVINO_PRECISIONS else "model.onnx"
    return staging / contract.tensor_model(spec.name, precision) / "1" / filename


Scorer = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def scorer(precision: str, path: Path) -> Scorer:
    """``(ids, mask) → (logits, weighted_score)`` of a built variant, run as its server will run it:
    ONNX Runtime, or OpenVINO compiled with the backend's properties (and refused unless it runs
    the precision its name says)."""
    if precision in contract.OPENVINO_PRECISIONS:
        return openvino_engine.served_model(precision, path).scores
    session = ort_session(path)
    return lambda ids, mask: ort_scores(session, ids, mask)


def logits_of(score: Scorer) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda ids, mask: score(ids, mask)[0]


def median_latency_ms(score: Scorer, ids: np.ndarray, mask: np.ndarray) -> float:
    """Batch-1 latency of one median-length text: what picks the fastest admitted variant."""
    score(ids, mask)  # warm-up
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        score(ids, mask)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


@dataclass(frozen=True)
class Validation:
    """Labelled articles and the card's scores for them, taken before the merge changes the model."""

    labelled: LabelledSet
    reference: np.ndarray


@dataclass(frozen=True)
class Reference:
    """What every variant is held to: the card's recipe on the parity texts (and the validation data)."""

    texts: list[str]
    scores: np.ndarray
    weighted: np.ndarray
    ids: np.ndarray  # the parity texts as one right-padded batch
    mask: np.ndarray
    validation: Validation | None


@dataclass(frozen=True)
class Int8Build:
    """Which rung of the exclusion ladder the INT8 file was quantized on; for ov_int8, what it was calibrated on."""

    rung: int
    kept_fp32: str
    fp32_matmuls: int
    calibration: dict[str, Any] | None = None
    # ov_int8's calibration inputs, kept for a rebuild up the ladder (not part of the record).
    feeds: tuple[dict[str, np.ndarray], ...] = field(default=(), repr=False, compare=False)

    def to_record(self) -> Int8Record:
        return Int8Record(self.rung, self.kept_fp32, self.fp32_matmuls, self.calibration)


@dataclass(frozen=True)
class Variant:
    """One built variant: its ONNX file in the staging folder, its parity record, and, for a build
    that has choices (INT8's exclusion ladder), the one it took."""

    path: Path
    parity: ParityRecord
    built: Int8Build | None = None

    @property
    def execution_precision(self) -> str | None:
        """What OpenVINO ran this variant at (None: not an OpenVINO variant)."""
        return str(self.parity.execution["precision"]) if self.parity.execution is not None else None


@dataclass(frozen=True)
class Variants:
    """The variants built so far, by precision in build order (a rebuilt one keeps its place), and the
    merge's own parity record."""

    merged: ParityRecord
    built: dict[str, Variant]

    def adding(self, precision: str, variant: Variant) -> Variants:
        """These variants with ``precision`` added, or replaced where it was rebuilt."""
        return Variants(self.merged, {**self.built, precision: variant})

    def paths(self, precisions: list[str] | tuple[str, ...]) -> dict[str, Path]:
        return {p: self.built[p].path for p in precisions}

    @property
    def parity(self) -> dict[str, ParityRecord]:
        """As the record keeps it: the merge's first, then every built variant's."""
        return {"merged": self.merged, **{p: v.parity for p, v in self.built.items()}}

    def int8_record(self, precision: str) -> Int8Record | None:
        variant = self.built.get(precision)
        return variant.built.to_record() if variant is not None and variant.built is not None else None


@dataclass(frozen=True)
class Admission:
    """The accuracy gate's outcome (None without validation data) and what it admitted, in the
    order the precisions were asked for."""

    gate: GateOutcome | None
    admitted: list[str]

    @property
    def refused(self) -> dict[str, list[str]]:
        return self.gate.refused if self.gate is not None else {}


@dataclass(frozen=True)
class DefaultPick:
    """Batch-1 latency of every asked-for variant (refused ones too, for the record) and the
    precision the ensemble serves."""

    latency: dict[str, float]
    precision: str


def check_stage(options: ExportOptions, steps: Steps) -> dict[str, Source]:
    """Paths exist, the sources are checksummed, and the repository accepts this filter: before any loading."""
    with steps.step("check inputs and checksum the sources"):
        adapter_weights_path(options.adapter)
        locate_base(options.base)
        refuse_member(options.out, options.spec.name)
        sources = {"base": describe_source(options.base), "adapter": describe_source(str(options.adapter))}
        plan_replacement(
            options.out, options.spec.name, candidate_models(options.spec.name, options.build),
            Fingerprint.made(options.spec.to_dict(), sources), options.force,
        )
    return sources


def load_stage(run: Run, sources: dict[str, Source]) -> tuple[Loaded, dict[str, Source]]:
    """The card's recipe in fp32; the sources gain the hub revision when the base came from the hub."""
    options = run.options
    with run.steps.step(f"load {options.base} (fp32) + adapter with PEFT, as the card does"):
        loaded = load_reference(options.base, options.adapter, options.spec)
        max_positions = int(loaded.model.config.max_position_embeddings)
        if options.spec.max_length > max_positions:
            raise FilterServeError(f"filter max_length {options.spec.max_length} exceeds the model's {max_positions} positions")
        commit_hash = getattr(loaded.model.config, "_commit_hash", None)
        if commit_hash and sources["base"].hub_id is not None:
            sources = {**sources, "base": replace(sources["base"], revision=str(commit_hash))}
    return loaded, sources


def reference_stage(run: Run, loaded: Loaded) -> Reference:
    """The unmerged PEFT model's scores: the parity texts, then the validation data if any."""
    spec, steps, validation_path = run.options.spec, run.steps, run.options.validation
    with steps.step("reference scores (PyTorch + PEFT, one text at a time)"):
        texts = parity_texts(loaded.tokenizer, spec)
        scores = reference_scores(loaded.model, loaded.tokenizer, texts, spec.max_length)
        ids, mask = encode(loaded.tokenizer, texts, spec.max_length)
        steps.say(f"{len(texts)} texts, padded batch {ids.shape[0]}×{ids.shape[1]} tokens")
    validation = None
    if validation_path is not None:
        with steps.step(f"reference scores on the validation data {validation_path}"):
            labelled = read_labelled(validation_path, spec, loaded.tokenizer)
            validation = Validation(labelled, reference_scores(loaded.model, loaded.tokenizer, labelled.texts, spec.max_length))
            steps.say(f"{len(labelled.texts)} labelled articles")
            for line, reason in labelled.skipped:
                steps.say(f"skipped {validation_path} line {line}: {reason}")
    weighted = scores @ np.asarray(spec.weights, dtype=np.float64)
    return Reference(texts, scores, weighted, ids, mask, validation)


def check_parity(precision: str, path: Path, reference: Reference, steps: Steps) -> ParityRecord:
    """Raw scores and the weighted score against the reference; raises ParityError outside the tolerance.

    An OpenVINO variant's record also holds what OpenVINO reports it ran (``execution``). A
    relative bound (bf16) is recorded with the absolute ``limit`` it came to on these texts.
    """
    openvino = precision in contract.OPENVINO_PRECISIONS
    model = openvino_engine.served_model(precision, path) if openvino else None
    logits, weighted = model.scores(reference.ids, reference.mask) if model else scorer(precision, path)(reference.ids, reference.mask)
    tolerance = TOLERANCES[precision]
    limit = contract.parity_limit(precision, float(np.abs(reference.scores).max()))
    label = f"{'OpenVINO' if openvino else 'ONNX'} {precision}"
    result = compare_outputs(label, logits, weighted[:, :1], reference.scores, reference.weighted, limit)
    bound = "the accuracy gate" if tolerance is None else f"{limit:.3g}" + (
        f" = {tolerance:g} × the largest |score|" if precision in contract.RELATIVE_PARITY else "")
    steps.say(f"max |Δ| = {result.max_abs_diff:.2e} (tolerance {bound})")
    record = parity_record(result, precision, limit)
    if model is not None:
        record = replace(record, execution=openvino_engine.execution_record(model.execution))
        steps.say(f"OpenVINO runs {model.execution.precision} (compute layers {model.execution.layers}; "
                  f"CPU flags {', '.join(model.execution.cpu.flags) or 'none'})")
    return record


def pytorch_stage(run: Run, loaded: Loaded, reference: Reference) -> Variants:
    """Owns the PyTorch model from here on: merge, the variants built from it, then frees it before
    their parity checks.

    Those are the precisions not made from another variant's file (fp32, fp16). fp16 converts the
    merged model in place, so it follows fp32. The model is released before any ONNX Runtime session
    is opened on the files: at 1.5B each holds about 6 GB, and both together, with the exporter's
    leftovers, took the export to 24 GB.
    """
    steps, spec = run.steps, run.options.spec
    merged: Any = None  # the merged PyTorch model, released in `finally` whatever happened
    paths: dict[str, Path] = {}
    try:
        with steps.step("merge LoRA into the base and check the merge"):
            merged, merged_parity = merge(loaded, reference.ids, reference.mask, reference.scores)
            steps.say(f"merged vs PEFT: max |Δ| = {merged_parity.max_abs_diff:.2e}")
        for precision in (p for p in run.options.build if p not in MADE_FROM):
            paths[precision] = variant_path(run.staging, spec, precision)
            with steps.step(f"build {precision}"):
                if precision == "fp16":
                    merged.half()
                export_onnx(merged, spec.weights, reference.ids, reference.mask, paths[precision])
    finally:
        merged = loaded.model = None
        gc.collect()
    built: dict[str, Variant] = {}
    for precision, path in paths.items():
        with steps.step(f"parity {precision} (ONNX Runtime) vs PyTorch + PEFT"):
            built[precision] = Variant(path, check_parity(precision, path, reference, steps))
    return Variants(merged_parity.to_record(), built)


def build_int8(run: Run, fp32_path: Path, int8_path: Path, rung: int) -> Int8Build:
    """Dynamic INT8 from the fp32 file, keeping in fp32 what the ladder's ``rung`` names (in a child process)."""
    description = EXCLUSION_LADDER[rung][0]
    kept = run.in_child(f"int8 (rung {rung})", child.Job("int8", str(fp32_path), str(int8_path), rung)).kept
    run.steps.say(f"dynamic INT8 (per-channel weights); fp32 besides the head: {description} ({len(kept)} MatMuls)")
    return Int8Build(rung, description, len(kept))


def int8_stage(run: Run, reference: Reference, variants: Variants) -> Variants:
    """INT8 from the fp32 file on the exclusion ladder's first rung; its parity is recorded, the gate judges it."""
    path = variant_path(run.staging, run.options.spec, "int8")
    with run.steps.step("build int8"):
        built = build_int8(run, variants.built["fp32"].path, path, 0)
    with run.steps.step("parity int8 (ONNX Runtime) vs PyTorch + PEFT"):
        parity = check_parity("int8", path, reference, run.steps)
    return variants.adding("int8", Variant(path, parity, built))


def calibration_feeds(run: Run, tokenizer: Any, reference: Reference) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """ov_int8's calibration articles as the model reads them, refused if the gate would score one of them."""
    options = run.options
    path = options.quantization_data
    articles = quantization_data.read_articles(path) if path else quantization_data.default_articles()
    source = str(path) if path else quantization_data.DEFAULT_SOURCE
    texts = quantization_data.model_texts(quantization_data.spread(articles), options.spec, tokenizer)
    if reference.validation is not None and options.validation is not None:
        quantization_data.check_disjoint(texts, source, reference.validation.labelled.texts, options.validation)
    feeds = quantization_data.calibration_feeds(texts, tokenizer, options.spec.max_length)
    return feeds, {"data": source, "articles": len(texts), "of": len(articles)}


def build_ov_int8(
    run: Run, variants: Variants, path: Path, rung: int, feeds: tuple[dict[str, np.ndarray], ...], calibration: dict[str, Any]
) -> Int8Build:
    """NNCF static int8 from the fp32 file, keeping in fp32 what the ladder's ``rung`` names (in a child process)."""
    description = EXCLUSION_LADDER[rung][0]
    with tempfile.TemporaryDirectory(prefix="filterserve-feeds-") as tmp:
        saved = child.save_feeds(feeds, Path(tmp) / "feeds.npz")
        made = run.in_child(f"ov_int8 (rung {rung})", child.Job("ov_int8", str(variants.built["fp32"].path), str(path), rung, str(saved)))
    fp32 = len(made.kept) + 2  # the ladder's, and the head's two (as ONNX Runtime's int8 counts them)
    run.steps.say(f"static int8 (NNCF, {calibration['articles']} calibration articles from {calibration['data']}); "
                  f"fp32 besides the head: {description} ({fp32} MatMuls)")
    return Int8Build(rung, description, fp32, calibration, feeds)


def openvino_stage(run: Run, tokenizer: Any, reference: Reference, variants: Variants) -> Variants:
    """The OpenVINO variants from the fp32 file: its IR as it is (bf16, ov_fp32), and NNCF's
    static int8 on the ladder's first rung (ov_int8); each checked as the backend will compile it."""
    for precision in (p for p in run.options.build if p in contract.OPENVINO_PRECISIONS):
        path = variant_path(run.staging, run.options.spec, precision)
        with run.steps.step(f"build {precision} (OpenVINO)"):
            if precision == "ov_int8":
                feeds, calibration = calibration_feeds(run, tokenizer, reference)
                built = build_ov_int8(run, variants, path, 0, tuple(feeds), calibration)
            else:
                run.in_child(f"{precision} IR", child.Job("ir", str(variants.built["fp32"].path), str(path)))
                built = None
        with run.steps.step(f"parity {precision} (OpenVINO) vs PyTorch + PEFT"):
            variants = variants.adding(precision, Variant(path, check_parity(precision, path, reference, run.steps), built))
    return variants


def rebuild_int8(run: Run, variants: Variants, variant: Variant, rung: int) -> Int8Build:
    """int8 again from the fp32 file, on ``rung``."""
    return build_int8(run, variants.built["fp32"].path, variant.path, rung)


def rebuild_ov_int8(run: Run, variants: Variants, variant: Variant, rung: int) -> Int8Build:
    """ov_int8 requantized on ``rung``, on the same calibration articles."""
    assert variant.built is not None
    return build_ov_int8(run, variants, variant.path, rung, variant.built.feeds, variant.built.calibration or {})


# What the gate may try before refusing a variant: a rebuild one rung up the exclusion ladder
# (more layers kept in fp32), which gives up speed for accuracy.
CLIMBS: dict[str, Callable[[Run, Variants, Variant, int], Int8Build]] = {"int8": rebuild_int8, "ov_int8": rebuild_ov_int8}


def climb(run: Run, reference: Reference, variants: Variants, precision: str, reasons: list[str]) -> Variants | None:
    """``precision`` rebuilt one rung up the exclusion ladder and checked again; None at the top."""
    variant = variants.built[precision]
    assert variant.built is not None  # every variant that climbs is built on a rung
    rung = variant.built.rung + 1
    if rung >= len(EXCLUSION_LADDER):
        return None
    run.steps.say(f"{precision} refused: " + "; ".join(reasons) + "; keeping more layers in fp32")
    built = CLIMBS[precision](run, variants, variant, rung)
    return variants.adding(precision, Variant(variant.path, check_parity(precision, variant.path, reference, run.steps), built))


def gate_variants(
    validation: Validation, tokenizer: Any, spec: FilterSpec, variants: dict[str, Path], tolerance: float
) -> GateOutcome:
    """Validation MAE per variant against the reference's: the gate's outcome."""
    scored = {}
    for precision, path in variants.items():
        scored[precision] = gate_scores(logits_of(scorer(precision, path)), tokenizer, validation.labelled, spec.max_length)
    return judge(spec, validation.labelled, validation.reference, scored, tolerance)


def gate_stage(run: Run, tokenizer: Any, reference: Reference, variants: Variants) -> tuple[Variants, Admission]:
    """Every asked-for variant through the accuracy gate; a refused one with a :data:`CLIMBS` entry is
    rebuilt and gated again until admitted or out of rungs. Raises :class:`AccuracyGateRefusal` when
    nothing is admitted; returns the variants as they ended."""
    options, steps, validation = run.options, run.steps, reference.validation
    if validation is None:
        return variants, Admission(None, list(options.precisions))
    tolerance, spec = options.gate_tolerance, options.spec
    with steps.step(f"accuracy gate on {options.validation} (MAE change ≤ {tolerance:g}, overall and per dimension)"):
        gate = gate_variants(validation, tokenizer, spec, variants.paths(options.precisions), tolerance)
        for precision in CLIMBS:
            while precision in gate.refused and (climbed := climb(run, reference, variants, precision, gate.refused[precision])):
                variants = climbed
                gate = gate.retried(gate_variants(validation, tokenizer, spec, variants.paths([precision]), tolerance), precision)
        for precision, reasons in gate.refused.items():
            steps.say(f"REFUSED {precision}: " + "; ".join(reasons))
    admitted = [p for p in options.precisions if p not in gate.refused]
    if not admitted:
        raise AccuracyGateRefusal(gate.refused)
    return variants, Admission(gate, admitted)


def default_stage(run: Run, reference: Reference, variants: Variants, gate: Admission) -> DefaultPick:
    """Batch-1 latency of every asked-for variant (refused ones too, for the record) and the precision the ensemble serves."""
    options = run.options
    with run.steps.step("batch-1 latency of each variant (refused ones too, for the record), to pick the default"):
        median_row = int(np.argsort(reference.mask.sum(axis=1))[len(reference.texts) // 2])
        length = int(reference.mask[median_row].sum())
        one_ids = reference.ids[median_row : median_row + 1, :length]
        one_mask = reference.mask[median_row : median_row + 1, :length]
        latency = {p: median_latency_ms(scorer(p, path), one_ids, one_mask) for p, path in variants.paths(options.precisions).items()}
        precision = choose_default(
            options.default, gate.admitted, latency, validated=options.validation is not None, gpu=options.repository.gpu
        )
        run.steps.say(", ".join(f"{p} {ms:.1f} ms" for p, ms in latency.items()) + f" → default {precision}")
    return DefaultPick(latency, precision)


@dataclass(frozen=True)
class MergedBuild:
    """What the build stages of a merged export made, for the write stage."""

    loaded: Loaded
    sources: dict[str, Source]
    reference: Reference
    variants: Variants
    gate: Admission
    pick: DefaultPick
    hybrid: HybridRecord | None
    children: list[ChildRecord]  # the steps run in a child process


@dataclass(frozen=True)
class MergedPlan(Plan[MergedBuild]):
    """A filter exported merged: its own tensor models, one per admitted variant (:class:`ExportOptions`)."""

    options: ExportOptions
    sources: dict[str, Source]  # checksummed by the check stage
    started: float  # time.perf_counter() when the export began, for the record's export_seconds
    embedder: EmbedderRecord | None = None  # the repository's stage-1 embedder, when the filter has a stage 1

    def target(self) -> tuple[Path, str]:
        return self.options.out, self.options.spec.name

    def total_steps(self) -> int:
        return total_steps(self.options)

    def build(self, staging: Path, steps: Steps) -> MergedBuild:
        run = Run(self.options, steps, staging, self.started)
        hybrid = None
        if self.options.hybrid is not None:  # first: a refused probe costs no model load
            assert self.embedder is not None  # run_export exports or reuses it before this plan
            hybrid = probe_stage(staging, self.options.spec, self.options.hybrid, self.embedder, steps)
        loaded, sources = load_stage(run, self.sources)
        reference = reference_stage(run, loaded)
        variants = pytorch_stage(run, loaded, reference)
        if "int8" in self.options.build:
            variants = int8_stage(run, reference, variants)
        variants = openvino_stage(run, loaded.tokenizer, reference, variants)
        variants, gate = gate_stage(run, loaded.tokenizer, reference, variants)
        pick = default_stage(run, reference, variants, gate)
        return MergedBuild(loaded, sources, reference, variants, gate, pick, hybrid, run.children)

    def write_label(self) -> str:
        return "write the Triton model repository and the filter's record, then swap them in"

    def write(self, staging: Path, built: MergedBuild, steps: Steps) -> Change:
        """Complete the repository in the staging folder and record it.

        Variants that were refused, or built only to make another from, are left out.
        """
        options, spec, settings = self.options, self.options.spec, self.options.repository
        variants, gate, pick, loaded = built.variants, built.gate, built.pick, built.loaded
        for precision, variant in variants.built.items():
            if precision not in gate.admitted:
                shutil.rmtree(variant.path.parent.parent)
        names = {p: tensor_model_name(spec.name, p, pick.precision) for p in gate.admitted}
        variants.built[pick.precision].path.parent.parent.rename(staging / names[pick.precision])
        with tempfile.TemporaryDirectory() as tmp:
            loaded.tokenizer.save_pretrained(tmp)
            write_repository(
                staging, spec, settings, tokenizer_dir=Path(tmp), precisions=gate.admitted,
                default_precision=pick.precision, pad_token_id=loaded.pad_token_id, vocab_size=loaded.vocab_size,
                executions={p: executed for p in gate.admitted if (executed := variants.built[p].execution_precision)},
            )
        hybrid = []
        if built.hybrid is not None and self.embedder is not None:
            write_probe(staging, spec, self.embedder.width, settings)
            write_hybrid(staging, spec, settings, threshold=built.hybrid.threshold)
            hybrid = hybrid_models(spec.name)
        figures = RunFigures.of(self.started, steps, built.children)
        record = filter_record(
            spec, models=[spec.name, contract.tokenizer_model(spec.name), contract.decision_model(spec.name), *names.values(), *hybrid],
            tensor_models=names, default_precision=pick.precision, pad_token_id=loaded.pad_token_id,
            vocab_size=loaded.vocab_size, settings=settings, sources=built.sources, parity=variants.parity,
            parity_texts=len(built.reference.texts), accuracy_gate=gate.gate.record if gate.gate is not None else None,
            architecture=loaded.architecture, refused=gate.refused, int8=variants.int8_record("int8"),
            ov_int8=variants.int8_record("ov_int8"), latency_ms_batch1=pick.latency, hybrid=built.hybrid,
            **figures.fields(), **figures.child_fields(),
        )
        steps.say(figures.summary())
        return Change({spec.name: record}, force=options.force)

    def written(self, change: Change) -> str:
        record = change.records[self.options.spec.name]
        return f"{record.name} is in {self.options.out}: {', '.join(record.models)}"


def run_export(options: ExportOptions, stream: TextIO | None = None) -> FilterRecord:
    """Run every stage and return the filter's record, as written to ``out/<name>.filter.json``.

    ``out`` may hold other filters: they are left as they are. Variants refused by the gate are
    left out of the repository, which still receives the admitted ones; then
    :class:`AccuracyGateRefusal` names what was refused and why. Progress goes to ``stream``
    (stderr when None).
    """
    if options.share_base:
        return export_shared(options, stream)
    started = time.perf_counter()
    steps = Steps(total=total_steps(options), stream=stream)
    hybrid = options.hybrid
    # Another embedder in the repository is refused before anything is read.
    existing = repository_embedder(options.out, hybrid.embedder, options.stage1_model) if hybrid is not None else None
    sources = check_stage(options, steps)
    embedder = None
    if hybrid is not None:
        embedder = ensure_embedder(options.out, hybrid, options.stage1_model, options.repository, existing, stream)
    record = execute(MergedPlan(options, sources, started, embedder), steps).records[options.spec.name]
    if record.refused:
        raise AccuracyGateRefusal(record.refused, written=list(record.tensor_models))
    return record


def export_filter(*args: Any, stream: TextIO | None = None, **options: Any) -> dict[str, Any]:
    """:func:`run_export` with the options given as arguments, as this function has always taken them:
    ``export_filter(base, adapter, out, spec, precisions="fp32,fp16", max_batch_size=16, ...)``; returns
    the record as the JSON written to ``out/<name>.filter.json``.

    The arguments are :class:`ExportOptions`' (base, adapter, out and spec may be positional), with
    :class:`~filterserve.model_repository.repository.RepositorySettings`' given flat
    (:meth:`ExportOptions.of`): a new option is added to those classes alone, not to this signature.
    ``default`` names the precision the ensemble serves; ``auto`` is the fastest variant the
    accuracy gate admitted when ``validation`` is given, else the first listed.
    """
    return dict(to_json(run_export(ExportOptions.of(*args, **options), stream)))


def choose_default(default: str, admitted: list[str], latency: dict[str, float], validated: bool, gpu: bool = False) -> str:
    """An explicit choice wins; ``auto`` takes the fastest gate-admitted variant, or the first listed.

    Without validation data only the parity check stands behind fp16, and a 0.05 bound on a few
    texts is no proof that the MAE did not move, so ``auto`` does not promote it. For a GPU the
    latencies measured here on the CPU say nothing: ``auto`` serves the variant that runs on
    TensorRT when the gate admitted it, and otherwise prefers any other variant to int8, which gets no TensorRT.
    """
    if default != "auto":
        if default not in admitted:
            raise FilterServeError(f"--default {default} was refused by the accuracy gate")
        return default
    if gpu:
        if validated and TENSORRT_PRECISION in admitted:
            return TENSORRT_PRECISION
        return next((p for p in admitted if p != "int8"), admitted[0])
    if not validated:
        return admitted[0]
    return min(admitted, key=latency.__getitem__)
