"""The export's memory-heavy steps run in child processes: recorded, checked as before, failing in one line, never orphaned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import export_into
from helpers import labelled_samples, settled

from filterserve.errors import FilterServeError
from filterserve.export import child
from filterserve.export.parity import ort_scores, ort_session
from filterserve.export.quantize import quantize_int8
from filterserve.filters import UPLIFTING_V4
from filterserve.manifest import read_filter_record


@pytest.fixture(scope="module")
def quantized(standin, tmp_path_factory):
    """The stand-in exported with both int8 variants (every variant admitted: random weights, for the mechanics)."""
    tmp = tmp_path_factory.mktemp("child_export")
    repo = tmp / "repo"
    export_into(repo, standin, UPLIFTING_V4, precisions="fp32,int8,ov_int8",
                validation=labelled_samples(tmp / "val.jsonl", UPLIFTING_V4), gate_tolerance=1e9, default="fp32")
    return repo


def test_quantization_runs_in_child_processes_whose_peaks_the_record_keeps(quantized):
    record = read_filter_record(quantized)
    assert record.children is not None and record.parent_peak_rss_mb is not None and record.peak_rss_mb is not None
    assert [c.step for c in record.children] == ["int8 (rung 0)", "ov_int8 (rung 0)"]
    for ran in record.children:
        assert ran.pid != os.getpid() and ran.peak_rss_mb > 0 and ran.parent_rss_mb > 0
    assert record.parent_peak_rss_mb > 0
    together = max(c.peak_rss_mb + c.parent_rss_mb for c in record.children)  # the parent waits while its child runs
    assert record.peak_rss_mb == pytest.approx(max(record.parent_peak_rss_mb, together), abs=0.1)
    assert record.peak_rss_mb > max(c.peak_rss_mb for c in record.children)


def test_the_childs_int8_file_is_the_one_quantized_in_process_and_passed_parity(quantized, standin, tmp_path):
    record = read_filter_record(quantized)
    assert record.parity["int8"].finite and record.parity["ov_int8"].finite and record.int8 is not None
    fp32 = quantized / record.tensor_models["fp32"] / "1" / "model.onnx"
    here = tmp_path / "model.onnx"
    assert len(quantize_int8(fp32, here)) == record.int8.fp32_matmuls
    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    served = ort_scores(ort_session(quantized / record.tensor_models["int8"] / "1" / "model.onnx"), ids, mask)
    in_process = ort_scores(ort_session(here), ids, mask)
    assert all(np.array_equal(a, b) for a, b in zip(served, in_process))


def test_a_child_that_fails_is_one_line_naming_the_step_and_the_file(tmp_path):
    missing = tmp_path / "absent.onnx"
    with pytest.raises(FilterServeError) as failed:
        child.run("int8 (rung 0)", child.Job("int8", str(missing), str(tmp_path / "int8.onnx")))
    message = str(failed.value)
    assert message.startswith(f"int8 (rung 0) of {missing} (child process) failed (exit 1): ") and "\n" not in message
    assert "absent.onnx" in message.split("failed (exit 1): ")[1]  # the child's own last stderr line
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("not a model", encoding="utf-8")
    with pytest.raises(FilterServeError, match=r"^ov_fp32 IR \(child process\): OpenVINO cannot read .*model\.onnx"):
        child.run("ov_fp32 IR", child.Job("ir", str(not_onnx), str(tmp_path / "model.xml")))


def _blocking_source(tmp_path: Path) -> Path:
    """A FIFO as the fp32 file: the child blocks opening it until it is killed."""
    fifo = tmp_path / "fp32.onnx"
    os.mkfifo(fifo)
    return fifo


def _children(parent: psutil.Process) -> list[psutil.Process]:
    return [p for p in parent.children() if "filterserve.export.child" in " ".join(p.cmdline())]


def _only_child(parent: psutil.Process) -> psutil.Process:
    children = settled(lambda: _children(parent), lambda found: len(found) == 1, timeout_s=60)
    assert len(children) == 1, children
    return children[0]


def _ended(process: psutil.Process) -> bool:
    """Gone, or a zombie nobody reaped yet (a container's init may not): it holds no memory either way."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_child_killed_by_the_kernel_is_reported_as_probably_out_of_memory(tmp_path):
    me = psutil.Process()
    killer = threading.Thread(target=lambda: _only_child(me).send_signal(signal.SIGKILL))
    killer.start()
    with pytest.raises(FilterServeError, match=r"^int8 \(rung 0\) of .*fp32\.onnx \(child process\) was killed, "
                                               r"probably out of memory: peak \d+\.\d GB$"):
        child.run("int8 (rung 0)", child.Job("int8", str(_blocking_source(tmp_path)), str(tmp_path / "int8.onnx")))
    killer.join()


@pytest.mark.parametrize("interrupt", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_export_leaves_no_child_behind(tmp_path, interrupt):
    """Ctrl-C: the parent kills its child before it stops; a parent killed outright takes it along (PDEATHSIG)."""
    script = ("import sys; from filterserve.export import child; "
              "child.run('int8 (rung 0)', child.Job('int8', sys.argv[1], sys.argv[2]))")
    parent = subprocess.Popen([sys.executable, "-c", script, str(_blocking_source(tmp_path)), str(tmp_path / "int8.onnx")],
                              stderr=subprocess.PIPE)
    grandchild = _only_child(psutil.Process(parent.pid))
    parent.send_signal(interrupt)
    _, err = parent.communicate(timeout=60)
    assert parent.returncode != 0
    if interrupt == signal.SIGINT:
        assert b"KeyboardInterrupt" in err
    assert settled(lambda: _ended(grandchild), bool, timeout_s=30), f"child {grandchild.pid} outlived its parent"


def test_the_lean_shape_inference_writes_the_very_file_onnx_runtimes_own_reload_writes(quantized, tmp_path, monkeypatch):
    """shapes_in_place skips ONNX Runtime's deepcopy-save-reload (3 copies of the weights); the int8 file stays byte for byte."""
    import contextlib
    import hashlib

    from filterserve.export import quantize

    record = read_filter_record(quantized)
    fp32 = quantized / record.tensor_models["fp32"] / "1" / "model.onnx"
    quantize_int8(fp32, tmp_path / "lean" / "model.onnx")
    monkeypatch.setattr(quantize, "lean_shape_inference", contextlib.nullcontext)
    quantize_int8(fp32, tmp_path / "ort" / "model.onnx")
    for name in ("model.onnx", "model.onnx.data"):
        lean, ort = (hashlib.sha256((tmp_path / kind / name).read_bytes()).hexdigest() for kind in ("lean", "ort"))
        assert lean == ort, name
