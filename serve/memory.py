"""Will the models fit? A pre-flight check before tritonserver loads a repository.

Several 1.5B filters on one CPU box add up, and a server that loads more than the machine holds
is killed by the kernel half-way through loading, with no message. This estimates what the
named models will hold once served, from their files, their configs and the figures measured
with ``filterserve bench memory`` (README, "Memory"; benchmarks/results/memory-*), and refuses
with a message that says how much is needed, how much is available and what to do instead.

Measured per tensor model stub (ONNX Runtime on the CPU, Qwen2.5-1.5B dimensions):
- the weights: ONNX Runtime pre-packs the MatMul weights into its own memory (about the size of
  their file for fp32 and int8; fp16 is converted to fp32 first, so twice its file); the
  embedding stays in the memory-mapped file and becomes resident as tokens are seen;
- the arena, which grows to the largest batch run and never shrinks: 1.25 GB at 8×512 tokens,
  5.2 GB at 32×512 (0.32 MB per token of the batch; attention grows with the square of the length);
- about 70 MB of Python and ONNX Runtime per stub, the tokenizer and decision steps included.
Smaller models than Qwen2.5-1.5B need a smaller arena: the estimate errs on the safe side.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve.errors import FilterServeError
from filterserve.manifest import is_repository, read_filter_records

GB = 1 << 30
MB = 1 << 20
# Resident weights / file size, by the precision in a tensor model's config.
WEIGHT_FACTOR = {"fp32": 1.0, "fp16": 2.0, "int8": 1.0}
# Any other model with weights (a TensorRT plan, or a precision not listed) holds its files once.
DEFAULT_FACTOR = 1.0
# Arena per token of the largest batch a tensor model may run (max_batch_size × max_length).
ARENA_BYTES_PER_TOKEN = int(0.32 * MB)
DEFAULT_MAX_LENGTH = 512
STUB_BYTES = 70 * MB
# Kept free for tritonserver itself and the rest of the machine.
HEADROOM = 0.10


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes each model is expected to hold once served, and what the machine has available."""

    models: dict[str, int]
    available: int
    headroom: float

    @property
    def needed(self) -> int:
        return int(sum(self.models.values()) * (1 + self.headroom))

    @property
    def fits(self) -> bool:
        return self.needed <= self.available


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def served_bytes(model_dir: Path, max_length: int = DEFAULT_MAX_LENGTH) -> int:
    """What one model folder is expected to hold once served (an ensemble holds nothing of its own)."""
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(encoding="utf-8"), mc.ModelConfig())
    if config.platform == "ensemble":
        return 0
    files = _model_bytes(model_dir)
    if "precision" not in config.parameters:  # a tokenizer or decision step: no batch-sized arena
        return STUB_BYTES + files
    factor = WEIGHT_FACTOR.get(config.parameters["precision"].string_value, DEFAULT_FACTOR)
    arena = ARENA_BYTES_PER_TOKEN * max(config.max_batch_size, 1) * max_length
    return STUB_BYTES + int(files * factor) + arena


def available_bytes() -> int:
    """MemAvailable, or less when a cgroup (a container's memory limit) leaves less."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def estimate(repo: Path, models: Iterable[str] | None = None, available: int | None = None, headroom: float = HEADROOM) -> MemoryEstimate:
    """The models named (default: every model folder in ``repo``) against the memory available now."""
    repo = Path(repo)
    names = sorted(models) if models is not None else sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    missing = [n for n in names if not (repo / n / "config.pbtxt").is_file()]
    if missing:
        raise FilterServeError(f"no model {', '.join(missing)} in {repo}")
    records = read_filter_records(repo).values() if is_repository(repo) else ()
    max_length = {model: record["max_length"] for record in records for model in record["models"]}
    return MemoryEstimate(
        {name: served_bytes(repo / name, max_length.get(name, DEFAULT_MAX_LENGTH)) for name in names},
        available_bytes() if available is None else available,
        headroom,
    )


def check_memory(repo: Path, models: Iterable[str] | None = None, available: int | None = None, headroom: float = HEADROOM) -> MemoryEstimate:
    """Raise a one-line FilterServeError when the models cannot fit; return the estimate when they can."""
    found = estimate(repo, models, available, headroom)
    if not found.fits:
        largest = sorted(found.models.items(), key=lambda item: item[1], reverse=True)[:3]
        raise FilterServeError(
            f"the models in {repo} need about {found.needed / GB:.1f} GB once served "
            f"({', '.join(f'{m} {b / GB:.1f} GB' for m, b in largest)}, plus {found.headroom:.0%} headroom) "
            f"but only {found.available / GB:.1f} GB is available: serve fewer filters, their int8 variants, "
            "or export with a smaller --max-batch-size"
        )
    return found
