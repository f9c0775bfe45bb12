"""The export's memory-heavy file-to-file steps, each in a child process of its own.

Why: ONNX Runtime's int8 quantizer and NNCF each read the whole fp32 graph with its weights
(5.75 GB at Qwen2.5-1.5B) and build their copies beside it; run in the exporting process, on top
of what that process still held, the full-depth export peaked at 23.4 of 24 GB. A child process
takes file paths, writes its files, returns a small :class:`Done` and exits: everything it
allocated goes back to the system with it, and the exporting process never holds those copies.
The parity checks and the accuracy gate stay in the exporting process and read the files the child
wrote, exactly as they read files built in-process.

The child is ``python -m filterserve.export.child JOB.json``: it reads a :class:`Job`, writes its
:class:`Done` (or the one line of a :class:`FilterServeError`) beside it, and exits. Its stderr
goes to a file whose last line the parent quotes when it fails; a child killed by SIGKILL (the
kernel's out-of-memory killer) is reported with the peak it reached, read from its own rusage
(``os.wait4``). An interrupted parent kills the child before it re-raises, and the child asks
the kernel to kill it if the parent dies first (``PR_SET_PDEATHSIG``): no orphan holds gigabytes.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from filterserve.errors import FilterServeError
from filterserve.manifest import ChildRecord

KINDS = ("int8", "ov_int8", "ir")  # ONNX Runtime dynamic int8, NNCF static int8, OpenVINO IR as it is
TERMINATE_WAIT_S = 5.0  # after SIGTERM on an interrupt, before SIGKILL
STDERR_TAIL_CHARS = 400  # of the child's last stderr line, quoted in the parent's one-line error
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Job:
    """What one child builds: ``target`` from the fp32 ONNX ``source``, on the exclusion ladder's ``rung``."""

    kind: str
    source: str
    target: str
    rung: int = 0
    feeds: str | None = None  # ov_int8: an .npz of the calibration inputs (feed i's arrays as "i/<input>")


@dataclass(frozen=True)
class Done:
    """The child's answer: what it kept in fp32 and quantized (int8 kinds), and what it cost."""

    pid: int
    peak_rss_mb: float
    seconds: float
    kept: list[str] = field(default_factory=list)
    quantized: int = 0



def save_feeds(feeds: Sequence[Mapping[str, np.ndarray]], path: Path) -> Path:
    np.savez(path, **{f"{i}/{name}": array for i, feed in enumerate(feeds) for name, array in feed.items()})
    return path


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    feeds: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as stored:
        for key in stored.files:
            index, _, name = key.partition("/")
            feeds.setdefault(int(index), {})[name] = stored[key]
    return [feeds[i] for i in sorted(feeds)]


def peak_mb(maxrss_kb: int) -> float:
    """Linux reports ``ru_maxrss`` in KiB."""
    return round(maxrss_kb / 1024, 1)


def build(job: Job) -> Done:
    """The child's work (imports here: the parent never loads the quantizers for it)."""
    from filterserve.export import openvino_engine
    from filterserve.export.quantize import EXCLUSION_LADDER, quantize_int8

    started = time.perf_counter()
    source, target = Path(job.source), Path(job.target)
    kept: list[str] = []
    quantized = 0
    if job.kind == "int8":
        kept = quantize_int8(source, target, EXCLUSION_LADDER[job.rung][1])
    elif job.kind == "ov_int8":
        feeds = load_feeds(Path(job.feeds)) if job.feeds else []
        made = openvino_engine.quantize_static_int8(source, target, feeds, EXCLUSION_LADDER[job.rung][1])
        kept, quantized = made.kept, made.quantized
    elif job.kind == "ir":
        openvino_engine.onnx_to_ir(source, target)
    else:
        raise FilterServeError(f"unknown child job {job.kind!r} (one of {', '.join(KINDS)})")
    seconds = round(time.perf_counter() - started, 2)
    return Done(os.getpid(), peak_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss), seconds, kept, quantized)


def answer_path(job_path: Path) -> Path:
    return job_path.with_suffix(".done.json")


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (elsewhere: nothing to ask)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request: nothing would ever kill us
        os._exit(1)


def main(argv: list[str]) -> int:
    job_path = Path(argv[0])
    die_with_parent(int(argv[1]))
    job = Job(**json.loads(job_path.read_text(encoding="utf-8")))
    try:
        answer: dict[str, object] = {"done": asdict(build(job))}
    except FilterServeError as exc:
        answer = {"error": str(exc)}
    answer_path(job_path).write_text(json.dumps(answer), encoding="utf-8")
    return 0


def last_line(path: Path) -> str:
    """The child's last non-empty stderr line (a traceback's is the exception), cut to a line's length."""
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1][-STDERR_TAIL_CHARS:] if lines else "no output on stderr"


def stop(pid: int) -> None:
    """SIGTERM, then SIGKILL if it is still there after :data:`TERMINATE_WAIT_S`; reaped either way."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + TERMINATE_WAIT_S
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def failure(step: str, job: Job, status: int, maxrss_kb: int, stderr: Path) -> str:
    """One line: the step, the file it was building from, and why the child ended."""
    code = os.waitstatus_to_exitcode(status)
    where = f"{step} of {job.source} (child process)"
    if code == -signal.SIGKILL:
        return f"{where} was killed, probably out of memory: peak {maxrss_kb / 2**20:.1f} GB"
    if code < 0:
        return f"{where} was killed by {signal.Signals(-code).name}"
    return f"{where} failed (exit {code}): {last_line(stderr)}"


def run(step: str, job: Job) -> tuple[Done, ChildRecord]:
    """``job`` in a child process: its answer and the record of what it cost, or its failure as one
    :class:`FilterServeError` line."""
    import psutil

    parent_rss_mb = round(psutil.Process().memory_info().rss / 2**20, 1)  # what this process holds while it waits
    with tempfile.TemporaryDirectory(prefix="filterserve-child-") as tmp:
        job_path, stderr = Path(tmp) / "job.json", Path(tmp) / "stderr.txt"
        job_path.write_text(json.dumps(asdict(job)), encoding="utf-8")
        fd = os.open(stderr, os.O_WRONLY | os.O_CREAT, 0o600)
        argv = [sys.executable, "-m", "filterserve.export.child", str(job_path), str(os.getpid())]
        try:
            pid = os.posix_spawn(sys.executable, argv, dict(os.environ),
                                 file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)])
        finally:
            os.close(fd)
        try:
            _, status, usage = os.wait4(pid, 0)
        except BaseException:  # Ctrl-C (KeyboardInterrupt) or any other way out: no orphan holds the memory
            stop(pid)
            raise
        answer_file = answer_path(job_path)
        if os.waitstatus_to_exitcode(status) != 0 or not answer_file.is_file():
            raise FilterServeError(failure(step, job, status, usage.ru_maxrss, stderr))
        answer = json.loads(answer_file.read_text(encoding="utf-8"))
    if "error" in answer:
        raise FilterServeError(f"{step} (child process): {answer['error']}")
    done = Done(**answer["done"])
    return done, ChildRecord(step, done.pid, done.peak_rss_mb, parent_rss_mb, done.seconds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
