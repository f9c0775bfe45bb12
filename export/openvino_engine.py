"""OpenVINO on the CPU: the export's ONNX read as it is, compiled as Triton's OpenVINO backend compiles
it, what actually ran read back, and NNCF's static int8 with the exclusion ladder.

Why OpenVINO beside ONNX Runtime (DESIGN.md, "CPU engines"): it is the only engine here with bf16
arithmetic on x86, and its calibrated int8 is faster than ONNX Runtime's dynamic int8. Why the
read-back: OpenVINO picks bf16 by itself on a CPU with avx512_bf16 or AMX, and silently keeps f32
where a bf16 hint cannot be met, so the only honest record of a variant is what the compiled model
reports, with the CPU flags it depended on.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from filterserve import contract
from filterserve.errors import FilterServeError

DEVICE = "CPU"
# CPU flags (/proc/cpuinfo) that OpenVINO's bf16 and int8 kernels use; recorded with each variant.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
# Layer types of the compiled (runtime) model that do the arithmetic whose precision is recorded.
COMPUTE_LAYERS = frozenset({"FullyConnected", "MatMul", "ScaledDotProductAttention", "Convolution"})


def cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The bf16 and int8 flags of this CPU, as the kernel lists them (empty where there is no /proc)."""
    try:
        text = path.read_text()
    except OSError:
        return ()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    return tuple(flag for flag in (*BF16_FLAGS, *INT8_FLAGS) if flag in present)


@dataclass(frozen=True)
class CpuSupport:
    """What this CPU offers OpenVINO: its own verdict (OPTIMIZATION_CAPABILITIES) and the flags behind it."""

    device: str
    capabilities: tuple[str, ...]
    flags: tuple[str, ...]

    @property
    def bf16(self) -> bool:
        """bf16 arithmetic in hardware: OpenVINO lists BF16 and the CPU has avx512_bf16 or AMX."""
        return "BF16" in self.capabilities and any(flag in self.flags for flag in BF16_FLAGS)

    @property
    def default_precision(self) -> str:
        """What OpenVINO runs without a precision hint, and so what Triton's backend runs."""
        return "bf16" if self.bf16 else "f32"

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "optimization_capabilities": list(self.capabilities), "flags": list(self.flags)}


@functools.cache
def core():
    import openvino as ov

    return ov.Core()


@functools.cache
def cpu_support() -> CpuSupport:
    return CpuSupport(
        device=str(core().get_property(DEVICE, "FULL_DEVICE_NAME")),
        capabilities=tuple(core().get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")),
        flags=cpuinfo_flags(),
    )


def expected_precision(precision: str, support: CpuSupport) -> str:
    """The execution precision an OpenVINO variant must read back on this CPU; refuses one it cannot run.

    - ``bf16``: bf16, which needs bf16 hardware; never served as f32 under the bf16 name.
    - ``ov_fp32``: f32, which Triton's backend cannot pin: on a bf16 CPU it would run bf16, so the
      name would not say what runs.
    - ``ov_int8``: the CPU's default outside the quantized layers (bf16 on a bf16 CPU), recorded.
    """
    flags = ", ".join(support.flags) or "none"
    if precision == "bf16":
        if not support.bf16:
            raise FilterServeError(
                f"bf16 needs a CPU with bf16 arithmetic (avx512_bf16 or amx_bf16); this one ({support.device}; "
                f"flags: {flags}) has none and OpenVINO would run f32: export fp32 or ov_fp32 instead"
            )
        return "bf16"
    if precision == "ov_fp32":
        if support.bf16:
            raise FilterServeError(
                f"ov_fp32 cannot be served on this CPU ({flags}): Triton's OpenVINO backend cannot pin f32 and "
                "OpenVINO runs bf16 here; export bf16 (OpenVINO) or fp32 (ONNX Runtime) instead"
            )
        return "f32"
    if precision == "ov_int8":
        return support.default_precision
    raise FilterServeError(f"{precision} is not an OpenVINO variant ({', '.join(contract.OPENVINO_PRECISIONS)})")


@dataclass(frozen=True)
class Execution:
    """What a compiled model runs, as OpenVINO reports it: the variant record's ``execution``."""

    precision: str  # INFERENCE_PRECISION_HINT read back from the compiled model
    layers: dict[str, int]  # runtime precision of the compute layers → how many
    properties: dict[str, Any]  # what it was compiled with
    cpu: CpuSupport

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": f"OpenVINO {openvino_version()}",
            "precision": self.precision,
            "compute_layers": self.layers,
            "compiled_with": {k: str(v) for k, v in self.properties.items()},
            "cpu": self.cpu.to_dict(),
        }


def openvino_version() -> str:
    import openvino as ov

    return ov.get_version().split("-")[0]


def read_execution(compiled: Any, properties: Mapping[str, Any]) -> Execution:
    layers: Counter[str] = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in COMPUTE_LAYERS:
            layers[info["runtimePrecision"].astype(str)] += 1
    return Execution(
        precision=compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
        layers=dict(sorted(layers.items())),
        properties=dict(properties),
        cpu=cpu_support(),
    )


def _first_line(exc: Exception) -> str:
    """OpenVINO's messages run to a C++ stack of source locations; the first line says what failed."""
    return next(iter(str(exc).splitlines()), type(exc).__name__)


def read_model(path: Path) -> Any:
    """An ONNX file (external data beside it) or an IR, as OpenVINO reads it; one line when it cannot."""
    if not Path(path).is_file():
        raise FilterServeError(f"model not found: {path}")
    try:
        return core().read_model(str(path))
    except RuntimeError as exc:  # OpenVINO reports every read failure as RuntimeError
        raise FilterServeError(f"OpenVINO cannot read {path}: {_first_line(exc)}") from None


class OpenVinoModel:
    """A compiled tensor model: ``scores(ids, mask) → (logits, weighted_score)``, and what it runs."""

    def __init__(self, path: Path, properties: Mapping[str, Any], device: str = DEVICE) -> None:
        try:
            self.compiled = core().compile_model(read_model(path), device, dict(properties))
        except RuntimeError as exc:
            raise FilterServeError(f"OpenVINO cannot compile {path} for {device}: {_first_line(exc)}") from None
        self.request = self.compiled.create_infer_request()
        self.outputs = [self.compiled.output(name) for name in contract.TENSOR_OUTPUTS]
        self.execution = read_execution(self.compiled, properties)

    def scores(self, ids: np.ndarray, mask: np.ndarray, filter_index: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A shared-base group's model also takes each row's ``filter_index`` [batch, 1]."""
        feeds = dict(zip(contract.TOKEN_INPUTS, (ids, mask)))
        if filter_index is not None:
            feeds[contract.FILTER_INDEX] = filter_index
        result = self.request.infer(feeds)
        logits, weighted = (np.array(result[output], copy=True) for output in self.outputs)
        return logits, weighted


def checked_model(path: Path, properties: Mapping[str, Any], precision: str) -> OpenVinoModel:
    """Compiled, and refused in one line unless it runs the precision ``precision`` must run here."""
    expected = expected_precision(precision, cpu_support())
    model = OpenVinoModel(path, properties)
    if model.execution.precision != expected:
        raise FilterServeError(
            f"{precision}: OpenVINO compiled {path} to run {model.execution.precision}, not {expected} "
            f"(CPU flags: {', '.join(cpu_support().flags) or 'none'}); it is not served under a name that says otherwise"
        )
    return model


def served_model(precision: str, path: Path) -> OpenVinoModel:
    """The variant compiled as Triton's OpenVINO backend compiles it from the config the export
    writes for it, and refused unless it runs what ``precision`` must run on this CPU."""
    from filterserve.model_repository.runtime.openvino import backend_parameters, compile_properties

    return checked_model(path, compile_properties(backend_parameters(bf16=precision == "bf16")), precision)


# What a variant's record says of the precision beside what ran (the issue of a backend that cannot pin one).
SERVED_PRECISION_NOTE = (
    "Triton's OpenVINO backend cannot pin a precision (it accepts only HINT_BF16): it runs what OpenVINO "
    "picks on the serving CPU, bf16 where the CPU has avx512_bf16 or AMX. The parity and the gate were "
    "measured at the precision above, compiled as that backend compiles this config, on this CPU; "
    "filterserve's stand-in refuses to load the model where it would run another."
)


def execution_record(execution: Execution) -> dict[str, Any]:
    """A variant record's ``execution``: what OpenVINO ran, and why that is what a server will run."""
    return execution.to_dict() | {"served_precision": SERVED_PRECISION_NOTE}


def write_ir(model: Any, xml_path: Path, mode_like: Path) -> Path:
    """``model.xml`` + ``model.bin`` with the weights as they are (no FP16 compression), readable like ``mode_like``.

    ``save_model`` compresses float weights to FP16 by default: the served model would then not be
    the one whose parity and gate were measured in memory.
    """
    import openvino as ov

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    for written in (xml_path, xml_path.with_suffix(".bin")):
        shutil.copymode(mode_like, written)
    return xml_path


def onnx_to_ir(onnx_path: Path, xml_path: Path) -> Path:
    """The export's fp32 ONNX as OpenVINO IR, the weights unchanged (the bf16 and ov_fp32 variants)."""
    return write_ir(read_model(onnx_path), xml_path, onnx_path)


def _has_parameter_upstream(node: Any) -> bool:
    """Whether a graph input feeds ``node``: an activation, as opposed to a weight built from constants."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current.get_type_name() == "Parameter":
            return True
        key = current.get_friendly_name()
        if key in seen:
            continue
        seen.add(key)
        stack.extend(current.input_value(i).get_node() for i in range(current.get_input_size()))
    return False


def matmul_roles(model: Any) -> tuple[list[str], list[str], list[str]]:
    """MatMul ops by role: (head, weight layers, activation × activation), in graph order.

    The head is the last two MatMuls (the score head and the weighted sum), as in
    :func:`filterserve.export.quantize.head_nodes`; attention's activation products stay out of
    int8 as in ONNX Runtime's (``MatMulConstBOnly``).
    """
    matmuls = [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
    head = [op.get_friendly_name() for op in matmuls[-2:]]
    weights: list[str] = []
    products: list[str] = []
    for op in matmuls[:-2]:
        (products if _has_parameter_upstream(op.input_value(1).get_node()) else weights).append(op.get_friendly_name())
    return head, weights, products


@dataclass(frozen=True)
class StaticInt8:
    """What NNCF quantized: the weight MatMuls kept in fp32 besides the head, by the ladder's predicate."""

    kept: list[str]
    quantized: int


def quantize_static_int8(
    fp32_onnx: Path,
    ir_path: Path,
    calibration: Sequence[Mapping[str, np.ndarray]],
    keep_fp32: Callable[[str], bool],
) -> StaticInt8:
    """NNCF static int8 (``ModelType.TRANSFORMER``) of the fp32 export, calibrated on ``calibration``.

    ``keep_fp32`` takes a PyTorch module path (one rung of
    :data:`filterserve.export.quantize.EXCLUSION_LADDER`); the module paths come from the ONNX
    graph, whose MatMul names OpenVINO keeps. The head, attention's products and the embedding
    table (a Gather, which NNCF would store in int8) always stay out, as in ONNX Runtime's int8.
    """
    import nncf
    import onnx

    from filterserve.export.quantize import module_paths

    if not calibration:
        raise FilterServeError("static int8 needs at least one calibration article")
    paths = module_paths(onnx.load(str(fp32_onnx), load_external_data=False))
    model = read_model(fp32_onnx)
    head, weights, products = matmul_roles(model)
    unnamed = [name for name in weights if name not in paths]
    if unnamed:
        raise FilterServeError(
            f"{fp32_onnx}: OpenVINO's MatMuls {', '.join(unnamed[:3])} have no ONNX node of that name, so the "
            "exclusion ladder cannot tell their layers; use the model filterserve export wrote"
        )
    kept = [name for name in weights if keep_fp32(paths[name])]
    logging.getLogger("nncf").setLevel(logging.ERROR)  # its INFO lines; Steps reports progress instead
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
            quantized = nncf.quantize(
                model,
                nncf.Dataset(list(calibration)),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(calibration),
                ignored_scope=nncf.IgnoredScope(names=[*head, *products, *kept], types=["Gather"]),
            )
    except (nncf.ValidationError, RuntimeError, ValueError) as exc:
        raise FilterServeError(f"NNCF int8 quantization of {fp32_onnx} failed: {type(exc).__name__}: {exc}") from exc
    write_ir(quantized, ir_path, fp32_onnx)
    return StaticInt8(kept=kept, quantized=len(weights) - len(kept))
