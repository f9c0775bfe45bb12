"""The stage-1 embedder: a sentence-transformers checkpoint loaded as production loads it, exported to ONNX.

Production embeds each article with ``SentenceTransformer("intfloat/multilingual-e5-small").encode(texts)``
(veen-systems/llm-distillery ``filters/common/embedding_stage.py`` @3e1ccec, ``screen_batch``): the
text is ``f"{title}\\n\\n{content}"``, or whichever of the two is non-empty, with no "query: " or
"passage: " prefix; the tokenizer truncates at the model's ``max_seq_length`` (512). What encode
then computes is what the checkpoint's ``modules.json`` declares: for e5, the Transformer's last
hidden state, mean-pooled over the attention mask, then L2-normalized. The ONNX graph holds all
three, so the served embedding is encode's. Only that layout is implemented: any other module,
or another pooling, is refused in one line naming the file, never exported as something else.

fp32 only: the export holds the graph to :data:`~filterserve.contract.EMBEDDING_TOLERANCE` of
``SentenceTransformer.encode`` on the parity texts (articles past 512 tokens among them) and fails
above it. No int8 is offered yet (its drift would need the probes' gate, see docs/export.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export.load import locate_model, quiet_libraries
from filterserve.export.onnx_export import export_graph
from filterserve.export.parity import compare, encode, ort_session
from filterserve.manifest import ParityRecord, read_json, read_json_object

WHAT = "stage-1 embedder"
MODULES_FILE = "modules.json"
# The module types production's e5 declares, in order (their last name: sentence-transformers 6
# reads the old "sentence_transformers.models.X" types under new module paths).
TRANSFORMER, POOLING, NORMALIZE = "Transformer", "Pooling", "Normalize"
# Pooling's config: the modes a checkpoint may switch on; only the mean is implemented.
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
# encode's batch size in production's screen_batch is 32; parity runs encode at 16 (the export's
# batch), the graph at one padded batch: padding must not move the embedding.
ENCODE_BATCH = 16


@dataclass(frozen=True)
class EmbedderLayout:
    """What ``modules.json`` declares, as far as the graph repeats it."""

    normalize: bool  # a Normalize module after the pooling


def _module_kind(entry: object, path: Path) -> tuple[str, str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
        raise FilterServeError(f"{path} is malformed: each module needs a \"type\"")
    return entry["type"].rsplit(".", 1)[-1], str(entry.get("path", ""))


def _mean_pooling(config_path: Path) -> None:
    """Refused unless the Pooling module pools by the mean alone."""
    config = read_json_object(config_path, "pooling config")
    if "pooling_mode" in config:  # sentence-transformers 6's own format
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode) if isinstance(mode, list) else [repr(mode)]
    else:
        modes = [m for m in POOLING_MODES if config.get(f"pooling_mode_{m}")]
        modes = ["mean" if m == "mean_tokens" else m for m in modes]
    if modes != ["mean"]:
        raise FilterServeError(
            f"{config_path} pools by {', '.join(modes) or 'nothing'}: the stage-1 export implements mean pooling only "
            "(as multilingual-e5-small declares)"
        )


def read_layout(folder: Path) -> EmbedderLayout:
    """``modules.json`` read as production's encode runs it: Transformer → Pooling (mean) → Normalize (or none)."""
    path = folder / MODULES_FILE
    if not path.is_file():
        raise FilterServeError(f"{folder} is not a sentence-transformers model: {MODULES_FILE} is missing")
    modules = read_json(path, "sentence-transformers modules file")
    if not isinstance(modules, list):
        raise FilterServeError(f"{path} must be a JSON list of modules")
    kinds = [_module_kind(entry, path) for entry in sorted(modules, key=lambda e: e.get("idx", 0) if isinstance(e, dict) else 0)]
    names = [kind for kind, _ in kinds]
    if names not in ([TRANSFORMER, POOLING], [TRANSFORMER, POOLING, NORMALIZE]):
        raise FilterServeError(
            f"{path} declares {' → '.join(names) or 'no modules'}: the stage-1 export implements "
            f"{TRANSFORMER} → {POOLING} (mean) → {NORMALIZE} only (multilingual-e5-small's layout)"
        )
    _mean_pooling(folder / kinds[1][1] / "config.json")
    return EmbedderLayout(normalize=len(names) == 3)


@dataclass
class LoadedEmbedder:
    """The checkpoint as ``SentenceTransformer(path)`` loads it, and what the graph repeats of it."""

    model: Any  # sentence_transformers.SentenceTransformer
    tokenizer: Any
    layout: EmbedderLayout
    folder: Path
    max_length: int
    width: int
    pad_token_id: int
    vocab_size: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """The reference: production's call (no prompt, no normalize_embeddings: the modules decide)."""
        return np.asarray(self.model.encode(texts, batch_size=ENCODE_BATCH, show_progress_bar=False, convert_to_numpy=True))


def load_embedder(where: str) -> LoadedEmbedder:
    """``SentenceTransformer(where)`` on the CPU, from a folder or a hub id (:func:`locate_model`'s one-line refusals)."""
    folder = Path(locate_model(where, WHAT))
    if not folder.is_dir():  # a hub id the hub knows but the cache lacks: sentence-transformers downloads it
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(where))
    layout = read_layout(folder)
    quiet_libraries()
    from sentence_transformers import SentenceTransformer

    try:
        model: Any = SentenceTransformer(str(folder), device="cpu")
    except (OSError, ValueError) as exc:
        raise FilterServeError(f"cannot load the {WHAT} {where!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    tokenizer = model.tokenizer
    if tokenizer.pad_token_id is None:
        raise FilterServeError(f"the tokenizer of the {WHAT} {where!r} has no pad token")
    tokenizer.padding_side = "right"
    transformer = model[0].auto_model
    return LoadedEmbedder(
        model=model, tokenizer=tokenizer, layout=layout, folder=folder, max_length=int(model.max_seq_length),
        width=int(transformer.config.hidden_size), pad_token_id=int(tokenizer.pad_token_id),
        vocab_size=int(transformer.config.vocab_size),
    )


def embedder_text(title: str, content: str) -> str:
    """EmbeddingStage._prepare_text: both joined by a blank line, else whichever is non-empty."""
    return f"{title}\n\n{content}" if title and content else title or content


class EmbeddingGraph(torch.nn.Module):
    """The Transformer's last hidden state → mean over the attention mask → L2 norm (when declared),
    as sentence-transformers' Pooling and Normalize compute them."""

    def __init__(self, transformer: torch.nn.Module, normalize: bool) -> None:
        super().__init__()
        self.transformer = transformer
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def parity_texts(tokenizer: Any, max_length: int) -> list[str]:
    """Production's embedder inputs for the parity articles (stage 2's, multilingual), plus an article
    past ``max_length`` tokens of every script, which the tokenizer truncates."""
    from filterserve.export.parity import PARITY_ARTICLES

    sentence = "Neighbours rebuilt the flooded library. 邻居们修复了房屋。 Волонтёры восстановили школу. "
    n_ids = len(tokenizer(sentence)["input_ids"])
    long = ("Library reopens after the flood", sentence * (max_length // max(n_ids, 1) + 2))
    return [embedder_text(title, content) for title, content in [*PARITY_ARTICLES, long, ("", long[1]), (long[0], "")]]


def export_embedder(loaded: LoadedEmbedder, texts: list[str], path: Path) -> Path:
    """The graph traced on ``texts`` (a padded batch), written to ``path`` with external data."""
    ids, mask = encode(loaded.tokenizer, texts[:4], loaded.max_length)
    graph = EmbeddingGraph(loaded.model[0].auto_model, loaded.layout.normalize).eval()
    return export_graph(graph, dict(zip(contract.TOKEN_INPUTS, (ids, mask))), path, outputs=(contract.EMBEDDING,))


def embed(path: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The exported graph's embeddings, on ONNX Runtime as the server runs it."""
    session = ort_session(path)
    (out,) = session.run([contract.EMBEDDING], dict(zip(contract.TOKEN_INPUTS, (ids, mask))))
    return np.asarray(out)


def check_parity(loaded: LoadedEmbedder, path: Path, texts: list[str]) -> ParityRecord:
    """The graph on one right-padded batch against ``SentenceTransformer.encode``; raises ParityError above the bound."""
    ids, mask = encode(loaded.tokenizer, texts, loaded.max_length)
    against = "SentenceTransformer.encode"
    result = compare(f"{WHAT} fp32", embed(path, ids, mask), loaded.encode(texts), contract.EMBEDDING_TOLERANCE, against)
    return result.to_record(variant="fp32", against=against)
