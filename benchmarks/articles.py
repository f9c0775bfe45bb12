"""Benchmark articles of known token lengths: a uniform set, and a mix shaped like real news.

No scraped news is shipped. The realistic mix is drawn from a documented distribution that
matches what 116 real multilingual articles measured with the Qwen tokenizer on
``title\\n\\ncontent``: median 97 tokens (p25 58, p75 218, mean 157), about 10% past 512.

=========  ======  =====================================  ==========================
component  share   tokens (log-uniform between bounds)    stands for
=========  ======  =====================================  ==========================
snippet    50%     30 – 100                               briefs, wire snippets
body       40%     100 – 400                              ordinary articles
tail       10%     513 – 2000                             long reads (truncated at 512)
=========  ======  =====================================  ==========================

That mix has median 100, p25 ≈ 55, p75 ≈ 240 and a mean of ≈ 167 tokens after truncation.
"""

from __future__ import annotations

import math
import random
from typing import Any

from filterserve.filters import FilterSpec

REALISTIC_MIX: tuple[tuple[str, float, int, int], ...] = (
    ("snippet", 0.5, 30, 100),
    ("body", 0.4, 100, 400),
    ("tail", 0.1, 513, 2000),
)
TITLE_WORDS = 8


def realistic_lengths(count: int, seed: int = 0) -> list[int]:
    """Token lengths drawn from :data:`REALISTIC_MIX`."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(count):
        low, high = _component_bounds(rng.random())
        lengths.append(int(math.exp(rng.uniform(math.log(low), math.log(high)))))
    return lengths


def _component_bounds(pick: float) -> tuple[int, int]:
    """The token bounds of the mix's component that ``pick`` (uniform on [0, 1)) falls in."""
    total = 0.0
    for _, share, low, high in REALISTIC_MIX:
        total += share
        if pick < total:
            return low, high
    return REALISTIC_MIX[-1][2], REALISTIC_MIX[-1][3]  # shares summed in floating point may end a hair below 1


def _word_pool() -> list[str]:
    from filterserve.data import sample_articles

    return " ".join(f"{a['title']} {a['content']}" for a in sample_articles()).split()


def text_of_length(tokenizer: Any, words: list[str], n_tokens: int, rng: random.Random) -> str:
    """A text of exactly ``n_tokens`` tokens (decoded, then checked by re-encoding)."""
    rng.shuffle(words)
    ids = tokenizer(" ".join(words * (n_tokens // len(words) + 2)))["input_ids"]
    text = tokenizer.decode(ids[:n_tokens])
    while len(tokenizer(text)["input_ids"]) > n_tokens:
        text = text[:-1]
    return text


def texts_of_length(tokenizer: Any, n_tokens: int, count: int, seed: int = 0) -> list[str]:
    """``count`` different texts of exactly ``n_tokens`` tokens."""
    words, rng = _word_pool(), random.Random(seed)
    return [text_of_length(tokenizer, words, n_tokens, rng) for _ in range(count)]


def articles_of_lengths(tokenizer: Any, spec: FilterSpec, lengths: list[int], seed: int = 0) -> list[tuple[str, str]]:
    """(title, content) pairs whose model input (the filter's template) has about the given token lengths."""
    words, rng = _word_pool(), random.Random(seed)
    articles = []
    for n_tokens in lengths:
        title = " ".join(rng.sample(words, TITLE_WORDS)).capitalize()
        overhead = len(tokenizer(spec.input_text(title, "x"))["input_ids"]) - 1
        articles.append((title, text_of_length(tokenizer, words, max(n_tokens - overhead, 1), rng)))
    return articles
