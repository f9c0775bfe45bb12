"""``filterserve build-engine``: a TensorRT FP16 engine for the tensor model, built where it runs.

Engines are tied to the GPU and the TensorRT version, so this step runs on the target device
(a Jetson included, where ONNX Runtime's backend has no TensorRT) from the exported ONNX file,
and adds a ``tensorrt_plan`` model beside the ONNX one in the same repository. The RMSNorm
layers are pinned to FP32: Qwen2/2.5-1.5B is reported to overflow to NaN in FP16 there.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from filterserve.errors import FilterServeError
from filterserve.filters import FilterSpec
from filterserve.manifest import read_filter_record, write_filter_record
from filterserve.model_repository.repository import tensor_model_config, write_tensor_model

# Layers whose FP16 overflow turns scores into NaN: normalisation (pow, mean, sqrt) and the head.
FP32_LAYER_HINTS = ("norm", "pow", "reducemean", "sqrt", "score", "matmul_head")


@dataclass(frozen=True)
class ShapeProfile:
    """TensorRT optimisation profile over (batch, sequence) for both inputs."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    @classmethod
    def parse(cls, text: str) -> tuple[int, int]:
        try:
            batch, seq = (int(x) for x in text.lower().split("x"))
        except ValueError:
            raise FilterServeError(f"shape {text!r} must be BATCHxSEQ, e.g. 8x256") from None
        return batch, seq

    def check(self) -> None:
        for axis in range(2):
            if not 1 <= self.min[axis] <= self.opt[axis] <= self.max[axis]:
                raise FilterServeError(f"profile needs 1 <= min <= opt <= max on every axis, got {self}")


def build_engine(onnx_path: Path, plan_path: Path, profile: ShapeProfile, fp16: bool = True, workspace_gb: int = 4) -> Path:
    try:
        import tensorrt as trt
    except ImportError:
        raise FilterServeError("TensorRT is not installed: build the engine on the target GPU (pip install tensorrt, or JetPack)") from None
    profile.check()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FilterServeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if any(hint in layer.name.lower() for hint in FP32_LAYER_HINTS):
                layer.precision = trt.float32
    shapes = builder.create_optimization_profile()
    for name in ("input_ids", "attention_mask"):
        shapes.set_shape(name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FilterServeError("TensorRT failed to build the engine (see its log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


def run_engine(plan_path: Path, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run a built engine on one batch (for the parity check), with torch's CUDA buffers."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    feeds = {"input_ids": torch.from_numpy(ids).cuda(), "attention_mask": torch.from_numpy(mask).cuda()}
    outputs = {}
    for name, tensor in feeds.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    for name in ("logits", "weighted_score"):
        outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise FilterServeError("TensorRT execution failed")
    stream.synchronize()
    return outputs["logits"].cpu().numpy(), outputs["weighted_score"].cpu().numpy()


def add_build_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", required=True, help="a repository written by filterserve export")
    parser.add_argument("--name", help="which filter of the repository (default: its only one)")
    parser.add_argument("--min-shape", default="1x1", help="BATCHxSEQ")
    parser.add_argument("--opt-shape", default="8x256", help="BATCHxSEQ")
    parser.add_argument("--max-shape", help="BATCHxSEQ (default: max_batch_size x max_length)")
    parser.add_argument("--tolerance", type=float, default=0.05, help="max |Δ| against the fp32 ONNX model")


def build_engine_command(args: argparse.Namespace) -> int:
    """Build ``<name>_trt`` from the fp32 ONNX model and check it against ONNX Runtime fp32."""
    from filterserve.export.parity import compare, ort_scores, ort_session

    repo = Path(args.model_repository)
    manifest = read_filter_record(repo, args.name)
    spec = FilterSpec.from_dict(manifest["filter"])
    if "fp32" not in manifest["tensor_models"]:
        raise FilterServeError("build-engine needs the fp32 ONNX model: export with --precision fp32")
    onnx_path = repo / manifest["tensor_models"]["fp32"] / "1" / "model.onnx"
    profile = ShapeProfile(
        min=ShapeProfile.parse(args.min_shape),
        opt=ShapeProfile.parse(args.opt_shape),
        max=ShapeProfile.parse(args.max_shape) if args.max_shape else (manifest["max_batch_size"], manifest["max_length"]),
    )
    name = f"{spec.name}_trt"
    plan = build_engine(onnx_path, repo / name / "1" / "model.plan", profile)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, manifest["vocab_size"], size=(min(4, profile.max[0]), min(64, profile.max[1])), dtype=np.int64)
    mask = np.ones_like(ids)
    reference, _ = ort_scores(ort_session(onnx_path), ids, mask)
    result = compare("TensorRT fp16", run_engine(plan, ids, mask)[0], reference, args.tolerance)
    config = tensor_model_config(
        spec, name, precision="trt-fp16", max_batch_size=profile.max[0], pad_token_id=manifest["pad_token_id"],
        vocab_size=manifest["vocab_size"], gpu=True, tensorrt_fp16=False,
    )
    config.ClearField("backend")
    config.platform = "tensorrt_plan"
    config.default_model_filename = "model.plan"
    write_tensor_model(repo / name, config)
    manifest["tensor_models"]["trt-fp16"] = name
    manifest["models"].append(name)
    manifest["parity"]["trt-fp16"] = result.to_dict() | {"against": "onnx fp32", "profile": vars(profile)}
    write_filter_record(repo, manifest)
    print(json.dumps({"engine": str(plan), "parity": manifest["parity"]["trt-fp16"]}, indent=2))
    print(f"call {name} directly, or re-point the ensemble {spec.name} at it", file=sys.stderr)
    return 0
