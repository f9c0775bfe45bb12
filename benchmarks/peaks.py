"""What this CPU can reach per arithmetic: the measured fp32, bf16 and int8 matmul peaks.

An engine's FLOP/s means little alone: bf16 and int8 kernels have higher ceilings than fp32
(avx512_bf16 / AMX, VNNI / AMX-int8), so each engine is held to the peak of the arithmetic it
runs. A peak is the best of a few ``n×n`` by ``n×n`` products on the engines that run that
arithmetic here: PyTorch for fp32 and bf16, OpenVINO (the kernels the bf16 and int8 variants use)
for all three. Measured in the benchmark's own process, before any model is loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

ARITHMETICS = ("fp32", "bf16", "int8")


def _best(call: Callable[[], Any], reps: int) -> float:
    call()  # warm-up: first calls pick and JIT the kernels
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def _openvino_matmul(n: int, arithmetic: str) -> Callable[[], Any]:
    """One activation × constant-weight MatMul compiled for ``arithmetic`` (int8: NNCF-quantized, as ov_int8 is)."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    activation = ops.parameter([n, n], np.float32, name="x")
    weight = ops.constant(rng.standard_normal((n, n)).astype(np.float32) / np.sqrt(n))
    model = ov.Model([ops.matmul(activation, weight, False, True)], [activation], "peak")
    sample = rng.standard_normal((n, n)).astype(np.float32)
    hint = "bf16" if arithmetic == "bf16" else "f32"
    if arithmetic == "int8":
        import contextlib
        import io

        import nncf

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            model = nncf.quantize(model, nncf.Dataset([sample]), subset_size=1)
        hint = None  # the CPU's default outside the int8 layer, as Triton's backend runs ov_int8
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint} if hint else {})
    request = compiled.create_infer_request()
    return lambda: request.infer([sample])


def matmul_peaks(n: int = 2048, reps: int = 5) -> dict[str, dict[str, float]]:
    """``{arithmetic: {"flops": best FLOP/s, "by": {engine: FLOP/s}}}`` for fp32, bf16 and int8."""
    flops = 2 * n**3
    measured: dict[str, dict[str, float]] = {a: {} for a in ARITHMETICS}
    a, b = torch.randn(n, n), torch.randn(n, n)
    measured["fp32"]["pytorch"] = flops / _best(lambda: torch.mm(a, b), reps)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    measured["bf16"]["pytorch"] = flops / _best(lambda: torch.mm(a16, b16), reps)
    for arithmetic in ARITHMETICS:
        measured[arithmetic]["openvino"] = flops / _best(_openvino_matmul(n, arithmetic), reps)
    return {arithmetic: {"flops": max(by.values()), "by": by} for arithmetic, by in measured.items()}
