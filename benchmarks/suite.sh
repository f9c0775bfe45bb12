#!/usr/bin/env bash
# The README's results: speed at the real Qwen2.5-1.5B dimensions (random weights) and accuracy on
# the trained fixture, in one run. Usage: benchmarks/suite.sh [RUN_DIR] (default runs/suite).
# Takes about 45 minutes on 2 CPU cores (the 1.5B export alone about 10); keep the machine quiet.
set -euo pipefail
run=${1:-runs/suite}
mkdir -p "$run"

# Trained fixture: every CPU variant through the accuracy gate (INT8 may be refused: that is the gate working).
[ -d "$run/fixture" ] || filterserve bench fixture --out "$run/fixture"
filterserve export --base "$run/fixture/base" --adapter "$run/fixture/adapter" --out "$run/fixture-repo" \
    --precision fp32,fp16,int8 --validation "$run/fixture/val.jsonl" --force > "$run/fixture-export.json" || true
filterserve bench accuracy --data "$run/fixture/val.jsonl" --model-repository "$run/fixture-repo" --out "$run/report"

# Speed at the real dimensions. Random weights cannot pass an accuracy gate, so INT8 is admitted
# here with an unbounded tolerance for the speed measurement only (recorded in filter.json).
[ -d "$run/qwen2.5-1.5b" ] || filterserve standin --shape qwen2.5-1.5b --out "$run/qwen2.5-1.5b"
[ -f "$run/qwen2.5-1.5b-repo/filter.json" ] || filterserve export --base "$run/qwen2.5-1.5b/base" \
    --adapter "$run/qwen2.5-1.5b/adapter" --out "$run/qwen2.5-1.5b-repo" --precision fp32,fp16,int8 \
    --validation "$run/fixture/val.jsonl" --gate-tolerance 1e9 --default fp32
filterserve bench latency --model-repository "$run/qwen2.5-1.5b-repo" --requests 5 --out "$run/report"
filterserve bench throughput --model-repository "$run/qwen2.5-1.5b-repo" --requests 16 --concurrency 1,4,16 --out "$run/report"
echo "reports in $run/report"
