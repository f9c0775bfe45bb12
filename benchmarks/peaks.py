"""What this CPU can reach per arithmetic: the measured fp32, bf16 and int8 matmul peaks.

An engine's FLOP/s means little alone: bf16 and int8 kernels have higher ceilings than fp32
(avx512_bf16 / AMX, VNNI / AMX-int8), so each engine is held to the peak of the arithmetic it
runs. A peak is the best of several products on the engines that run that arithmetic here:
PyTorch for fp32 and bf16, OpenVINO (the kernels the bf16 and int8 variants use) for all three,
and ONNX Runtime's dynamic int8 (the int8 variant's kernel).
One square size alone under-reads on a CPU with AMX, whose tile kernels reach their best on the
tall, thin products a transformer runs (512 tokens × hidden × intermediate), so the model's own
MLP shapes are measured too. Measured in the benchmark's own process, before any model is loaded.

A CPU without bf16 arithmetic (no avx512_bf16, no AMX) has no bf16 peak: PyTorch would emulate
the products (a 4096³ one ran for minutes on an avx2-only EPYC) and the figure would be no
ceiling at all, so bf16 is left out of the peaks there and its rows read "no peak".
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

ARITHMETICS = ("fp32", "bf16", "int8")
# (rows, inner, columns) of the square products every run measures.
SQUARE_SHAPES = ((2048, 2048, 2048), (4096, 4096, 4096))
# Tokens in the model-shaped products: the longest text the filters score.
MODEL_TOKENS = 512

Shape = tuple[int, int, int]


def _best(call: Callable[[], Any], reps: int) -> float:
    call()  # warm-up: first calls pick and JIT the kernels
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _openvino_matmul(shape: Shape, arithmetic: str) -> Callable[[], Any]:
    """One activation × constant-weight MatMul compiled for ``arithmetic`` (int8: NNCF-quantized, as ov_int8 is)."""
    import openvino as ov
    from openvino import opset13 as ops

    m, k, n = shape
    rng = np.random.default_rng(0)
    activation = ops.parameter([m, k], np.float32, name="x")
    weight = ops.constant(rng.standard_normal((n, k)).astype(np.float32) / np.sqrt(k))
    model = ov.Model([ops.matmul(activation, weight, False, True)], [activation], "peak")
    sample = rng.standard_normal((m, k)).astype(np.float32)
    hint: str | None = "bf16" if arithmetic == "bf16" else "f32"
    if arithmetic == "int8":
        import nncf

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = nncf.quantize(model, nncf.Dataset([sample]), subset_size=1)
        hint = None  # the CPU's default outside the int8 layer, as Triton's backend runs ov_int8
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint} if hint else {})
    request = compiled.create_infer_request()
    return lambda: request.infer([sample])


def _onnxruntime_int8_matmul(shape: Shape, folder: Path) -> Callable[[], Any]:
    """One activation × constant-weight MatMul quantized as the int8 variant is (dynamic, per channel)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    m, k, n = shape
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "peak",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "fp32.onnx")
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs its pre-processing advice at WARNING
    quantize_dynamic(folder / "fp32.onnx", folder / "int8.onnx", per_channel=True, weight_type=QuantType.QInt8,
                     extra_options={"MatMulConstBOnly": True})
    session = ort.InferenceSession(str(folder / "int8.onnx"), providers=["CPUExecutionProvider"])
    sample = {"x": rng.standard_normal((m, k)).astype(np.float32)}
    return lambda: session.run(None, sample)


def model_shapes(base: str | Path) -> list[Shape]:
    """The two MLP products of the base in ``base/config.json`` at :data:`MODEL_TOKENS` tokens
    (none when the base is a hub id with no local config)."""
    path = Path(base) / "config.json"
    if not path.is_file():
        return []
    config = json.loads(path.read_text(encoding="utf-8"))
    config = config.get("text_config", config)
    hidden, intermediate = config["hidden_size"], config["intermediate_size"]
    return [(MODEL_TOKENS, hidden, intermediate), (MODEL_TOKENS, intermediate, hidden)]


def measured_arithmetics() -> tuple[str, ...]:
    """The arithmetics this CPU runs in hardware, so the ones with a peak worth measuring."""
    from filterserve.export.openvino_engine import cpu_support

    return ARITHMETICS if cpu_support().bf16 else tuple(a for a in ARITHMETICS if a != "bf16")


def matmul_peaks(extra_shapes: Sequence[Shape] = (), reps: int = 5) -> dict[str, Any]:
    """``{arithmetic: {"flops": best FLOP/s, "by": {"engine m×k×n": FLOP/s}}}`` for each of
    :func:`measured_arithmetics`, over :data:`SQUARE_SHAPES` and ``extra_shapes``."""
    arithmetics = measured_arithmetics()
    measured: dict[str, dict[str, float]] = {a: {} for a in arithmetics}
    for shape in (*SQUARE_SHAPES, *extra_shapes):
        m, k, n = shape
        label = f"{m}×{k}×{n}"
        flops = 2 * m * k * n
        a, b = torch.randn(m, k), torch.randn(k, n)
        measured["fp32"][f"pytorch {label}"] = flops / _best(partial(torch.mm, a, b), reps)
        if "bf16" in measured:
            a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
            measured["bf16"][f"pytorch {label}"] = flops / _best(partial(torch.mm, a16, b16), reps)
        for arithmetic in arithmetics:
            measured[arithmetic][f"openvino {label}"] = flops / _best(_openvino_matmul(shape, arithmetic), reps)
        with tempfile.TemporaryDirectory() as folder:
            measured["int8"][f"onnxruntime {label}"] = flops / _best(_onnxruntime_int8_matmul(shape, Path(folder)), reps)
    return {arithmetic: {"flops": max(by.values()), "by": by} for arithmetic, by in measured.items()}
