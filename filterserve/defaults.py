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
# `filterserve export`: the variants built (--precision) and the one the ensemble serves (--default:
# auto = the fastest the accuracy gate admitted, else the first listed). The gate's tolerance is the
# contract's (filterserve.contract.GATE_TOLERANCE): the figure the model card's MAE is held to.
EXPORT_PRECISION = "fp32"
EXPORT_DEFAULT_PRECISION = "auto"
# `filterserve standin`: the seed of its random weights.
STANDIN_SEED = 0
# `filterserve build-engine`: TensorRT's build workspace, in GiB.
ENGINE_WORKSPACE_GB = 4
# How long a --base or --adapter that is neither a folder nor in the local Hugging Face cache may
# take to be fetched from the hub before the export gives up (one attempt, no retry loop).
HUB_TIMEOUT_S = 10


# ---- serve -----------------------------------------------------------------------------------------
# `filterserve serve`. Triton's own ports, so existing clients and dashboards find it; the supervisor's
# /ready and /metrics next to them. 0 picks a free port.
SERVE_HOST = "127.0.0.1"
SERVE_HTTP_PORT = 8000
SERVE_GRPC_PORT = 8001
SERVE_METRICS_PORT = 8002
SERVE_SUPERVISOR_PORT = 8003
# Seconds between the supervisor's test inferences of each filter, and before one counts as late.
SERVE_CHECK_INTERVAL_S = 10.0
SERVE_PROBE_TIMEOUT_S = 5.0
# Seconds SIGTERM gives requests in flight; tritonserver restarts allowed within the restart window.
SERVE_GRACE_PERIOD_S = 30.0
SERVE_MAX_RESTARTS = 5
# Seconds tritonserver may take to load the repository (and a reload one model) before serve gives up:
# a 1.5B fp32 file read from a slow volume takes minutes. deploy/'s startup probes outlast it.
SERVE_STARTUP_TIMEOUT_S = 180.0


# ---- client and `filterserve score` ----------------------------------------------------------------
# Requests in flight at once, per filter: `filterserve score`, the clients' bulk scoring, and the
# benchmarks' served runs, which measure what `score` does.
CONCURRENCY = 16
# The protocol a bare HOST:PORT is spoken in (a URL's scheme, http:// or grpc://, decides otherwise),
# and the port a URL without one gets: Triton's own, which `filterserve serve` listens on by default.
PROTOCOL: Final = "grpc"
PORTS = {"grpc": SERVE_GRPC_PORT, "http": SERVE_HTTP_PORT}
# Seconds one request may take, and retries while a server is unreachable (a pool of several servers
# fails over instead of retrying).
TIMEOUT_S = 30.0
RETRIES = 3
# What `filterserve score` writes under each filter's name: filterserve's fields, or the production scorer's.
SCHEMA = "filterserve"
# Ray Data workers (`client/ray_data.py`): fewer requests each, since several workers share the servers,
# and a long timeout, since a batch of a corpus may queue behind the other workers' batches.
RAY_CONCURRENCY = 8
RAY_TIMEOUT_S = 600.0


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


# ---- issue 27, same article, same score (`filterserve bench determinism`) --------------------------
# Realistic-mix articles scored every way (besides the demo's articles), by every precision of the repository.
DETERMINISM_ARTICLES = 120


# ---- the stage-1 embedder (`filterserve export`, issue 26) -------------------------------------------
# Where the stage-1 embedder loads from (--stage1-model, a folder or hub id); None: the embedder the
# filter folder names (intfloat/multilingual-e5-small for every live filter).
STAGE1_MODEL: str | None = None
