"""Will the models fit? A pre-flight check before tritonserver loads a repository, and the project's
only memory model: pod sizing (deploy/), the README and the tests derive their figures from here.

Several 1.5B filters on one CPU box add up, and a server that loads more than the machine holds
is killed by the kernel half-way through loading, with no message. This estimates what the
named models will hold once served, from their files, their configs and the figures measured
with ``filterserve bench memory`` (benchmarks/results/memory-*), and refuses with a message that
says how much is needed, how much is available and what to do instead.

Measured per tensor model stub (ONNX Runtime on the CPU, Qwen2.5-1.5B dimensions):
- the weights: ONNX Runtime pre-packs the MatMul weights into its own memory (about the size of
  their file for fp32 and int8; fp16 is converted to fp32 first, so twice its file); the
  embedding stays in the memory-mapped file and becomes resident as tokens are seen;
- the arena, which grows to the largest batch run and never shrinks: 1.25 GB at 8×512 tokens,
  5.2 GB at 32×512 (0.32 MB per token of the batch; attention grows with the square of the length);
- about 70 MB of Python and ONNX Runtime per stub, the tokenizer and decision steps included.
Smaller models than Qwen2.5-1.5B need a smaller arena: the estimate errs on the safe side.

Before an export exists (sizing a pod), :func:`shape_estimate` gives the same figures from the
model's dimensions: the weight files follow from the parameter count (checked against transformers'
own count and the measured files in tests/test_memory.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.manifest import is_repository, read_filter_records, read_group_records
from filterserve.serve.assembly import read_model_config

GB = 1 << 30
MB = 1 << 20
# Resident weights / file size, by the precision in a tensor model's config.
WEIGHT_FACTOR = {"fp32": 1.0, "fp16": 2.0, "int8": 1.0}
# An OpenVINO tensor model (backend "openvino", whose config holds no "precision"): resident bytes
# per byte of IR after compile_model, the largest measured (f32 1.7, bf16 1.5, static int8 0.8, a
# 2-layer 1536-wide stand-in, in process); its arena measured 0.35 MB per token there, as ONNX
# Runtime's. It runs one request at a time (max_batch_size 0), so the arena is one max_length row.
OPENVINO_WEIGHT_FACTOR = 1.7
# Any other model with weights (a TensorRT plan, or a precision not listed) holds its files once.
DEFAULT_FACTOR = 1.0
# Arena per token of the largest batch a tensor model may run (max_batch_size × max_length).
ARENA_BYTES_PER_TOKEN = int(0.32 * MB)
DEFAULT_MAX_LENGTH = 512
STUB_BYTES = 70 * MB
# Kept free for tritonserver itself and the rest of the machine.
HEADROOM = 0.10
# What `filterserve serve` itself holds when it runs the check (82 MB RSS, measured here): inside a
# container it counts against the memory limit, so the models get the limit less this.
SERVE_BYTES = 82 * MB
# Bytes per parameter in an exported weight file, by precision: (embedding, norms, biases and the
# score head; the linear layers' weights). INT8 quantizes only the linear layers.
FILE_BYTES_PER_PARAMETER = {"fp32": (4, 4), "fp16": (2, 2), "int8": (4, 1)}
# A GPU pod runs NVIDIA's Triton alone (no filterserve, so no pre-flight check). Its host memory per
# byte of weight file, an estimate (nothing was run on a GPU): 1.07 while ONNX Runtime builds the
# session (the peak measured on the CPU) plus a copy held by TensorRT's parser while it builds the
# engine. The activations live on the GPU.
GPU_HOST_FACTOR = 1.07 + 1.0


class DecoderShape(Protocol):
    """A decoder's dimensions (``filterserve.export.standin.StandinShape`` is one): Qwen2 or Gemma-3."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    architecture: str  # the base config's model_type
    head_dim: int | None  # None: hidden_size // num_attention_heads


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


def folder_bytes(folder: Path) -> int:
    """A model folder's files on disk (``filterserve bench memory`` reports the same figure)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tensor_model_bytes(file_bytes: int, precision: str, max_batch_size: int, max_length: int = DEFAULT_MAX_LENGTH) -> int:
    """A tensor model served by ONNX Runtime on the CPU: its stub, its weights as held, its arena at the largest batch."""
    factor = WEIGHT_FACTOR.get(precision, DEFAULT_FACTOR)
    arena = ARENA_BYTES_PER_TOKEN * max(max_batch_size, 1) * max_length
    return STUB_BYTES + int(file_bytes * factor) + arena


def step_bytes(file_bytes: int) -> int:
    """A tokenizer or decision step: a stub and its files, no batch-sized arena."""
    return STUB_BYTES + file_bytes


def served_bytes(model_dir: Path, max_length: int = DEFAULT_MAX_LENGTH) -> int:
    """What one model folder is expected to hold once served (an ensemble holds nothing of its own)."""
    config = read_model_config(model_dir / "config.pbtxt")
    if config.platform == "ensemble":
        return 0
    files = folder_bytes(model_dir)
    if (model_dir / contract.GROUP_ADAPTERS).is_dir():  # a shared-base group's adapter copies are never loaded
        files -= folder_bytes(model_dir / contract.GROUP_ADAPTERS)
    if config.backend == "openvino":
        return STUB_BYTES + int(files * OPENVINO_WEIGHT_FACTOR) + ARENA_BYTES_PER_TOKEN * max_length
    if "precision" not in config.parameters:
        return step_bytes(files)
    return tensor_model_bytes(files, config.parameters["precision"].string_value, config.max_batch_size, max_length)


def parameters(shape: DecoderShape, num_labels: int) -> tuple[int, int]:
    """(embedding, norms, biases and score head; the linear layers) of a filter's model on ``shape``.

    Qwen2 has biases on q, k and v and two norms per layer; Gemma-3 has no biases, four norms per
    layer and one each on q and k. Both tie the embedding, and sequence classification has no LM head.
    """
    if shape.architecture not in ("qwen2", "gemma3_text"):
        raise FilterServeError(f"no parameter count known for architecture {shape.architecture!r}")
    hidden, layers = shape.hidden_size, shape.num_hidden_layers
    head_dim = shape.head_dim or hidden // shape.num_attention_heads
    q, kv = shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    linear = layers * (2 * hidden * q + 2 * hidden * kv + 3 * hidden * shape.intermediate_size)
    per_layer = q + 2 * kv + 2 * hidden if shape.architecture == "qwen2" else 4 * hidden + 2 * head_dim
    other = shape.vocab_size * hidden + layers * per_layer + hidden + hidden * num_labels
    return other, linear


def weight_file_bytes(shape: DecoderShape, num_labels: int, precision: str) -> int:
    """The exported tensor model's files for a filter of ``num_labels`` dimensions on a decoder of ``shape``."""
    if precision not in FILE_BYTES_PER_PARAMETER:
        raise FilterServeError(f"no weight-file size known for precision {precision!r}: {', '.join(FILE_BYTES_PER_PARAMETER)}")
    other, linear = parameters(shape, num_labels)
    per_other, per_linear = FILE_BYTES_PER_PARAMETER[precision]
    return other * per_other + linear * per_linear


def shape_estimate(
    name: str,
    shape: DecoderShape,
    num_labels: int,
    precisions: Sequence[str],
    max_batch_size: int,
    tokenizer_bytes: int,
    available: int,
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    gpu: bool = False,
    headroom: float = HEADROOM,
) -> MemoryEstimate:
    """One filter's models once served, from its decoder's shape: for sizing before any export exists.

    ``precisions``: the tensor models the repository holds (Triton loads them all), the served one
    first. ``gpu``: the host memory of NVIDIA's Triton (see :data:`GPU_HOST_FACTOR`); otherwise what
    :func:`check_memory` would estimate for the exported repository. The decision step's files (a
    few KB) are left out.
    """
    models = {name: 0, contract.tokenizer_model(name): step_bytes(tokenizer_bytes), contract.decision_model(name): step_bytes(0)}
    for index, precision in enumerate(precisions):
        files = weight_file_bytes(shape, num_labels, precision)
        held = int(files * GPU_HOST_FACTOR) if gpu else tensor_model_bytes(files, precision, max_batch_size, max_length)
        models[contract.tensor_model(name, None if index == 0 else precision)] = held
    return MemoryEstimate(models, available, headroom)


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


def available_in_pod(limit: int) -> int:
    """What :func:`available_bytes` reads in a fresh container with this memory limit, as serve starts."""
    return limit - SERVE_BYTES


def _max_lengths(repo: Path) -> dict[str, int]:
    """Model → the max_length it runs at, from the records of the filters and shared-base groups."""
    if not is_repository(repo):
        return {}
    lengths: dict[str, int] = {}
    for record in read_filter_records(repo).values():
        lengths |= {model: record.max_length for model in record.models}
    for group in read_group_records(repo).values():
        lengths |= {model: group.max_length for model in group.models}
    return lengths


def estimate(repo: Path, models: Iterable[str] | None = None, available: int | None = None, headroom: float = HEADROOM) -> MemoryEstimate:
    """The models named (default: every model folder in ``repo``) against the memory available now."""
    repo = Path(repo)
    names = sorted(models) if models is not None else sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    missing = [n for n in names if not (repo / n / "config.pbtxt").is_file()]
    if missing:
        raise FilterServeError(f"no model {', '.join(missing)} in {repo}")
    max_length = _max_lengths(repo)
    return MemoryEstimate(
        {name: served_bytes(repo / name, max_length.get(name, DEFAULT_MAX_LENGTH)) for name in names},
        available_bytes() if available is None else available,
        headroom,
    )


def check_memory(
    repo: Path, models: Iterable[str] | None = None, available: int | None = None, headroom: float = HEADROOM
) -> MemoryEstimate:
    """Raise a one-line FilterServeError when the models cannot fit; return the estimate when they can."""
    found = estimate(repo, models, available, headroom)
    if not found.fits:
        largest = sorted(found.models.items(), key=lambda item: item[1], reverse=True)[:3]
        raise FilterServeError(
            f"the models in {repo} need about {found.needed / GB:.1f} GB once served "
            f"({', '.join(f'{m} {b / GB:.1f} GB' for m, b in largest)}, plus {found.headroom:.0%} headroom) "
            f"but only {found.available / GB:.1f} GB is available: serve fewer filters, their int8 variants, "
            "filters of one base as one group (export --share-base), or export with a smaller --max-batch-size"
        )
    return found
