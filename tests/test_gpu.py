"""GPU paths: TensorRT FP16 engine and ONNX Runtime's CUDA provider. Skipped without a CUDA GPU.

Run on the target device: ``python -m pytest -m gpu tests/test_gpu.py``. No GPU has run them yet;
what the CPU can check of the same code is in tests/test_gpu_path.py.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from filterserve.cli import main
from filterserve.export.parity import encode, ort_scores, ort_session

pytestmark = pytest.mark.gpu


def test_build_engine_matches_the_peft_reference_and_becomes_the_default(exported, reference, tmp_path):
    pytest.importorskip("tensorrt")
    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    assert main(["build-engine", "--model-repository", str(repo), "--make-default"]) == 0
    manifest = json.loads((repo / "uplifting_v4.filter.json").read_text())
    engine = manifest["engines"]["trt-fp16"]
    assert engine["model"] == "uplifting_v4_trt" and "uplifting_v4_trt" in manifest["models"]
    assert engine["parity"]["passed"] and engine["parity"]["finite"] and engine["fp32_layers"]["tensorrt_layers"] > 0
    assert (repo / "uplifting_v4_trt" / "1" / "model.plan").stat().st_size > 0
    ensemble = text_format.Parse((repo / "uplifting_v4" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert "uplifting_v4_trt" in [step.model_name for step in ensemble.ensemble_scheduling.step]

    from filterserve.export.tensorrt_engine import EngineRunner

    texts = ["Volunteers rebuild the flooded library.", "A", "word " * 600]
    ids, mask = encode(reference.tokenizer, texts, 512)
    logits, _ = EngineRunner((repo / "uplifting_v4_trt" / "1" / "model.plan").read_bytes())(ids, mask)
    assert np.isfinite(logits).all()
    assert np.abs(logits - reference(texts)).max() <= 0.05


def test_cuda_provider_matches_cpu(exported, reference):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu)")
    repo, manifest = exported
    texts = ["Volunteers rebuild the flooded library.", "Markets slide."]
    ids, mask = encode(reference.tokenizer, texts, 512)
    path = repo / manifest["tensor_models"]["fp32"] / "1" / "model.onnx"
    cuda, _ = ort_scores(ort_session(path, ["CUDAExecutionProvider"]), ids, mask)
    assert np.abs(cuda - reference(texts)).max() <= 1e-3
