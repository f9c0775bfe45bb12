"""The stage-1 probe converted to ONNX (scaler folded into the first Linear) scores as production's
``scaler.transform`` + ``MLPProbe`` in eval mode does (issue 26, "Each filter's probe is a small
model of its own, with the scaler folded in")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from probe_fixtures import E5_SMALL_DIM, embeddings, production_probe, reference_scores, write_production_probe

from filterserve.export.probe_onnx import PROBE_INPUT, PROBE_OUTPUT, write_probe_onnx
from filterserve.probe_pickle import load_probe

PARITY = 1e-5


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("dims", "hidden", "with_mean", "with_std"),
    [
        (6, (256, 128), True, True),  # human_thriving v9, belonging v3, nature_recovery v4
        (7, (256, 128), True, True),  # solutions v6
        (5, (256, 128), True, False),
        (5, (64,), False, True),
    ],
)
def test_onnx_probe_matches_scaler_and_mlp(tmp_path: Path, dims: int, hidden: tuple[int, ...], with_mean: bool, with_std: bool):
    scaler, model = production_probe(dims, seed=dims, hidden_sizes=hidden, with_mean=with_mean, with_std=with_std)
    probe = load_probe(write_production_probe(tmp_path / "probe" / "embedding_probe_e5small.pkl", scaler, model))
    onnx_path = write_probe_onnx(probe, tmp_path / "probe.onnx")
    session = _session(onnx_path)

    for x in (embeddings(257, seed=11), embeddings(64, seed=12, spread=50.0), embeddings(1, seed=13)):
        (got,) = session.run([PROBE_OUTPUT], {PROBE_INPUT: x})
        want = reference_scores(scaler, model, x)
        assert got.dtype == np.float32 and got.shape == (len(x), dims)
        assert float(np.max(np.abs(got - want))) <= PARITY


def test_onnx_probe_signature(tmp_path: Path):
    scaler, model = production_probe(6, seed=1)
    onnx_path = write_probe_onnx(load_probe(write_production_probe(tmp_path / "p.pkl", scaler, model)), tmp_path / "m" / "probe.onnx")
    graph = onnx.load(str(onnx_path)).graph
    (inp,), (out,) = graph.input, graph.output

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert (inp.name, inp.type.tensor_type.elem_type, shape(inp)) == (PROBE_INPUT, onnx.TensorProto.FLOAT, ["batch", E5_SMALL_DIM])
    assert (out.name, out.type.tensor_type.elem_type, shape(out)) == (PROBE_OUTPUT, onnx.TensorProto.FLOAT, ["batch", 6])
    assert [n.op_type for n in graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]


def test_reading_and_converting_need_neither_torch_nor_sklearn(tmp_path: Path):
    """The export reads the pickle and writes the ONNX with torch and sklearn made unimportable."""
    scaler, model = production_probe(6, seed=21)
    pickle_path = write_production_probe(tmp_path / "probe.pkl", scaler, model)
    onnx_path = tmp_path / "probe.onnx"
    script = (
        "import sys\n"
        "for name in ('torch', 'sklearn'):\n"
        "    sys.modules[name] = None\n"
        "from pathlib import Path\n"
        "from filterserve.probe_pickle import load_probe\n"
        "from filterserve.export.probe_onnx import write_probe_onnx\n"
        f"write_probe_onnx(load_probe({str(pickle_path)!r}), Path({str(onnx_path)!r}))\n"
        "assert not any(m == 'torch' or m.startswith(('torch.', 'sklearn')) for m in sys.modules if sys.modules[m] is not None)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    x = embeddings(32, seed=22)
    (got,) = _session(onnx_path).run([PROBE_OUTPUT], {PROBE_INPUT: x})
    assert float(np.max(np.abs(got - reference_scores(scaler, model, x)))) <= PARITY
