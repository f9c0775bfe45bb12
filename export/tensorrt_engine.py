"""``filterserve build-engine``: a TensorRT FP16 engine for the tensor model, built where it runs.

Engines are tied to the GPU and the TensorRT version, so this step runs on the target device
(a Jetson included, where Triton's ONNX Runtime backend has no TensorRT) from the exported fp32
ONNX file, and adds a ``tensorrt_plan`` model beside the ONNX ones, through the staging commit
every export uses (:mod:`filterserve.export.staging`). The engine computes in FP16
except where FP16 overflows or rounds away the result: every RMSNorm, the attention softmax and
the score head (:func:`filterserve.export.graph.fp32_nodes`), pinned through TensorRT 10's layer
precision and output types. Before anything is written the engine is checked as the export
checks a variant: the parity texts, and with ``--validation`` the accuracy gate.

No GPU has run this module yet (see docs/gpu.md, "Runbook"): what a CPU can check is tested.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve import contract, defaults
from filterserve.errors import FilterServeError
from filterserve.export.options import EngineOptions, fp16_tolerance
from filterserve.export.staging import Change, commit, staging_folder
from filterserve.filters import FilterSpec
from filterserve.gate import GATE_BATCH, AccuracyGateRefusal, LabelledSet, judge, read_labelled
from filterserve.manifest import EngineRecord, FilterRecord, read_filter_record
from filterserve.model_repository.gpu import ShapeProfile, padded_length, serving_profile
from filterserve.model_repository.repository import tensor_model_config, write_tensor_model

if TYPE_CHECKING:  # the graph module needs onnx, which every `filterserve` command would otherwise import
    from filterserve.export.graph import Fp32Selection

ENGINE_PRECISION = "trt-fp16"
PLAN_FILE = "model.plan"
# What the checks compare the engine with: the exported fp32 model, which matched the card's
# recipe within 1e-4 when it was exported (the device has no PyTorch + PEFT reference).
REFERENCE = "onnx_fp32"
# TensorRT's ONNX parser (onnx-tensorrt, since TensorRT 8.6) records the ONNX node in each layer's metadata.
ONNX_LAYER_METADATA = re.compile(r"\[ONNX Layer: (.+?)(?: \| .*)?\]")
NUMBERED = re.compile(r"^(.+)_\d+$")


def engine_model(spec: FilterSpec) -> str:
    return f"{spec.name}_trt"


def import_tensorrt() -> Any:
    """TensorRT 10.x, or a one-line reason why not (checked before any work is done)."""
    try:
        import tensorrt as trt  # on the target GPU only, untyped
    except ImportError:
        raise FilterServeError(
            "TensorRT is not installed: build the engine on the target GPU with TensorRT 10.x "
            "(pip install 'tensorrt-cu12>=10,<11' on a desktop GPU; JetPack 6.1+ ships it on a Jetson)"
        ) from None
    check_tensorrt_version(trt.__version__)
    return trt


def check_tensorrt_version(version: str) -> None:
    """TensorRT 10 only: the FP32 pins are weakly-typed precision constraints, which TensorRT 11
    removed, and the token ids are INT64, which TensorRT 8 binds as INT32."""
    major = int(version.split(".")[0])
    if major != 10:
        raise FilterServeError(
            f"build-engine needs TensorRT 10.x, found {version}: "
            + ("TensorRT 11 removed per-layer precision, which pins the norms to FP32" if major > 10
               else "TensorRT 8 cannot take the INT64 token ids the tensor model is served with")
        )


def onnx_node_of_layer(layer_name: str, metadata: str, node_names: Collection[str]) -> str | None:
    """The ONNX node a TensorRT layer was made for, or None for the parser's own helper layers.

    TensorRT's ONNX parser names each layer after the ONNX node it implements (its
    ``registerLayer``); when a node needs several layers, or the name is taken, it appends
    ``_<counter>`` (``generateUniqueName``). So a layer name can be the node's name or the node's
    name plus one numeric suffix, and a node named ``node_mul`` could be taken for the helper of
    one named ``node_mul_8``. The parser also records ``[ONNX Layer: <node name> | ...]`` in the
    layer's metadata, which is exact: it is read first, and the name only when metadata is absent.
    """
    found = ONNX_LAYER_METADATA.fullmatch(metadata or "")
    if found:
        return found.group(1) if found.group(1) in node_names else None
    if layer_name in node_names:
        return layer_name
    numbered = NUMBERED.match(layer_name)
    return numbered.group(1) if numbered and numbered.group(1) in node_names else None


def pin_fp32(network: Any, trt: Any, selected: Collection[str], node_names: Collection[str]) -> int:
    """Pin every layer made for a selected node to FP32, its computation and its outputs.

    ``precision`` alone lets TensorRT hand an FP16 tensor to the next layer: x² would still be
    stored in FP16 and overflow past 65504. With OBEY_PRECISION_CONSTRAINTS the build fails
    rather than ignore a pin. Layers whose outputs are not floating point (shape arithmetic the
    parser adds) have no precision to pin. ``node_names`` holds every node of the graph, so a
    layer named after an unselected node is never taken for a selected one's helper. Returns the
    number of layers pinned; a selected node that got no layer is an error, since its FP16
    arithmetic would go unnoticed.
    """
    pinned, covered = 0, set()
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        node = onnx_node_of_layer(layer.name, getattr(layer, "metadata", ""), node_names)
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if node not in selected or not all(out.dtype == trt.float32 for out in outputs):
            continue
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
        pinned += 1
        covered.add(node)
    missing = sorted(set(selected) - covered)
    if missing:
        raise FilterServeError(
            f"TensorRT's parser made no float layer for {len(missing)} FP32 nodes ({', '.join(missing[:5])}): cannot pin them"
        )
    return pinned


def build_engine(onnx_path: Path, profile: ShapeProfile, selection: Fp32Selection, workspace_gb: int) -> tuple[bytes, int]:
    """The serialized engine (FP16, the selected nodes in FP32) and how many layers were pinned."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FilterServeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_gb << 30)
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    pinned = pin_fp32(network, trt, selection.nodes, selection.graph_nodes)
    shapes = builder.create_optimization_profile()
    for name in contract.TOKEN_INPUTS:
        shapes.set_shape(name, profile.min, profile.opt, profile.max)
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FilterServeError("TensorRT failed to build the engine (see its log above)")
    return bytes(serialized), pinned


class EngineRunner:
    """A built engine on the GPU, fed and read through torch's CUDA tensors (no pycuda needed)."""

    def __init__(self, plan: bytes) -> None:
        import torch

        trt = import_tensorrt()
        self._torch = torch
        self._engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
        if self._engine is None:
            raise FilterServeError("TensorRT could not load the engine it built")
        self._context = self._engine.create_execution_context()

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        feeds = {"input_ids": torch.from_numpy(ids).cuda(), "attention_mask": torch.from_numpy(mask).cuda()}
        for name, tensor in feeds.items():
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in contract.TENSOR_OUTPUTS:
            shape = tuple(self._context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
            self._context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.Stream()
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise FilterServeError("TensorRT execution failed")
        stream.synchronize()
        return outputs[contract.LOGITS].cpu().numpy(), outputs[contract.WEIGHTED_SCORE].cpu().numpy()


@dataclass(frozen=True)
class EnginePlan:
    """What build-engine will build and check, settled (and refused if wrong) before TensorRT is touched."""

    options: EngineOptions
    manifest: FilterRecord  # the filter's record the engine is built from
    spec: FilterSpec
    onnx_path: Path
    profile: ShapeProfile

    @property
    def repo(self) -> Path:
        return self.options.model_repository


def plan_engine(options: EngineOptions) -> EnginePlan:
    """Reads the repository; a profile the server could send past is refused."""
    repo = options.model_repository
    manifest = read_filter_record(repo, options.name)
    spec = FilterSpec.from_dict(manifest.filter)
    if "fp32" not in manifest.tensor_models:
        raise FilterServeError("build-engine needs the fp32 ONNX model: export with --precision fp32 (fp16 and int8 may be added)")
    onnx_path = repo / manifest.tensor_models["fp32"] / "1" / "model.onnx"
    serving = serving_profile(manifest.max_batch_size, spec.max_length, manifest.bucket)
    profile = ShapeProfile(
        min=ShapeProfile.parse(options.min_shape) if options.min_shape else serving.min,
        opt=ShapeProfile.parse(options.opt_shape) if options.opt_shape else serving.opt,
        max=ShapeProfile.parse(options.max_shape) if options.max_shape else serving.max,
    )
    profile.check()
    check_profile(profile, serving, manifest.bucket, spec.max_length, options.make_default)
    return EnginePlan(options, manifest, spec, onnx_path, profile)


def check_profile(profile: ShapeProfile, serving: ShapeProfile, bucket: int, max_length: int, make_default: bool) -> None:
    """The engine must take every shape the server can send it, and be tuned at one it does send.

    Its batch may be smaller than the ensemble's only when it is not the ensemble's tensor model
    (Triton refuses an ensemble whose composing model takes smaller batches).
    """
    high = serving.max if make_default else (1, serving.max[1])
    if not profile.covers(serving.min, high):
        raise FilterServeError(
            f"profile {profile.describe()} does not cover what the server sends ({serving.min[0]}x{serving.min[1]} "
            f"to {high[0]}x{high[1]}: clients send unpadded ids, the longest text is {max_length} tokens"
            + (", the ensemble joins up to max_batch_size articles)" if make_default else ")")
        )
    if profile.opt[1] != padded_length(profile.opt[1], bucket, max_length):
        raise FilterServeError(
            f"opt length {profile.opt[1]} is never sent: the tokenizer step pads to multiples of {bucket} tokens "
            f"(up to {max_length}); choose e.g. {padded_length(profile.opt[1], bucket, max_length)}"
        )


def engine_config(spec: FilterSpec, profile: ShapeProfile, *, pad_token_id: int, vocab_size: int,
                  max_batch_tokens: int | None) -> mc.ModelConfig:
    """The tensor model's config (same tensors, batcher and warm-up), served by Triton's TensorRT backend;
    the token facts and the batch-token limit are the filter record's."""
    config = tensor_model_config(
        spec,
        engine_model(spec),
        precision=ENGINE_PRECISION,
        max_batch_size=profile.max[0],
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
        gpu=True,
        max_batch_tokens=max_batch_tokens,
    )
    config.ClearField("backend")
    config.platform = "tensorrt_plan"
    config.default_model_filename = PLAN_FILE
    return config


def point_ensemble_at(repo: Path, spec: FilterSpec, tensor_model: str) -> None:
    """Make ``tensor_model`` the ensemble's tensor model: the step fed token ids, as clients find it.

    The tokenizer step names the tensor model too (the label of its token counters).
    """
    ensemble_path = repo / spec.name / "config.pbtxt"
    ensemble = text_format.Parse(ensemble_path.read_text(encoding="utf-8"), mc.ModelConfig())
    steps = [s for s in ensemble.ensemble_scheduling.step if contract.TOKEN_INPUTS[0] in s.input_map]
    if len(steps) != 1:
        raise FilterServeError(f"{ensemble_path}: expected one step fed {contract.TOKEN_INPUTS[0]}, found {len(steps)}")
    steps[0].model_name = tensor_model
    ensemble_path.write_text(text_format.MessageToString(ensemble), encoding="utf-8")
    tokenizer_path = repo / contract.tokenizer_model(spec.name) / "config.pbtxt"
    tokenizer = text_format.Parse(tokenizer_path.read_text(encoding="utf-8"), mc.ModelConfig())
    if "tensor_model" in tokenizer.parameters:
        tokenizer.parameters["tensor_model"].string_value = tensor_model
        tokenizer_path.write_text(text_format.MessageToString(tokenizer), encoding="utf-8")


def write_engine(plan: EnginePlan, engine: bytes, engine_record: EngineRecord) -> FilterRecord:
    """Add ``<name>_trt`` to the filter through the staging commit, as every export writes; returns the new record.

    The engine's model folder is built beside the repository; with ``--make-default`` so are copies of
    the ensemble and the tokenizer step, re-pointed at the engine. They are swapped in together with
    the record, so a server polling the repository never sees an ensemble naming a model that is not
    there yet, and a failure (Ctrl-C included) leaves the repository as it was. The commit is refused
    if the filter was exported again while the engine was being built from its fp32 model.
    """
    spec, name, manifest = plan.spec, engine_model(plan.spec), plan.manifest
    with staging_folder(plan.repo, spec.name) as staging:
        (staging / name / "1").mkdir(parents=True)
        (staging / name / "1" / PLAN_FILE).write_bytes(engine)
        write_tensor_model(staging / name, engine_config(spec, plan.profile, pad_token_id=manifest.pad_token_id,
                                                         vocab_size=manifest.vocab_size, max_batch_tokens=manifest.max_batch_tokens))
        if plan.options.make_default:
            for model in (spec.name, contract.tokenizer_model(spec.name)):
                shutil.copytree(plan.repo / model, staging / model)
            point_ensemble_at(staging, spec, name)
        record = replace(
            manifest,
            models=[*manifest.models, *([] if name in manifest.models else [name])],
            engines={**(manifest.engines or {}), ENGINE_PRECISION: engine_record},
        )
        # expected: the record is the one the engine was built from (stricter than the fingerprint);
        # force: a <name>_trt folder no record lists (left by an interrupted build-engine of an
        # earlier version, which wrote in place) is replaced.
        commit(plan.repo, staging, Change({spec.name: record}, expected={spec.name: manifest}, force=True))
    return record


def add_build_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", required=True, help="a repository written by filterserve export (with fp32)")
    parser.add_argument("--name", help="which filter of the repository (default: its only one)")
    parser.add_argument("--min-shape", help="BATCHxSEQ (default 1x1: clients may send unpadded ids)")
    parser.add_argument("--opt-shape", help="BATCHxSEQ the kernels are tuned for (default: 8 x a typical article, padded to a bucket)")
    parser.add_argument("--max-shape", help="BATCHxSEQ (default: max_batch_size x max_length)")
    parser.add_argument("--tolerance", type=float, default=fp16_tolerance(),
                        help="max |Δ| against the fp32 ONNX model on the parity texts (default: the fp16 variant's, %(default)s)")
    parser.add_argument("--validation", help="labelled JSONL (title, content, one field per dimension): the engine "
                        "must keep the validation MAE within --gate-tolerance of the fp32 ONNX model's")
    parser.add_argument("--gate-tolerance", type=float, default=contract.GATE_TOLERANCE, help="max MAE increase, overall and per dimension")
    parser.add_argument("--make-default", action="store_true", help="serve the engine as the ensemble's tensor model once it passed")
    parser.add_argument("--workspace-gb", type=int, default=defaults.ENGINE_WORKSPACE_GB, help="TensorRT's build workspace")


def build_engine_options(args: argparse.Namespace) -> EngineOptions:
    """The parsed flags as one checked value."""
    return EngineOptions(
        Path(args.model_repository), args.name, args.min_shape, args.opt_shape, args.max_shape, args.tolerance,
        Path(args.validation) if args.validation else None, args.gate_tolerance, args.make_default, args.workspace_gb,
    )


Outputs = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def both_outputs(score: Outputs) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """logits and weighted_score side by side, so one pass checks both."""
    return lambda ids, mask: np.hstack(score(ids, mask))


def fp32_references(plan: EnginePlan, tokenizer: Any, texts: list[str], labelled: LabelledSet | None,
                    gate_batch: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The fp32 ONNX model's scores on the parity texts (one at a time) and on the validation articles;
    its session is released on return, before TensorRT builds."""
    from filterserve.export.parity import gate_scores, ort_scores, ort_session, score_in_batches

    session = ort_session(plan.onnx_path)

    def fp32(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ort_scores(session, ids, mask)

    reference = score_in_batches(both_outputs(fp32), tokenizer, texts, plan.spec.max_length, 1)
    if labelled is None:
        return reference, None
    return reference, gate_scores(lambda i, m: fp32(i, m)[0], tokenizer, labelled, plan.spec.max_length, gate_batch)


def build_engine_command(args: argparse.Namespace) -> int:
    return run_build_engine(plan_engine(build_engine_options(args)))


def run_build_engine(plan: EnginePlan) -> int:
    """Build ``<name>_trt`` from the fp32 ONNX model; write it only if it passes parity (and the gate).

    The fp32 references are scored before the engine is built and their session released, so the
    ONNX Runtime copy of the weights and TensorRT's never share a Jetson's memory.
    """
    import onnx
    import torch

    from filterserve.export.graph import fp32_nodes
    from filterserve.export.load import load_tokenizer
    from filterserve.export.parity import compare_outputs, gate_scores, parity_texts, score_in_batches
    from filterserve.progress import Steps

    options, trt = plan.options, import_tensorrt()
    spec, profile = plan.spec, plan.profile
    tolerance = options.tolerance
    tokenizer = load_tokenizer(plan.repo / contract.tokenizer_model(spec.name) / "1" / "tokenizer")
    texts = parity_texts(tokenizer, spec)
    labelled = read_labelled(options.validation, spec, tokenizer) if options.validation else None
    gate_batch = min(GATE_BATCH, profile.max[0])
    steps = Steps(total=5 + (labelled is not None))

    with steps.step(f"fp32 ONNX references: {len(texts)} parity texts one at a time"
                    + (f", {len(labelled.texts)} validation articles" if labelled else "")):
        reference, held_out = fp32_references(plan, tokenizer, texts, labelled, gate_batch)
    with steps.step(f"find the FP32 layers in {plan.onnx_path}"):
        selection = fp32_nodes(onnx.load(str(plan.onnx_path), load_external_data=False))
        steps.say(json.dumps(selection.summary()))
    with steps.step(f"build the TensorRT {trt.__version__} FP16 engine, profile {profile.describe()}"):
        engine, pinned = build_engine(plan.onnx_path, profile, selection, options.workspace_gb)
        steps.say(f"{pinned} TensorRT layers pinned to FP32; {len(engine) / 2**30:.2f} GiB")
    runner = EngineRunner(engine)
    n = spec.num_labels
    with steps.step("parity: the engine on right-padded batches vs fp32 ONNX one text at a time"):
        got = score_in_batches(both_outputs(runner), tokenizer, texts, spec.max_length, profile.max[0])
        parity = compare_outputs("TensorRT fp16", got[:, :n], got[:, n:], reference[:, :n], reference[:, n:], tolerance,
                                 against="the fp32 ONNX model")
        steps.say(f"max |Δ| = {parity.max_abs_diff:.2e} over {len(texts)} texts (tolerance {tolerance:g})")
    gate = None
    if labelled is not None and held_out is not None:
        with steps.step(f"accuracy gate on {options.validation} (MAE change ≤ {options.gate_tolerance:g}, overall and per dimension)"):
            scored = gate_scores(lambda i, m: runner(i, m)[0], tokenizer, labelled, spec.max_length, gate_batch)
            outcome = judge(spec, labelled, held_out, {ENGINE_PRECISION: scored}, options.gate_tolerance, reference_name=REFERENCE)
            if outcome.refused:
                raise AccuracyGateRefusal(outcome.refused)
            gate = outcome.record

    name = engine_model(spec)
    with steps.step(f"write {name}" + (f" and serve it from the ensemble {spec.name}" if options.make_default else "")):
        write_engine(plan, engine, EngineRecord(
            model=name,
            ensemble_default=options.make_default,
            profile={"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)},
            fp32_layers=selection.summary() | {"tensorrt_layers": pinned},
            parity=parity.to_record(against=REFERENCE),
            accuracy_gate=gate,
            tensorrt=trt.__version__,
            device=torch.cuda.get_device_name(),
        ))
    print(json.dumps({"engine": name, "parity_max_abs_diff": parity.max_abs_diff,
                      "validation_mae_change": gate and gate.report["variants"][ENGINE_PRECISION]["mae_delta"]}, indent=2))
    if not options.make_default:
        print(f"call {name} directly, or rerun with --make-default to serve it from the ensemble {spec.name}", file=sys.stderr)
    return 0
