set -o pipefail
export PYTHONUNBUFFERED=1
python3 benchmarks/bench_scale.py --shape ${SHAPES_MAIN:-llama3-8b} --attn-sweep eager --stream-batches 5 --stream-steps 25 --best-batch 0 \
  --one-at-a-time 2 --one-at-a-time-full-forward 0 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
python3 benchmarks/bench_scale.py --shape ${SHAPES_MORE:-qwen2.5-7b,gpt-j} --attn-sweep eager --one-at-a-time 2 --one-at-a-time-full-forward 0 --out "$OUT" 2>&1 | tee -a "$OUT/log.txt"
