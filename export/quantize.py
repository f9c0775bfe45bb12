"""INT8 for the CPU: ONNX Runtime dynamic quantization of the fp32 export.

Only the weight matrices of the linear layers are quantized (per channel, int8 weights,
activations quantized on the fly); the score head and the weighted sum always stay fp32
because their few outputs carry the whole result. On random weights the drift is large
(docs/design.md), so an INT8 model is admitted only by the accuracy gate on the filter's labelled
validation data; when the gate refuses it, the export climbs :data:`EXCLUSION_LADDER`,
keeping more layers in fp32, until the gate admits it or the ladder ends.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx

from filterserve.errors import FilterServeError
from filterserve.export.graph import module_path

# (what stays fp32 besides the head, which module paths it keeps), tried in order.
EXCLUSION_LADDER: list[tuple[str, Callable[[str], bool]]] = [
    ("nothing else", lambda path: False),
    ("the MLP down projections (activation outliers)", lambda path: path.endswith("mlp.down_proj")),
    ("every MLP projection (attention stays int8)", lambda path: ".mlp." in path),
]


def module_paths(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul node → the PyTorch module it came from, read from the exporter's name scopes."""
    return {node.name: module_path(node) or node.name for node in model.graph.node if node.op_type == "MatMul"}


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """The score head and the weighted sum: the last two MatMuls of the (topologically sorted) graph."""
    return [n.name for n in model.graph.node if n.op_type == "MatMul"][-2:]


def shapes_in_place(model: onnx.ModelProto) -> onnx.ModelProto:
    """What ONNX Runtime's ``save_and_reload_model_with_shape_infer`` gives its dynamic quantizer, without its copies.

    That function deep-copies the whole model with its weights, saves the copy and loads it back,
    while the quantizer's caller still holds the original: three copies of the weights at once
    (17 GB for Qwen2.5-1.5B's 5.75 GB). Shape inference needs only the graph and each
    initializer's type and shape, so it runs on a weightless twin here and its ``value_info`` is
    written into ``model`` itself, marked as ONNX Runtime marks it.
    """
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    weightless = onnx.helper.make_model(
        onnx.helper.make_graph(
            model.graph.node, model.graph.name, model.graph.input, model.graph.output,
            [onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims) for t in model.graph.initializer],
            value_info=model.graph.value_info,
        ),
        opset_imports=model.opset_import, ir_version=model.ir_version, functions=model.functions,
    )
    inferred = onnx.shape_inference.infer_shapes(weightless)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    add_infer_metadata(model)
    return model


@contextlib.contextmanager
def lean_shape_inference() -> Iterator[None]:
    """ONNX Runtime's dynamic quantizer with :func:`shapes_in_place` instead of its copying reload."""
    from onnxruntime.quantization import onnx_quantizer

    original = onnx_quantizer.save_and_reload_model_with_shape_infer
    onnx_quantizer.save_and_reload_model_with_shape_infer = shapes_in_place
    try:
        yield
    finally:
        onnx_quantizer.save_and_reload_model_with_shape_infer = original


def quantize_int8(fp32_path: Path, int8_path: Path, keep_fp32: Callable[[str], bool] = EXCLUSION_LADDER[0][1]) -> list[str]:
    """Write the INT8 model (external data, like the others); returns the MatMul nodes kept in fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32_path), load_external_data=False)
    kept = set(head_nodes(graph)) | {node for node, path in module_paths(graph).items() if keep_fp32(path)}
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (int8_path, int8_path.with_name(int8_path.name + ".data")):
        stale.unlink(missing_ok=True)  # the quantizer appends to an existing external-data file
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs its pre-processing advice at WARNING
    try:
        with lean_shape_inference():
            quantize_dynamic(
                str(fp32_path),
                str(int8_path),
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=sorted(kept),
                use_external_data_format=True,
                extra_options={"MatMulConstBOnly": True},
            )
    except Exception as exc:  # the quantizer raises bare Exceptions and ValueErrors alike
        raise FilterServeError(f"INT8 quantization of {fp32_path} failed: {type(exc).__name__}: {exc}") from exc
    # The quantizer writes its data through a private temp file (mode 0600): a server running as
    # another user (a container, a shared volume) could not read it. Same mode as the fp32 files.
    for written in (int8_path, int8_path.with_name(int8_path.name + ".data")):
        if written.exists():
            shutil.copymode(fp32_path, written)
    return sorted(kept)
