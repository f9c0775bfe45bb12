"""Sample articles shipped with the package, for the demo and the stand-in tokenizer."""

from __future__ import annotations

import json
from importlib import resources


def sample_articles() -> list[dict[str, str]]:
    """The demo's articles: ``title`` and ``content``, plus an ``id``."""
    text = resources.files(__name__).joinpath("sample_articles.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]
