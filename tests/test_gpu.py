"""GPU paths: TensorRT FP16 engine and ONNX Runtime's CUDA provider. Skipped without a CUDA GPU.

Run on the target device: ``python -m pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from filterserve.cli import main
from filterserve.export.parity import encode, ort_scores, ort_session

pytestmark = pytest.mark.gpu


def test_build_engine_matches_the_peft_reference(exported, reference, tmp_path):
    pytest.importorskip("tensorrt")
    repo = tmp_path / "repo"
    shutil.copytree(exported[0], repo)
    assert main(["build-engine", "--model-repository", str(repo), "--opt-shape", "4x64", "--max-shape", "8x512"]) == 0
    manifest = json.loads((repo / "uplifting_v4.filter.json").read_text())
    assert manifest["tensor_models"]["trt-fp16"] == "uplifting_v4_trt"
    assert (repo / "uplifting_v4_trt" / "1" / "model.plan").stat().st_size > 0
    assert manifest["parity"]["trt-fp16"]["passed"] and manifest["parity"]["trt-fp16"]["finite"]

    from filterserve.export.tensorrt_engine import run_engine

    texts = ["Volunteers rebuild the flooded library.", "A", "word " * 600]
    ids, mask = encode(reference.tokenizer, texts, 512)
    logits, weighted = run_engine(repo / "uplifting_v4_trt" / "1" / "model.plan", ids, mask)
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
