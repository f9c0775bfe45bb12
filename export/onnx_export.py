"""ONNX export of the merged model with the serving contract's names and dynamic axes.

The graph returns ``logits`` [batch, n_dims] in FP32 whatever the inner precision, and the
filter's ``weighted_score`` [batch, 1], so every consumer (Triton, ONNX Runtime, TensorRT)
gets the card's weighted score without a separate post-processing step.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch

from filterserve.contract import TENSOR_OUTPUTS, TOKEN_INPUTS
from filterserve.errors import FilterServeError

OPSET = 18


class ScoringGraph(torch.nn.Module):
    """Sequence classifier + the filter's weights, FP32 at the outputs."""

    def __init__(self, model: torch.nn.Module, weights: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32).reshape(-1, 1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        return logits, logits @ self.weights


def export_onnx(
    model: torch.nn.Module,
    weights: tuple[float, ...],
    ids: np.ndarray,
    mask: np.ndarray,
    path: Path,
) -> Path:
    """The merged model with the filter's weights, as ``<name>_onnx`` serves it."""
    return export_graph(ScoringGraph(model, weights).eval(), dict(zip(TOKEN_INPUTS, (ids, mask))), path)


def export_graph(
    graph: torch.nn.Module, inputs: dict[str, np.ndarray], path: Path, outputs: tuple[str, ...] = TENSOR_OUTPUTS
) -> Path:
    """Trace with a padded batch (batch ≥ 2, as docs/design.md notes) and write external data.

    ``inputs``: the graph's inputs by name, in its forward's order; the token inputs get dynamic
    batch and sequence axes, any other (a group's ``filter_index``) a dynamic batch axis.
    ``outputs``: the names of its outputs (a scoring graph's, or the stage-1 embedder's).
    External data is always used so that a 1.5B model (5.75 GB in fp32) fits ONNX's 2 GB
    protobuf limit and small and large models share one layout.
    """
    first = next(iter(inputs.values()))
    if first.shape[0] < 2:
        raise ValueError("trace with a batch of at least 2 rows so the batch axis stays dynamic")
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=1 << 16)
    dynamic = {name: {0: batch, 1: seq} if name in TOKEN_INPUTS else {0: batch} for name in inputs}
    args = tuple(torch.from_numpy(value) for value in inputs.values())
    log = io.StringIO()
    try:
        with torch.inference_mode(False), torch.no_grad(), contextlib.redirect_stdout(log):
            program = torch.onnx.export(
                graph,
                args,
                dynamo=True,
                opset_version=OPSET,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_shapes=dynamic,
                optimize=True,
                verbose=False,
            )
            data_name = path.name + ".data"
            if (path.parent / data_name).exists():
                os.remove(path.parent / data_name)
            if program is None:  # only the TorchScript exporter (dynamo=False) returns none
                raise FilterServeError("ONNX export returned no program")
            program.save(str(path), external_data=True)
    except Exception as exc:  # torch.export raises many types; the log says which step failed
        raise FilterServeError(f"ONNX export failed: {type(exc).__name__}: {exc}\n{log.getvalue()[-2000:]}") from exc
    _rename_clashes(path, outputs)
    import onnx

    onnx.checker.check_model(str(path))
    return path


def _rename_clashes(path: Path, outputs: tuple[str, ...]) -> None:
    """An inner value the exporter named like an output (aten.embedding's is ``embedding``) renamed,
    so the graph stays in single-assignment form; the file is rewritten only when one was found."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    nodes = model.graph.node
    changed = False
    for name in outputs:
        producers = [i for i, node in enumerate(nodes) if name in node.output]
        for first, last in zip(producers, producers[1:]):
            inner = f"{name}__inner{first}"
            for node in nodes[first:last + 1]:
                node.input[:] = [inner if value == name else value for value in node.input]
            nodes[first].output[:] = [inner if value == name else value for value in nodes[first].output]
            changed = True
    if changed:
        onnx.save(model, str(path))
