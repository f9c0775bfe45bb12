"""What a GPU serves, and under which key its TensorRT engines are cached.

Two places build TensorRT engines for a filter: ONNX Runtime's TensorRT accelerator inside
Triton's ONNX Runtime backend (``filterserve export --gpu``) and ``filterserve build-engine``
(a ``tensorrt_plan`` model). Both take their optimisation profile from :func:`serving_profile`,
so an engine is tuned for the shapes the server actually sends, and the accelerator's engine
cache lives under a folder named after the checksum of the ONNX files it was built from, so a
new export can never be answered by an engine built from an older one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from filterserve import contract
from filterserve.errors import FilterServeError

# The one variant ONNX Runtime's TensorRT accelerator runs (in FP16): its recorded parity (0.05)
# and accuracy gate describe FP16 arithmetic. FP16 on the fp32 variant would be served under
# fp32's 1e-4 figure, which would not describe it; int8 (ONNX Runtime's dynamic quantization
# ops) is not something TensorRT takes.
TENSORRT_PRECISION = "fp16"
# Where ONNX Runtime writes engines unless --trt-cache-dir says otherwise: writable in NVIDIA's
# container and in deploy/ (the repository itself is mounted read-only there, or copied from
# object storage). Each model's engines go into <root>/<model>/<checksum>/.
TRT_CACHE_ROOT = "/tmp/filterserve_trt_cache"
# The optimum TensorRT tunes kernels for: a typical real article (median 97 tokens, p75 218;
# docs/design.md), rounded up to a bucket, in a batch of the dynamic batcher's middle preferred size.
OPT_TOKENS = 128
OPT_BATCH = 8
CHECKSUM_CHARS = 16


@dataclass(frozen=True)
class ShapeProfile:
    """One TensorRT optimisation profile over (batch, sequence), the same for both token inputs."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    @staticmethod
    def parse(text: str) -> tuple[int, int]:
        try:
            batch, seq = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise FilterServeError(f"shape {text!r} must be BATCHxSEQ, e.g. 8x256") from None
        return batch, seq

    def check(self) -> None:
        for axis in range(2):
            if not 1 <= self.min[axis] <= self.opt[axis] <= self.max[axis]:
                raise FilterServeError(f"profile needs 1 <= min <= opt <= max on every axis, got {self.describe()}")

    def covers(self, low: tuple[int, int], high: tuple[int, int]) -> bool:
        """Whether every shape from ``low`` to ``high`` (per axis) is inside this profile."""
        return all(self.min[a] <= low[a] and high[a] <= self.max[a] for a in range(2))

    def describe(self) -> str:
        return " / ".join(f"{name} {b}x{s}" for name, (b, s) in (("min", self.min), ("opt", self.opt), ("max", self.max)))

    def ort_shapes(self) -> dict[str, str]:
        """ONNX Runtime's ``trt_profile_{min,opt,max}_shapes`` strings: ``input:BxS,input:BxS``."""
        return {
            f"trt_profile_{name}_shapes": ",".join(f"{tensor}:{b}x{s}" for tensor in contract.TOKEN_INPUTS)
            for name, (b, s) in (("min", self.min), ("opt", self.opt), ("max", self.max))
        }


def padded_length(tokens: int, bucket: int, max_length: int) -> int:
    """The length the tokenizer step pads a request of ``tokens`` tokens to (its ``_padded_length``)."""
    return min(-(-max(tokens, 1) // bucket) * bucket, max_length)


def serving_profile(max_batch_size: int, max_length: int, bucket: int) -> ShapeProfile:
    """Every shape the tensor model can be sent, tuned at a typical one.

    The minimum is 1x1, not one bucket: clients that tokenize themselves call the tensor model
    with unpadded ids. The maximum is what the dynamic batcher can join at the longest text.
    """
    return ShapeProfile(
        min=(1, 1),
        opt=(min(OPT_BATCH, max_batch_size), padded_length(OPT_TOKENS, bucket, max_length)),
        max=(max_batch_size, max_length),
    )


def onnx_checksum(model_file: Path) -> str:
    """sha256 over the model file and every external-data file beside it, named and in order.

    ONNX Runtime names cached engines by the model's file name, input, initializer and node output
    names and its versions (``TRTGenerateId``), not the weights: a retrained adapter exported into
    the same graph would otherwise be served from the old engine.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in model_file.parent.iterdir() if p.is_file()):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def engine_cache_dir(root: str, model_name: str, checksum: str) -> str:
    return f"{root.rstrip('/')}/{model_name}/{checksum[:CHECKSUM_CHARS]}"


@dataclass(frozen=True)
class TensorRTAccelerator:
    """ONNX Runtime's TensorRT execution provider in FP16, as Triton's ONNX Runtime backend takes it."""

    profile: ShapeProfile
    cache_dir: str
    workspace_bytes: int = 4 << 30

    def parameters(self) -> dict[str, str]:
        """Keys as Triton's ONNX Runtime backend names them (it maps precision_mode and max_workspace_size_bytes)."""
        return {
            "precision_mode": "FP16",
            # Pow + ReduceMean of every norm in FP32: x² overflows FP16 for |x| > 256 (docs/design.md: Qwen2
            # 1.5B is reported to reach NaN in FP16 there).
            "trt_layer_norm_fp32_fallback": "true",
            "max_workspace_size_bytes": str(self.workspace_bytes),
            "trt_engine_cache_enable": "true",
            "trt_engine_cache_path": self.cache_dir,
            **self.profile.ort_shapes(),
        }
