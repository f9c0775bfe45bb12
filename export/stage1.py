"""Stage 1 in the repository: the embedder as a kind of plan, and each filter's probe as a small model.

**One embedder per repository.** Production loads the embedder once per model name and shares it
across filters (``EmbeddingStage._embedding_models``, veen-systems/llm-distillery
``filters/common/embedding_stage.py`` @3e1ccec), and every live filter names
intfloat/multilingual-e5-small: one embedding per article then serves every filter. The repository
holds it once, as :data:`~filterserve.contract.EMBEDDER`, written by :class:`EmbedderPlan` (a
:class:`~filterserve.export.plan.Plan` like every export: staged, checked, committed once) the
first time a hybrid filter is exported into it. A later filter that names the same embedder reuses
it, unless its ``--stage1-model`` is another model; a filter that names another embedder is refused
in one line (export it into another repository): two embedders under one name would silently feed
a probe the vectors of a model it was not trained on.

**A probe per filter.** The filter's export (:class:`~filterserve.export.pipeline.MergedPlan`) reads
the probe pickle with :mod:`filterserve.probe_pickle` (no code in it runs), converts it with
:mod:`filterserve.export.probe_onnx` (the scaler folded in) into ``probe_model(<name>)``, checks the
ONNX file against the unfolded scaler + MLP, and records the settings
(:class:`~filterserve.manifest.HybridRecord`): the threshold, where it was read, the probe's
sha256 (the pin is enforced by :mod:`filterserve.hybrid_settings`) and the embedder it reads.
The filter's ``<name>`` then routes in one call (``model_repository/runtime/templates/hybrid_model.py``,
written by :func:`~filterserve.model_repository.repository.write_hybrid`).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export import embedder as stage1_embedder
from filterserve.export.manifest import describe_source, versions
from filterserve.export.parity import compare, ort_session
from filterserve.export.plan import Plan, execute
from filterserve.export.probe_onnx import write_probe_onnx
from filterserve.export.records import now, serving_fields
from filterserve.export.staging import Change
from filterserve.filters import FilterSpec
from filterserve.hybrid_settings import HybridSettings
from filterserve.manifest import EmbedderRecord, HybridRecord, ParityRecord, Source, is_repository, read_embedder_records
from filterserve.model_repository.repository import EmbedderFacts, RepositorySettings, embedder_models, write_embedder
from filterserve.probe_pickle import Probe, load_probe
from filterserve.progress import Steps

# Max |Δ| of the ONNX probe (scaler folded) against the scaler + MLP computed unfolded in float64.
PROBE_TOLERANCE = 1e-4
PROBE_CHECK_ROWS = 64


def repository_embedder(out: Path, model_id: str, stage1_model: str | None) -> EmbedderRecord | None:
    """The repository's embedder when this filter's stage 1 can read it; None when there is none yet.

    Refused in one line: the repository's embedder is another model than the one the filter names,
    or than ``--stage1-model`` (compared by content, a hub id by name).
    """
    if not out.is_dir() or not is_repository(out):
        return None
    record = read_embedder_records(out).get(contract.EMBEDDER)
    if record is None:
        return None
    if record.model_id != model_id:
        raise FilterServeError(
            f"{out} serves the stage-1 embedder {record.model_id} (for its other filters); this filter's stage 1 names "
            f"{model_id}: a repository holds one embedder, so export this filter into another --out"
        )
    if stage1_model is not None and not describe_source(stage1_model).same_model(record.source):
        raise FilterServeError(
            f"{out}'s stage-1 embedder {record.model_id} was exported from {record.source.where}, --stage1-model "
            f"{stage1_model} is another model: leave out --stage1-model to reuse it, or export into another --out"
        )
    return record


@dataclass(frozen=True)
class EmbedderBuild:
    loaded: stage1_embedder.LoadedEmbedder
    source: Source
    parity: ParityRecord
    parity_texts: int


@dataclass(frozen=True)
class EmbedderPlan(Plan[EmbedderBuild]):
    """The repository's stage-1 embedder: ``model_id`` (what the filters name) loaded from ``where``."""

    out: Path
    model_id: str
    where: str  # --stage1-model, else model_id
    settings: RepositorySettings

    def target(self) -> tuple[Path, str]:
        return self.out, contract.EMBEDDER

    def total_steps(self) -> int:
        return 3

    def build(self, staging: Path, steps: Steps) -> EmbedderBuild:
        with steps.step(f"load the stage-1 embedder {self.where} as production does (SentenceTransformer)"):
            loaded = stage1_embedder.load_embedder(self.where)
            steps.say(f"{loaded.width} wide, {loaded.max_length} tokens, mean pooling"
                      + (", normalized" if loaded.layout.normalize else ""))
        with steps.step("export it to ONNX (fp32; pooling and normalization in the graph), parity vs SentenceTransformer.encode"):
            texts = stage1_embedder.parity_texts(loaded.tokenizer, loaded.max_length)
            path = staging / contract.tensor_model(contract.EMBEDDER) / "1" / "model.onnx"
            stage1_embedder.export_embedder(loaded, texts, path)
            parity = stage1_embedder.check_parity(loaded, path, texts)
            steps.say(f"max |Δ| = {parity.max_abs_diff:.2e} on {len(texts)} texts (tolerance {contract.EMBEDDING_TOLERANCE:g})")
        return EmbedderBuild(loaded, describe_source(self.where), parity, len(texts))

    def write_label(self) -> str:
        return "write the stage-1 embedder's models and record, then swap them in"

    def write(self, staging: Path, built: EmbedderBuild, steps: Steps) -> Change:
        loaded = built.loaded
        facts = EmbedderFacts(loaded.width, loaded.max_length, loaded.pad_token_id, loaded.vocab_size)
        with tempfile.TemporaryDirectory() as tmp:
            loaded.tokenizer.save_pretrained(tmp)
            write_embedder(staging, facts, self.settings, tokenizer_dir=Path(tmp))
        record = EmbedderRecord(
            name=contract.EMBEDDER, models=embedder_models(), tensor_model=contract.tensor_model(contract.EMBEDDER),
            model_id=self.model_id, source=built.source, width=loaded.width, max_length=loaded.max_length,
            pad_token_id=loaded.pad_token_id, vocab_size=loaded.vocab_size, normalize=loaded.layout.normalize,
            parity={"fp32": built.parity}, parity_texts=built.parity_texts, **serving_fields(self.settings),
            versions=versions(), created=now(),
        )
        return Change({}, embedder=record)

    def written(self, change: Change) -> str:
        return f"stage-1 embedder {self.model_id} is in {self.out} as {contract.EMBEDDER}, for every hybrid filter in it"


def ensure_embedder(out: Path, settings: HybridSettings, stage1_model: str | None, repository: RepositorySettings,
                    record: EmbedderRecord | None, stream: TextIO | None = None) -> EmbedderRecord:
    """The repository's embedder for this filter: ``record`` (:func:`repository_embedder`'s answer) reused,
    or, when None, exported now by its own plan (one commit)."""
    steps = Steps(total=0, stream=stream)
    if record is not None:
        steps.say(f"stage 1 reads {out}'s embedder {record.model_id} ({contract.EMBEDDER}), already exported")
        return record
    started = time.perf_counter()
    change = execute(EmbedderPlan(out, settings.embedder, stage1_model or settings.embedder, repository), steps)
    assert change.embedder is not None
    steps.say(f"stage-1 embedder exported in {time.perf_counter() - started:.1f} s")
    return change.embedder


def probe_reference(probe: Probe, x: np.ndarray) -> np.ndarray:
    """Production's scaler.transform, then the MLP in eval mode (Linear, ReLU, ...), in float64, unfolded."""
    h = x.astype(np.float64)
    if probe.scaler.mean is not None:
        h = h - probe.scaler.mean
    if probe.scaler.scale is not None:
        h = h / probe.scaler.scale
    for i, layer in enumerate(probe.layers):
        h = h @ layer.weight.astype(np.float64).T + layer.bias
        if i < len(probe.layers) - 1:
            h = np.maximum(h, 0.0)
    return h


def probe_stage(staging: Path, spec: FilterSpec, settings: HybridSettings, embedder: EmbedderRecord, steps: Steps) -> HybridRecord:
    """The filter's probe as ``probe_model(<name>)`` in ``staging``, checked, and its record."""
    name = contract.probe_model(spec.name)
    with steps.step(f"stage-1 probe {settings.probe} → ONNX {name} (scaler folded), parity vs the scaler + MLP"):
        for line in settings.report():
            steps.say(line)
        probe = load_probe(settings.probe)
        misfits = [what for fits, what in (
            (probe.output_dim == spec.num_labels, f"scores {probe.output_dim} dimensions, filter {spec.name!r} has {spec.num_labels}"),
            (probe.input_dim == embedder.width,
             f"reads {probe.input_dim}-wide embeddings, the embedder {embedder.model_id} gives {embedder.width}"),
        ) if not fits]
        if misfits:
            raise FilterServeError(f"probe {settings.probe} {'; '.join(misfits)}")
        path = write_probe_onnx(probe, staging / name / "1" / "model.onnx")
        x = np.random.default_rng(0).normal(size=(PROBE_CHECK_ROWS, probe.input_dim))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # unit vectors, as the embedder gives
        (got,) = ort_session(path).run([contract.PROBE_SCORES], {contract.EMBEDDING: x})
        parity = compare(f"stage-1 probe {name}", np.asarray(got), probe_reference(probe, x), PROBE_TOLERANCE,
                         "the scaler + MLP").to_record(variant="fp32", against="the scaler + MLP")
        steps.say(f"max |Δ| = {parity.max_abs_diff:.2e} (tolerance {PROBE_TOLERANCE:g}); threshold {settings.threshold:g} "
                  f"from {settings.threshold_source}")
    return HybridRecord(
        threshold=settings.threshold, threshold_source=settings.threshold_source,
        threshold_from_config=settings.threshold_from_config, probe=str(settings.probe), probe_sha256=settings.probe_sha256,
        probe_model=name, embedder=embedder.name, embedder_source=settings.embedder, hidden_sizes=list(probe.hidden_sizes),
        parity=parity, disagreements=list(settings.disagreements),
    )
