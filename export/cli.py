"""``filterserve export`` arguments and entry point."""

from __future__ import annotations

import argparse
import json
import sys

from filterserve.contract import GATE_TOLERANCE
from filterserve.errors import FilterServeError
from filterserve.filters import load_filter
from filterserve.model_repository.gpu import TRT_CACHE_ROOT
from filterserve.model_repository.repository import DEFAULT_BUCKET, DEFAULT_MAX_TEXT_BYTES


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="base model folder or hub id (e.g. Qwen/Qwen2.5-1.5B)")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter + tokenizer files)")
    parser.add_argument("--out", required=True, help="model repository to add the filter to (or replace it in); other filters stay")
    parser.add_argument("--name", help="Triton model name (default: the filter's name)")
    parser.add_argument("--filter", help="filter description JSON (default: uplifting v4)")
    parser.add_argument("--calibration", help='per-dimension isotonic breakpoints, JSON {"<dimension>": {"x": [...], "y": [...]}}: '
                        "applied to the served final_scores (raw scores and parity are unchanged)")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32,fp16,int8 (int8 needs --validation)")
    parser.add_argument("--validation", help="labelled JSONL (title, content, one field per dimension): every variant "
                        "must keep the validation MAE within --gate-tolerance of the PyTorch + PEFT reference")
    parser.add_argument("--gate-tolerance", type=float, default=GATE_TOLERANCE, help="max MAE increase, overall and per dimension")
    parser.add_argument("--default", default="auto", help="precision the ensemble serves; auto = the fastest variant "
                        "the accuracy gate admitted (with --validation), else the first listed")
    parser.add_argument("--max-batch-size", type=int, default=32, help="most articles the tensor model runs at once")
    parser.add_argument("--max-batch-tokens", type=int, help="most tokens (rows × padded length) per tensor-model run, "
                        "to bound memory on small GPUs (default: max-batch-size × max_length)")
    parser.add_argument("--bucket", type=int, default=DEFAULT_BUCKET, help="each request is padded to a multiple of "
                        "this many tokens; smaller wastes less, larger lets more requests share a shape (default: 16)")
    parser.add_argument("--max-text-bytes", type=int, default=DEFAULT_MAX_TEXT_BYTES,
                        help="longer TEXT, TITLE or CONTENT values are refused (default: 262144)")
    parser.add_argument("--gpu", action="store_true", help="target a GPU (NVIDIA's container): GPU instance groups; the fp16 "
                        "variant, and only it, runs on ONNX Runtime's TensorRT accelerator in FP16 (export fp16 to get it)")
    parser.add_argument("--trt-cache-dir", default=TRT_CACHE_ROOT, help="with --gpu: where the server's ONNX Runtime writes "
                        "TensorRT engines, one folder per model checksum (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace a different export of the same filter already in --out")


def export_command(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from filterserve.export.pipeline import export_filter

    spec = load_filter(args.filter)
    if args.name:
        spec = replace(spec, name=args.name)
    if args.calibration:
        spec = spec.with_calibration(args.calibration)
    manifest = export_filter(
        args.base,
        args.adapter,
        args.out,
        spec=spec,
        precisions=args.precision,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        bucket=args.bucket,
        max_text_bytes=args.max_text_bytes,
        force=args.force,
        gpu=args.gpu,
        trt_cache_root=args.trt_cache_dir,
        validation=args.validation,
        gate_tolerance=args.gate_tolerance,
        default=args.default,
    )
    summary = {p: round(r["max_abs_diff"], 8) for p, r in manifest["parity"].items()}
    gate = manifest["accuracy_gate"]
    print(json.dumps({
        "repository": str(args.out),
        "models": manifest["models"],
        "default_precision": manifest["default_precision"],
        "parity_max_abs_diff": summary,
        "validation_mae_change": gate and {v: round(m["mae_delta"], 6) for v, m in gate["report"]["variants"].items()},
        "latency_ms_batch1": manifest["latency_ms_batch1"],
        "export_seconds": manifest["export_seconds"],
        "peak_rss_mb": manifest["peak_rss_mb"],
    }, indent=2))
    name = manifest["filter"]["name"]
    print(f"wrote filter {name} into {args.out}; serve it with: filterserve serve --model-repository {args.out}\n"
          f"a server already running on it keeps its loaded models until told: "
          f"POST /v2/repository/models/{name}/load", file=sys.stderr)
    return 0


def add_standin_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write base/ and adapter/ into")
    parser.add_argument("--shape", choices=["tiny", "qwen2.5-1.5b"], default="tiny",
                        help="tiny (seconds) or the real Qwen2.5-1.5B dimensions (random weights, ~6 GB)")
    parser.add_argument("--filter", help="filter description JSON (default: uplifting v4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="number of decoder layers (default: the shape's)")
    parser.add_argument("--tokenizer", help="a real tokenizer.json (e.g. Qwen2.5's) instead of the tiny trained one: "
                        "the real token lengths of articles; the vocabulary grows to Qwen2.5's if smaller")


def standin_command(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from filterserve.export.standin import QWEN25_VOCAB_SIZE, StandinShape, build_standin

    shape = StandinShape.qwen25_1_5b() if args.shape == "qwen2.5-1.5b" else StandinShape()
    if args.layers is not None:
        if args.layers < 1:
            raise FilterServeError(f"--layers must be at least 1, got {args.layers}")
        shape = replace(shape, num_hidden_layers=args.layers)
    if args.tokenizer:
        shape = replace(shape, vocab_size=max(shape.vocab_size, QWEN25_VOCAB_SIZE))
    print(f"building a random-weight stand-in ({shape}); its scores mean nothing", file=sys.stderr)
    made = build_standin(
        Path(args.out),
        load_filter(args.filter),
        shape=shape,
        seed=args.seed,
        tokenizer_file=Path(args.tokenizer) if args.tokenizer else None,
    )
    print(json.dumps({"base": str(made.base_dir), "adapter": str(made.adapter_dir)}))
    return 0
