#!/usr/bin/env python
"""Long-form (AnyEdit) residual optimization: joint vs autoregressive, in one run.

1. Seconds per request of ``optimize_residuals`` on the factworld model's long-form requests
   (``factworld:default/longform``), ``joint`` and ``autoregressive`` mode, same chunks and
   settings, all ``--steps`` Adam steps for every chunk (no early stop), plus the mean chunk NLL
   each reaches (quality of the optimization itself).
2. (run first, so the process's peak grows with it) Peak memory of the same optimization with answers of 250 and 500 tokens (random tokens, a
   randomly initialized Llama-shaped model of ``--width`` with 1024 positions: the factworld model
   has 256), on CUDA from ``torch.cuda.max_memory_allocated``, on CPU from the process's peak
   resident set size growth (``resource.getrusage``; a coarse upper bound).

    python benchmarks/bench_longform.py
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_edit.engine.arch import ModelAdapter  # noqa: E402
from lightning_edit.engine.loading import load_pretrained  # noqa: E402
from lightning_edit.engine.residuals import ResidualConfig, build_chunked_batch, optimize_residuals  # noqa: E402
from lightning_edit.longform import ChunkingConfig, load_longform  # noqa: E402
from lightning_edit.longform.edit import LongFormConfig, build_longform_batch  # noqa: E402


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", default="0,1,2")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out: dict = {"requests": args.requests, "window": args.window, "steps": args.steps, "threads": args.threads}

    # peak memory vs answer length (random tokens on a 1024-position Llama-shaped model)
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg_m = LlamaConfig(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=6, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=4096, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    big = AutoModelForCausalLM.from_config(cfg_m).eval().requires_grad_(False)
    from bench_scale import synthetic_tokenizer  # noqa: E402  (this folder)
    stok = synthetic_tokenizer(4096)
    out["memory"] = {}
    for n_tok in (250, 500):
        g = torch.Generator().manual_seed(n_tok)
        question = " ".join(f"t{int(i)}" for i in torch.randint(2, 4096, (20,), generator=g))
        answer = " ".join(f"t{int(i)}" for i in torch.randint(2, 4096, (n_tok,), generator=g))
        text = question + " " + answer
        enc = stok(text, return_offsets_mapping=True, add_special_tokens=False)
        offs = enc["offset_mapping"][20:]
        spans = [(offs[i][0] - 1, offs[min(i + args.window, len(offs)) - 1][1]) for i in range(0, len(offs), args.window)]
        b = build_chunked_batch(stok, [(text, spans)] * 4)
        base = _rss_mb()
        res_cfg = ResidualConfig(lr=0.5, steps=2, clamp_norm_factor=4.0, kl_factor=0.0, early_stop_loss=0.0)
        t0 = time.perf_counter()
        optimize_residuals(ModelAdapter(big), b, 2, res_cfg)
        out["memory"][n_tok] = {"peak_rss_growth_mb": _rss_mb() - base, "s": time.perf_counter() - t0, "chunks": b.n_chunks}
        print(f"answers of {n_tok} tokens (4 requests, {b.n_chunks} chunks): peak RSS grew {_rss_mb() - base:.0f} MB; "
              f"{time.perf_counter() - t0:.2f} s for 2 steps", flush=True)
    model, tok = load_pretrained("factworld:default/model")
    adapter = ModelAdapter(model)
    z_layer = max(int(x) for x in args.layers.split(","))
    reqs = load_longform("factworld:default/longform")[: args.requests]
    batch, chunks = build_longform_batch(tok, reqs, LongFormConfig(chunking=ChunkingConfig(window=args.window)))
    out["chunks"] = batch.n_chunks
    out["answer_tokens_mean"] = sum(len(c.answer_tokens) for c in chunks) / len(chunks)
    for mode in ("joint", "autoregressive"):
        cfg = ResidualConfig(lr=4.0, steps=args.steps, clamp_norm_factor=4.0, kl_factor=0.0, early_stop_loss=0.0, mode=mode)
        optimize_residuals(adapter, batch, z_layer, ResidualConfig(**{**cfg.__dict__, "steps": 1}))  # warm-up
        t0 = time.perf_counter()
        res = optimize_residuals(adapter, batch, z_layer, cfg)
        dt = time.perf_counter() - t0
        out[mode] = {"s": dt, "s_per_request": dt / len(reqs), "mean_chunk_nll": float(res.nll.mean())}
        print(f"{mode:>14}: {dt:.2f} s for {len(reqs)} requests ({batch.n_chunks} chunks of {args.window} tokens, "
              f"{args.steps} steps): {dt / len(reqs):.3f} s per request; mean chunk NLL {float(res.nll.mean()):.3f}", flush=True)
    out["autoregressive_over_joint"] = out["autoregressive"]["s"] / out["joint"]["s"]
    print(f"autoregressive / joint time: {out['autoregressive_over_joint']:.2f}x")

    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
