"""OpenVINO beside ONNX Runtime on the CPU (issue 20): the engine in process against PyTorch + PEFT,
what it reports it ran, NNCF's static int8, the backend's config, and its stand-in served."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXED_ARTICLES
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export import openvino_engine as ove
from filterserve.export import quantization_data as qd
from filterserve.export.parity import compare, encode, parity_texts
from filterserve.export.quantize import EXCLUSION_LADDER
from filterserve.filters import UPLIFTING_V4
from filterserve.model_repository.repository import RepositorySettings, openvino_model_config, write_repository
from filterserve.model_repository.runtime import openvino as backend

SPEC = UPLIFTING_V4
BF16_CPU = ove.cpu_support().bf16
needs_bf16 = pytest.mark.skipif(not BF16_CPU, reason="this CPU has no bf16 arithmetic")
STANDIN_BACKEND = Path(__file__).resolve().parents[1] / "model_repository" / "runtime" / "backends" / "openvino" / "model.py"


@pytest.fixture(scope="module")
def fp32_onnx(exported) -> Path:
    return exported[0] / contract.tensor_model(SPEC.name) / "1" / "model.onnx"


@pytest.fixture(scope="module")
def ir(fp32_onnx, tmp_path_factory) -> Path:
    return ove.onnx_to_ir(fp32_onnx, tmp_path_factory.mktemp("ir") / "model.xml")


@pytest.fixture(scope="module")
def parity_batch(reference):
    texts = parity_texts(reference.tokenizer, SPEC)
    ids, mask = encode(reference.tokenizer, texts, SPEC.max_length)
    return ids, mask, reference(texts)


@pytest.fixture(scope="module")
def calibration(reference) -> list[dict[str, np.ndarray]]:
    tokenizer = reference.tokenizer
    return qd.calibration_feeds(qd.model_texts(qd.default_articles(16), SPEC, tokenizer), tokenizer, SPEC.max_length)


@pytest.fixture(scope="module")
def int8_ir(fp32_onnx, calibration, tmp_path_factory) -> tuple[Path, ove.StaticInt8]:
    path = tmp_path_factory.mktemp("int8") / "model.xml"
    return path, ove.quantize_static_int8(fp32_onnx, path, calibration, EXCLUSION_LADDER[0][1])


def _weights_of(model, names: list[str]) -> dict[str, str]:
    """Each named MatMul's weight, as stored in the IR: the element type of the Constant feeding its second input."""
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    found = {}
    for name in names:
        node = ops[name].input_value(1).get_node()
        while node.get_type_name() != "Constant":
            node = node.input_value(0).get_node()
        found[name] = node.get_output_element_type(0).get_type_name()
    return found


def test_ir_in_f32_matches_peft_and_says_it_ran_f32(ir, parity_batch):
    ids, mask, reference = parity_batch
    model = ove.OpenVinoModel(ir, {"INFERENCE_PRECISION_HINT": "f32"})
    assert model.execution.precision == "f32" and set(model.execution.layers) == {"f32"}
    logits, weighted = model.scores(ids, mask)
    scale = float(np.abs(reference).max())
    compare("OpenVINO f32", logits, reference, contract.parity_limit("ov_fp32", scale))
    compare("OpenVINO f32 weighted_score", weighted[:, 0], reference @ np.asarray(SPEC.weights), contract.parity_limit("ov_fp32", scale))
    assert np.abs(logits - reference).max() < 1e-4, "f32 is f32: as close as ONNX Runtime"
    # The IR keeps the export's f32 weights (save_model would have stored them in FP16)
    weights = _weights_of(ove.read_model(ir), ove.matmul_roles(ove.read_model(ir))[1])
    assert set(weights.values()) == {"f32"}


@needs_bf16
def test_bf16_runs_bf16_within_its_relative_bound(ir, parity_batch):
    ids, mask, reference = parity_batch
    model = ove.checked_model(ir, backend.compile_properties(backend.backend_parameters(bf16=True)), "bf16")
    record = model.execution.to_dict()
    assert record["precision"] == "bf16" and set(record["compute_layers"]) == {"bf16"}
    assert record["compiled_with"]["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "avx512_bf16" in record["cpu"]["flags"] or "amx_bf16" in record["cpu"]["flags"]
    logits, _ = model.scores(ids, mask)
    limit = contract.parity_limit("bf16", float(np.abs(reference).max()))
    compare("OpenVINO bf16", logits, reference, limit)
    assert np.abs(logits - reference).max() > 1e-4, "bf16 arithmetic ran: it does not match f32 to f32's precision"


@needs_bf16
def test_a_compiled_precision_other_than_the_names_is_refused(ir):
    with pytest.raises(FilterServeError, match=r"bf16: OpenVINO compiled .* to run f32, not bf16"):
        ove.checked_model(ir, {"INFERENCE_PRECISION_HINT": "f32"}, "bf16")


def test_precision_names_say_what_the_cpu_runs():
    no_bf16 = ove.CpuSupport("Old Xeon", ("FP32", "INT8"), ("avx512_vnni",))
    bf16 = ove.CpuSupport("Zen 4", ("BF16", "FP32", "INT8"), ("avx512_bf16", "avx512_vnni"))
    with pytest.raises(FilterServeError) as refused:
        ove.expected_precision("bf16", no_bf16)
    message = str(refused.value)
    assert "\n" not in message and "Old Xeon" in message and "avx512_vnni" in message and "would run f32" in message
    assert ove.expected_precision("bf16", bf16) == "bf16"
    assert ove.expected_precision("ov_fp32", no_bf16) == "f32"
    with pytest.raises(FilterServeError, match="cannot pin f32"):
        ove.expected_precision("ov_fp32", bf16)
    assert ove.expected_precision("ov_int8", bf16) == "bf16" and ove.expected_precision("ov_int8", no_bf16) == "f32"
    # OpenVINO listing BF16 on a CPU without the instructions (emulation) is not bf16 hardware
    assert not ove.CpuSupport("emulated", ("BF16", "FP32"), ("avx512_vnni",)).bf16


def test_cpu_flags_come_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_vnni avx512_bf16\n")
    assert ove.cpuinfo_flags(cpuinfo) == ("avx512_bf16", "avx512_vnni")
    assert ove.cpuinfo_flags(tmp_path / "missing") == ()


def test_static_int8_keeps_the_head_attention_and_embedding_out(int8_ir, parity_batch):
    path, made = int8_ir
    model = ove.read_model(path)
    head, weights, products = ove.matmul_roles(model)
    assert len(head) == 2 and len(products) == 2 * 2  # the stand-in's 2 layers: scores and values per layer
    assert made.kept == [] and made.quantized == len(weights)
    stored = _weights_of(model, head + weights)
    assert {stored[n] for n in head} == {"f32"} and {stored[n] for n in weights} == {"i8"}
    embedding = [op for op in model.get_ordered_ops() if op.get_type_name() == "Gather"][0]
    assert embedding.input_value(0).get_node().get_output_element_type(0).get_type_name() == "f32"
    compiled = ove.OpenVinoModel(path, {})
    assert compiled.execution.precision == ove.cpu_support().default_precision
    assert {"i8", "u8"} & set(compiled.execution.layers), compiled.execution.layers
    ids, mask, reference = parity_batch
    logits, _ = compiled.scores(ids, mask)
    assert np.isfinite(logits).all()
    assert np.abs(logits - reference).max() > 1e-3, "int8 arithmetic ran"


def test_the_ladders_last_rung_keeps_every_mlp_projection(fp32_onnx, calibration, tmp_path):
    made = ove.quantize_static_int8(fp32_onnx, tmp_path / "model.xml", calibration, EXCLUSION_LADDER[-1][1])
    model = ove.read_model(tmp_path / "model.xml")
    stored = _weights_of(model, ove.matmul_roles(model)[1])
    assert len(made.kept) == 3 * 2 and made.quantized == len(stored) - len(made.kept)  # gate/up/down per layer
    assert sorted(n for n, t in stored.items() if t == "f32") == sorted(made.kept)


def test_default_quantization_articles_are_fixed_and_spread(reference):
    articles = qd.default_articles()
    assert articles == qd.default_articles() and len(articles) == qd.DEFAULT_COUNT
    lengths = [len(reference.tokenizer(SPEC.input_text(*a))["input_ids"]) for a in articles]
    assert min(lengths) < 64 and max(lengths) > SPEC.max_length, "from a sentence to past max_length"


def test_quantization_articles_the_gate_scores_are_refused(tmp_path):
    texts = qd.model_texts([("A title", "Some content."), ("Other", "More.")], SPEC, None)
    qd.check_disjoint(texts, "quant.jsonl", ["Unrelated\n\ntext"], tmp_path / "val.jsonl")
    with pytest.raises(FilterServeError, match=r"1 of the 2 quantization articles in quant.jsonl are also in the validation data"):
        qd.check_disjoint(texts, "quant.jsonl", [texts[1]], tmp_path / "val.jsonl")
    bad = tmp_path / "quant.jsonl"
    bad.write_text(json.dumps({"title": "T", "content": "C"}) + "\n" + json.dumps({"title": "", "content": "C"}) + "\n")
    with pytest.raises(FilterServeError, match=r"quant.jsonl line 2: a quantization article needs a non-empty title and content"):
        qd.read_articles(bad)


def test_openvino_configs_hold_only_the_backends_parameters():
    for precision in contract.OPENVINO_PRECISIONS:
        config = openvino_model_config(SPEC, f"m_{precision}", precision=precision)
        text_format.Parse(text_format.MessageToString(config), mc.ModelConfig())  # a valid config
        parameters = {k: v.string_value for k, v in config.parameters.items()}
        assert set(parameters) <= set(backend.BACKEND_PARAMETERS), parameters
        assert config.backend == "openvino" and config.default_model_filename == "model.xml"
        assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
        assert [list(t.dims) for t in config.input] == [[-1, -1], [-1, -1]]
        hint = backend.compile_properties(parameters).get("INFERENCE_PRECISION_HINT")
        assert hint == ("bf16" if precision == "bf16" else None)


def test_compile_properties_read_the_parameters_as_the_backend_does():
    assert backend.compile_properties({"HINT_BF16": "yes", "NUM_STREAMS": "auto", "PERFORMANCE_HINT": "throughput",
                                       "INFERENCE_NUM_THREADS": "4"}) == {
        "INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": "AUTO", "PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_NUM_THREADS": 4}
    for bad, message in (({"HINT_BF16": "NO"}, "must be YES"), ({"NUM_STREAMS": "many"}, "non-negative number"),
                         ({"PERFORMANCE_HINT": "fast"}, "must be one of"), ({"precision": "bf16"}, "does not read the parameter")):
        with pytest.raises(FilterServeError, match=message):
            backend.compile_properties(bad)


@needs_bf16
def test_the_standin_refuses_a_precision_the_export_did_not_gate(ir, tmp_path):
    """Loaded the way Triton's Python backend loads it (initialize with the model's args)."""
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    for file in (ir, ir.with_suffix(".bin")):
        shutil.copy2(file, model_dir / "1" / file.name)
    config = openvino_model_config(SPEC, "m", precision="bf16")
    rules = {"vocab_size": 4096, "pad_token_id": 0, "max_length": SPEC.max_length, "max_batch_tokens": 8192}
    spec_ = importlib.util.spec_from_file_location("openvino_standin", STANDIN_BACKEND)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    args = {"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
            "model_repository": str(model_dir), "model_version": "1"}
    backend.write_standin_file(model_dir, rules, "bf16")
    module.TritonPythonModel().initialize(args)  # loads: it runs what was gated
    backend.write_standin_file(model_dir, rules, "f32")
    with pytest.raises(FilterServeError, match="m would run bf16 on this CPU, but its export gated f32"):
        module.TritonPythonModel().initialize(args)


@pytest.fixture(scope="module")
def ov_repo(exported, standin, ir, int8_ir, tmp_path_factory) -> Path:
    """The stand-in's repository with bf16 (served by default), fp32 (ONNX Runtime) and ov_int8."""
    source, manifest = exported
    repo = tmp_path_factory.mktemp("ov_repo") / "repo"
    folders = {"bf16": contract.tensor_model(SPEC.name), "fp32": contract.tensor_model(SPEC.name, "fp32"),
               "ov_int8": contract.tensor_model(SPEC.name, "ov_int8")}
    shutil.copytree(source / contract.tensor_model(SPEC.name) / "1", repo / folders["fp32"] / "1")
    for precision, xml in (("bf16", ir), ("ov_int8", int8_ir[0])):
        (repo / folders[precision] / "1").mkdir(parents=True)
        for file in (xml, xml.with_suffix(".bin")):
            shutil.copy2(file, repo / folders[precision] / "1" / file.name)
    write_repository(
        repo, SPEC, RepositorySettings(max_batch_size=16), tokenizer_dir=standin.adapter_dir,
        precisions=list(folders), default_precision="bf16", pad_token_id=manifest["pad_token_id"],
        vocab_size=manifest["vocab_size"], executions={"bf16": "bf16", "ov_int8": ove.cpu_support().default_precision},
    )
    return repo


@needs_bf16
@pytest.mark.slow
def test_served_openvino_standin_matches_in_process_openvino(ov_repo):
    import tritonclient.grpc as grpcclient
    from helpers import int_input, text_inputs
    from tritonclient.utils import InferenceServerException

    from filterserve.client import FilterClient
    from filterserve.serve import TritonServer
    from filterserve.serve.assembly import read_configs

    configs = read_configs(ov_repo)
    openvino_models = {name: c for name, c in configs.items() if c.backend == "openvino"}
    assert sorted(openvino_models) == sorted([contract.tensor_model(SPEC.name), contract.tensor_model(SPEC.name, "ov_int8")])
    for config in openvino_models.values():  # every generated config, against the backend's list
        assert set(config.parameters) <= set(backend.BACKEND_PARAMETERS)
    texts = [SPEC.input_text(title, content) for title, content in MIXED_ARTICLES]
    with TritonServer(ov_repo) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        served = FilterClient(server.grpc_url, "grpc", model=SPEC.name).score_many(texts, concurrency=4)
        for name, config in openvino_models.items():
            parameters = {k: v.string_value for k, v in config.parameters.items()}
            local = ove.OpenVinoModel(ov_repo / name / "1" / "model.xml", backend.compile_properties(parameters))
            for i, text in enumerate(texts):
                tokens = client.infer(contract.tokenizer_model(SPEC.name), text_inputs("grpc", [text]))
                ids, mask = (tokens.as_numpy(n) for n in contract.TOKEN_INPUTS)
                answer = client.infer(name, [int_input("grpc", n, v) for n, v in zip(contract.TOKEN_INPUTS, (ids, mask))])
                expected, weighted = local.scores(ids, mask)
                assert np.abs(answer.as_numpy(contract.LOGITS) - expected).max() <= 1e-5, (name, i)
                assert np.abs(answer.as_numpy(contract.WEIGHTED_SCORE) - weighted).max() <= 1e-5, (name, i)
                if name == contract.tensor_model(SPEC.name):  # the ensemble serves bf16
                    got = np.array([served[i].scores[d] for d in SPEC.dimensions])
                    assert np.abs(got - expected[0]).max() <= 1e-5, i
        # The stand-in checks requests as the ONNX Runtime one does: a wrong pad id is refused
        bad = [int_input("grpc", n, np.array([v])) for n, v in zip(contract.TOKEN_INPUTS, ([5, 6, 7, 1], [1, 1, 1, 0]))]
        with pytest.raises(InferenceServerException, match="padding positions .* must hold the pad token id"):
            client.infer(contract.tensor_model(SPEC.name), bad)
        client.close()
