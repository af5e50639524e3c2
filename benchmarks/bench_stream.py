#!/usr/bin/env python
"""Is the time per edit batch flat over a long sequential AlphaEdit stream?

A stream of ``--batches`` x ``--batch-size`` counterfactual edits on a saved model (default: the
factworld model with the quickstart's settings: layers 0-2, anchor ``prompt_last``, 2 context
prefixes, Adam lr 4, up to 25 steps with early stop at 0.05, AlphaEdit energy 0.05, L2 10). The
edit file's cases are reused pass after pass; in pass ``p`` each case's new target is the one
``p`` cases further on among the cases of the same relation (skipping its true object), so every
edit asks for a change the model has not been given before.

Per batch it records the wall seconds (and the process's CPU seconds, which a shared, loaded
machine disturbs far less) of the z optimization and of the update (keys, solve, apply,
AlphaEdit state) and the mean Adam steps the requests took, and it prints the ratio of the mean
batch time of the last tenth of the stream to the first tenth, also per Adam step (the number of
steps a request needs can change as the model fills up; the per-step time is the engine's cost).

    python benchmarks/bench_stream.py                          # 5,000 edits on factworld, CPU
    python benchmarks/bench_stream.py --batches 3 --batch-size 20   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_edit.data.formats import records_to_requests  # noqa: E402
from lightning_edit.engine.arch import ModelAdapter  # noqa: E402
from lightning_edit.engine.loading import load_pretrained  # noqa: E402
from lightning_edit.engine.prefixes import generate_prefixes  # noqa: E402
from lightning_edit.engine.profiling import PhaseTimer  # noqa: E402
from lightning_edit.engine.residuals import ResidualConfig, build_residual_batch, optimize_residuals  # noqa: E402
from lightning_edit.engine.stats import StatsConfig, projectors, second_moments  # noqa: E402
from lightning_edit.engine.update import AlphaEditMethod, apply_update  # noqa: E402


def rotated_requests(requests, passes: int):
    """``passes`` copies of the requests; in copy ``p`` every new target is taken ``p`` places
    further along the requests of the same relation (never the true object)."""
    by_rel = defaultdict(list)
    for r in requests:
        by_rel[r.extra.get("relation_id", r.prompt)].append(r)
    out = []
    for p in range(passes):
        for r in requests:
            group = by_rel[r.extra.get("relation_id", r.prompt)]
            i = group.index(r)
            for k in range(p, p + len(group)):
                cand = group[(i + k) % len(group)].target_new
                if p == 0 or (cand.strip() != (r.target_true or "").strip() and cand.strip() != r.target_new.strip()):
                    break
            out.append(replace(r, case_id=f"{r.case_id}/{p}", target_new=cand if p else r.target_new))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="factworld:default/model")
    p.add_argument("--requests", default="factworld:default/counterfact")
    p.add_argument("--corpus", default="factworld:default/corpus")
    p.add_argument("--layers", default="0,1,2")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--stats-texts", type=int, default=20000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lightning_edit.resources import resolve

    model, tok = load_pretrained(args.model)
    adapter = ModelAdapter(model)
    layers = [int(x) for x in args.layers.split(",")]
    records = json.loads(Path(resolve(args.requests)).read_text())
    base = records_to_requests(records)
    n_total = args.batches * args.batch_size
    passes = -(-n_total // len(base))
    reqs = rotated_requests(base, passes)[:n_total]
    stats = StatsConfig(corpus=args.corpus, corpus_name=None, n_samples=args.stats_texts, max_length=128, batch_size=32,
                        cache_dir="checkpoints/stats")
    moments = second_moments(adapter, tok, layers, stats)
    projs, _ = projectors(adapter, moments, stats, 0.05, "energy")
    method = AlphaEditMethod(l2=10.0, projectors=projs)
    prefixes = generate_prefixes(model, tok, 2, 10)
    cfg = ResidualConfig(lr=4.0, steps=args.steps, clamp_norm_factor=4.0, kl_factor=0.0, early_stop_loss=0.05, anchor="prompt_last")
    rows = []
    t_start = time.perf_counter()
    for b in range(args.batches):
        batch = reqs[b * args.batch_size : (b + 1) * args.batch_size]
        timer = PhaseTimer()
        cpu0 = time.process_time()
        rb = build_residual_batch(tok, batch, prefixes, cfg.anchor, kl=False)
        with timer("z"):
            res = optimize_residuals(adapter, rb, layers[-1], cfg)
        apply_update(adapter, rb, res.z_target, layers, method, timer=timer)
        sec = dict(timer.seconds)
        cpu = time.process_time() - cpu0
        total = sum(sec.values())
        steps = float(res.steps.float().mean()) + 1  # forwards per request: steps + the final check
        rows.append({"batch": b, "s": total, "cpu_s": cpu, "cpu_s_per_forward": cpu / steps, "z_s": sec["z"], "update_s": total - sec["z"], "mean_steps": steps - 1,
                     "z_s_per_forward": sec["z"] / steps})
        print(f"batch {b + 1}/{args.batches}: {total:.2f} s (z {sec['z']:.2f} s, {steps - 1:.1f} steps; update {total - sec['z']:.2f} s)",
              flush=True)
    k = max(1, len(rows) // 10)

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    out = {
        "model": args.model, "layers": layers, "edits": n_total, "batches": args.batches, "batch_size": args.batch_size,
        "threads": args.threads, "wall_s": time.perf_counter() - t_start,
        "first_tenth_s": mean("s", rows[:k]), "last_tenth_s": mean("s", rows[-k:]),
        "last_over_first": mean("s", rows[-k:]) / mean("s", rows[:k]),
        "cpu_last_over_first": mean("cpu_s", rows[-k:]) / mean("cpu_s", rows[:k]),
        "cpu_per_forward_last_over_first": mean("cpu_s_per_forward", rows[-k:]) / mean("cpu_s_per_forward", rows[:k]),
        "update_last_over_first": mean("update_s", rows[-k:]) / mean("update_s", rows[:k]),
        "z_per_forward_last_over_first": mean("z_s_per_forward", rows[-k:]) / mean("z_s_per_forward", rows[:k]),
        "mean_steps_first_tenth": mean("mean_steps", rows[:k]), "mean_steps_last_tenth": mean("mean_steps", rows[-k:]),
        "per_batch": rows,
    }
    print(f"\n{n_total} edits in {args.batches} batches: first tenth {out['first_tenth_s']:.2f} s per batch, last tenth "
          f"{out['last_tenth_s']:.2f} s (ratio {out['last_over_first']:.2f}); process CPU time ratio {out['cpu_last_over_first']:.2f}, "
          f"per forward {out['cpu_per_forward_last_over_first']:.2f}; update alone {out['update_last_over_first']:.2f}; "
          f"z per forward {out['z_per_forward_last_over_first']:.2f}; mean Adam steps {out['mean_steps_first_tenth']:.1f} -> "
          f"{out['mean_steps_last_tenth']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
