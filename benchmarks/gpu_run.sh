#!/usr/bin/env bash
# The GPU session's measurement (issue 10): Llama-3-8B shape with the sweeps and the best-config
# batch, then the Qwen2.5-7B and GPT-J rows. Writes one JSON per shape and the log under $OUT.
# CPU dry run: SHAPES_MAIN=tiny SHAPES_MORE=tiny OUT=/tmp/x bash benchmarks/gpu_run.sh
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
MAIN=${SHAPES_MAIN:-llama3-8b}
MORE=${SHAPES_MORE:-qwen2.5-7b,gpt-j}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee "$OUT/log.txt"
python3 benchmarks/bench_scale.py --shape "$MAIN" --attn-sweep eager,efficient,efficient+math --bucket-sweep 1,3,4 --best-batch 1 \
  --one-at-a-time 5 --one-at-a-time-full-forward 0 --profile-steps 2 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
python3 benchmarks/bench_scale.py --shape "$MORE" --one-at-a-time 5 --one-at-a-time-full-forward 0 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
