"""What each export command is asked to do, as one value checked once: :class:`ExportOptions`
(``export``), :class:`RemoveOptions` (``export --remove``), :class:`StandinOptions` (``standin``),
:class:`EngineOptions` (``build-engine``).

The CLI, :func:`filterserve.export.pipeline.export_filter` and every stage read the same value,
so a new option (an engine's setting, a filter family's, a shared base's) is added here and read
where it is used, without lengthening the signatures in between. Every check that needs nothing
loaded is made when the value is made: a mistyped flag fails before the base model is read, and
a value that exists is one the export can run. What the server is told (batch sizes, padding, the
text limit, the device) is the repository's own value, :class:`RepositorySettings`, held whole.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field, fields
from pathlib import Path
from typing import Any

from filterserve import contract, defaults
from filterserve.errors import FilterServeError
from filterserve.filters import UPLIFTING_V4, FilterSpec
from filterserve.hybrid_settings import HybridSettings
from filterserve.model_repository.repository import RepositorySettings

# The order variants are built in: fp16 converts the merged PyTorch model in place, so it follows
# fp32; int8 and the OpenVINO variants are made from the fp32 file after the PyTorch model is freed.
BUILD_ORDER = ("fp32", "fp16", "int8", *contract.OPENVINO_PRECISIONS)
# A variant made from another one's file: that one is built too, even when it was not asked for.
MADE_FROM = {"int8": "fp32", **{p: "fp32" for p in contract.OPENVINO_PRECISIONS}}
# Variants only the accuracy gate can admit (no parity bound of their own): they need --validation.
GATED_ONLY = tuple(p for p, tolerance in contract.PARITY_TOLERANCES.items() if tolerance is None)


def parse_precisions(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"fp32,fp16"`` or a list, lower-cased, each once, in the order given (the first may become the
    default); ``ov-int8`` is read as ``ov_int8`` (the names become Triton model names)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [p.strip().lower().replace("-", "_") for p in items if p.strip()]
    unknown = [p for p in items if p not in contract.PARITY_TOLERANCES]
    if not items or unknown:
        raise FilterServeError(
            f"unknown precision {', '.join(unknown) or '(none)'}; choose from {', '.join(contract.PARITY_TOLERANCES)}"
        )
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class ExportOptions:
    """Every option of one export. Paths and the precision list may be given as a user types them
    (``"fp32,int8"``, ``"~/adapter"``); they are stored normalised.

    ``precisions`` are the variants asked for, as listed: without validation data the first
    becomes the default. ``default`` names the precision the ensemble serves, or ``auto``.
    ``force`` lets the export replace a different export of the same filter.
    ``quantization_data``: the articles ov_int8 is calibrated on (JSONL, title and content), never
    the validation articles; None: filterserve's default set (:mod:`filterserve.export.quantization_data`).
    """

    base: str
    adapter: Path
    out: Path
    spec: FilterSpec = UPLIFTING_V4
    _: KW_ONLY
    precisions: tuple[str, ...] = (defaults.EXPORT_PRECISION,)
    validation: Path | None = None
    quantization_data: Path | None = None
    gate_tolerance: float = contract.GATE_TOLERANCE
    default: str = defaults.EXPORT_DEFAULT_PRECISION
    force: bool = False
    repository: RepositorySettings = RepositorySettings()
    # Add the filter to the repository's shared-base group for ``base`` (filterserve.export.group)
    # instead of exporting it merged: one copy of the base for every filter on it.
    share_base: bool = False
    # The filter folder's stage 1 (filterserve.hybrid_settings; None: stage 2 alone, as for a folder
    # without inference_hybrid.py or with --no-hybrid), and where its embedder loads from (None: the
    # id the folder names).
    hybrid: HybridSettings | None = None
    stage1_model: str | None = None

    def __post_init__(self) -> None:
        normalised = {
            "base": str(self.base),
            "adapter": Path(self.adapter).expanduser(),
            "out": Path(self.out).expanduser(),
            "precisions": parse_precisions(self.precisions),
            "validation": Path(self.validation) if self.validation is not None else None,
            "quantization_data": Path(self.quantization_data) if self.quantization_data is not None else None,
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)  # frozen: normalising is part of making the value
        self.repository.check(self.spec)
        if self.default != "auto" and self.default not in self.precisions:
            raise FilterServeError(f"--default {self.default} is not among the exported precisions {list(self.precisions)}")
        gated_only = [p for p in self.precisions if p in GATED_ONLY]
        if gated_only and self.validation is None:
            raise FilterServeError(
                f"{gated_only[0]} needs --validation VAL.jsonl (labelled articles): its drift can only be judged by the "
                "accuracy gate on trained weights"
            )
        if self.validation is not None and not self.validation.is_file():
            raise FilterServeError(f"validation data not found: {self.validation}")
        self._check_openvino()
        self._check_hybrid()
        if self.share_base and (len(self.precisions) != 1 or self.precisions[0] not in contract.GROUP_PRECISIONS):
            raise FilterServeError(
                f"--share-base builds one precision for the whole group, {' or '.join(contract.GROUP_PRECISIONS)} "
                f"(asked: {', '.join(self.precisions)}); fp16 and int8 of a group would need the accuracy gate to admit "
                "every member at once: export those filters merged instead"
            )

    def _check_hybrid(self) -> None:
        if self.stage1_model is not None and self.hybrid is None:
            raise FilterServeError(
                "--stage1-model gives the stage-1 embedder, but this export has no stage 1 (the filter folder ships no "
                "inference_hybrid.py, or --no-hybrid was given)"
            )
        if self.hybrid is not None and self.share_base:
            raise FilterServeError(
                f"--share-base does not carry stage 1 yet: pass --no-hybrid to add {self.hybrid.folder} to the group "
                "as stage 2 alone, or export it merged"
            )

    def _check_openvino(self) -> None:
        """The OpenVINO variants' own rules: CPU only, a precision this CPU runs as named, calibration data that exists."""
        asked = [p for p in self.precisions if p in contract.OPENVINO_PRECISIONS]
        if self.quantization_data is not None:
            if "ov_int8" not in self.precisions:
                raise FilterServeError("--quantization-data calibrates ov_int8 alone, which was not asked for (--precision)")
            if not self.quantization_data.is_file():
                raise FilterServeError(f"quantization data not found: {self.quantization_data}")
        if not asked:
            return
        if self.repository.gpu:
            raise FilterServeError(
                f"{', '.join(asked)} run on OpenVINO, which Triton serves on the CPU only: leave out --gpu or {', '.join(asked)}"
            )
        from filterserve.export.openvino_engine import cpu_support, expected_precision

        for precision in asked:
            expected_precision(precision, cpu_support())  # one line when this CPU cannot run it as named

    @classmethod
    def of(cls, *args: Any, **keywords: Any) -> ExportOptions:
        """From flat keywords, as :func:`export_filter` has always taken them (``max_batch_size=16``):
        those that name a :class:`RepositorySettings` field go to ``repository``."""
        own = {f.name for f in fields(RepositorySettings)}
        flat = {k: keywords.pop(k) for k in list(keywords) if k in own}
        if flat and "repository" in keywords:  # one of the two would be dropped silently
            raise TypeError(f"repository settings given twice: repository= and {', '.join(sorted(flat))}")
        if flat:
            keywords["repository"] = RepositorySettings(**flat)
        return cls(*args, **keywords)

    @property
    def build(self) -> tuple[str, ...]:
        """What is built, in :data:`BUILD_ORDER`: the precisions asked for and what they are made from."""
        needed = set(self.precisions) | {MADE_FROM[p] for p in self.precisions if p in MADE_FROM}
        return tuple(p for p in BUILD_ORDER if p in needed)


@dataclass(frozen=True)
class RemoveOptions:
    """``filterserve export --remove NAME --out REPO``: ``base`` names a group's base only when it moved."""

    out: Path
    name: str
    base: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out).expanduser())


@dataclass(frozen=True)
class StandinOptions:
    """``filterserve standin``: a random-weight base + adapter of ``shape`` (a :data:`defaults.STANDIN_SHAPES` name)."""

    out: Path
    spec: FilterSpec = UPLIFTING_V4
    shape: str = defaults.STANDIN_SHAPE
    seed: int = defaults.STANDIN_SEED
    layers: int | None = None
    tokenizer: Path | None = None

    def __post_init__(self) -> None:
        if self.shape not in defaults.STANDIN_SHAPES:
            raise FilterServeError(f"unknown stand-in shape {self.shape!r}; choose from {', '.join(defaults.STANDIN_SHAPES)}")
        if self.layers is not None and self.layers < 1:
            raise FilterServeError(f"--layers must be at least 1, got {self.layers}")
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if self.tokenizer is not None:
            object.__setattr__(self, "tokenizer", Path(self.tokenizer).expanduser())


def fp16_tolerance() -> float:
    """The fp16 variant's parity bound, which a TensorRT FP16 engine is held to by default."""
    tolerance = contract.PARITY_TOLERANCES["fp16"]
    assert tolerance is not None  # fp16 has a bound of its own (only int8's are the gate's alone)
    return tolerance


@dataclass(frozen=True)
class EngineOptions:
    """``filterserve build-engine``: which filter of which repository, the engine's shape profile
    (each ``BATCHxSEQ``; None: what the server sends), and what it is held to."""

    model_repository: Path
    name: str | None = None
    min_shape: str | None = None
    opt_shape: str | None = None
    max_shape: str | None = None
    tolerance: float = field(default_factory=lambda: fp16_tolerance())  # max |Δ| against the fp32 ONNX model
    validation: Path | None = None
    gate_tolerance: float = contract.GATE_TOLERANCE
    make_default: bool = False
    workspace_gb: int = defaults.ENGINE_WORKSPACE_GB

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repository", Path(self.model_repository).expanduser())
        if self.validation is not None:
            object.__setattr__(self, "validation", Path(self.validation))
            if not self.validation.is_file():
                raise FilterServeError(f"validation data not found: {self.validation}")
        if self.workspace_gb < 1:
            raise FilterServeError(f"--workspace-gb must be at least 1, got {self.workspace_gb}")
