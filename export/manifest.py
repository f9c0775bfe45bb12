"""A filter's record (``<name>.filter.json``): where the model came from, and the proof it scores right.

Clients and benchmarks read the dimension names and weights from it; a later export of the same
filter reads its fingerprint to refuse replacing a different model by accident.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from filterserve.manifest import FILTER_FORMAT

_CHECKSUMMED = (".safetensors", ".bin", ".json", ".model", ".txt")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    return {
        p.name: sha256(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in _CHECKSUMMED and p.name != "README.md"
    }


def describe_source(source: str) -> dict[str, Any]:
    """A local folder is checksummed; a hub id is recorded as given (its revision once loaded)."""
    path = Path(source)
    if path.is_dir():
        return {"path": str(path.resolve()), "sha256": folder_checksums(path)}
    return {"hub_id": source}


def versions() -> dict[str, str]:
    names = ["filterserve", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "tokenizers"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def fingerprint(manifest: dict[str, Any]) -> dict[str, Any]:
    """What makes two exports the same model: filter, base and adapter contents."""
    sources = manifest.get("sources", {})
    strip = lambda s: {k: v for k, v in s.items() if k != "path"}  # noqa: E731 - a moved folder is the same model
    return {
        "filter": manifest.get("filter"),
        "base": strip(sources.get("base", {})),
        "adapter": strip(sources.get("adapter", {})),
    }


def new_record(fields: dict[str, Any]) -> dict[str, Any]:
    """A filter's record as it will be written: format first, and exactly what JSON keeps."""
    return json.loads(json.dumps({"format": FILTER_FORMAT, **fields}))
