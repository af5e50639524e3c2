#!/usr/bin/env python
"""Peak device memory and time of the z optimization alone (one AlphaEdit-shaped batch of 100
edits, 25 steps, no early stop) with all packed rows in one forward vs split into forwards of
at most ``--max-rows`` packed rows (``model.max_rows_per_forward``).

    python benchmarks/z_memory.py --shape gpt-j --max-rows 0,160,80
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_scale as B  # noqa: E402

from lightning_edit.engine.arch import ModelAdapter  # noqa: E402
from lightning_edit.engine.residuals import ResidualConfig, build_residual_batch, optimize_residuals  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--max-rows", default="0,160,80")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    results = {}
    for name in a.shape.split(","):
        shape = B.SHAPES[name]
        model = B.build_model(shape, dtype, dev)
        ad = ModelAdapter(model)
        vocab = model.config.vocab_size
        tok = B.synthetic_tokenizer(vocab)
        g = torch.Generator().manual_seed(1)
        prefixes = [B.words(g, 10, vocab) + " " for _ in range(5)]
        cfg = ResidualConfig(lr=shape.lr, steps=a.steps, early_stop_loss=0.0, clamp_norm_factor=4.0, kl_factor=0.0625, anchor="subject_last")
        z = shape.layers[-1]
        optimize_residuals(ad, build_residual_batch(tok, B.random_requests(100, vocab, 10), prefixes, "subject_last"), z, replace(cfg, steps=2))
        base = torch.cuda.memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
        rows = {}
        for mr in [int(x) for x in a.max_rows.split(",")]:
            rb = build_residual_batch(tok, B.random_requests(100, vocab, 11), prefixes, "subject_last")
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            optimize_residuals(ad, rb, z, replace(cfg, max_rows_per_forward=mr))
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None
            rows[mr] = {"z_s_per_100_edits": dt, "peak_gb": peak, "peak_over_model_gb": None if peak is None else peak - base}
            print(f"[{name}] max_rows_per_forward {mr}: z {dt:.2f} s per 100 edits, peak {peak} GB (allocated before: {base} GB)", flush=True)
        results[name] = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "allocated_before_gb": base, "by_max_rows": rows}
        del model, ad
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
