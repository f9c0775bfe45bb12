"""A filter's stage-1 probe as a small ONNX model, the scaler folded into the first Linear.

Production scores stage 1 as ``probe(scaler.transform(embedding))`` (veen-systems/llm-distillery
``filters/common/embedding_stage.py`` @3e1ccec, ``EmbeddingStage.screen_batch``): a StandardScaler,
then ``MLPProbe`` in eval mode, Linear-ReLU-Dropout per hidden layer and a last Linear. Dropout is
the identity in eval, and the scaler is affine, so the whole probe is Gemm-Relu-...-Gemm with

    W₀' = W₀ / scale (per input column),    b₀' = b₀ − W₀' · mean

(``mean`` 0 under with_mean=False, ``scale`` 1 under with_std=False). The fold is computed in
float64 and stored in float32. The repository then holds this ONNX file, never the pickle
(filterserve.probe_pickle reads that without running it), and no torch is needed to build it.

The output is the probe's raw scores; the clamp to [0, 10], the weighted average and the
threshold are the decision's, as in production's screen_batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.probe_pickle import Probe

# The probe model's tensors: the e5 embedding in (FP32 [batch, input_dim], unit length as
# SentenceTransformer's Normalize module leaves it), the raw scores out (FP32 [batch, n_dims]).
PROBE_INPUT, PROBE_OUTPUT = contract.EMBEDDING, contract.PROBE_SCORES
# Gemm and Relu are in every opset; 18 and IR 8 as the stage-2 export's ONNX (export.onnx_export),
# so one ONNX Runtime serves both.
PROBE_OPSET, PROBE_IR_VERSION = 18, 8


def folded_layers(probe: Probe) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(weight [out, in], bias [out])`` per Linear, FP32, the scaler folded into the first."""
    first = probe.layers[0]
    weight = first.weight.astype(np.float64)
    bias = first.bias.astype(np.float64)
    if probe.scaler.scale is not None:
        weight = weight / probe.scaler.scale[None, :]
    if probe.scaler.mean is not None:
        bias = bias - weight @ probe.scaler.mean
    layers = [(weight, bias)] + [(layer.weight, layer.bias) for layer in probe.layers[1:]]
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers]


def probe_model(probe: Probe) -> onnx.ModelProto:
    """``embedding`` → Gemm(folded) → Relu → ... → Gemm → ``probe_scores``, checked by onnx's checker."""
    nodes, initializers = [], []
    current = PROBE_INPUT
    layers = folded_layers(probe)
    for i, (weight, bias) in enumerate(layers):
        last = i == len(layers) - 1
        initializers += [numpy_helper.from_array(weight, f"linear{i}.weight"), numpy_helper.from_array(bias, f"linear{i}.bias")]
        out = PROBE_OUTPUT if last else f"linear{i}"
        nodes.append(helper.make_node("Gemm", [current, f"linear{i}.weight", f"linear{i}.bias"], [out], transB=1, name=f"linear{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    graph = helper.make_graph(
        nodes,
        "stage1_probe",
        [helper.make_tensor_value_info(PROBE_INPUT, TensorProto.FLOAT, ["batch", probe.input_dim])],
        [helper.make_tensor_value_info(PROBE_OUTPUT, TensorProto.FLOAT, ["batch", probe.output_dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", PROBE_OPSET)], producer_name="filterserve")
    model.ir_version = PROBE_IR_VERSION
    model.doc_string = f"stage-1 probe from {probe.path.name}: scaler folded, hidden {list(probe.hidden_sizes)}"
    onnx.checker.check_model(model, full_check=True)
    return model


def write_probe_onnx(probe: Probe, path: Path) -> Path:
    """The probe's ONNX file at ``path`` (its folder made)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(probe_model(probe), str(path))
    except OSError as exc:
        raise FilterServeError(f"cannot write the probe model {path}: {exc.strerror or exc}") from None
    return path
