"""Every default a user can change, in one place: the CLI's ``--help`` shows these values, and the
code below the CLI takes them from here (or from the options value the CLI built), never from a
literal of its own.

Names the outside world relies on (Triton models, tensors, metrics) are not defaults: they live in
:mod:`filterserve.contract`. This module imports only the standard library, so the client-only install can read it.
"""

from __future__ import annotations

import argparse


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


# ---- client and `filterserve score` ----------------------------------------------------------------
# Requests in flight at once, per filter: `filterserve score`, the clients' bulk scoring, and the
# benchmarks' served runs, which measure what `score` does.
CONCURRENCY = 16


# ---- benchmarks and the demo -----------------------------------------------------------------------

