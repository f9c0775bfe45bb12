#!/usr/bin/env bash
# The results in docs/benchmarks.md: speed at the real Qwen2.5-1.5B dimensions (random weights) and accuracy on
# the trained fixture, in one run. Usage: benchmarks/suite.sh [RUN_DIR] (default runs/suite).
# Takes about 45 minutes on 2 CPU cores (the 1.5B export alone about 10); keep the machine quiet.
set -euo pipefail
run=${1:-runs/suite}
mkdir -p "$run"

# Trained fixture: every CPU variant through the accuracy gate (INT8 may be refused: that is the gate working),
# ONNX Runtime's and OpenVINO's (bf16 needs avx512_bf16 or AMX; ov_int8 is calibrated on the training articles).
[ -d "$run/fixture" ] || filterserve bench fixture --out "$run/fixture"
filterserve export --base "$run/fixture/base" --adapter "$run/fixture/adapter" --out "$run/fixture-repo" \
    --precision fp32,fp16,int8,bf16,ov_int8 --validation "$run/fixture/val.jsonl" \
    --quantization-data "$run/fixture/train.jsonl" --force > "$run/fixture-export.json" || true
filterserve bench accuracy --data "$run/fixture/val.jsonl" --model-repository "$run/fixture-repo" --out "$run/report"

# Speed at the real dimensions. Random weights cannot pass an accuracy gate, so INT8 is admitted
# here with an unbounded tolerance for the speed measurement only (recorded in the filter's
# record, uplifting_v4.filter.json). An export that completed wrote filterserve.json last: a run
# that finds it skips the 10-minute export.
[ -d "$run/qwen2.5-1.5b" ] || filterserve standin --shape qwen2.5-1.5b --out "$run/qwen2.5-1.5b"
[ -f "$run/qwen2.5-1.5b-repo/filterserve.json" ] || filterserve export --base "$run/qwen2.5-1.5b/base" \
    --adapter "$run/qwen2.5-1.5b/adapter" --out "$run/qwen2.5-1.5b-repo" --precision fp32,fp16,int8,bf16,ov_int8 \
    --validation "$run/fixture/val.jsonl" --gate-tolerance 1e9 --default fp32
filterserve bench latency --model-repository "$run/qwen2.5-1.5b-repo" --requests 5 --out "$run/report"
filterserve bench throughput --model-repository "$run/qwen2.5-1.5b-repo" --requests 16 --concurrency 1,4,16 --out "$run/report"

# Beside it, Gemma-3-1B width (the production filters' base today): Gemma's real vocabulary, the
# same realistic length mix, head+tail on (uplifting v4's rules with a 256 + 256 cut).
gemma_tokenizer=$(python -c "from filterserve.export.standin import install_gemma3_tokenizer; print(install_gemma3_tokenizer())")
python - "$run/gemma3-1b-filter.json" <<'PY'
import json, sys
from dataclasses import replace
from filterserve.filters import UPLIFTING_V4, HeadTail
spec = replace(UPLIFTING_V4, name="gemma3_1b_head_tail", head_tail=HeadTail(), description="Gemma-3-1B width, head+tail on")
json.dump(spec.to_dict(), open(sys.argv[1], "w", encoding="utf-8"))
PY
[ -d "$run/gemma3-1b" ] || filterserve standin --shape gemma3-1b --filter "$run/gemma3-1b-filter.json" \
    --tokenizer "$gemma_tokenizer" --out "$run/gemma3-1b"
[ -f "$run/gemma3-1b-repo/filterserve.json" ] || filterserve export --base "$run/gemma3-1b/base" \
    --adapter "$run/gemma3-1b/adapter" --out "$run/gemma3-1b-repo" --filter "$run/gemma3-1b-filter.json" --precision fp32,bf16
filterserve bench throughput --model-repository "$run/gemma3-1b-repo" --requests 16 --concurrency 1,4,16 --mix realistic \
    --out "$run/report/gemma3-1b"
echo "reports in $run/report"
