"""``filterserve export`` arguments and entry point."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from filterserve import defaults
from filterserve.contract import GATE_TOLERANCE
from filterserve.errors import FilterServeError
from filterserve.export.options import ExportOptions, RemoveOptions, StandinOptions
from filterserve.filter_folder import is_filter_folder
from filterserve.filter_loader import load_filter
from filterserve.hybrid_settings import HybridSettings, read_hybrid_settings
from filterserve.manifest import to_json
from filterserve.model_repository.gpu import TRT_CACHE_ROOT
from filterserve.model_repository.repository import (
    DEFAULT_BUCKET,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_TEXT_BYTES,
    RepositorySettings,
)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model folder or hub id (e.g. Qwen/Qwen2.5-1.5B); required but with --remove, "
                        "where it names a group's base only when it moved")
    parser.add_argument("--adapter", help="PEFT adapter folder (adapter + tokenizer files); required but with --remove")
    parser.add_argument("--out", required=True, help="model repository to add the filter to (or replace it in); other filters stay")
    parser.add_argument("--share-base", action="store_true", help="add the filter to the repository's shared-base group for "
                        "--base (created if needed): one copy of the base serves every filter on it, each row with its own "
                        "LoRA and head; the group is rebuilt with all its members and swapped in at once, at the one "
                        "--precision given: fp32 (ONNX Runtime) or bf16 (OpenVINO)")
    parser.add_argument("--remove", metavar="NAME", help="take filter NAME out of --out instead of exporting: a merged "
                        "filter's models go; a group member's group is rebuilt without it (dropped with its last member)")
    parser.add_argument("--name", help="Triton model name (default: the filter's name)")
    parser.add_argument("--filter", help="filter description JSON (default: uplifting v4)")
    parser.add_argument("--calibration", help='per-dimension isotonic breakpoints, JSON {"<dimension>": {"x": [...], "y": [...]}}: '
                        "applied to the served final_scores (raw scores and parity are unchanged)")
    parser.add_argument("--precision", default=defaults.EXPORT_PRECISION, help="comma-separated. ONNX Runtime: fp32, fp16, int8 (dynamic). "
                        "OpenVINO (CPU; Triton backend \"openvino\"): bf16 (needs avx512_bf16 or AMX), ov_fp32 (only on a "
                        "CPU without bf16: Triton's backend cannot pin f32), ov_int8 (static, NNCF-calibrated). "
                        "int8 and ov_int8 need --validation")
    parser.add_argument("--quantization-data", help="JSONL articles (title, content) that ov_int8 is calibrated on, "
                        "none of them in --validation; best: the filter's training articles (default: 64 articles built "
                        "from the sentences of filterserve's sample articles)")
    parser.add_argument("--validation", help="labelled JSONL (title, content, one field per dimension): every variant "
                        "must keep the validation MAE within --gate-tolerance of the PyTorch + PEFT reference")
    parser.add_argument("--gate-tolerance", type=float, default=GATE_TOLERANCE, help="max MAE increase, overall and per dimension")
    parser.add_argument("--default", default=defaults.EXPORT_DEFAULT_PRECISION,
                        help="precision the ensemble serves; auto = the fastest variant "
                        "the accuracy gate admitted (with --validation), else the first listed")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE, help="most articles the tensor model runs at once")
    parser.add_argument("--max-batch-tokens", type=int, help="most tokens (rows × padded length) per tensor-model run, "
                        "to bound memory on small GPUs (default: max-batch-size × max_length)")
    parser.add_argument("--bucket", type=int, default=DEFAULT_BUCKET, help="each request is padded to a multiple of "
                        "this many tokens; smaller wastes less, larger lets more requests share a shape")
    parser.add_argument("--max-text-bytes", type=int, default=DEFAULT_MAX_TEXT_BYTES,
                        help="longer TEXT, TITLE or CONTENT values are refused")
    parser.add_argument("--gpu", action="store_true", help="target a GPU (NVIDIA's container): GPU instance groups; the fp16 "
                        "variant, and only it, runs on ONNX Runtime's TensorRT accelerator in FP16 (export fp16 to get it)")
    parser.add_argument("--trt-cache-dir", dest="trt_cache_root", metavar="TRT_CACHE_DIR", default=TRT_CACHE_ROOT,
                        help="with --gpu: where the server's ONNX Runtime writes "
                        "TensorRT engines, one folder per model checksum")
    parser.add_argument("--force", action="store_true", help="replace a different export of the same filter already in --out")
    parser.add_argument("--stage1-model", default=defaults.STAGE1_MODEL, metavar="PATH_OR_ID",
                        help="the stage-1 embedder's folder or hub id, as --base gives the base (default: the embedder "
                        "the filter folder names, intfloat/multilingual-e5-small for every live filter); exported once "
                        "per repository and shared by every filter whose stage 1 names it")
    parser.add_argument("--no-hybrid", action="store_true", help="export stage 2 alone for a filter folder that ships "
                        "inference_hybrid.py: every row is then scored by the fine-tuned model, which differs from "
                        "production for the rows its stage 1 screens out")


def export_options(args: argparse.Namespace) -> ExportOptions:
    """The parsed flags as one checked value: every flag's check and message live in ExportOptions."""
    from dataclasses import fields, replace

    spec = load_filter(args.filter)
    hybrid = stage1_settings(args)
    if args.name:
        spec = replace(spec, name=args.name)
    if args.calibration:
        spec = spec.with_calibration(args.calibration)
    # Every RepositorySettings field is the flag of the same name (dest): a new setting is a field and a flag.
    repository = RepositorySettings(**{f.name: getattr(args, f.name) for f in fields(RepositorySettings)})
    return ExportOptions(
        args.base, args.adapter, args.out, spec, precisions=args.precision, validation=args.validation,
        quantization_data=args.quantization_data, gate_tolerance=args.gate_tolerance, default=args.default, force=args.force,
        repository=repository, share_base=args.share_base, hybrid=hybrid, stage1_model=args.stage1_model,
    )


def stage1_settings(args: argparse.Namespace) -> HybridSettings | None:
    """A filter folder's stage 1 as production runs it (the probe's step prints its DISAGREEMENT lines),
    or None: no folder, no inference_hybrid.py, or --no-hybrid (said in one line)."""
    if not args.filter or not is_filter_folder(Path(args.filter)):
        return None
    settings = read_hybrid_settings(args.filter)
    if settings is None:
        return None
    if args.no_hybrid:
        print(f"--no-hybrid: {settings.folder} is exported as stage 2 alone; production screens rows whose stage-1 "
              f"average is below {settings.threshold:g} with its probe, so results differ from production for those rows",
              file=sys.stderr)
        return None
    return settings


def remove_options(args: argparse.Namespace) -> RemoveOptions:
    """``export --remove NAME``: the flags that take a filter out; those of an export are refused."""
    given = [flag for flag, value in (("--adapter", args.adapter), ("--filter", args.filter), ("--share-base", args.share_base)) if value]
    if given:
        raise FilterServeError(f"--remove takes no {', '.join(given)}: it only takes a filter out of --out")
    return RemoveOptions(args.out, args.remove, args.base)


def remove_command(options: RemoveOptions) -> int:
    from filterserve.export.group import remove_filter

    group = remove_filter(options)
    left = f"; group {group.group} now serves {', '.join(group.members)}" if group else ""
    print(f"removed filter {options.name} from {options.out}{left}", file=sys.stderr)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from filterserve.export.pipeline import run_export

    if args.remove:
        return remove_command(remove_options(args))
    missing = [flag for flag, value in (("--base", args.base), ("--adapter", args.adapter)) if not value]
    if missing:
        raise FilterServeError(f"filterserve export needs {' and '.join(missing)} (or --remove NAME)")
    options = export_options(args)
    record = run_export(options)
    gate = record.accuracy_gate
    print(json.dumps({
        "repository": str(options.out),
        "models": record.models,
        "default_precision": record.default_precision,
        "parity_max_abs_diff": {p: round(r.max_abs_diff, 8) for p, r in record.parity.items()},
        "validation_mae_change": gate and {v: round(m["mae_delta"], 6) for v, m in gate.report["variants"].items()},
        **({"group": to_json(record.group)} if record.group is not None else {
            "latency_ms_batch1": record.latency_ms_batch1,
            "export_seconds": record.export_seconds,
            "peak_rss_mb": record.peak_rss_mb,
        }),
    }, indent=2))
    print(f"wrote filter {record.name} into {options.out}; serve it with: filterserve serve --model-repository {options.out}\n"
          "a server already running on it keeps the models it loaded: restart filterserve serve to serve this export",
          file=sys.stderr)
    return 0


def add_standin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write base/ and adapter/ into")
    parser.add_argument("--shape", choices=defaults.STANDIN_SHAPES, default=defaults.STANDIN_SHAPE,
                        help="tiny and gemma3-tiny (seconds), or the real Qwen2.5-1.5B (~6 GB) or Gemma-3-1B (~4 GB) "
                        "dimensions; random weights. The Gemma-3 shapes are saved as the hub's Gemma3ForCausalLM")
    parser.add_argument("--filter", help="filter description JSON (default: uplifting v4)")
    parser.add_argument("--seed", type=int, default=defaults.STANDIN_SEED, help="seed of the random weights")
    parser.add_argument("--layers", type=int, help="number of decoder layers (default: the shape's)")
    parser.add_argument("--tokenizer", help="a real tokenizer.json (Qwen2.5's, or Gemma-3's for the gemma3 shapes: "
                        "see filterserve.export.standin.install_gemma3_tokenizer) instead of the tiny trained one: the "
                        "real token lengths of articles; the vocabulary grows to the real model's if smaller")


def standin_options(args: argparse.Namespace) -> StandinOptions:
    return StandinOptions(Path(args.out), load_filter(args.filter), args.shape, args.seed, args.layers,
                          Path(args.tokenizer) if args.tokenizer else None)


def standin_command(args: argparse.Namespace) -> int:
    from filterserve.export.standin import build_standin, standin_shape

    options = standin_options(args)
    shape = standin_shape(options.shape, options.layers, options.tokenizer is not None)
    print(f"building a random-weight stand-in ({shape}); its scores mean nothing", file=sys.stderr)
    made = build_standin(options.out, options.spec, shape=shape, seed=options.seed, tokenizer_file=options.tokenizer)
    print(json.dumps({"base": str(made.base_dir), "adapter": str(made.adapter_dir)}))
    return 0
