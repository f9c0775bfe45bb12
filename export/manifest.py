"""``filter.json``: what the repository serves, where it came from, and the proof it scores right.

Clients and benchmarks read the dimension names and weights from it; a later export into the
same folder reads its fingerprint to refuse overwriting a different model by accident.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from filterserve.errors import FilterServeError

MANIFEST = "filter.json"
FORMAT = "filterserve.manifest/1"
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


def read_manifest(repo: Path) -> dict[str, Any]:
    path = repo / MANIFEST
    if not path.is_file():
        raise FilterServeError(f"{repo} is not a filterserve model repository: {MANIFEST} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FilterServeError(f"{path} is not valid JSON: {exc}") from None


def prepare_out_dir(out: Path, new: dict[str, Any], force: bool) -> None:
    """Refuse to mix two models in one repository; clear our own earlier export otherwise.

    A non-empty folder that is not a filterserve export is never cleared, ``--force`` or not:
    a mistyped ``--out`` must not delete someone's files.
    """
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise FilterServeError(f"--out {out} exists and is not a folder")
    entries = list(out.iterdir())
    if not entries:
        return
    if not (out / MANIFEST).is_file():
        raise FilterServeError(
            f"--out {out} is not empty and holds no filterserve export ({MANIFEST}); choose an empty or new folder"
        )
    old = read_manifest(out)
    if fingerprint(old) != fingerprint(new) and not force:
        raise FilterServeError(
            f"--out {out} already holds a different export (filter {old.get('filter', {}).get('name')!r}, "
            f"adapter {old.get('sources', {}).get('adapter', {}).get('path')}); pass --force to replace it"
        )
    for name in old.get("models", []):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / MANIFEST).unlink()


def write_manifest(repo: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write ``filter.json`` and return exactly what was written."""
    manifest = json.loads(json.dumps({"format": FORMAT, **manifest}))
    (repo / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
