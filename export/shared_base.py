"""One tensor model for every filter of one base: the base's weights once, each member's LoRA kept apart.

Filters of one base differ only in their LoRA matrices and score heads (docs/design.md, "The
filter family"), yet a merged export holds a full copy of the base per filter. ONNX Runtime's run-time
adapters do not help: an active adapter applies to a whole ``Run()``, and Triton's ONNX Runtime
backend has no adapter API. So the selection happens inside the graph, per row, as Punica's BGMV
does on GPUs, in standard ONNX ops (Gather, MatMul) that ONNX Runtime, TensorRT and OpenVINO run:

- every Linear any member's LoRA targets computes ``base(x) + (x @ A[f]) @ B[f]``, where ``A``
  [n_members, in, r_max] and ``B`` [n_members, r_max, out] stack the members' matrices
  (transposed, ranks padded with zeros, which add nothing; each member's scaling, alpha/r or
  alpha/√r as its ``adapter_config.json`` says and PEFT applies it, folded into its ``B``), and
  ``f`` is the row's ``filter_index``: a row computes its own filter's LoRA only;
- the score head is ``hidden @ H[f]``, ``H`` [n_members, hidden, width], and ``weighted_score``
  uses the row's weights [n_members, width]; ``width`` is the widest member's number of
  dimensions, and a member's scores are the first ``n_dims`` columns of ``logits`` (the others
  are 0): its decision step reads that slice, so every filter keeps its public outputs.

The pooling is the base's own sequence-classification forward (the last token that is not the
pad id), so it is the merged export's. Members are held to their own PyTorch + PEFT reference on
one batch whose rows mix the members (:func:`check_group_parity`).
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export.load import Loaded, check_adapter_config, load_base_model, load_reference, load_tokenizer
from filterserve.export.manifest import folder_checksums
from filterserve.export.onnx_export import export_graph
from filterserve.export.parity import compare, compare_outputs, ort_scores, ort_session, parity_record, parity_texts, reference_scores
from filterserve.filters import FilterSpec
from filterserve.manifest import ParityRecord
from filterserve.progress import Steps

# Base config fields that must agree for an adapter trained on one base to run on another folder.
ARCHITECTURE_FIELDS = (
    "architectures", "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "vocab_size",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class MemberSource:
    """A filter of the group as the export reads it: its description and its adapter folder."""

    spec: FilterSpec
    adapter: Path


@dataclass(frozen=True)
class MemberWeights:
    """What one member adds to the shared base, taken from its loaded PEFT model."""

    spec: FilterSpec
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path → (A [r, in], scaling · B [out, r])
    head: torch.Tensor  # [n_dims, hidden]

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.lora.values())


@dataclass(frozen=True)
class MemberReference:
    """A member's parity texts and its PyTorch + PEFT scores on them (one text at a time, unpadded)."""

    spec: FilterSpec
    texts: list[str]
    rows: list[list[int]]  # token ids, truncated at the member's max_length
    scores: np.ndarray
    validation: np.ndarray | None = None  # the reference on the member's labelled articles, when it has them

    @property
    def weighted(self) -> np.ndarray:
        return self.scores @ np.asarray(self.spec.weights, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# Which adapters may share a base


def _normalized_name(name: str) -> str:
    """``Qwen/Qwen2.5-1.5B`` and ``/models/qwen2.5-1.5b/`` name one model; only the last part and its case are compared."""
    return Path(name.rstrip("/")).name.lower()


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise FilterServeError(f"base model folder {folder} has no config.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _architecture(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config") or {}  # multimodal configs keep the decoder's sizes there
    return {key: config.get(key, text.get(key)) for key in ARCHITECTURE_FIELDS}


def check_trained_on(adapter_dir: Path, adapter_config: dict[str, Any], base: str, member_bases: list[str]) -> None:
    """Refuse an adapter whose ``base_model_name_or_path`` is not the group's base.

    A folder that exists here is compared by content (architecture and sizes first, for a clear
    message, then the weight files' checksums); a hub id or a path from the training machine is
    compared by name with ``base`` when that is a hub id, and with the other members' bases.
    """
    named = adapter_config.get("base_model_name_or_path")
    if not named:
        return
    trained_on = Path(named).expanduser()
    if trained_on.is_dir():
        if Path(base).is_dir() and trained_on.resolve() == Path(base).resolve():
            return
        if not Path(base).is_dir():
            raise FilterServeError(f"adapter {adapter_dir} was made for the base folder {named}, not for {base}")
        ours, theirs = _architecture(_config(Path(base))), _architecture(_config(trained_on))
        differ = [f"{k} {theirs[k]} vs {ours[k]}" for k in ARCHITECTURE_FIELDS if ours[k] != theirs[k]]
        if differ:
            raise FilterServeError(
                f"adapter {adapter_dir} was made for {named}, whose architecture differs from {base}: " + "; ".join(differ)
            )
        weights = lambda folder: {n: s for n, s in folder_checksums(folder).items() if n.endswith(WEIGHT_SUFFIXES)}  # noqa: E731
        if weights(trained_on) != weights(Path(base)):
            raise FilterServeError(
                f"adapter {adapter_dir} was made for {named}, whose weights differ from {base} (same architecture and sizes)"
            )
        return
    expected = ([] if Path(base).exists() else [base]) + [b for b in member_bases if not Path(b).expanduser().is_dir()]
    for other in expected:
        if _normalized_name(other) != _normalized_name(named):
            raise FilterServeError(f"adapter {adapter_dir} was made for {named}, but the group's base is {other}")


def check_vocabulary(adapter_dir: Path, tokenizer: Any, group_tokenizer: Any, group: str) -> None:
    """One embedding table serves every member: the same text must give the same ids, and padding the same pad id."""
    ours, theirs = group_tokenizer.get_vocab(), tokenizer.get_vocab()
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
        raise FilterServeError(
            f"the tokenizer in {adapter_dir} has another vocabulary than group {group}'s ({len(theirs)} vs {len(ours)} "
            f"tokens; differing: {', '.join(f'{t!r}→{i}' for t, i in differ)}): its filter needs its own base"
        )
    if tokenizer.pad_token_id != group_tokenizer.pad_token_id:
        raise FilterServeError(
            f"the tokenizer in {adapter_dir} pads with id {tokenizer.pad_token_id}, group {group} with "
            f"{group_tokenizer.pad_token_id}: the pooling reads one pad id for every row"
        )


# ---------------------------------------------------------------------------------------------
# Per-member weights and references


def member_weights(loaded: Loaded, spec: FilterSpec, adapter_dir: Path) -> MemberWeights:
    """Each LoRA pair as PEFT computes it (its scaling included), and the trained head; refuses what a shared base cannot hold."""
    from peft.tuners.lora.layer import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, module in loaded.model.named_modules():
        path = path.removeprefix("base_model.model.")
        if isinstance(module, ModulesToSaveWrapper) and path != "score":
            raise FilterServeError(
                f"adapter {adapter_dir} saves its own trained copy of {path}: members of a shared base may "
                "differ only in LoRA matrices and the score head; export this filter merged"
            )
        if not isinstance(module, LoraLayer):
            continue
        problem = (
            "LoRA on an embedding" if module.lora_embedding_A
            else "DoRA" if any(module.use_dora.values())
            else "a LoRA bias" if any(getattr(module, "lora_bias", {}).values())
            else "a layer that is not a Linear" if not isinstance(module.get_base_layer(), torch.nn.Linear)
            else "fan_in_fan_out" if getattr(module, "fan_in_fan_out", False)
            else None
        )
        if problem:
            raise FilterServeError(f"adapter {adapter_dir} uses {problem} ({path}); a shared base holds plain LoRA on Linear layers only")
        layer: Any = module  # a peft LoraLayer (peft has no type information)
        (name,) = layer.lora_A.keys()
        a = layer.lora_A[name].weight.detach().float().clone()
        b = layer.lora_B[name].weight.detach().float() * float(layer.scaling[name])
        lora[path] = (a, b)
    if not lora:
        raise FilterServeError(f"adapter {adapter_dir} holds no LoRA layers")
    return MemberWeights(spec, lora, loaded.adapter_score_weight.detach().float().clone())


def member_reference(loaded: Loaded, spec: FilterSpec, validation: list[str] | None = None) -> MemberReference:
    texts = parity_texts(loaded.tokenizer, spec)
    rows = [loaded.tokenizer(t, max_length=spec.max_length, truncation=True)["input_ids"] for t in texts]
    score = lambda some: reference_scores(loaded.model, loaded.tokenizer, some, spec.max_length)  # noqa: E731
    return MemberReference(spec, texts, rows, score(texts), score(validation) if validation else None)


@dataclass(frozen=True)
class LoadedMembers:
    """Every member's weights and reference, with the tokenizer they share and the base's sizes."""

    weights: list[MemberWeights]
    references: list[MemberReference]
    tokenizer: Any
    pad_token_id: int
    vocab_size: int
    max_positions: int


def load_members(
    base: str, members: list[MemberSource], group: str, steps: Steps, validation: dict[str, list[str]] | None = None
) -> LoadedMembers:
    """Each member with PyTorch + PEFT in turn (one base in memory at a time): checks, reference scores, LoRA tensors.

    The cheap refusals (adapter config, the base it was made for, the vocabulary) run for every
    member before any model is loaded. ``validation``: labelled texts per member, scored by its
    reference too (the accuracy gate's).
    """
    if not members:
        raise FilterServeError(f"group {group} has no members")
    tokenizers: list[Any] = []
    bases: list[str] = []
    for member in members:
        config = check_adapter_config(member.adapter)
        check_trained_on(member.adapter, config, base, bases)
        bases.append(config.get("base_model_name_or_path") or "")
        tokenizer = load_tokenizer(member.adapter)
        if tokenizers:
            check_vocabulary(member.adapter, tokenizer, tokenizers[0], group)
        tokenizers.append(tokenizer)
    weights, references = [], []
    for member in members:
        with steps.step(f"member {member.spec.name}: load {base} (fp32) + {member.adapter} with PEFT, reference scores"):
            loaded = load_reference(base, member.adapter, member.spec)
            try:
                positions = int(loaded.model.config.max_position_embeddings)
                if member.spec.max_length > positions:
                    raise FilterServeError(
                        f"filter {member.spec.name} max_length {member.spec.max_length} exceeds the model's {positions} positions"
                    )
                weights.append(member_weights(loaded, member.spec, member.adapter))
                references.append(member_reference(loaded, member.spec, (validation or {}).get(member.spec.name)))
                steps.say(f"LoRA rank {weights[-1].rank} on {len(weights[-1].lora)} layers, {member.spec.num_labels} dimensions")
                pad, vocab = loaded.pad_token_id, loaded.vocab_size
            finally:
                loaded.model = None
                del loaded
                gc.collect()
    return LoadedMembers(weights, references, tokenizers[0], pad, vocab, positions)


# ---------------------------------------------------------------------------------------------
# The shared graph


class RowSelection:
    """The batch's ``filter_index`` [batch], set by :class:`SharedScoringGraph` for the layers it wraps to read.

    The base's own forward passes only tokens down to its layers; the index travels beside it.
    """

    index: torch.Tensor | None = None

    def rows(self) -> torch.Tensor:
        if self.index is None:
            raise RuntimeError("a shared-base layer ran outside SharedScoringGraph.forward")
        return self.index


class RowLoraLinear(torch.nn.Module):
    """``base(x) + (x @ A[f]) @ B[f]`` with ``f`` each row's filter: Gather then batched MatMul (BGMV)."""

    def __init__(self, base: torch.nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, selection: RowSelection) -> None:
        super().__init__()
        self.base = base
        self.lora_a: torch.Tensor
        self.lora_b: torch.Tensor
        self.register_buffer("lora_a", lora_a)  # [n_members, in, r_max]
        self.register_buffer("lora_b", lora_b)  # [n_members, r_max, out], scaling folded in
        self.selection = selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.selection.rows()
        down = torch.matmul(x, torch.index_select(self.lora_a, 0, rows))  # [batch, seq, r_max]
        return self.base(x) + torch.matmul(down, torch.index_select(self.lora_b, 0, rows))


class RowHead(torch.nn.Module):
    """Each row's own score head, ``hidden @ H[f]`` (zero columns past the member's dimensions)."""

    def __init__(self, heads: torch.Tensor, selection: RowSelection) -> None:
        super().__init__()
        self.heads: torch.Tensor
        self.register_buffer("heads", heads)  # [n_members, hidden, width]
        self.selection = selection

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.matmul(hidden.float(), torch.index_select(self.heads, 0, self.selection.rows()))


class SharedScoringGraph(torch.nn.Module):
    """The base for sequence classification, LoRA and head chosen per row; FP32 ``logits`` and ``weighted_score`` out."""

    def __init__(self, model: torch.nn.Module, weights: torch.Tensor, selection: RowSelection) -> None:
        super().__init__()
        self.model = model
        self.weights: torch.Tensor
        self.register_buffer("weights", weights)  # [n_members, width], zero past each member's dimensions
        self.selection = selection

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, filter_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = filter_index.reshape(-1)
        self.selection.index = rows
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        finally:
            self.selection.index = None
        weighted = (logits * torch.index_select(self.weights, 0, rows)).sum(dim=-1, keepdim=True)
        return logits, weighted


def width(members: list[MemberWeights] | list[MemberSource]) -> int:
    """The group's ``logits`` width: its widest member's number of dimensions."""
    return max(m.spec.num_labels for m in members)


def _stacked(members: list[MemberWeights], path: str, layer: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """A [n, in, r_max] and B [n, r_max, out] for one layer; members that do not target it get zeros."""
    rank = max(m.lora[path][0].shape[0] for m in members if path in m.lora)
    lora_a = torch.zeros(len(members), layer.in_features, rank)
    lora_b = torch.zeros(len(members), rank, layer.out_features)
    for i, member in enumerate(members):
        if path in member.lora:
            a, b = member.lora[path]
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise FilterServeError(
                    f"filter {member.spec.name}'s LoRA on {path} is {a.shape[1]}→{b.shape[0]}, the base layer "
                    f"{layer.in_features}→{layer.out_features}"
                )
            lora_a[i, :, : a.shape[0]] = a.T
            lora_b[i, : a.shape[0], :] = b.T
    return lora_a, lora_b


def shared_model(base: str, members: list[MemberWeights], pad_token_id: int) -> SharedScoringGraph:
    """The base once (fp32), every targeted Linear wrapped, the head replaced: the graph the group's ONNX is traced from."""
    model = load_base_model(base, width(members))
    model.config.pad_token_id = pad_token_id
    model.eval()
    selection = RowSelection()
    for path in sorted({p for m in members for p in m.lora}):
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise FilterServeError(f"{path} (targeted by a member's LoRA) does not exist in the base {base}") from None
        if not isinstance(layer, torch.nn.Linear):
            raise FilterServeError(f"{path} in the base {base} is a {type(layer).__name__}, not a Linear")
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, RowLoraLinear(layer, *_stacked(members, path, layer), selection))
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise FilterServeError(f"{type(model).__name__} has no bias-free 'score' head to select per row")
    heads = torch.zeros(len(members), head.in_features, width(members))
    weights = torch.zeros(len(members), width(members))
    for i, member in enumerate(members):
        if member.head.shape[1] != head.in_features:
            raise FilterServeError(
                f"filter {member.spec.name}'s score head expects hidden size {member.head.shape[1]}, the base has {head.in_features}"
            )
        heads[i, :, : member.spec.num_labels] = member.head.T
        weights[i, : member.spec.num_labels] = torch.tensor(member.spec.weights, dtype=torch.float32)
    model.score = RowHead(heads, selection)
    return SharedScoringGraph(model, weights, selection).eval()


# ---------------------------------------------------------------------------------------------
# A batch that mixes the members, and the parity check on it


@dataclass(frozen=True)
class MixedBatch:
    """Every member's parity texts, interleaved so that neighbouring rows belong to different members."""

    ids: np.ndarray
    mask: np.ndarray
    filter_index: np.ndarray  # [rows, 1]
    rows: dict[int, list[int]]  # member index → its rows, in the order of its texts

    def feeds(self) -> dict[str, np.ndarray]:
        return {contract.TOKEN_INPUTS[0]: self.ids, contract.TOKEN_INPUTS[1]: self.mask, contract.FILTER_INDEX: self.filter_index}


def _interleaved(references: list[MemberReference]) -> Iterator[tuple[int, int]]:
    longest = max(len(r.rows) for r in references)
    for j in range(longest):
        for i, reference in enumerate(references):
            if j < len(reference.rows):
                yield i, j


def mixed_batch(references: list[MemberReference], pad_token_id: int) -> MixedBatch:
    order = list(_interleaved(references))
    length = max(len(references[i].rows[j]) for i, j in order)
    ids = np.full((len(order), length), pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    rows: dict[int, list[int]] = {i: [] for i in range(len(references))}
    for row, (i, j) in enumerate(order):
        tokens = references[i].rows[j]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
        rows[i].append(row)
    index = np.array([[i] for i, _ in order], dtype=np.int64)
    return MixedBatch(ids, mask, index, rows)


# A group's tensor model as the export checks it: ``(input_ids, attention_mask, filter_index) → (logits, weighted_score)``.
GroupScorer = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def onnx_group_scorer(path: Path) -> GroupScorer:
    """The group's ONNX file on ONNX Runtime (its fp32 variant, as the stand-in and Triton's backend run it)."""
    session = ort_session(path)
    return lambda ids, mask, rows: ort_scores(session, ids, mask, rows)


def check_group_parity(score: GroupScorer, references: list[MemberReference], batch: MixedBatch, precision: str,
                       variant: str) -> dict[str, ParityRecord]:
    """Per member, its rows of the mixed batch against its own reference: raw scores, weighted score, and zeros past its dimensions.

    The bound is ``precision``'s (:func:`contract.parity_limit`: bf16's is relative to each
    member's own largest |score|). Raises :class:`ParityError` naming the member; returns each
    member's parity record.
    """
    logits, weighted = score(batch.ids, batch.mask, batch.filter_index)
    results = {}
    for i, reference in enumerate(references):
        rows, n = batch.rows[i], reference.spec.num_labels
        limit = contract.parity_limit(precision, float(np.abs(reference.scores).max()))
        label = f"{variant}, member {reference.spec.name} (rows mixed with {len(references) - 1} other filters)"
        result = compare_outputs(label, logits[rows, :n], weighted[rows], reference.scores, reference.weighted, limit)
        if logits.shape[1] > n:
            compare(f"{label} columns past its {n} dimensions", logits[rows, n:], np.zeros_like(logits[rows, n:]), 0.0,
                    against="zero")
        results[reference.spec.name] = parity_record(result, precision, limit)
    return results


def export_group(base: str, loaded: LoadedMembers, path: Path) -> MixedBatch:
    """Trace the shared graph on the mixed parity batch and write ``path`` (+ external data); frees the PyTorch model."""
    batch = mixed_batch(loaded.references, loaded.pad_token_id)
    graph = shared_model(base, loaded.weights, loaded.pad_token_id)
    try:
        export_graph(graph, batch.feeds(), path)
    finally:
        del graph
        gc.collect()
    return batch
