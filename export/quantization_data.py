"""The articles static int8 is calibrated on (``--quantization-data``): never the ones the gate scores.

NNCF's static int8 fixes every activation's int8 range from the activations these articles
produce. Were they the validation articles, the accuracy gate would judge the variant on the
very texts it was tuned to and could admit one that drifts on everything else, so the two sets
must not share an article (checked on the texts the model reads).

A filter's own training articles are the best calibration (pass them with
``--quantization-data train.jsonl``). Without them, :func:`default_articles` is used: 64
articles assembled from the sentences of filterserve's eight sample articles
(``filterserve/data/sample_articles.jsonl``, English news), from one sentence to past 512
tokens. It is generic, not the filter's domain; the gate still decides.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.gate import read_jsonl

DEFAULT_COUNT = 64
# At most this many articles are calibrated on, evenly spread over the file: each costs NNCF a few
# fp32 forward passes (statistics, SmoothQuant, bias correction), seconds each at 1.5B on 2 cores.
MAX_ARTICLES = 128
DEFAULT_SEED = 0
# Sentences per default article, log-uniform: one short sentence to a long read (~40 sentences
# of ~25 tokens is past 512 tokens, so the truncated end is calibrated too).
MIN_SENTENCES, MAX_SENTENCES = 1, 40
DEFAULT_SOURCE = "filterserve's default quantization articles (sentences of filterserve/data/sample_articles.jsonl)"


def default_articles(count: int = DEFAULT_COUNT, seed: int = DEFAULT_SEED) -> list[tuple[str, str]]:
    """(title, content) pairs: a sample article's title over sentences drawn from all eight."""
    from filterserve.data import sample_articles

    samples = sample_articles()
    sentences = [s for a in samples for s in re.split(r"(?<=[.!?])\s+", a["content"]) if s.strip()]
    rng = random.Random(seed)
    articles = []
    for _ in range(count):
        n = int(round(np.exp(rng.uniform(np.log(MIN_SENTENCES), np.log(MAX_SENTENCES)))))
        articles.append((rng.choice(samples)["title"], " ".join(rng.choice(sentences) for _ in range(n))))
    return articles


def read_articles(path: Path) -> list[tuple[str, str]]:
    """(title, content) of every line of a JSONL file (labels, if any, are ignored); one line per problem."""
    articles = []
    for number, record in read_jsonl(path):
        title, content = record.get("title"), record.get("content")
        if not isinstance(title, str) or not isinstance(content, str) or not title.strip() or not content.strip():
            raise FilterServeError(f"{path} line {number}: a quantization article needs a non-empty title and content")
        articles.append((title, content))
    if not articles:
        raise FilterServeError(f"{path} holds no article")
    return articles


def spread(articles: list[tuple[str, str]], limit: int = MAX_ARTICLES) -> list[tuple[str, str]]:
    """At most ``limit`` of the articles, evenly spaced (a file sorted by topic or date is sampled across)."""
    if len(articles) <= limit:
        return list(articles)
    return [articles[int(i * len(articles) / limit)] for i in range(limit)]


def model_texts(articles: list[tuple[str, str]], spec: FilterSpec, tokenizer: Any) -> list[str]:
    """The articles as the model reads them: the filter's template and head+tail cut."""
    return spec.model_texts([spec.input_text(title, content) for title, content in articles], tokenizer)


def check_disjoint(texts: list[str], source: str, validation_texts: list[str], validation_path: Path) -> None:
    """Refuse, in one line, quantization articles that the accuracy gate will also score."""
    shared = set(texts) & set(validation_texts)
    if shared:
        raise FilterServeError(
            f"{len(shared)} of the {len(texts)} quantization articles in {source} are also in the validation data "
            f"{validation_path}: the gate must judge int8 on articles it was not calibrated on (pass another "
            "--quantization-data)"
        )


def calibration_feeds(texts: list[str], tokenizer: Any, max_length: int) -> list[dict[str, np.ndarray]]:
    """One unpadded batch of one per text: padding would put the pad token's activations into the ranges."""
    from filterserve.export.parity import encode

    return [dict(zip(contract.TOKEN_INPUTS, encode(tokenizer, [text], max_length))) for text in texts]
