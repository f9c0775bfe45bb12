"""A toy filter export with the real tensor names, built in under a second.

Serving tests need a repository before (and independently of) the real export: this writes an
ONNX model with the contract's inputs and outputs (external data included) and a tiny byte-level
BPE tokenizer whose pad token is Qwen's ``<|endoftext|>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from filterserve.filters import FilterSpec
from filterserve.model_repository import write_repository
from filterserve.model_repository.repository import RepositorySettings

PAD_TOKEN = "<|endoftext|>"
TOY_SPEC = FilterSpec(name="toy_v1", dimensions=("alpha", "beta", "gamma"), weights=(0.5, 0.3, 0.2), max_length=64)
SENTENCES = [
    "Volunteers rebuilt the village school after the flood.",
    "A new vaccine reached remote clinics this spring.",
    "Researchers found a cheaper way to store solar power.",
    "The community garden feeds two hundred families every week.",
    "Markets fell sharply as investors feared a recession.",
]


@dataclass(frozen=True)
class ToyExport:
    repo: Path
    tokenizer_dir: Path
    spec: FilterSpec
    pad_token_id: int
    vocab_size: int
    max_batch_size: int


def build_tokenizer(dest: Path) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[PAD_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}'
    )
    return tok


def build_onnx(path: Path, vocab_size: int, weights: tuple[float, ...], hidden: int = 8) -> None:
    """logits = (sum of masked embeddings) @ W + b; weighted_score = logits @ weights."""
    rng = np.random.default_rng(0)
    n = len(weights)
    initializers = [
        numpy_helper.from_array(rng.normal(size=(vocab_size, hidden)).astype(np.float32), "embedding"),
        numpy_helper.from_array(rng.normal(size=(hidden, n)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.normal(size=(n,)).astype(np.float32), "b"),
        numpy_helper.from_array(np.asarray(weights, dtype=np.float32).reshape(n, 1), "weights"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "W"], ["proj"]),
        helper.make_node("Add", ["proj", "b"], ["logits"]),
        helper.make_node("MatMul", ["logits", "weights"], ["weighted_score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "toy_filter",
        [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"]) for name in ("input_ids", "attention_mask")],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n]),
            helper.make_tensor_value_info("weighted_score", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=64)


def build_toy_export(root: Path, *, max_batch_size: int = 8, bucket: int = 16) -> ToyExport:
    """A complete repository in ``root/repo`` as the export would leave it (a root record included)."""
    tokenizer_dir = root / "tokenizer"
    tok = build_tokenizer(tokenizer_dir)
    vocab_size = tok.get_vocab_size()
    pad_token_id = tok.token_to_id(PAD_TOKEN)
    repo = root / "repo"
    build_onnx(repo / f"{TOY_SPEC.name}_onnx" / "1" / "model.onnx", vocab_size, TOY_SPEC.weights)
    # A repository manifest at the root, as the export leaves one (Triton must ignore it); the toy has no filter records.
    (repo / "filterserve.json").write_text('{"format": "filterserve.repository/1", "filters": {}}')
    write_repository(
        repo,
        TOY_SPEC,
        RepositorySettings(max_batch_size=max_batch_size, bucket=bucket),
        tokenizer_dir=tokenizer_dir,
        precisions=["fp32"],
        default_precision="fp32",
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
    )
    return ToyExport(repo, tokenizer_dir, TOY_SPEC, pad_token_id, vocab_size, max_batch_size)
