"""The GPU path, checked on the CPU (issue 12): no GPU, TensorRT or onnxruntime-gpu runs here.

What the CPU can check is checked on the real thing: the FP32 layer selection on a real export
of the stand-in, the engine-cache key on real ONNX files, every generated config against
Triton's ``ModelConfig`` protobuf and against ONNX Runtime's documented TensorRT options, and
build-engine's arguments up to the point where TensorRT itself is needed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
import pytest
from conftest import perturb_head, tree_digest
from google.protobuf import text_format
from toy_onnx import TOY_SPEC, build_onnx, build_tokenizer, build_toy_export
from tritonclient.grpc import model_config_pb2 as mc

from filterserve.cli import main
from filterserve.errors import FilterServeError
from filterserve.export.graph import fp32_nodes, module_path, node_key
from filterserve.export.pipeline import choose_default, export_filter
from filterserve.export.tensorrt_engine import (
    ENGINE_PRECISION,
    EnginePlan,
    add_build_engine_arguments,
    build_engine_options,
    check_tensorrt_version,
    engine_config,
    onnx_node_of_layer,
    pin_fp32,
    plan_engine,
    point_ensemble_at,
    write_engine,
)
from filterserve.manifest import EngineRecord, read_filter_records, to_json
from filterserve.model_repository import write_repository
from filterserve.model_repository.gpu import ShapeProfile, engine_cache_dir, onnx_checksum, serving_profile
from filterserve.model_repository.repository import RepositorySettings

# ONNX Runtime's TensorRT execution provider options, as documented in the "Execution Provider
# Options" table of https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html
# (the trt_* options this project relies on, and their types there).
DOCUMENTED_TRT_OPTIONS = {
    "trt_fp16_enable": "bool",
    "trt_max_workspace_size": "int",
    "trt_layer_norm_fp32_fallback": "bool",
    "trt_engine_cache_enable": "bool",
    "trt_engine_cache_path": "string",
    "trt_profile_min_shapes": "string",
    "trt_profile_opt_shapes": "string",
    "trt_profile_max_shapes": "string",
}
# Triton's ONNX Runtime backend renames two keys ("Parameter mapping between ONNX Runtime and Triton
# ONNXRuntime Backend" in triton-inference-server/onnxruntime_backend's README, present since r24.04
# for trt_layer_norm_fp32_fallback) and refuses any key it does not know; the others pass unchanged.
TRITON_KEY_TO_ORT = {"precision_mode": "trt_fp16_enable", "max_workspace_size_bytes": "trt_max_workspace_size"}


def _config(path: Path) -> mc.ModelConfig:
    """Strict: a field Triton's protobuf does not define fails here as it would in the server."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _module_nodes(model: onnx.ModelProto, path: str) -> set[str]:
    return {node_key(n) for n in model.graph.node if module_path(n) == path}


# --- 1. FP32 layers, chosen by what they compute -------------------------------------------------


@pytest.fixture(scope="module")
def fp32_graph(exported) -> onnx.ModelProto:
    repo, manifest = exported
    return onnx.load(str(repo / manifest["tensor_models"]["fp32"] / "1" / "model.onnx"), load_external_data=False)


def test_every_norm_softmax_and_the_head_are_selected_and_nothing_else(fp32_graph, standin):
    layers = json.loads((standin.base_dir / "config.json").read_text())["num_hidden_layers"]
    selection = fp32_nodes(fp32_graph)
    # The oracle names the modules (the selection itself never reads a name).
    norm_modules = {f"model.model.layers.{i}.{norm}" for i in range(layers) for norm in ("input_layernorm", "post_attention_layernorm")}
    norm_modules.add("model.model.norm")
    assert set(selection.norms) == norm_modules
    for path in norm_modules:
        ops = {n.op_type for n in fp32_graph.graph.node if module_path(n) == path}
        assert {"Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal", "Mul"} <= ops, path
        assert set(selection.norms[path]) == _module_nodes(fp32_graph, path), f"{path} is selected whole"
    softmax = {node_key(n) for n in fp32_graph.graph.node if n.op_type == "Softmax"}
    assert set(selection.softmax) == softmax and len(softmax) == layers
    producer = {out: node_key(n) for n in fp32_graph.graph.node for out in n.output}
    head = _module_nodes(fp32_graph, "model.score") | {producer["logits"], producer["weighted_score"]}
    assert len(head) == 3, "the score MatMul, the pooling gather that yields logits, the weighted sum"
    expected = set().union(*(_module_nodes(fp32_graph, p) for p in norm_modules)) | softmax | head
    assert selection.nodes == expected
    assert selection.summary() == {"norms": 2 * layers + 1, "norm_nodes": 7 * (2 * layers + 1), "softmax": layers, "head_nodes": 3}
    assert selection.graph_nodes == {node_key(n) for n in fp32_graph.graph.node}


def test_a_graph_without_module_paths_is_refused(fp32_graph):
    stripped = onnx.ModelProto()
    stripped.CopyFrom(fp32_graph)
    for node in stripped.graph.node:
        del node.metadata_props[:]
    with pytest.raises(FilterServeError, match="records no module paths"):
        fp32_nodes(stripped)


def test_a_norm_whose_module_path_is_lost_is_an_error_not_a_silent_fp16_norm(fp32_graph):
    damaged = onnx.ModelProto()
    damaged.CopyFrom(fp32_graph)
    pow_node = next(n for n in damaged.graph.node if module_path(n) == "model.model.norm" and n.op_type == "Pow")
    del pow_node.metadata_props[:]
    with pytest.raises(FilterServeError, match=f"{pow_node.name} squares a tensor for a mean"):
        fp32_nodes(damaged)


def test_tensorrt_layer_names_map_back_to_onnx_nodes():
    nodes = {"node_mul", "node_mul_8", "node_pow_1", "node_Softmax_160"}
    assert onnx_node_of_layer("node_pow_1", "", nodes) == "node_pow_1"
    assert onnx_node_of_layer("node_pow_1_37", "", nodes) == "node_pow_1", "a helper layer: the parser's _<n> suffix"
    assert onnx_node_of_layer("node_mul_8", "", nodes) == "node_mul_8", "a node's own name is never read as a suffix"
    assert onnx_node_of_layer("node_mul_8", "[ONNX Layer: node_mul]", nodes) == "node_mul", "metadata is exact"
    assert onnx_node_of_layer("x", "[ONNX Layer: node_Softmax_160 | Local Function: f]", nodes) == "node_Softmax_160"
    assert onnx_node_of_layer("ONNXTRT_ShapeTensorFromDims_3", "", nodes) is None
    assert onnx_node_of_layer("node_neg_2", "", nodes) is None


@dataclass
class _Tensor:
    dtype: str


@dataclass
class _Layer:
    """TensorRT's ILayer as far as pin_fp32 uses it (TensorRT cannot run here)."""

    name: str
    metadata: str
    dtypes: list[str]
    precision: str | None = None
    output_types: dict[int, str] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return len(self.dtypes)

    def get_output(self, index: int) -> _Tensor:
        return _Tensor(self.dtypes[index])

    def set_output_type(self, index: int, dtype: str) -> None:
        self.output_types[index] = dtype


@dataclass
class _Network:
    layers: list[_Layer]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, index: int) -> _Layer:
        return self.layers[index]


class _Trt:
    float32, int64 = "float32", "int64"


def test_pinning_sets_precision_and_output_type_of_every_float_layer_of_a_selected_node():
    pow_layer, pow_helper = _Layer("node_pow_1", "", ["float32"]), _Layer("node_pow_1_4", "", ["float32"])
    shape_helper = _Layer("node_pow_1_5", "", ["int64"])
    other = _Layer("node_mean_7", "[ONNX Layer: node_mean_7]", ["float32"])
    softmax = _Layer("renamed", "[ONNX Layer: node_Softmax_1]", ["float32", "float32"])
    network = _Network([pow_layer, pow_helper, shape_helper, other, softmax])
    graph = {"node_pow_1", "node_mean_7", "node_Softmax_1"}
    assert pin_fp32(network, _Trt, {"node_pow_1", "node_Softmax_1"}, graph) == 3
    for layer in (pow_layer, pow_helper, softmax):
        assert layer.precision == "float32" and set(layer.output_types.values()) == {"float32"}
    assert softmax.output_types == {0: "float32", 1: "float32"}
    assert shape_helper.precision is None and other.precision is None and not other.output_types
    with pytest.raises(FilterServeError, match="no float layer for 1 FP32 nodes \\(node_lost\\)"):
        pin_fp32(network, _Trt, {"node_pow_1", "node_lost"}, graph | {"node_lost"})


@pytest.mark.parametrize("version, message",
                         [("10.3.0", None), ("10.14.1.48", None), ("11.0.0", "TensorRT 11 removed"), ("8.6.2", "INT64")])
def test_only_tensorrt_10_builds(version, message):
    if message is None:
        check_tensorrt_version(version)
    else:
        with pytest.raises(FilterServeError, match=message):
            check_tensorrt_version(version)


# --- 2 and 3. What --gpu serves, and the engine-cache key ------------------------------------------


GPU = RepositorySettings(max_batch_size=16, gpu=True)


def _toy_variants(root: Path, precisions: tuple[str, ...]) -> dict:
    """Toy ONNX files for each precision (the first is the default); returns write_repository's keywords."""
    tokenizer_dir = root / "tokenizer"
    vocab_size = build_tokenizer(tokenizer_dir).get_vocab_size()
    for precision in precisions:
        folder = f"{TOY_SPEC.name}_onnx" if precision == precisions[0] else f"{TOY_SPEC.name}_onnx_{precision}"
        build_onnx(root / "repo" / folder / "1" / "model.onnx", vocab_size, TOY_SPEC.weights)
    return dict(tokenizer_dir=tokenizer_dir, precisions=list(precisions), default_precision=precisions[0],
                pad_token_id=0, vocab_size=vocab_size)


def _gpu_repo(root: Path, precisions: tuple[str, ...] = ("fp32", "fp16", "int8"), **settings) -> Path:
    write_repository(root / "repo", TOY_SPEC, replace(GPU, **settings), **_toy_variants(root, precisions))
    return root / "repo"


def test_gpu_configs_put_tensorrt_fp16_on_the_fp16_variant_only(tmp_path):
    repo = _gpu_repo(tmp_path, trt_cache_root="/var/cache/trt", bucket=16)
    for model in (f"{TOY_SPEC.name}_onnx", f"{TOY_SPEC.name}_onnx_int8"):
        config = _config(repo / model / "config.pbtxt")
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator, f"{model}: no TensorRT"
    fp16 = f"{TOY_SPEC.name}_onnx_fp16"
    config = _config(repo / fp16 / "config.pbtxt")
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = dict(accelerator.parameters)
    for key, value in params.items():
        option = TRITON_KEY_TO_ORT.get(key, key)
        assert option in DOCUMENTED_TRT_OPTIONS, f"{key} is not a documented TensorRT EP option"
        if DOCUMENTED_TRT_OPTIONS[option] == "bool" and key != "precision_mode":
            assert value in {"true", "false", "1", "0"}, key
        if DOCUMENTED_TRT_OPTIONS[option] == "int":
            assert value.isdigit(), key
    checksum = onnx_checksum(repo / fp16 / "1" / "model.onnx")
    max_length = TOY_SPEC.max_length
    assert params == {
        "precision_mode": "FP16",
        "trt_layer_norm_fp32_fallback": "true",
        "max_workspace_size_bytes": str(4 << 30),
        "trt_engine_cache_enable": "true",
        "trt_engine_cache_path": f"/var/cache/trt/{fp16}/{checksum[:16]}",
        "trt_profile_min_shapes": "input_ids:1x1,attention_mask:1x1",
        "trt_profile_opt_shapes": f"input_ids:8x{max_length},attention_mask:8x{max_length}",
        "trt_profile_max_shapes": f"input_ids:16x{max_length},attention_mask:16x{max_length}",
    }
    ensemble = _config(repo / TOY_SPEC.name / "config.pbtxt")
    assert ensemble.ensemble_scheduling.step[1].model_name == f"{TOY_SPEC.name}_onnx"


def test_cpu_configs_carry_no_accelerator(tmp_path):
    repo = _gpu_repo(tmp_path, gpu=False)
    config = _config(repo / f"{TOY_SPEC.name}_onnx_fp16" / "config.pbtxt")
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator


def test_engine_cache_key_follows_the_weights_not_the_graph_or_the_folder(tmp_path):
    arguments = _toy_variants(tmp_path, ("fp16",))
    repo = tmp_path / "repo"
    model = repo / f"{TOY_SPEC.name}_onnx" / "1" / "model.onnx"

    def cache_path() -> str:
        write_repository(repo, TOY_SPEC, GPU, **arguments)
        accelerators = _config(repo / f"{TOY_SPEC.name}_onnx" / "config.pbtxt").optimization.execution_accelerators
        return accelerators.gpu_execution_accelerator[0].parameters["trt_engine_cache_path"]

    before = cache_path()
    assert before == engine_cache_dir("/tmp/filterserve_trt_cache", f"{TOY_SPEC.name}_onnx", onnx_checksum(model))
    copied = tmp_path / "elsewhere" / "1" / "model.onnx"
    shutil.copytree(model.parent, copied.parent)
    assert onnx_checksum(copied) == onnx_checksum(model), "a copied repository keeps its engines"

    retrained = tmp_path / "retrained" / "1" / "model.onnx"
    perturb_head(model, retrained, column=1, factor=1.01)
    old, new = onnx.load(str(model), load_external_data=False), onnx.load(str(retrained), load_external_data=False)
    assert [n.op_type for n in old.graph.node] == [n.op_type for n in new.graph.node]
    assert [i.name for i in old.graph.initializer] == [i.name for i in new.graph.initializer], "all ONNX Runtime keys on"
    shutil.rmtree(model.parent)
    shutil.copytree(retrained.parent, model.parent)
    after = cache_path()
    assert after != before and after.rsplit("/", 1)[0] == before.rsplit("/", 1)[0]


@pytest.mark.parametrize(
    "admitted, validated, expected",
    [
        (["fp32", "fp16", "int8"], True, "fp16"),  # CPU latency would pick int8
        (["fp32", "int8"], True, "fp32"),  # fp16 refused by the gate: still not int8
        (["int8", "fp32"], True, "fp32"),
        (["fp32", "fp16"], False, "fp32"),  # no gate: the first listed, as on the CPU
        (["fp16", "fp32"], False, "fp16"),
    ],
)
def test_auto_default_for_a_gpu_never_follows_cpu_latency(admitted, validated, expected):
    latency = {"fp32": 100.0, "fp16": 90.0, "int8": 30.0}
    assert choose_default("auto", admitted, latency, validated=validated, gpu=True) == expected


def test_auto_default_on_the_cpu_is_still_the_fastest_admitted():
    assert choose_default("auto", ["fp32", "fp16", "int8"], {"fp32": 100.0, "fp16": 90.0, "int8": 30.0}, validated=True) == "int8"


# --- 4. build-engine, up to TensorRT -----------------------------------------------------------------


def test_serving_profile_spans_what_the_server_sends():
    assert serving_profile(32, 512, 16) == ShapeProfile(min=(1, 1), opt=(8, 128), max=(32, 512))
    assert serving_profile(4, 512, 100) == ShapeProfile(min=(1, 1), opt=(4, 200), max=(4, 512))
    assert serving_profile(16, 64, 16).opt == (8, 64)
    assert serving_profile(32, 512, 16).ort_shapes()["trt_profile_opt_shapes"] == "input_ids:8x128,attention_mask:8x128"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-shape", "16x256"], "does not cover what the server sends"),
        (["--min-shape", "2x1"], "does not cover what the server sends"),
        (["--make-default", "--max-shape", "8x512"], "the ensemble joins up to max_batch_size"),
        (["--opt-shape", "8x100"], "opt length 100 is never sent: .* e.g. 112"),
        (["--opt-shape", "8by256"], "must be BATCHxSEQ"),
        (["--min-shape", "4x1", "--opt-shape", "2x128"], "1 <= min <= opt <= max"),
        (["--validation", "missing.jsonl"], "validation data not found: missing.jsonl"),
    ],
)
def test_build_engine_refuses_bad_arguments_before_touching_tensorrt(exported, capsys, extra, message):
    repo, _ = exported
    assert main(["build-engine", "--model-repository", str(repo), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_build_engine_needs_the_fp32_model(exported, tmp_path, capsys):
    repo, manifest = exported
    name = manifest["filter"]["name"]
    (tmp_path / "filterserve.json").write_text(json.dumps({"format": "filterserve.repository/1", "filters": {name: f"{name}.filter.json"}}))
    (tmp_path / f"{name}.filter.json").write_text(json.dumps({**manifest, "tensor_models": {"fp16": "x"}}))
    assert main(["build-engine", "--model-repository", str(tmp_path)]) == 2
    assert "needs the fp32 ONNX model" in capsys.readouterr().err


def test_build_engine_without_tensorrt_says_so_in_one_line(exported, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here")
    repo, _ = exported
    # A smaller batch is fine for an engine that is not the ensemble's tensor model.
    assert main(["build-engine", "--model-repository", str(repo), "--max-shape", "8x512"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: TensorRT is not installed") and len(err.strip().splitlines()) == 1


def test_engine_model_config_is_a_valid_tensorrt_plan_config(tmp_path):
    profile = ShapeProfile(min=(1, 1), opt=(8, 64), max=(16, 64))
    config = engine_config(TOY_SPEC, profile, pad_token_id=0, vocab_size=400, max_batch_tokens=None)
    (tmp_path / "config.pbtxt").write_text(text_format.MessageToString(config))
    parsed = _config(tmp_path / "config.pbtxt")
    assert parsed.platform == "tensorrt_plan" and not parsed.backend
    assert parsed.name == f"{TOY_SPEC.name}_trt" and parsed.default_model_filename == "model.plan"
    assert parsed.max_batch_size == 16 and parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert [(t.name, t.data_type, list(t.dims)) for t in parsed.input] == [
        ("input_ids", mc.TYPE_INT64, [-1]), ("attention_mask", mc.TYPE_INT64, [-1])
    ]
    assert [t.name for t in parsed.output] == ["logits", "weighted_score"]
    assert not parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert parsed.parameters["precision"].string_value == ENGINE_PRECISION


def test_make_default_points_the_ensemble_and_the_token_counters_at_the_engine(tmp_path):
    toy = build_toy_export(tmp_path)
    before = _config(toy.repo / TOY_SPEC.name / "config.pbtxt")
    point_ensemble_at(toy.repo, TOY_SPEC, f"{TOY_SPEC.name}_trt")
    after = _config(toy.repo / TOY_SPEC.name / "config.pbtxt")
    models = [s.model_name for s in after.ensemble_scheduling.step]
    assert models == [s.model_name if s.model_name != f"{TOY_SPEC.name}_onnx" else f"{TOY_SPEC.name}_trt"
                      for s in before.ensemble_scheduling.step]
    assert f"{TOY_SPEC.name}_trt" in models and f"{TOY_SPEC.name}_onnx" not in models
    tokenizer = _config(toy.repo / f"{TOY_SPEC.name}_tokenizer" / "config.pbtxt")
    assert tokenizer.parameters["tensor_model"].string_value == f"{TOY_SPEC.name}_trt"


# --- 5. build-engine writes through the staging commit, as every export does ------------------------
# TensorRT cannot run here: the engine's bytes stand for the one it would build. What is checked is
# everything around them, which is the same on a GPU.


def _engine_plan(repo: Path, *extra: str) -> EnginePlan:
    parser = argparse.ArgumentParser()
    add_build_engine_arguments(parser)
    return plan_engine(build_engine_options(parser.parse_args(["--model-repository", str(repo), *extra])))


def _siblings(repo: Path) -> list[str]:
    """What sits beside the repository: a staging folder left behind would show here."""
    return sorted(p.name for p in repo.parent.iterdir())


def test_an_engine_made_the_default_is_swapped_in_with_the_ensemble_and_the_record(exported, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    before = tree_digest(repo)
    name, engine = "uplifting_v4", "uplifting_v4_trt"
    record = to_json(write_engine(_engine_plan(repo, "--make-default"), b"engine bytes", EngineRecord(engine, ensemble_default=True)))

    assert (repo / engine / "1" / "model.plan").read_bytes() == b"engine bytes"
    config = _config(repo / engine / "config.pbtxt")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert (repo / engine / "warmup" / "attention_mask").is_file()
    assert engine in [s.model_name for s in _config(repo / name / "config.pbtxt").ensemble_scheduling.step]
    assert _config(repo / f"{name}_tokenizer" / "config.pbtxt").parameters["tensor_model"].string_value == engine
    on_disk = to_json(read_filter_records(repo)[name])
    assert on_disk == record and on_disk["models"] == [*exported[1]["models"], engine]
    assert on_disk["engines"] == {ENGINE_PRECISION: {"model": engine, "ensemble_default": True}}
    assert {k: v for k, v in on_disk.items() if k != "engines"} == {**exported[1], "models": on_disk["models"]}
    changed = {f"{name}/config.pbtxt", f"{name}_tokenizer/config.pbtxt", f"{name}.filter.json"}
    after = tree_digest(repo)
    assert {k: v for k, v in after.items() if k in before and k not in changed} == {k: v for k, v in before.items() if k not in changed}
    assert all(after[k] != before[k] for k in changed) and _siblings(repo) == ["repo"]


def test_an_engine_not_made_the_default_leaves_the_ensemble_and_a_rebuild_replaces_it(exported, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    before = tree_digest(repo)
    plan = _engine_plan(repo, "--max-shape", "8x512")
    write_engine(plan, b"first", EngineRecord("uplifting_v4_trt", ensemble_default=False))
    unchanged = {k: v for k, v in tree_digest(repo).items() if not k.startswith("uplifting_v4_trt/")}
    assert unchanged == {**before, "uplifting_v4.filter.json": unchanged["uplifting_v4.filter.json"]}
    assert _config(repo / "uplifting_v4_trt" / "config.pbtxt").max_batch_size == 8

    write_engine(_engine_plan(repo), b"second", EngineRecord("uplifting_v4_trt", ensemble_default=False))
    assert (repo / "uplifting_v4_trt" / "1" / "model.plan").read_bytes() == b"second"
    assert read_filter_records(repo)["uplifting_v4"].models.count("uplifting_v4_trt") == 1
    assert _siblings(repo) == ["repo"]


@pytest.mark.slow  # a whole export of its own
def test_an_engine_built_from_a_filter_exported_again_meanwhile_is_not_written(exported, standin, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    plan = _engine_plan(repo, "--make-default")
    # Another export of the filter commits while the engine is being built from the old fp32 model.
    export_filter(str(standin.base_dir), standin.adapter_dir, repo, precisions="fp32", max_batch_size=16)
    before = tree_digest(repo)
    with pytest.raises(FilterServeError, match="changed while this was being built .*nothing was written: run it again"):
        write_engine(plan, b"stale engine", EngineRecord("uplifting_v4_trt", ensemble_default=True))
    assert tree_digest(repo) == before and _siblings(repo) == ["repo"]
