"""The ``filterserve`` command: one subcommand per stage.

Subcommand modules are imported only when chosen, so ``filterserve score`` runs on the
client-only install (no torch).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from filterserve import defaults
from filterserve.errors import EXIT_USER_ERROR, FilterServeError, describe_os_error

# Modules that only the extras install; a missing one means the install is client-only.
EXTRAS_MODULES = {"tensorrt", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "openvino", "nncf", "pytriton",
                  "matplotlib", "safetensors"}

# subcommand → (module holding add_<x>_arguments and <x>_command, help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "export": ("filterserve.export.cli", "merge the LoRA, export ONNX, check parity, write the model repository"),
    "demo": ("filterserve.demo", "stand-in (or real) filter → export → serve → score the sample articles"),
    "standin": ("filterserve.export.cli", "build a random-weight Qwen2 or Gemma-3 + LoRA stand-in filter (tiny or real dimensions)"),
    "build-engine": ("filterserve.export.tensorrt_engine", "on the target GPU: build a TensorRT FP16 engine into the repository"),
    "serve": ("filterserve.serve.cli", "run tritonserver on a model repository (foreground)"),
    "bench": ("filterserve.benchmarks.cli", "benchmarks: trained fixture, accuracy gate, latency, throughput, memory, shared base"),
    "score": ("filterserve.client.cli", "score JSONL articles against a running server"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="filterserve", description=__doc__.splitlines()[0].replace("``", ""),
                                     formatter_class=defaults.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=defaults.HelpFormatter)
        sub_parser.set_defaults(_module=module, _name=name.replace("-", "_"))
        try:
            getattr(importlib.import_module(module), f"add_{name.replace('-', '_')}_arguments")(sub_parser)
        except ImportError as exc:
            sub_parser.set_defaults(_missing=str(exc))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"error: `filterserve {args.command}` needs an extra: pip install 'filterserve[all]' ({args._missing})",
              file=sys.stderr)
        return EXIT_USER_ERROR
    command = getattr(importlib.import_module(args._module), f"{args._name}_command")
    try:
        return int(command(args) or 0)
    except FilterServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # The net under the commands' own checks: a file the user named cannot be read or written
        # (a folder missing above it, a file where a folder should be, a full or read-only disk).
        # Without a filename it is not about a path (a socket, a bug): its traceback stays.
        if exc.filename is None:
            raise
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in EXTRAS_MODULES:
            print(f"error: `filterserve {args.command}` needs {exc.name}: pip install 'filterserve[all]'", file=sys.stderr)
            return EXIT_USER_ERROR
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
