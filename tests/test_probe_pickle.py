"""The stage-1 probe pickle is read without running any code it holds (issue 26, "No pickle code ever runs").

The production-format files are written here by real sklearn and torch, as production's
train_probe.py writes them; the hostile ones would run a command under a plain ``pickle.load``,
and the tests prove the command never ran under the restricted reader.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from probe_fixtures import production_probe, write_production_probe

from filterserve.errors import FilterServeError
from filterserve.probe_pickle import load_probe


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_production_probe_loads_to_the_same_numbers(tmp_path: Path, protocol: int):
    scaler, model = production_probe(output_dim=6, seed=1)
    path = write_production_probe(tmp_path / "probe" / "embedding_probe_e5small.pkl", scaler, model, protocol)

    probe = load_probe(path)

    assert (probe.input_dim, probe.output_dim, probe.hidden_sizes) == (384, 6, (256, 128))
    assert probe.scaler.n_features == 384
    np.testing.assert_array_equal(probe.scaler.mean, scaler.mean_)
    np.testing.assert_array_equal(probe.scaler.scale, scaler.scale_)
    linears = [m for m in model.network if isinstance(m, torch.nn.Linear)]
    for layer, linear in zip(probe.layers, linears, strict=True):
        np.testing.assert_array_equal(layer.weight, linear.weight.detach().numpy())
        np.testing.assert_array_equal(layer.bias, linear.bias.detach().numpy())


def test_numpy_2_names(tmp_path: Path):
    """Production's probes are written under numpy 2, whose pickles name ``numpy._core`` (numpy 1: ``numpy.core``)."""
    scaler, model = production_probe(output_dim=6, seed=1, hidden_sizes=(16,))
    path = write_production_probe(tmp_path / "p.pkl", scaler, model, protocol=2)  # GLOBAL opcodes: names are plain text
    numpy1 = path.read_bytes()
    assert b"cnumpy.core.multiarray\n" in numpy1
    path.write_bytes(numpy1.replace(b"cnumpy.core.", b"cnumpy._core."))
    probe = load_probe(path)
    np.testing.assert_array_equal(probe.scaler.mean, scaler.mean_)
    np.testing.assert_array_equal(probe.layers[0].weight, model.network[0].weight.detach().numpy())


def test_scaler_without_mean_or_std(tmp_path: Path):
    scaler, model = production_probe(output_dim=5, seed=2, hidden_sizes=(32,), with_mean=False)
    probe = load_probe(write_production_probe(tmp_path / "p.pkl", scaler, model))
    assert probe.scaler.mean is None
    np.testing.assert_array_equal(probe.scaler.scale, scaler.scale_)
    assert probe.hidden_sizes == (32,)


def test_tensor_views_of_a_shared_storage(tmp_path: Path):
    """A state dict whose tensors are views (offset, transposed strides) of one storage reads as torch reads it."""
    scaler, model = production_probe(output_dim=3, seed=3, hidden_sizes=(4,))
    state = model.state_dict()
    block = torch.arange(4 * 384 + 4 + 12, dtype=torch.float32) / 100
    state["network.0.weight"] = block[: 4 * 384].view(384, 4).t()  # strides (1, 4)
    state["network.0.bias"] = block[4 * 384: 4 * 384 + 4]  # offset into the same storage
    state["network.3.weight"] = block[4 * 384 + 4:].view(3, 4)
    model.load_state_dict(state)
    path = tmp_path / "p.pkl"
    with path.open("wb") as f:
        pickle.dump({"scaler": scaler, "state_dict": state, "model_config": {"input_dim": 384, "output_dim": 3}}, f)
    probe = load_probe(path)
    np.testing.assert_array_equal(probe.layers[0].weight, state["network.0.weight"].numpy())
    np.testing.assert_array_equal(probe.layers[0].bias, state["network.0.bias"].numpy())
    np.testing.assert_array_equal(probe.layers[1].weight, state["network.3.weight"].numpy())


class _RunsCommand:
    """Unpickling this runs ``callable(*args)``: the shape of every pickle exploit."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _hostile_payloads(marker: Path):
    touch = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')"
    return {
        "os.system": _RunsCommand(os.system, f"{sys.executable} -c \"{touch}\""),
        "builtins.exec": _RunsCommand(exec, touch),
        "subprocess.call": _RunsCommand(subprocess.call, [sys.executable, "-c", touch]),
    }


@pytest.mark.parametrize("global_name", ["os.system", "builtins.exec", "subprocess.call"])
def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path, global_name: str):
    marker = tmp_path / "marker"
    scaler, model = production_probe(output_dim=6, seed=4, hidden_sizes=(8,))
    path = write_production_probe(tmp_path / "probe.pkl", scaler, model)
    data = pickle.loads(path.read_bytes())
    # Behind a real scaler and state dict, so the reader has accepted much before it meets it.
    data["metrics"] = {"val_mae": _hostile_payloads(marker)[global_name]}
    path.write_bytes(pickle.dumps(data))

    with pytest.raises(FilterServeError) as refused:
        load_probe(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message
    expected = {"os.system": "posix.system", "builtins.exec": "builtins.exec", "subprocess.call": "subprocess.call"}[global_name]
    assert f"global {expected}" in message
    assert not marker.exists()

    # The payload is live: a plain pickle.load, as production's EmbeddingStage does, runs it.
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"], check=True)
    assert marker.read_text() == "ran"


def _probe_with_last_bias(tmp_path: Path, bias: object) -> Path:
    """A production-format probe (2 dimensions, hidden [2]) whose last bias is ``bias``, pickled as it reduces."""
    scaler, model = production_probe(output_dim=2, seed=5, hidden_sizes=(2,))
    state = model.state_dict()
    state["network.3.bias"] = bias
    path = tmp_path / "probe.pkl"
    path.write_bytes(pickle.dumps({"scaler": scaler, "state_dict": state, "model_config": {"input_dim": 384, "output_dim": 2}}))
    return path


def test_code_hidden_inside_a_torch_storage_is_refused(tmp_path: Path):
    """torch.storage._load_from_bytes's bytes are themselves pickles; production torch.loads them unrestricted."""
    marker = tmp_path / "marker"
    inner = pickle.dumps(_hostile_payloads(marker)["builtins.exec"], protocol=2)

    class _Storage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (inner,)

    class _Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (_Storage(), 0, (2,), (1,), False, {})

    with pytest.raises(FilterServeError, match=r"refused probe .*global (__builtin__|builtins)\.exec"):
        load_probe(_probe_with_last_bias(tmp_path, _Tensor()))
    assert not marker.exists()


def test_a_tensor_view_past_its_storage_is_refused(tmp_path: Path):
    """A size/stride reaching beyond the storage would read memory that is not the probe's."""
    storage = torch.zeros(4).untyped_storage()

    class _Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.float32,
                                                                                 _internal=True), 3, (2,), (1000,), False, {})

    with pytest.raises(FilterServeError, match=r"reaches element 1003 of a storage of 4"):
        load_probe(_probe_with_last_bias(tmp_path, _Tensor()))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "not a dict", "no scaler", "layer mismatch"])
def test_damaged_files_are_one_line(tmp_path: Path, damage: str):
    scaler, model = production_probe(output_dim=6, seed=7, hidden_sizes=(8,))
    good = write_production_probe(tmp_path / "good.pkl", scaler, model).read_bytes()
    state = model.state_dict()
    state["network.3.weight"] = state["network.3.weight"][:, :5]
    content = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\x17not a pickle at all" * 10,
        "empty": b"",
        "not a dict": pickle.dumps([1, 2, 3]),
        "no scaler": pickle.dumps({"state_dict": {}, "model_config": {}}),
        "layer mismatch": pickle.dumps({"scaler": scaler, "state_dict": state, "model_config": {"input_dim": 384, "output_dim": 6}}),
    }[damage]
    path = tmp_path / "probe.pkl"
    path.write_bytes(content)
    with pytest.raises(FilterServeError) as refused:
        load_probe(path)
    assert "\n" not in str(refused.value) and str(path) in str(refused.value)


def test_missing_file_is_one_line(tmp_path: Path):
    with pytest.raises(FilterServeError, match="cannot read probe .*missing.pkl"):
        load_probe(tmp_path / "missing.pkl")


def test_torch_zip_format_is_refused(tmp_path: Path):
    """torch.save's zip file is not what production writes (pickle.dump); it is refused, not half-read."""
    scaler, model = production_probe(output_dim=2, seed=8, hidden_sizes=(2,))
    buffer = io.BytesIO()
    torch.save({"scaler": scaler, "state_dict": model.state_dict()}, buffer)
    path = tmp_path / "probe.pkl"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(FilterServeError, match=str(path)):
        load_probe(path)
