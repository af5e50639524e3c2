#!/usr/bin/env python
"""Micro-benchmark of the editing hot paths of lightning-edit, from ONE run on one model.

Sections (each the median of ``--repeats`` timed runs after one untimed warm-up that runs the
same code path on a reduced workload: one Adam step, or the first statistics batch):

1. Residual optimization (``optimize_residuals``): the same N counterfactual requests with the
   same :class:`ResidualConfig` (a fixed number of Adam steps: ``early_stop_loss=0`` so every
   request runs every step), (a) as one padded batch and (b) one request at a time in a Python
   loop. Also the largest relative difference between the two sets of target vectors ``z``
   (they optimize the same per-request objective, so they must agree up to rounding).
2. A full edit batch: encode + residuals + ``apply_update`` with MEMIT and with AlphaEdit
   (the edit-layer weights are restored between repeats). Rewrite success before/after is
   printed as a sanity check that the edits took.
3. Key-statistics throughput: tokens/s of ``accumulate_moments`` over packed blocks (all edit
   layers captured in one forward that stops after the last edit layer) against per-layer
   baselines: one full forward per layer, and one forward per layer stopped at that layer
   (what the reference ``layer_stats`` does: ``Trace(..., stop=True)``, one pass per layer).

The default model is a small GPT-2 built from config and trained for a few seconds on a toy
fact world (no downloads; the builder is copied here so the benchmark does not depend on the
test suite). ``--model PATH`` benchmarks a saved Hugging Face model + tokenizer instead. Section 3
runs before section 2 (the edit needs the statistics), but the report follows the numbering.

    python benchmarks/bench_edit.py                  # default tiny model, ~2 min on 2 busy cores
    python benchmarks/bench_edit.py --json bench.json
    FW=checkpoints/factworld/default-seed0
    python benchmarks/bench_edit.py --model $FW/model --requests $FW/counterfact.json --corpus $FW/corpus.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import get_args

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from lightning_edit.builtin.toy import corpus_sentences, counterfactual_requests, make_tokenizer, train_tiny  # noqa: E402
from lightning_edit.engine.arch import ModelAdapter  # noqa: E402
from lightning_edit.engine.closed_form import ThresholdMode, null_space_projector  # noqa: E402
from lightning_edit.engine.loading import load_pretrained  # noqa: E402
from lightning_edit.engine.prefixes import generate_prefixes  # noqa: E402
from lightning_edit.engine.residuals import ResidualConfig, build_residual_batch, optimize_residuals  # noqa: E402
from lightning_edit.engine.stats import StatsConfig, accumulate_moments, iter_corpus_texts, packed_blocks  # noqa: E402
from lightning_edit.engine.update import AlphaEditMethod, MemitMethod, apply_update  # noqa: E402
from lightning_edit.evaluation.scoring import target_scores  # noqa: E402

# --------------------------------------------------------------------------------------------
# Timing helpers
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], repeats: int, device: torch.device,
            warmup: Callable[[], object] | None = None, before: Callable[[], None] | None = None) -> tuple[float, list[float]]:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs, after one untimed warm-up call
    (``warmup()`` if given, e.g. the same code path with fewer optimizer steps, else ``fn()``).
    ``before`` (untimed) runs ahead of every call, e.g. to restore edited weights."""
    if before:
        before()
    (warmup or fn)()
    times = []
    for _ in range(repeats):
        if before:
            before()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Section 1: residual optimization, batched vs one at a time
# --------------------------------------------------------------------------------------------


def padding_share(batches) -> float:
    """Share of the token slots of the padded forward passes that are padding."""
    total = sum(b.enc.attention_mask.numel() for b in batches)
    real = sum(int(b.enc.attention_mask.sum()) for b in batches)
    return 1 - real / total


def bench_residuals(adapter, tok, requests, prefixes, z_layer, cfg, repeats, device) -> dict:
    """Section 1. Encoding is done up front (and timed separately): only ``optimize_residuals``
    is in the timed region. The warm-up runs the same code path with a single Adam step."""
    n = len(requests)
    kl = cfg.kl_factor > 0
    t0 = time.perf_counter()
    batch = build_residual_batch(tok, requests, prefixes, cfg.anchor, kl=kl)
    t_enc_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    singles = [build_residual_batch(tok, [r], prefixes, cfg.anchor, kl=kl) for r in requests]
    t_enc_single = time.perf_counter() - t0
    warm_cfg = replace(cfg, steps=1)

    out: dict = {}

    def run_batched(c=cfg):
        out["batched"] = optimize_residuals(adapter, batch, z_layer, c)

    def run_single(c=cfg):
        out["single"] = [optimize_residuals(adapter, b, z_layer, c) for b in singles]

    log(f"[1] residuals: {n} requests x {cfg.steps} steps; batched: {batch.enc.input_ids.shape[0]} rows x "
        f"{batch.enc.input_ids.shape[1]} tokens, {padding_share([batch]):.0%} padding; "
        f"one at a time: {padding_share(singles):.0%} padding ...")
    t_b, all_b = time_it(run_batched, repeats, device, warmup=lambda: run_batched(warm_cfg))
    log(f"    batched:    {t_b:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in all_b)})")
    t_s, all_s = time_it(run_single, repeats, device, warmup=lambda: run_single(warm_cfg))
    log(f"    one-by-one: {t_s:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in all_s)})")

    # baseline: the same batched run computing the LM head (and softmax) on every position
    import lightning_edit.engine.forward_plan as residuals_mod  # where the plan asks for logits_to_keep

    keep_fn = residuals_mod.supports_logits_to_keep
    residuals_mod.supports_logits_to_keep = lambda model: False
    try:
        def run_full_head(c=cfg):
            out["full_head"] = optimize_residuals(adapter, batch, z_layer, c)

        t_f, all_f = time_it(run_full_head, repeats, device, warmup=lambda: run_full_head(warm_cfg))
    finally:
        residuals_mod.supports_logits_to_keep = keep_fn
    log(f"    batched, LM head on every position: {t_f:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in all_f)})")
    head_rel = ((out["full_head"].z_target.cpu() - out["batched"].z_target.cpu()).norm(dim=-1)
                / out["batched"].z_target.cpu().norm(dim=-1).clamp_min(1e-12)).max().item()

    zb = out["batched"].z_target.cpu()
    zs = torch.cat([r.z_target for r in out["single"]]).cpu()
    rel = ((zb - zs).norm(dim=-1) / zs.norm(dim=-1).clamp_min(1e-12)).max().item()
    elem = ((zb - zs).abs().max() / zs.abs().max().clamp_min(1e-12)).item()
    steps_b = out["batched"].steps.cpu()
    steps_s = torch.cat([r.steps for r in out["single"]]).cpu()
    loss_b = out["batched"].loss.cpu()
    loss_s = torch.cat([r.loss for r in out["single"]]).cpu()
    return {
        "n_requests": n,
        "steps": cfg.steps,
        "rows_batched": int(batch.enc.input_ids.shape[0]),
        "seq_len_batched": int(batch.enc.input_ids.shape[1]),
        "padding_share_batched": padding_share([batch]),
        "padding_share_one_by_one": padding_share(singles),
        "encode_batched_s": t_enc_batched,
        "encode_one_by_one_s": t_enc_single,
        "batched_s": t_b,
        "batched_per_edit_s": t_b / n,
        "one_by_one_s": t_s,
        "one_by_one_per_edit_s": t_s / n,
        "speedup": t_s / t_b,
        "full_head_s": t_f,
        "head_speedup": t_f / t_b,
        "head_z_max_rel_diff": head_rel,
        "z_max_rel_diff": rel,
        "z_max_abs_diff_over_max_abs": elem,
        "steps_identical": bool(torch.equal(steps_b, steps_s)),
        "final_loss_max_abs_diff": float((loss_b - loss_s).abs().max()),
        "final_loss_mean": float(loss_b.mean()),
        "batched_runs_s": all_b,
        "one_by_one_runs_s": all_s,
    }


# --------------------------------------------------------------------------------------------
# Section 2: a full edit batch
# --------------------------------------------------------------------------------------------


def rewrite_success(model, tok, requests) -> float | None:
    """Share of requests whose new target is more likely than the true one (per-token NLL);
    ``None`` when no request names its true target."""
    requests = [r for r in requests if r.target_true is not None]
    if not requests:
        return None
    prompts = [r.rendered_prompt for r in requests]
    new = target_scores(model, tok, prompts, [r.target_new for r in requests]).nll
    true = target_scores(model, tok, prompts, [r.target_true for r in requests]).nll
    return float((new < true).float().mean())


def bench_full_edit(adapter, tok, requests, prefixes, layers, cfg, moments, projs, args, device) -> dict:
    """Section 2: encode + ``optimize_residuals`` + ``apply_update`` for one batch, per method.
    The edit-layer weights are restored (untimed) before every run, and each run gets a fresh
    method object, so every run is the same first batch on the unedited model. The warm-up runs
    the same path with a single Adam step."""
    n = len(requests)
    z_layer = max(layers)
    snapshot = {l: adapter.weight_as_linear(l).detach().clone() for l in layers}
    warm_cfg = replace(cfg, steps=1)

    def restore():
        with torch.no_grad():
            for l, w in snapshot.items():
                adapter.weight_as_linear(l).copy_(w)

    results: dict = {"success_before": rewrite_success(adapter.model, tok, requests)}
    for name in ("memit", "alphaedit"):
        split: dict[str, list[float]] = {"residuals": [], "update": []}

        def run(c=cfg, record=True):
            # a fresh method: AlphaEdit's running K_p K_p^T starts empty (the first batch)
            method = MemitMethod(lam=args.lam, moments=moments) if name == "memit" else AlphaEditMethod(l2=args.l2, projectors=projs)
            _sync(device)
            t0 = time.perf_counter()
            rb = build_residual_batch(tok, requests, prefixes, c.anchor, kl=c.kl_factor > 0)
            res = optimize_residuals(adapter, rb, z_layer, c)
            _sync(device)
            t1 = time.perf_counter()
            apply_update(adapter, rb, res.z_target, layers, method)
            _sync(device)
            t2 = time.perf_counter()
            if record:
                split["residuals"].append(t1 - t0)
                split["update"].append(t2 - t1)

        log(f"[2] full edit batch ({name}) ...")
        t, runs = time_it(run, args.repeats, device, warmup=lambda: run(warm_cfg, record=False), before=restore)
        success = rewrite_success(adapter.model, tok, requests)  # the model still holds the last edit
        restore()
        results[name] = {
            "batch_s": t,
            "per_edit_s": t / n,
            "residuals_s": statistics.median(split["residuals"]),
            "update_s": statistics.median(split["update"]),
            "success_after": success,
            "runs_s": runs,
        }
        log(f"    {t:.3f} s per batch (residuals {results[name]['residuals_s']:.3f} s, "
            f"apply_update {results[name]['update_s']:.3f} s), rewrite success {fmt_p(success)}")
    return results


# --------------------------------------------------------------------------------------------
# Section 3: key-statistics throughput
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def moments_per_layer(adapter, blocks: Sequence[torch.Tensor], layers: Sequence[int], stop: bool) -> dict[int, tuple[torch.Tensor, int]]:
    """Baseline: one pass over the corpus per layer, capturing only that layer's keys; the
    forward either runs the whole model (``stop=False``) or stops after that layer."""
    device = next(adapter.model.parameters()).device
    acc = {}
    for l in layers:
        d_k = adapter.dims(l)[1]
        s, c = torch.zeros(d_k, d_k, dtype=torch.float64, device=device), 0
        for ids in blocks:
            ids = ids.to(device)
            with adapter.trace(key_layers=[l], stop_after=l if stop else None) as rec:
                adapter.forward(ids, torch.ones_like(ids))
            k = rec["keys"][l].reshape(-1, rec["keys"][l].shape[-1]).float()
            s.add_((k.T @ k).double())
            c += k.shape[0]
        acc[l] = (s, c)
    return acc


def _max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[l][0] - b[l][0]).abs().max() / a[l][0].abs().max()) for l in a)


def bench_stats(adapter, blocks, layers, repeats, device, t_read: float) -> dict:
    tokens = sum(int(b.numel()) for b in blocks)
    out: dict = {}
    log(f"[3] statistics: {tokens} tokens in {len(blocks)} batches, layers {list(layers)} ...")
    first = blocks[:1]  # warm-ups: the same code on the first batch only
    t_fast, _ = time_it(lambda: out.__setitem__("fast", accumulate_moments(adapter, iter(blocks), layers)), repeats, device,
                        warmup=lambda: accumulate_moments(adapter, iter(first), layers))
    log(f"    one pass, all layers, early stop: {t_fast:.3f} s")
    t_full, _ = time_it(lambda: out.__setitem__("full", moments_per_layer(adapter, blocks, layers, stop=False)), repeats, device,
                        warmup=lambda: moments_per_layer(adapter, first, layers, stop=False))
    log(f"    one full pass per layer:          {t_full:.3f} s")
    t_stop, _ = time_it(lambda: out.__setitem__("stop", moments_per_layer(adapter, blocks, layers, stop=True)), repeats, device,
                        warmup=lambda: moments_per_layer(adapter, first, layers, stop=True))
    log(f"    one stopped pass per layer:       {t_stop:.3f} s")
    counts_ok = all(out["fast"][l][1] == out["full"][l][1] == out["stop"][l][1] == tokens for l in layers)
    return {
        "tokens": tokens,
        "batches": len(blocks),
        "read_tokenize_pack_tok_per_s": tokens / t_read,
        "fast_s": t_fast,
        "fast_tok_per_s": tokens / t_fast,
        "per_layer_full_s": t_full,
        "per_layer_full_tok_per_s": tokens / t_full,
        "per_layer_stop_s": t_stop,
        "per_layer_stop_tok_per_s": tokens / t_stop,
        "speedup_vs_full": t_full / t_fast,
        "speedup_vs_stop": t_stop / t_fast,
        "sum_max_rel_diff_vs_full": _max_rel_diff(out["fast"], out["full"]),
        "sum_max_rel_diff_vs_stop": _max_rel_diff(out["fast"], out["stop"]),
        "counts_match": counts_ok,
        "moments": {l: out["fast"][l] for l in layers},  # reused by section 2; dropped from JSON
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="saved HF causal LM + tokenizer directory (default: build the tiny GPT-2)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype for --model")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:0, ...)")
    g.add_argument("--n-layer", type=int, default=4, help="tiny model: decoder blocks")
    g.add_argument("--width", type=int, default=64, help="tiny model: d_model (MLP width d_k = 4x)")
    g.add_argument("--train-steps", type=int, default=150, help="tiny model: training steps on the toy facts")
    g.add_argument("--layers", default=None, help="comma-separated edit layers (default: up to 3 consecutive blocks from n_layer // 4, at most half the model)")
    g = p.add_argument_group("edits")
    g.add_argument("--requests", default=None, help="edit-records file (any supported format) instead of the toy counterfacts")
    g.add_argument("-n", "--num-edits", type=int, default=32, help="requests per batch (N)")
    g.add_argument("--steps", type=int, default=10, help="Adam steps of the residual optimization, all run (early_stop_loss=0); the reference uses 20-25")
    g.add_argument("--anchor", default="prompt_last", choices=["subject_last", "prompt_last"],
                   help="where z is defined (tiny models look facts up at the prompt's last token; the papers use subject_last)")
    g.add_argument("--clamp-norm-factor", type=float, default=4.0, help="||delta|| <= this x ||z0|| (reference: 0.75)")
    g.add_argument("--prefixes", type=int, default=5, help="MEMIT context prefixes per request (rows per request = 1 + this + 1 KL)")
    g.add_argument("--prefix-length", type=int, default=10, help="tokens per context prefix")
    g.add_argument("--lam", type=float, default=1.0, help="MEMIT preservation weight (reference: 15000-20000)")
    g.add_argument("--l2", type=float, default=1.0, help="AlphaEdit ridge term (reference: 10)")
    g.add_argument("--nullspace-threshold", type=float, default=0.02, help="AlphaEdit projector threshold (reference: 0.02 absolute)")
    g.add_argument("--threshold-mode", default="relative", choices=list(get_args(ThresholdMode)), help="how the projector threshold is read")
    g = p.add_argument_group("statistics")
    g.add_argument("--corpus", default=None, help="text/JSON/JSONL/parquet corpus (default: toy sentences in a temp JSONL)")
    g.add_argument("--text-field", default="text", help="corpus column holding the text")
    g.add_argument("--stats-texts", type=int, default=2000, help="texts read from the corpus")
    g.add_argument("--max-length", type=int, default=128, help="tokens per packed block (capped at the model's positions)")
    g.add_argument("--stats-batch", type=int, default=16, help="blocks per forward")
    g = p.add_argument_group("run")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported; one warm-up first)")
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared, loaded machine)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model, requests, prefixes and corpus")
    g.add_argument("--skip", default="", help="comma-separated sections to skip: residuals, edit, stats")
    g.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    return p.parse_args(argv)


def environment(args, device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    import transformers

    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": cpu,
        "device": str(device),
        "command": "python " + shlex.join(sys.argv),
    }
    if hasattr(os, "getloadavg"):
        env["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def fmt_p(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def fmt_s(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def markdown_table(env: dict, setup: dict, res: dict | None, edit: dict | None, stats: dict | None) -> str:
    rows: list[tuple[str, str]] = []
    if res:
        n = res["n_requests"]
        rows += [
            (f"residuals, batched ({n} edits, {res['steps']} steps)", f"{fmt_s(res['batched_s'])} / batch, {fmt_s(res['batched_per_edit_s'])} / edit"),
            ("residuals, one request at a time", f"{fmt_s(res['one_by_one_s'])} / batch, {fmt_s(res['one_by_one_per_edit_s'])} / edit"),
            ("residuals, speed-up of batching", f"{res['speedup']:.2f}x"),
            ("residuals, max relative difference of z (batched vs single)", f"{res['z_max_rel_diff']:.1e}"),
            ("residuals, LM head on every position (before) vs scored positions only",
             f"{fmt_s(res['full_head_s'])} vs {fmt_s(res['batched_s'])}: {res['head_speedup']:.2f}x (z max rel diff {res['head_z_max_rel_diff']:.1e})"),
            ("residuals, padded token slots (batched / one at a time)", f"{res['padding_share_batched']:.0%} / {res['padding_share_one_by_one']:.0%}"),
        ]
    if edit:
        n = setup["n_requests"]
        for name, label in (("memit", "MEMIT"), ("alphaedit", "AlphaEdit")):
            e = edit[name]
            rows.append((f"full edit batch, {label} ({n} edits)",
                         f"{fmt_s(e['batch_s'])} / batch, {fmt_s(e['per_edit_s'])} / edit "
                         f"(residuals {fmt_s(e['residuals_s'])}, apply_update {fmt_s(e['update_s'])})"))
        rows.append(("rewrite success before -> after (MEMIT / AlphaEdit)",
                     f"{fmt_p(edit['success_before'])} -> {fmt_p(edit['memit']['success_after'])} / {fmt_p(edit['alphaedit']['success_after'])}"))
    if stats:
        rows += [
            (f"statistics, one pass for all {len(setup['layers'])} layers, early stop", f"{stats['fast_tok_per_s']:,.0f} tok/s"),
            ("statistics, one full pass per layer", f"{stats['per_layer_full_tok_per_s']:,.0f} tok/s"),
            ("statistics, one stopped pass per layer (reference layer_stats)", f"{stats['per_layer_stop_tok_per_s']:,.0f} tok/s"),
            ("statistics, speed-up vs full / vs stopped per-layer passes", f"{stats['speedup_vs_full']:.2f}x / {stats['speedup_vs_stop']:.2f}x"),
            ("statistics, corpus read + tokenize + pack", f"{stats['read_tokenize_pack_tok_per_s']:,.0f} tok/s"),
        ]
    lines = ["| measurement | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    lines += [
        "",
        f"Model: {setup['model']} ({setup['n_layers']} layers, d_model {setup['d_model']}, d_k {setup['d_k']}, "
        f"{setup['params'] / 1e6:.2f} M parameters), edit layers {setup['layers']}, "
        f"{setup['prefixes']} context prefixes, anchor {setup['anchor']}, MEMIT lam {setup['lam']:g}, AlphaEdit l2 {setup['l2']:g}. "
        + (f"Statistics: {stats['tokens']:,} tokens in blocks of {setup['max_length']}, {setup['stats_batch']} blocks per forward. " if stats else "")
        + f"Median of {setup['repeats']} runs after one warm-up.",
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} torch thread(s), "
        f"{env['cpu_count']} CPUs ({env['cpus_available']} available), {env['cpu']}, device {env['device']}"
        + (f" ({env['gpu']})" if 'gpu' in env else "")
        + (f", 1-min load average at start {env['load_avg_1m_at_start']}" if "load_avg_1m_at_start" in env else "") + ".",
        "",
        f"Command: `{env['command']}`",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass  # already set (e.g. when called twice in one process)
    device = torch.device(args.device)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - {"residuals", "edit", "stats"}:
        raise SystemExit(f"--skip: unknown section(s) {sorted(skip - {'residuals', 'edit', 'stats'})}; use residuals, edit, stats")
    t_start = time.perf_counter()

    # ---- model -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if args.model:
        model, tok = load_pretrained(args.model, args.dtype)
        model_name = args.model
    else:
        tok = make_tokenizer()
        model = train_tiny("gpt2", tok, steps=args.train_steps, n_layer=args.n_layer, width=args.width, seed=args.seed)
        model_name = f"tiny GPT-2 (trained {args.train_steps} steps on the toy facts)"
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = ModelAdapter(model)
    t_model = time.perf_counter() - t0
    n = adapter.n_layers
    if args.layers:
        layers = sorted(int(x) for x in args.layers.split(","))
    else:
        first = n // 4
        layers = list(range(first, first + max(1, min(3, n // 2))))
    adapter.check_layers(layers)
    z_layer = max(layers)
    d_model, d_k = adapter.dims(layers[0])
    log(f"model: {model_name}: {n} layers, d_model {d_model}, d_k {d_k}; edit layers {layers} ({t_model:.1f} s to build/load)")

    # ---- requests and prefixes ----------------------------------------------------------------
    if args.requests:
        from lightning_edit.data.formats import records_to_requests
        from lightning_edit.data.sources import load_records

        pool = records_to_requests(load_records(args.requests))
        if not pool:
            raise SystemExit(f"no edit requests in {args.requests}")
        requests = [pool[i % len(pool)] for i in range(args.num_edits)]
    else:
        requests = counterfactual_requests(args.num_edits)
    prefixes = generate_prefixes(model, tok, args.prefixes, args.prefix_length, args.seed)
    cfg = ResidualConfig(steps=args.steps, early_stop_loss=0.0, anchor=args.anchor, clamp_norm_factor=args.clamp_norm_factor)

    # ---- statistics corpus (also provides the moments the full edit needs) ---------------------
    max_length = min(args.max_length, getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", args.max_length))
    with tempfile.TemporaryDirectory() as tmp:
        corpus = args.corpus
        if corpus is None:
            corpus = str(Path(tmp) / "toy_corpus.jsonl")
            with open(corpus, "w") as f:
                for s in corpus_sentences(args.stats_texts, seed=args.seed + 1):
                    f.write(json.dumps({"text": s}) + "\n")
        scfg = StatsConfig(corpus=corpus, corpus_name=None, text_field=args.text_field, n_samples=args.stats_texts,
                           max_length=max_length, batch_size=args.stats_batch, cache_dir=str(Path(tmp) / "stats"))
        t0 = time.perf_counter()
        blocks = list(packed_blocks(tok, iter_corpus_texts(scfg), max_length, args.stats_batch))
        t_read = time.perf_counter() - t0
    if not blocks:
        raise SystemExit("the statistics corpus produced no tokens")

    setup = {
        "model": model_name, "n_layers": n, "d_model": d_model, "d_k": d_k,
        "params": sum(p.numel() for p in model.parameters()), "layers": layers, "n_requests": len(requests),
        "steps": args.steps, "prefixes": len(prefixes), "anchor": args.anchor, "max_length": max_length,
        "stats_batch": args.stats_batch, "repeats": args.repeats, "model_build_s": t_model,
        "clamp_norm_factor": args.clamp_norm_factor, "lam": args.lam, "l2": args.l2,
        "nullspace_threshold": args.nullspace_threshold, "threshold_mode": args.threshold_mode,
    }

    # ---- sections ------------------------------------------------------------------------------
    res = bench_residuals(adapter, tok, requests, prefixes, z_layer, cfg, args.repeats, device) if "residuals" not in skip else None

    stats = None
    if "stats" not in skip:
        stats = bench_stats(adapter, blocks, layers, args.repeats, device, t_read)
        acc = stats.pop("moments")
    elif "edit" not in skip:
        acc = accumulate_moments(adapter, iter(blocks), layers)

    edit = None
    if "edit" not in skip:
        moments = {l: (s / c).float() for l, (s, c) in acc.items()}
        projs, ranks = {}, {}
        for l, m in moments.items():
            projs[l], info = null_space_projector(m, args.nullspace_threshold, args.threshold_mode)
            projs[l] = projs[l].to(device)
            ranks[l] = info["rank"]
        setup["projector_rank"] = ranks
        log(f"    AlphaEdit null-space rank per layer (of {d_k}): {ranks}")
        edit = bench_full_edit(adapter, tok, requests, prefixes, layers, cfg, moments, projs, args, device)

    env = environment(args, device)
    setup["total_wall_s"] = time.perf_counter() - t_start
    table = markdown_table(env, setup, res, edit, stats)

    # ---- report ---------------------------------------------------------------------------------
    log("")
    if res:
        log("Residual optimization (same requests, same config, fixed steps)")
        log(f"  batched:        {fmt_s(res['batched_s'])} per batch, {fmt_s(res['batched_per_edit_s'])} per edit")
        log(f"  one at a time:  {fmt_s(res['one_by_one_s'])} per batch, {fmt_s(res['one_by_one_per_edit_s'])} per edit")
        log(f"  speed-up:       {res['speedup']:.2f}x")
        log(f"  z agreement:    max ||z_b - z_1|| / ||z_1|| = {res['z_max_rel_diff']:.2e}; "
            f"max |dz| / max |z| = {res['z_max_abs_diff_over_max_abs']:.2e}; steps identical: {res['steps_identical']}; "
            f"max |loss diff| = {res['final_loss_max_abs_diff']:.2e}")
        log(f"  padding:        {res['padding_share_batched']:.0%} of token slots batched ({res['rows_batched']} rows x "
            f"{res['seq_len_batched']}), {res['padding_share_one_by_one']:.0%} one at a time")
        log(f"  encoding (untimed above): batched {fmt_s(res['encode_batched_s'])}, one at a time {fmt_s(res['encode_one_by_one_s'])}")
    if edit:
        log("Full edit batch (encode + residuals + apply_update)")
        for name in ("memit", "alphaedit"):
            e = edit[name]
            log(f"  {name:9s}: {fmt_s(e['batch_s'])} per batch, {fmt_s(e['per_edit_s'])} per edit "
                f"(residuals {fmt_s(e['residuals_s'])}, apply_update {fmt_s(e['update_s'])}); rewrite success "
                f"{fmt_p(edit['success_before'])} -> {fmt_p(e['success_after'])}")
    if stats:
        log("Key statistics")
        log(f"  one pass, all layers, stop after layer {z_layer}: {stats['fast_tok_per_s']:,.0f} tok/s")
        log(f"  one full pass per layer:                {stats['per_layer_full_tok_per_s']:,.0f} tok/s "
            f"(ratio {stats['speedup_vs_full']:.2f}x)")
        log(f"  one stopped pass per layer:             {stats['per_layer_stop_tok_per_s']:,.0f} tok/s "
            f"(ratio {stats['speedup_vs_stop']:.2f}x)")
        log(f"  sums agree: max rel diff {max(stats['sum_max_rel_diff_vs_full'], stats['sum_max_rel_diff_vs_stop']):.1e}; "
            f"token counts match: {stats['counts_match']}")
    log(f"Total wall time: {setup['total_wall_s']:.1f} s")
    log("")
    log(table)

    report = {"environment": env, "setup": setup, "residuals": res, "full_edit": edit, "statistics": stats}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
        log(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
