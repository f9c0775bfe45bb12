"""A small stand-in for Qwen2.5-1.5B + the Uplifting LoRA adapter, built in seconds.

The real weights cannot be downloaded everywhere (tests, CI, a fresh machine's demo), yet the
export must be exercised on the real on-disk layout: a base checkpoint saved as
``Qwen2ForCausalLM`` (so loading it for sequence classification initialises a fresh ``score``
head, exactly as the hub checkpoint does) and an adapter folder holding
``adapter_model.safetensors``, ``adapter_config.json`` and the tokenizer files. Its scores mean
nothing.

By default the tokenizer is a tiny BPE trained on the sample articles, so nothing needs to be
fetched. Given a real ``tokenizer.json`` (Qwen's), the stand-in has the real vocabulary and the
real token lengths of articles, which is what speed measurements need: the cost of an article is
its number of tokens, and the embedding table is a real share of the model at small depths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec

PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", "<|im_end|>"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Qwen2.5's embedding rows: its tokenizer's 151665 ids, padded by the model authors to 151936.
QWEN25_VOCAB_SIZE = 151936


@dataclass(frozen=True)
class StandinShape:
    """Model dimensions; the defaults are tiny, :meth:`qwen25_1_5b` gives the real ones."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 2048
    max_position_embeddings: int = 1024

    @classmethod
    def qwen25_1_5b(cls) -> "StandinShape":
        return cls(1536, 28, 12, 2, 8960, QWEN25_VOCAB_SIZE, 32768)


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


def tokenizer_from_file(tokenizer_file: Path):
    """A given ``tokenizer.json`` as the adapter folder would hold it: pad = ``<|endoftext|>``.

    Refused when the file has no ``<|endoftext|>``: the stand-in's pooling, like Qwen's, finds
    the last non-pad token through that id.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer_file = Path(tokenizer_file)
    if not tokenizer_file.is_file():
        raise FilterServeError(f"tokenizer file not found: {tokenizer_file}")
    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises plain Exception subclasses for malformed files
        raise FilterServeError(f"cannot read {tokenizer_file} as a tokenizer.json: {exc}") from None
    if tok.token_to_id(PAD_TOKEN) is None:
        raise FilterServeError(f"{tokenizer_file} has no {PAD_TOKEN} token: the stand-in pads and pools with it")
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=PAD_TOKEN, pad_token=PAD_TOKEN, padding_side="right")


def build_standin(
    root: Path,
    spec: FilterSpec,
    shape: StandinShape = StandinShape(),
    seed: int = 0,
    with_tokenizer_pad: bool = True,
    tokenizer_file: Path | None = None,
) -> Standin:
    """Write ``root/base`` and ``root/adapter`` in the real layout; random, non-zero LoRA and head.

    ``tokenizer_file``: a real ``tokenizer.json`` to use instead of the tiny trained one; the
    shape's ``vocab_size`` must hold all of its ids (Qwen's needs :data:`QWEN25_VOCAB_SIZE`).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from filterserve.export.load import quiet_libraries

    quiet_libraries()
    torch.manual_seed(seed)
    if tokenizer_file is None:
        tokenizer = build_tokenizer(min(shape.vocab_size, 4096), spec)
    else:
        tokenizer = tokenizer_from_file(tokenizer_file)
        if len(tokenizer) > shape.vocab_size:
            raise FilterServeError(
                f"{tokenizer_file} has {len(tokenizer)} ids but the stand-in's vocab_size is {shape.vocab_size}"
            )
    config = Qwen2Config(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.pad_token_id,
    )
    config.pad_token_id = None  # as in Qwen2.5's config: the export must set it
    base_dir, adapter_dir = root / "base", root / "adapter"
    Qwen2ForCausalLM(config).save_pretrained(base_dir)

    classifier = Qwen2ForSequenceClassification.from_pretrained(
        base_dir, num_labels=spec.num_labels, dtype=torch.float32
    )
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=8,
        lora_alpha=16,
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
    peft_model.save_pretrained(adapter_dir)
    if not with_tokenizer_pad:
        tokenizer.pad_token = None
    tokenizer.save_pretrained(adapter_dir)
    return Standin(base_dir=base_dir, adapter_dir=adapter_dir)
