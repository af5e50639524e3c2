#!/usr/bin/env python
"""What MPES and NAS do to one batch's residual optimization, on CPU in a few minutes.

For one batch of N requests, with the run's residual settings: the z optimization with
``residual.mpes`` 0 (off), 1 (the paper's rule) and 2 (ENCORE's Llama-3-8B config): wall time
(median of ``--repeats``), mean Adam steps, mean ``||delta|| / ||z0||``, the target NLL, and the
share of requests whose new target is the argmax at every target position of every rewrite row
at the final ``z`` (teacher-forced: MPES's criterion, measured the same way for every setting).
With ``residual.nas`` on (free: ``v0`` comes from the same forward as ``z0``): the norm anchor the
batch would give (mean ``||v*||``, top 5% dropped), the spread of ``||v*|| / anchor`` and how many
requests NAS would leave unedited (``||v*|| > 2 x anchor``).

    FW=checkpoints/factworld/default-seed0
    python benchmarks/bench_long_streams.py --model $FW/model --requests $FW/counterfact.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from lightning_edit.data.loaders import requests_from_records  # noqa: E402
from lightning_edit.engine.arch import ModelAdapter  # noqa: E402
from lightning_edit.engine.loading import load_pretrained  # noqa: E402
from lightning_edit.engine.prefixes import generate_prefixes  # noqa: E402
from lightning_edit.engine.residuals import ResidualConfig, build_residual_batch, optimize_residuals, trimmed_mean_norm  # noqa: E402
from lightning_edit.engine.tokens import flatten_targets  # noqa: E402


@torch.no_grad()
def most_probable_everywhere(adapter: ModelAdapter, batch, z_layer: int, delta: torch.Tensor) -> torch.Tensor:
    """Per request: at ``z = z0 + delta``, is the target the argmax at every target position of
    every rewrite row (one full forward, independent of the optimization's code)?"""
    rows, pos, chunk = batch.anchors()
    t_rows, t_pos, _ = flatten_targets(batch.enc)
    labels = batch.enc.input_ids[t_rows, t_pos]
    with adapter.add_at_positions(z_layer, rows, pos, delta[chunk]):
        logits = adapter.model(input_ids=batch.enc.input_ids, attention_mask=batch.enc.attention_mask).logits
    hit = logits[t_rows, t_pos - 1].argmax(-1) == labels
    miss = torch.zeros(batch.n_chunks, dtype=torch.long).index_add(0, batch.row_chunk[t_rows], (~hit).long())
    return miss == 0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="saved HF causal LM + tokenizer directory")
    ap.add_argument("--requests", required=True, help="edit-records file (any supported format)")
    ap.add_argument("-n", "--num-edits", type=int, default=100, help="requests in the batch (the first N)")
    ap.add_argument("--z-layer", type=int, default=2, help="the last edit layer (where z is defined)")
    ap.add_argument("--lr", type=float, default=4.0, help="residual.lr (configs/factworld.yaml: 4.0)")
    ap.add_argument("--steps", type=int, default=25, help="residual.steps")
    ap.add_argument("--clamp-norm-factor", type=float, default=4.0)
    ap.add_argument("--kl-factor", type=float, default=0.0)
    ap.add_argument("--early-stop-loss", type=float, default=0.05)
    ap.add_argument("--anchor", default="prompt_last", choices=["subject_last", "prompt_last"])
    ap.add_argument("--prefixes", type=int, default=2, help="context prefixes (generated from the model, seed 0)")
    ap.add_argument("--mpes", default="0,1,2", help="comma-separated residual.mpes values")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained(args.model)
    model.eval()
    adapter = ModelAdapter(model)
    records = json.loads(Path(args.requests).read_text())[: args.num_edits]
    reqs = requests_from_records(records, "auto", 0)
    prefixes = generate_prefixes(model, tok, args.prefixes, 10, 0)
    base = ResidualConfig(lr=args.lr, steps=args.steps, clamp_norm_factor=args.clamp_norm_factor, kl_factor=args.kl_factor,
                          early_stop_loss=args.early_stop_loss, anchor=args.anchor, nas=True)
    batch = build_residual_batch(tok, reqs, prefixes, base.anchor, kl=base.kl_factor > 0)
    out = {"model": args.model, "requests": len(reqs), "threads": args.threads, "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "settings": vars(args), "runs": {}}
    for k in [int(x) for x in args.mpes.split(",")]:
        cfg = replace(base, mpes=k)
        times, res = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            res = optimize_residuals(adapter, batch, args.z_layer, cfg)
            times.append(time.perf_counter() - t0)
        delta = res.z_target - res.z_init
        top = most_probable_everywhere(adapter, batch, args.z_layer, delta)
        anchor = trimmed_mean_norm(res.v_star_norm)
        ratio = res.v_star_norm / anchor
        row = {"seconds": statistics.median(times), "times": times, "mean_steps": float(res.steps.float().mean()),
               "max_steps": int(res.steps.max()),
               "mean_rel_delta": float((delta.norm(dim=-1) / res.z_init.norm(dim=-1)).mean()),
               "mean_nll": float(res.nll.mean()), "most_probable_everywhere": float(top.float().mean()),
               "nas_anchor": anchor, "v_star_ratio_min_median_max": [float(ratio.min()), float(ratio.median()), float(ratio.max())],
               "nas_would_skip": int((ratio > 2).sum())}
        out["runs"][f"mpes={k}"] = row
        print(f"mpes={k}: {row['seconds']:.2f} s (median of {args.repeats}), steps mean {row['mean_steps']:.2f} max {row['max_steps']}, "
              f"||delta||/||z0|| {row['mean_rel_delta']:.3f}, NLL {row['mean_nll']:.3f}, "
              f"target argmax on every row {row['most_probable_everywhere']:.2f}; NAS anchor {anchor:.1f}, "
              f"||v*||/anchor min/median/max {ratio.min():.2f}/{ratio.median():.2f}/{ratio.max():.2f}, "
              f"would skip {row['nas_would_skip']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
