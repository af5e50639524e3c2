#!/usr/bin/env bash
# The GPU session's measurement (issues 10 and 8): the Llama-3-8B shape with the defaults (packed
# rows; the JSON's s_per_100_edits), in the same run the padded rows and SDPA attention for
# comparison, a 300-edit stream, a profile of two z steps and AnyEdit batches with answers of
# 250 and 500 tokens (time and peak memory); then the Qwen2.5-7B and GPT-J shapes with the defaults.
# Writes one JSON per shape and the log under $OUT.
# CPU dry run: SHAPES_MAIN=tiny SHAPES_MORE=tiny OUT=/tmp/x bash benchmarks/gpu_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
MAIN=${SHAPES_MAIN:-llama3-8b}
MORE=${SHAPES_MORE:-qwen2.5-7b,gpt-j}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee "$OUT/log.txt"
python3 benchmarks/bench_scale.py --shape "$MAIN" --attn-sweep sdpa --stream-batches 3 --stream-steps 25 --profile-steps 2 \
  --longform-tokens 250,500 --one-at-a-time 2 --one-at-a-time-full-forward 0 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt" ||
  python3 benchmarks/bench_scale.py --shape "$MAIN" --pack-rows 0 --pack-compare 0 --one-at-a-time 2 \
    --one-at-a-time-full-forward 0 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"  # padded rows if the packed run failed
python3 benchmarks/bench_scale.py --shape "$MORE" --one-at-a-time 2 --one-at-a-time-full-forward 0 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
