"""The articles a caller hands the client, in the three forms it takes, and what each means to the server."""

from __future__ import annotations

from typing import Any

from filterserve.client.errors import ClientError
from filterserve.contract import CONTENT, TEXT, TITLE

# Text already joined as the filter expects, a (title, content) pair, or a record with those keys.
Item = str | tuple[str, str] | dict[str, Any]


def article_inputs(item: Item) -> dict[str, str]:
    """An item as the ensemble's inputs: TEXT, or TITLE + CONTENT.

    An article goes as TITLE and CONTENT so that the server applies the filter's own template;
    an empty title or content is refused here, as the filter's production scorer refuses it.
    """
    if isinstance(item, str):
        if not item.strip():
            raise ClientError("bad input: empty text")
        _check_encodable("text", item)
        return {TEXT: item}
    if isinstance(item, tuple) and len(item) == 2:
        title, content = item
    elif isinstance(item, dict):
        missing = [key for key in ("title", "content") if key not in item]
        if missing:
            raise ClientError(f"bad input: missing {' and '.join(missing)}")
        title, content = item["title"], item["content"]
    else:
        raise ClientError(f"bad input: expected a text, a (title, content) pair or a dict, got {type(item).__name__}")
    for name, value in (("title", title), ("content", content)):
        if not isinstance(value, str):
            raise ClientError(f"bad input: {name} must be a string, got {type(value).__name__}")
        if not value.strip():
            raise ClientError(f"bad input: {name} is empty")
        _check_encodable(name, value)
    return {TITLE: title, CONTENT: content}


def content_length(item: Item) -> int:
    """Characters of the item's content as the production scorer stamps them
    (``BasePreFilter.content_length``: a record's ``text``, else its ``content``); a joined text is its own."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, tuple):
        return len(item[1])
    text = item.get("text")
    return len(text) if isinstance(text, str) and text else len(item["content"])


def _check_encodable(name: str, value: str) -> None:
    """JSON may escape a lone surrogate (``"\\ud800"``): a str that has no UTF-8 bytes to send."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ClientError(f"bad input: {name} is not valid Unicode text ({exc.reason} at character {exc.start})") from None


def item_length(item: object) -> int:
    """Characters of an item's text: the client's stand-in for its token length (no tokenizer needed)."""
    if isinstance(item, str):
        return len(item)
    if isinstance(item, tuple):
        return sum(len(part) for part in item if isinstance(part, str))
    if isinstance(item, dict):
        return sum(len(item.get(key) or "") for key in ("title", "content") if isinstance(item.get(key, ""), str))
    return 0
