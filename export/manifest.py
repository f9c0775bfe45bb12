"""Where an exported model came from (checksums, hub ids, library versions) and what makes two exports the same.

The records themselves are :mod:`filterserve.manifest`'s; a later export of the same filter reads
the fingerprint to refuse replacing a different model by accident.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from filterserve.manifest import FilterRecord, Source

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


def describe_source(source: str) -> Source:
    """A local folder is checksummed; a hub id is recorded as given (its revision once loaded)."""
    path = Path(source)
    if path.is_dir():
        return Source(path=str(path.resolve()), sha256=folder_checksums(path))
    return Source(hub_id=source)


def versions() -> dict[str, str]:
    names = ["filterserve", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "tokenizers"]
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@dataclass(frozen=True)
class Fingerprint:
    """What makes two exports the same model: filter, base and adapter contents (a moved folder is the same model)."""

    filter: dict[str, Any]
    base: Source
    adapter: Source

    @classmethod
    def of(cls, record: FilterRecord) -> Fingerprint:
        return cls.made(record.filter, record.sources)

    @classmethod
    def made(cls, filter: dict[str, Any], sources: dict[str, Source]) -> Fingerprint:
        return cls(filter, *(replace(sources.get(k, Source()), path=None) for k in ("base", "adapter")))
