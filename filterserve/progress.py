"""Step-by-step progress on stderr, so long exports and benchmarks never look hung."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Steps:
    """Numbered steps with their wall time: ``[3/7] export ONNX fp32 ... done (4.2 s)``."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.index = 0
        self.stream = stream if stream is not None else sys.stderr
        self.timings: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(f"      {message}", file=self.stream, flush=True)

    @contextmanager
    def step(self, label: str) -> Iterator[None]:
        self.index += 1
        print(f"[{self.index}/{self.total}] {label} ...", file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings[label] = round(elapsed, 3)
        print(f"      done ({elapsed:.1f} s)", file=self.stream, flush=True)
