"""The filter's decision as a tiny ONNX graph: raw scores → what consumers read.

The production scorer (``filters/common/filter_base_scorer.py`` @4d17e75, ``_process_raw_scores``)
turns the raw outputs into, in this order: per-dimension calibration (isotonic breakpoints, linear
interpolation, flat past the ends; a non-finite raw score on a calibrated dimension becomes 0), a
clamp to [0, 10], the weighted average of the clamped scores, the gatekeepers' caps, the
short-content cap (``_apply_short_content_cap``: content shorter than ``min_chars`` characters caps
the average at ``cap``), and the tier on that calibrated raw average (``_assign_tier``: the
op-point decides once, ADR-022 and NM#280). Its consumer then normalizes the average where the
filter has a normalization (a percentile lookup, or a linear scale factor): ranking metadata that
moves ``weighted_average`` and never the tier. A stage-1 row of the hybrid (``screened``: the
probe's scores) is clamped, averaged, capped for short content and tiered, but neither calibrated
nor gated, as ``HybridScorer.score_batch`` treats it; one graph serves both kinds of rows.
Doing this as its own small ONNX model (not inside the 6 GB tensor model,
not in a Python step) means: it runs in Triton's C++ ONNX Runtime backend in NVIDIA's container at
microsecond cost; a new calibration rewrites a few kilobytes instead of re-exporting the model; and
parity stays on the raw scores, since calibration is a deliberate change, not drift.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from filterserve.contract import (
    CONTENT_LENGTH,
    CONTENT_LENGTH_INPUT,
    FINAL_SCORES,
    GATEKEEPER_APPLIED,
    LOGITS,
    NO_TIER_INDEX,
    RAW_WEIGHTED_AVERAGE,
    SCORES,
    SCREENED,
    SHORT_CONTENT_CAP_APPLIED,
    TIER,
    WEIGHTED_AVERAGE,
    decision_model,
)
from filterserve.filters import SCORE_RANGE, Breakpoints, FilterSpec

if TYPE_CHECKING:  # onnx is an export dependency, imported where a graph is built
    from onnx import ModelProto, ValueInfoProto

OPSET = 18


def _segments(columns: list[Breakpoints | None]) -> dict[str, np.ndarray]:
    """Breakpoints as clipped segments: ``y0 + Σ slope_i · clip(v − x_i, 0, x_{i+1} − x_i)``.

    That sum is exactly linear interpolation between the breakpoints, constant past both ends
    (``np.interp``). Columns with fewer breakpoints get zero-width segments, which add nothing.
    """
    n_segments = max((len(p.x) - 1 for p in columns if p is not None), default=1)
    shape = (n_segments, len(columns))
    start, width, slope = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    first = np.zeros(len(columns))
    for j, points in enumerate(columns):
        if points is None:
            continue
        x, y = np.asarray(points.x), np.asarray(points.y)
        k = len(x) - 1
        start[:k, j], width[:k, j], slope[:k, j] = x[:-1], np.diff(x), np.diff(y) / np.diff(x)
        first[j] = y[0]
    return {"start": start, "width": width, "slope": slope, "first": first}


class _Graph:
    """Nodes and initializers of the decision graph, with unique names."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.inits: list = []

    def const(self, name: str, value, dtype=np.float32) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def interpolate(self, value: str, columns: list[Breakpoints | None], prefix: str) -> str:
        """``np.interp`` per column of ``value`` [B, n] (uncalibrated columns pass through); a non-finite value → 0."""
        seg = _segments(columns)
        c = lambda name, v, dtype=np.float32: self.const(f"{prefix}_{name}", v, dtype)  # noqa: E731
        n = lambda op, inputs, out, **a: self.node(op, inputs, f"{prefix}_{out}", **a)  # noqa: E731
        lifted = n("Unsqueeze", [value, c("axis", [1], np.int64)], "lifted")  # [B, 1, n]
        offset = n("Sub", [lifted, c("start", seg["start"])], "offset")  # [B, S, n]
        within = n("Min", [n("Max", [offset, c("zero", 0.0)], "above_start"), c("width", seg["width"])], "within")
        rises = n("Mul", [within, c("slope", seg["slope"])], "rises")
        summed = n("ReduceSum", [rises, c("sum_axis", [1], np.int64)], "summed", keepdims=0)
        interpolated = n("Add", [summed, c("first", seg["first"])], "interpolated")
        non_finite = n("Or", [n("IsNaN", [value], "is_nan"), n("IsInf", [value], "is_inf")], "non_finite")
        interpolated = n("Where", [non_finite, c("non_finite_value", 0.0), interpolated], "finite")
        mask = np.array([p is not None for p in columns])
        return n("Where", [c("is_calibrated", mask, bool), interpolated, value], "out")


def _all_false(g: _Graph, like: str, output: str) -> str:
    """``output``: BOOL false, shaped as ``like`` [B, 1] (a flag no rule of this filter can raise)."""
    from onnx import TensorProto, helper

    shape = g.node("Shape", [like], f"{output}_shape")
    g.nodes.append(helper.make_node("ConstantOfShape", [shape], [output],
                                    value=helper.make_tensor("false", TensorProto.BOOL, [1], [False])))
    return output


def _gatekeepers(g: _Graph, spec: FilterSpec, final: str, average: str) -> tuple[str, str]:
    """Every gatekeeper's cap where its rule holds: the average is lowered to the lowest such cap.

    Applying the production scorer's caps one after another gives the same, in any order:
    ``gatekeeper_applied`` is true when some cap lowered the average. A screened row is never gated.
    """
    if not spec.gatekeepers:
        return average, _all_false(g, average, GATEKEEPER_APPLIED)
    columns: dict[str, str] = {}

    def column(dim: str) -> str:
        if dim not in columns:
            index = g.const(f"index_{dim}", [spec.dimensions.index(dim)], np.int64)
            columns[dim] = g.node("Gather", [final, index], f"col_{dim}", axis=1)
        return columns[dim]

    lowest = g.const("no_cap", np.inf)
    for i, rule in enumerate(spec.gatekeepers):
        gated = g.node("Less", [column(rule.dimension), g.const(f"below_{i}", rule.below)], f"gate_low_{i}")
        if rule.unless:
            held = [g.node("GreaterOrEqual", [column(d), g.const(f"unless_{i}_{k}", t)], f"unless_held_{i}_{k}")
                    for k, (d, t) in enumerate(rule.unless)]
            exception = held[0]
            for k, other in enumerate(held[1:]):
                exception = g.node("And", [exception, other], f"unless_all_{i}_{k}")
            gated = g.node("And", [gated, g.node("Not", [exception], f"no_exception_{i}")], f"gated_{i}")
        cap = g.node("Where", [gated, g.const(f"cap_{i}", rule.cap), g.const(f"no_cap_{i}", np.inf)], f"cap_if_gated_{i}")
        lowest = g.node("Min", [lowest, cap], f"lowest_cap_{i}")
    lowest = g.node("Where", [SCREENED, g.const("not_gated", np.inf), lowest], "gate_cap")
    capped = g.node("Min", [average, lowest], "capped")
    g.node("Greater", [average, lowest], GATEKEEPER_APPLIED)
    return capped, GATEKEEPER_APPLIED


def _short_content(g: _Graph, spec: FilterSpec, average: str) -> str:
    """The short-content cap: a known length under ``min_chars`` lowers an average above ``cap`` to it."""
    rule = spec.short_content
    if rule is None:
        _all_false(g, average, SHORT_CONTENT_CAP_APPLIED)
        return average
    from onnx import TensorProto

    length = g.node("Cast", [CONTENT_LENGTH_INPUT], "content_length_f", to=TensorProto.FLOAT)
    known = g.node("GreaterOrEqual", [length, g.const("no_length", 0.0)], "length_known")
    short = g.node("And", [known, g.node("Less", [length, g.const("min_chars", rule.min_chars)], "under_min")], "short")
    cap = g.const("short_cap", rule.cap)
    g.node("And", [short, g.node("Greater", [average, cap], "above_cap")], SHORT_CONTENT_CAP_APPLIED)
    return g.node("Where", [SHORT_CONTENT_CAP_APPLIED, cap, average], "short_capped")


def _normalize(g: _Graph, spec: FilterSpec, raw: str) -> str:
    rule = spec.normalization
    if rule is None:
        return g.node("Identity", [raw], WEIGHTED_AVERAGE)
    if rule.method == "percentile":
        return g.node("Identity", [g.interpolate(raw, [rule.points], "normalization")], WEIGHTED_AVERAGE)
    scaled = g.node("Mul", [raw, g.const("score_scale_factor", rule.score_scale_factor)], "scaled")
    return g.node("Min", [scaled, g.const("scale_ceiling", SCORE_RANGE[1])], WEIGHTED_AVERAGE)


def _tier(g: _Graph, spec: FilterSpec, average: str) -> str:
    """The index of the first tier whose threshold ``average`` reaches, or NO_TIER_INDEX."""
    from onnx import TensorProto, helper

    if not spec.tiers:
        shape = g.node("Shape", [average], "tier_shape")
        g.nodes.append(helper.make_node("ConstantOfShape", [shape], [TIER],
                                        value=helper.make_tensor("no_tier", TensorProto.INT32, [1], [NO_TIER_INDEX])))
        return TIER
    thresholds = g.const("tier_thresholds", [t.threshold for t in spec.tiers])
    reached = g.node("Cast", [g.node("GreaterOrEqual", [average, thresholds], "tier_reached")], "tier_reached_f", to=TensorProto.FLOAT)
    first = g.node("ArgMax", [reached], "tier_first", axis=1, keepdims=1)  # the first maximum: the first tier reached
    some = g.node("Greater", [g.node("ReduceMax", [reached, g.const("tier_axis", [1], np.int64)], "tier_any", keepdims=1),
                              g.const("half", 0.5)], "tier_some")
    index = g.node("Where", [some, first, g.const("no_tier", [NO_TIER_INDEX], np.int64)], "tier_index")
    return g.node("Cast", [index], TIER, to=TensorProto.INT32)


def decision_graph(spec: FilterSpec, width: int | None = None) -> ModelProto:
    """``logits`` FP32 [batch, n], ``CONTENT_LENGTH`` INT32 [batch, 1] and ``screened`` BOOL [batch, 1]
    → ``scores`` (the logits, passed through for the ensemble), ``final_scores`` [batch, n],
    ``weighted_average`` [batch, 1] (normalized where the filter normalizes), ``gatekeeper_applied``
    BOOL [batch, 1], ``raw_weighted_average`` [batch, 1] (gated and capped: what the tier reads),
    ``tier`` INT32 [batch, 1], ``short_content_cap_applied`` BOOL [batch, 1] and ``content_length``
    INT32 [batch, 1] (the length read, passed through for the ensemble; see contract.py).

    ``width``: the tensor model's ``logits`` are that wide (a shared-base group's widest member);
    this filter's scores are the first n columns."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    n = spec.num_labels
    width = width or n
    own = LOGITS if width == n else g.node(
        "Slice", [LOGITS, g.const("first_column", [0], np.int64), g.const("n_dims", [n], np.int64),
                  g.const("column_axis", [1], np.int64)], "own_logits")
    scores = g.node("Identity", [own], SCORES)
    if spec.calibration:
        calibrated = dict(spec.calibration)
        mapped = g.interpolate(scores, [calibrated.get(dim) for dim in spec.dimensions], "calibration")
        scores = g.node("Where", [SCREENED, scores, mapped], "calibrated")  # a probe's scores are not calibrated
    low, high = SCORE_RANGE
    final = g.node("Clip", [scores, g.const("low", low), g.const("high", high)], FINAL_SCORES)
    weights = np.asarray(spec.weights, dtype=np.float64)
    average = g.node("MatMul", [final, g.const("weights", (weights / weights.sum()).reshape(n, 1))], "average")
    gated, _ = _gatekeepers(g, spec, final, average)
    raw = g.node("Identity", [_short_content(g, spec, gated)], RAW_WEIGHTED_AVERAGE)
    _tier(g, spec, raw)
    _normalize(g, spec, raw)
    g.node("Identity", [CONTENT_LENGTH_INPUT], CONTENT_LENGTH)

    def output(name: str, kind: int, width: int) -> ValueInfoProto:
        return helper.make_tensor_value_info(name, kind, ["batch", width])

    graph = helper.make_graph(
        g.nodes,
        decision_model(spec.name),
        [output(LOGITS, TensorProto.FLOAT, width), output(CONTENT_LENGTH_INPUT, TensorProto.INT32, 1),
         output(SCREENED, TensorProto.BOOL, 1)],
        [
            output(SCORES, TensorProto.FLOAT, n),
            output(FINAL_SCORES, TensorProto.FLOAT, n),
            output(WEIGHTED_AVERAGE, TensorProto.FLOAT, 1),
            output(GATEKEEPER_APPLIED, TensorProto.BOOL, 1),
            output(RAW_WEIGHTED_AVERAGE, TensorProto.FLOAT, 1),
            output(TIER, TensorProto.INT32, 1),
            output(SHORT_CONTENT_CAP_APPLIED, TensorProto.BOOL, 1),
            output(CONTENT_LENGTH, TensorProto.INT32, 1),
        ],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="filterserve")
    model.ir_version = 8  # what ONNX Runtime and Triton's ONNX Runtime backend read for opset 18
    onnx.checker.check_model(model, full_check=True)
    return model


def write_decision_model(path: Path, spec: FilterSpec, width: int | None = None) -> Path:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(decision_graph(spec, width), str(path))
    return path
