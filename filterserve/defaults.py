"""Every default a user can change, in one place: the CLI's ``--help`` shows these values, and the
code below the CLI takes them from here (or from the options value the CLI built), never from a
literal of its own.

Names the outside world relies on (Triton models, tensors, metrics) are not defaults: they live in
:mod:`filterserve.contract`. This module imports only the standard library, so the client-only install can read it.
"""

from __future__ import annotations

import argparse
from typing import Final


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default where it has one and its help does not already say it.

    Every parser and sub-parser of the CLI uses it, so a default changed here shows in ``--help``.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS or "default" in text \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"

# ---- stand-ins (`filterserve standin`, `filterserve bench family`) ---------------------------------
# The --shape names; filterserve.export.standin maps each to its dimensions.
STANDIN_SHAPES = ("tiny", "qwen2.5-1.5b", "gemma3-tiny", "gemma3-1b")
STANDIN_SHAPE = "tiny"


# ---- export ----------------------------------------------------------------------------------------


# ---- serve -----------------------------------------------------------------------------------------


# ---- client and `filterserve score` ----------------------------------------------------------------
# Requests in flight at once, per filter: `filterserve score`, the clients' bulk scoring, and the
# benchmarks' served runs, which measure what `score` does.
CONCURRENCY = 16


# ---- benchmarks and the demo -----------------------------------------------------------------------

# Where `filterserve bench` writes its markdown, JSON and PNG reports, and the protocol it speaks to a
# server given with --url (`filterserve demo` speaks it to the server it starts).
BENCH_OUT = "bench-report"
BENCH_PROTOCOL: Final = "grpc"
# `bench fixture`: training steps (batch 16) and the seed of its articles and weights. The demo trains as many.
FIXTURE_STEPS = 600
FIXTURE_SEED = 42
# `bench latency`: timed batch-1 requests per engine and text length; `bench throughput`: articles per run,
# the concurrency levels (in process: batch sizes) and the article-length mixes, every one known by default.
LATENCY_REQUESTS = 20
THROUGHPUT_REQUESTS = 20
THROUGHPUT_CONCURRENCY = (1, 4, 16, 64)
MIXES = ("uniform", "realistic")
# `bench memory` and `bench shared-base`: the batch every tensor model runs before its memory is read.
MEMORY_BATCH = 8
MEMORY_TOKENS = 512
# `bench family`: how many stand-in filters share its base.
FAMILY_COUNT = 6
# `bench shared-base`: numbers of filters served, realistic-mix articles, timed batch-1 requests per text.
SHARED_BASE_COUNTS = (1, 2, 4, 6)
SHARED_BASE_ARTICLES = 32
SHARED_BASE_REQUESTS = 10
# `filterserve demo`: where the trained filters and the repository go.
DEMO_WORKDIR = "filterserve-demo"
