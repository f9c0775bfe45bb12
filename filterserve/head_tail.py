"""Head+tail input: an over-long article becomes its first and last tokens, as the filter was trained.

The production filters (their ``filters/common/text_preprocessing.py``, switched on by
``preprocessing.head_tail`` in each filter's config.yaml) feed the model the beginning and the end
of a long article instead of the beginning alone:

1. the model's text (``f"{title}\\n\\n{content}"``) is encoded *without* special tokens;
2. if it has more than ``head_tokens + tail_tokens`` tokens, it becomes
   ``decode(first head_tokens) + separator + decode(last tail_tokens)``, both decoded with
   ``skip_special_tokens=True``; otherwise it is left as it is;
3. that text is then tokenized as usual (special tokens, ``max_length``, truncation from the right).

This is the one implementation every stage runs: the export's reference and parity texts, the
accuracy gate, the server's tokenizer step, the client's local tokenizing path and the benchmarks.
The tokenizer step runs inside Triton without this package, so this file imports nothing but the
standard library; the export copies it next to the step's ``model.py``. It works on a
``tokenizers.Tokenizer``: a transformers tokenizer's ``decode`` is that backend's decode (plus a
space clean-up that transformers skips for BPE models, the only kind filterserve serves), so both
give the same text. A cut can fall inside a character that spans several tokens (byte fallback,
byte-level BPE): decoding then yields U+FFFD for the partial bytes, exactly as in production.
"""

from __future__ import annotations

from typing import Any

HEAD_TOKENS, TAIL_TOKENS, SEPARATOR = 256, 256, " [...] "


def head_tail(text: str, tokenizer: Any, head_tokens: int, tail_tokens: int, separator: str) -> tuple[str, bool]:
    """The text the model reads, and whether it was cut to its head and tail.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` without truncation or padding: a truncating one
    would hide the length that decides the cut.
    """
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        raise ValueError("head_tail needs a tokenizer without truncation or padding: it counts every token of the text")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) <= head_tokens + tail_tokens:
        return text, False
    head = tokenizer.decode(ids[:head_tokens], skip_special_tokens=True)
    tail = tokenizer.decode(ids[len(ids) - tail_tokens :], skip_special_tokens=True)
    return head + separator + tail, True

