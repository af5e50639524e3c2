#!/usr/bin/env bash
# The GPU session's measurement (issue 10): every shape with the default configuration (the
# JSON's s_per_100_edits), the Llama-3-8B shape also with SDPA-only attention and other bucket
# counts for comparison. Writes one JSON per shape and the log under $OUT.
# CPU dry run: SHAPES_MAIN=tiny SHAPES_MORE=tiny OUT=/tmp/x bash benchmarks/gpu_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
MAIN=${SHAPES_MAIN:-llama3-8b}
MORE=${SHAPES_MORE:-qwen2.5-7b,gpt-j}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee "$OUT/log.txt"
python3 benchmarks/bench_scale.py --shape "$MAIN" --attn-sweep sdpa --bucket-sweep 2,4 \
  --one-at-a-time 3 --one-at-a-time-full-forward 0 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
python3 benchmarks/bench_scale.py --shape "$MORE" --one-at-a-time 3 --one-at-a-time-full-forward 0 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
