"""OpenVINO variants through the export (issue 20): built, checked against PyTorch + PEFT, gated,
picked by ``--default auto``, and scored by ``filterserve score`` through the OpenVINO stand-in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import MIXED_ARTICLES, export_into, peft_scorer

from filterserve import contract
from filterserve.errors import FilterServeError
from filterserve.export import openvino_engine as ove
from filterserve.export.options import ExportOptions
from filterserve.export.quantization_data import DEFAULT_SOURCE
from filterserve.filters import UPLIFTING_V4
from filterserve.model_repository.runtime import openvino as backend
from filterserve.serve.assembly import read_configs

SPEC = UPLIFTING_V4
needs_bf16 = pytest.mark.skipif(not ove.cpu_support().bf16, reason="this CPU has no bf16 arithmetic")
# every test here runs whole exports (OpenVINO, NNCF) on a trained filter: slow
pytestmark = [needs_bf16, pytest.mark.slow]
ASKED = ("fp32", "bf16", "int8", "ov_int8")


@pytest.fixture(scope="module")
def ov_export(trained, tmp_path_factory) -> tuple[Path, dict]:
    """The trained fixture exported in every CPU engine; ov_int8 calibrated on the training articles.
    At a gate tolerance of 0.05 (as test_variants) both int8 variants are admitted on the tiny fixture."""
    repo = tmp_path_factory.mktemp("ov_export") / "repo"
    record = export_into(repo, trained, SPEC, precisions=",".join(ASKED), validation=trained.val_path,
                         quantization_data=trained.train_path, gate_tolerance=0.05)
    return repo, record


def test_every_engine_is_built_checked_gated_and_the_fastest_served(ov_export, trained):
    repo, record = ov_export
    assert list(record["tensor_models"]) == list(ASKED) and record["refused"] == {}
    gate = record["accuracy_gate"]["report"]["variants"]
    for precision in ASKED:
        assert gate[precision]["finite"] and gate[precision]["mae_delta"] <= 0.05
    # What ran, read back, with the CPU flags it depended on
    bf16, ov_int8 = record["parity"]["bf16"], record["parity"]["ov_int8"]
    assert bf16["execution"]["precision"] == "bf16" and set(bf16["execution"]["compute_layers"]) == {"bf16"}
    assert bf16["relative"] and bf16["tolerance"] == contract.PARITY_TOLERANCES["bf16"]
    assert 1e-4 < bf16["max_abs_diff"] <= bf16["limit"] < 1.5  # 10% of scores of a few units: bf16 ran, within its bound
    assert ov_int8["execution"]["precision"] == "bf16" and {"i8", "u8"} & set(ov_int8["execution"]["compute_layers"])
    assert ov_int8["tolerance"] is None and "cannot pin a precision" in ov_int8["execution"]["served_precision"]
    assert any(flag in bf16["execution"]["cpu"]["flags"] for flag in ove.BF16_FLAGS)
    assert record["ov_int8"]["rung"] == 0 and record["ov_int8"]["calibration"]["data"] == str(trained.train_path)
    assert record["ov_int8"]["calibration"]["articles"] == 128 < record["ov_int8"]["calibration"]["of"]  # spread over the file
    # --default auto: the fastest admitted, through backend "openvino" when that is an OpenVINO variant
    latency = record["latency_ms_batch1"]
    assert set(latency) == set(ASKED) and record["default_precision"] == min(latency, key=latency.__getitem__)
    configs = read_configs(repo)
    served = configs[contract.tensor_model(SPEC.name)]
    assert (served.backend == "openvino") == (record["default_precision"] in contract.OPENVINO_PRECISIONS)
    for precision, model in record["tensor_models"].items():
        config = configs[model]
        if precision in contract.OPENVINO_PRECISIONS:
            assert config.backend == "openvino" and set(config.parameters) <= set(backend.BACKEND_PARAMETERS)
            assert (repo / model / "1" / "model.xml").is_file() and (repo / model / "1" / "model.bin").is_file()
            assert backend.read_standin_file(repo / model)["execution_precision"] == record["parity"][precision]["execution"]["precision"]
        else:
            assert config.backend == "onnxruntime" and (repo / model / "1" / "model.onnx").is_file()
    modes = {f.stat().st_mode for f in repo.glob("*/1/model.*")}
    assert len(modes) == 1, "the IR is as readable as the ONNX files"


def test_openvino_options_are_refused_in_one_line_before_loading(trained, tmp_path):
    common = dict(base=str(trained.base_dir), adapter=trained.adapter_dir, out=tmp_path / "r")
    with pytest.raises(FilterServeError, match="ov_int8 needs --validation"):
        ExportOptions(**common, precisions="fp32,ov_int8")
    with pytest.raises(FilterServeError, match="cannot pin f32"):
        ExportOptions(**common, precisions="ov-fp32")  # the hyphen spelling is the same name
    with pytest.raises(FilterServeError, match="Triton serves on the CPU only"):
        ExportOptions.of(**common, precisions="bf16", gpu=True)
    with pytest.raises(FilterServeError, match="--quantization-data calibrates ov_int8 alone"):
        ExportOptions(**common, precisions="bf16", quantization_data=trained.train_path)
    assert not (tmp_path / "r").exists()


def test_calibrating_on_the_validation_articles_is_refused(trained, tmp_path):
    with pytest.raises(FilterServeError, match=r"quantization articles in .*val.jsonl are also in the validation data"):
        export_into(tmp_path / "r", trained, SPEC, precisions="fp32,ov_int8", validation=trained.val_path,
                    quantization_data=trained.val_path)
    assert not (tmp_path / "r").exists(), "the repository is left as it was"


def test_the_default_quantization_data_is_recorded(trained, tmp_path):
    record = export_into(tmp_path / "r", trained, SPEC, precisions="fp32,ov_int8", validation=trained.val_path,
                         gate_tolerance=1.0, default="ov_int8")
    assert record["ov_int8"]["calibration"] == {"data": DEFAULT_SOURCE, "articles": 64, "of": 64}


def test_filterserve_score_through_the_openvino_standin(ov_export, trained, tmp_path):
    """Each OpenVINO variant served through the filter's ensemble; ``filterserve score``'s scores
    against in-process OpenVINO on the tokens the server's tokenizer step made (1e-5), and against
    PyTorch + PEFT within the variant's recorded parity bound."""
    import tritonclient.grpc as grpcclient
    from helpers import text_inputs

    from filterserve.benchmarks.engines import open_repository, variant_repository
    from filterserve.serve import TritonServer

    repo, record = ov_export
    opened = open_repository(repo)
    source = tmp_path / "articles.jsonl"
    source.write_text("".join(json.dumps({"title": t, "content": c}, ensure_ascii=False) + "\n" for t, c in MIXED_ARTICLES))
    texts = [SPEC.input_text(t, c) for t, c in MIXED_ARTICLES]
    reference = peft_scorer(trained, SPEC)(texts)
    for precision in ("bf16", "ov_int8"):
        model = record["tensor_models"][precision]
        served_repo = repo if precision == record["default_precision"] else variant_repository(opened, precision, tmp_path / precision)
        local = ove.served_model(precision, repo / model / "1" / "model.xml")
        with TritonServer(served_repo) as server:
            out = tmp_path / f"{precision}.jsonl"
            done = subprocess.run([sys.executable, "-m", "filterserve.cli", "score", str(source), "--url", server.grpc_url,
                                   "-o", str(out)], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            rows = [json.loads(line)[SPEC.name] for line in out.read_text().splitlines()]
            client = grpcclient.InferenceServerClient(server.grpc_url)
            for i, text in enumerate(texts):
                tokens = client.infer(contract.tokenizer_model(SPEC.name), text_inputs("grpc", [text]))
                expected, weighted = local.scores(*(tokens.as_numpy(n) for n in contract.TOKEN_INPUTS))
                got = np.array([rows[i]["scores"][d] for d in SPEC.dimensions])
                assert np.abs(got - expected[0]).max() <= 1e-5, (precision, i)
                assert abs(rows[i]["weighted_score"] - weighted[0, 0]) <= 1e-5, (precision, i)
            client.close()
        served = np.array([[row["scores"][d] for d in SPEC.dimensions] for row in rows])
        bound = record["parity"][precision].get("limit")
        if bound is not None:  # bf16; ov_int8 has no bound of its own (the gate admitted it)
            assert np.abs(served - reference).max() <= bound, precision
        assert np.isfinite(served).all()
