"""The filter's decision as a tiny ONNX graph: raw scores → what consumers read.

The production scorer turns the raw outputs into, in this order: per-dimension calibration
(isotonic breakpoints, linear interpolation, flat past the ends), a clamp to [0, 10], the
weighted average of the clamped scores, and the gatekeeper's cap. Doing this as its own small
ONNX model (not inside the 6 GB tensor model, not in a Python step) means: it runs in Triton's
C++ ONNX Runtime backend in NVIDIA's container at microsecond cost; a new calibration rewrites a
few kilobytes instead of re-exporting the model; and parity stays on the raw scores, since
calibration is a deliberate change, not drift.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from filterserve.contract import FINAL_SCORES, GATEKEEPER_APPLIED, LOGITS, SCORES, WEIGHTED_AVERAGE
from filterserve.filters import SCORE_RANGE, FilterSpec

OPSET = 18


def _segments(spec: FilterSpec) -> dict[str, np.ndarray]:
    """Breakpoints as clipped segments: ``y0 + Σ slope_i · clip(v − x_i, 0, x_{i+1} − x_i)``.

    That sum is exactly linear interpolation between the breakpoints, constant past both ends.
    Dimensions with fewer breakpoints get zero-width segments, which add nothing.
    """
    calibrated = dict(spec.calibration)
    n_segments = max((len(p.x) - 1 for p in calibrated.values()), default=1)
    shape = (n_segments, spec.num_labels)
    start, width, slope = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    first = np.zeros(spec.num_labels)
    for j, dim in enumerate(spec.dimensions):
        if dim not in calibrated:
            continue
        x, y = np.asarray(calibrated[dim].x), np.asarray(calibrated[dim].y)
        k = len(x) - 1
        start[:k, j], width[:k, j], slope[:k, j] = x[:-1], np.diff(x), np.diff(y) / np.diff(x)
        first[j] = y[0]
    mask = np.array([dim in calibrated for dim in spec.dimensions])
    return {"start": start, "width": width, "slope": slope, "first": first, "calibrated": mask}


def decision_graph(spec: FilterSpec):
    """``logits`` FP32 [batch, n] → ``scores`` (the same, passed through for the ensemble),
    ``final_scores`` [batch, n], ``weighted_average`` [batch, 1], ``gatekeeper_applied`` BOOL [batch, 1]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes: list = []
    inits: list = []

    def const(name: str, value: np.ndarray | float | int | bool, dtype=np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    n = spec.num_labels
    scores = node("Identity", [LOGITS], SCORES)
    if spec.calibration:
        seg = _segments(spec)
        lifted = node("Unsqueeze", [scores, const("axis_1", [1], np.int64)], "lifted")  # [B, 1, n]
        offset = node("Sub", [lifted, const("seg_start", seg["start"])], "offset")  # [B, S, n]
        within = node("Min", [node("Max", [offset, const("zero", 0.0)], "above_start"), const("seg_width", seg["width"])], "within")
        rises = node("Mul", [within, const("seg_slope", seg["slope"])], "rises")
        summed = node("ReduceSum", [rises, const("axis_1b", [1], np.int64)], "summed", keepdims=0)
        interpolated = node("Add", [summed, const("seg_first", seg["first"])], "interpolated")
        scores = node("Where", [const("is_calibrated", seg["calibrated"], bool), interpolated, LOGITS], "calibrated")
    low, high = SCORE_RANGE
    final = node("Clip", [scores, const("low", low), const("high", high)], FINAL_SCORES)
    weights = np.asarray(spec.weights, dtype=np.float64)
    average = node("MatMul", [final, const("weights", (weights / weights.sum()).reshape(n, 1))], "average")

    rule = spec.gatekeeper
    if rule is None:
        node("Identity", [average], WEIGHTED_AVERAGE)
        shape = node("Shape", [average], "average_shape")
        nodes.append(helper.make_node("ConstantOfShape", [shape], [GATEKEEPER_APPLIED],
                                      value=helper.make_tensor("false", TensorProto.BOOL, [1], [False])))
    else:
        columns: dict[str, str] = {}

        def column(dim: str) -> str:
            if dim not in columns:
                index = const(f"index_{dim}", [spec.dimensions.index(dim)], np.int64)
                columns[dim] = node("Gather", [final, index], f"col_{dim}", axis=1)
            return columns[dim]

        gated = node("Less", [column(rule.dimension), const("below", rule.below)], "gate_low")
        if rule.unless:
            held = [node("GreaterOrEqual", [column(d), const(f"unless_{i}", t)], f"unless_held_{i}") for i, (d, t) in enumerate(rule.unless)]
            exception = held[0]
            for i, other in enumerate(held[1:]):
                exception = node("And", [exception, other], f"unless_all_{i}")
            gated = node("And", [gated, node("Not", [exception], "no_exception")], "gated")
        cap = const("cap", rule.cap)
        node("Where", [gated, node("Min", [average, cap], "capped"), average], WEIGHTED_AVERAGE)
        node("And", [gated, node("Greater", [average, cap], "above_cap")], GATEKEEPER_APPLIED)

    graph = helper.make_graph(
        nodes,
        f"{spec.name}_decision",
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["batch", n])],
        [
            helper.make_tensor_value_info(SCORES, TensorProto.FLOAT, ["batch", n]),
            helper.make_tensor_value_info(FINAL_SCORES, TensorProto.FLOAT, ["batch", n]),
            helper.make_tensor_value_info(WEIGHTED_AVERAGE, TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info(GATEKEEPER_APPLIED, TensorProto.BOOL, ["batch", 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="filterserve")
    model.ir_version = 8  # what ONNX Runtime and Triton's ONNX Runtime backend read for opset 18
    onnx.checker.check_model(model, full_check=True)
    return model


def write_decision_model(path: Path, spec: FilterSpec) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(decision_graph(spec), str(path))
    return path
