#!/usr/bin/env python
"""One AlphaEdit batch at real model shapes (Llama-3-8B, Qwen2.5-7B, GPT-J), timed by phase.

The model is built from its config directly on the device, randomly initialized, in bfloat16
(no CPU copy, no download). Its tokenizer is synthetic: token ``i`` is the word ``t<i>``, so
requests are random token sequences that go through the real code path (one tokenization with
character offsets, anchors, targets). A timing needs shapes, not knowledge.

Per shape, in one run:

* an AlphaEdit batch of ``--edits`` requests (subject span, 1-4 target tokens, ``--prefixes``
  context prefixes, a KL row each) on edit layers 4-8 (GPT-J: 3-8), split by phase: z
  optimization (``--steps`` Adam steps for every request, no early stop), keys, solve, apply,
  AlphaEdit state update. It is the second batch on the model (the first, a warm-up, leaves a
  non-zero ``K_p K_p^T`` behind, as in a stream);
* the same z optimization with the previous code path (every step runs the whole sequence
  through every block) and one request at a time (the reference's loop), on a subset of
  ``--one-at-a-time`` requests, scaled to 100 edits;
* the solve of one layer in float32 and float64;
* key statistics: tokens/s of the one-pass moment accumulation over random 512-token blocks
  with the forward stopped after the last edit layer, against the roofline from the device's
  measured bf16 matrix rate and the FLOPs per token of the blocks that run;
* peak device memory, and the bytes of the model, the projectors and ``K_p K_p^T``.

The AlphaEdit projector is a random one of the reference's typical rank (70% of the key
directions kept): its content does not change the cost, and an exact ``eigh`` of five
14336 x 14336 moments is a one-off cost (``--time-eigh`` times one).

    python benchmarks/bench_scale.py --shape tiny                 # CPU, seconds
    python benchmarks/bench_scale.py --shape llama3-8b --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from lightning_edit.data.requests import EditRequest  # noqa: E402
from lightning_edit.engine.arch import ModelAdapter, supports_packed_rows  # noqa: E402
from lightning_edit.engine.closed_form import alphaedit_update  # noqa: E402
from lightning_edit.engine.profiling import PhaseTimer  # noqa: E402
from lightning_edit.engine.residuals import ResidualConfig, build_residual_batch, optimize_residuals  # noqa: E402
from lightning_edit.engine.stats import accumulate_moments  # noqa: E402
from lightning_edit.engine.update import AlphaEditMethod, anchor_keys_and_outputs, apply_update  # noqa: E402


@dataclass
class Shape:
    arch: str
    config: dict
    layers: list[int]
    lr: float = 0.5


SHAPES: dict[str, Shape] = {
    # tests and CPU smoke runs
    "tiny": Shape("llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=10, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512), [4, 5, 6, 7, 8]),
    # Meta-Llama-3-8B: 32 layers, d 4096, MLP 14336, 32 query / 8 key-value heads, vocab 128256
    "llama3-8b": Shape("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                                     rope_theta=500000.0), [4, 5, 6, 7, 8], lr=0.1),
    # Qwen2.5-7B: 28 layers, d 3584, MLP 18944, 28 query / 4 key-value heads, vocab 152064
    "qwen2.5-7b": Shape("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                                      num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                                      rope_theta=1000000.0), [4, 5, 6, 7, 8]),
    # GPT-J-6B: 28 layers, d 4096, MLP 16384, 16 heads, rotary dim 64, vocab 50400
    "gpt-j": Shape("gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048),
                   [3, 4, 5, 6, 7, 8]),
}


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: Shape, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM, GPTJConfig, LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gptj": GPTJConfig}[shape.arch]
    cfg = cls(**shape.config, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):  # parameters are created (and initialized) on the device
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def synthetic_tokenizer(vocab_size: int):
    """Token ``i`` is the word ``t<i>``: whitespace-split words, exact character offsets."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t0", unk_token="t1")


def words(g: torch.Generator, n: int, vocab: int) -> str:
    return " ".join(f"t{int(i)}" for i in torch.randint(2, vocab, (n,), generator=g))


def random_requests(n: int, vocab: int, seed: int) -> list[EditRequest]:
    """CounterFact-like shapes: 0-4 tokens before the subject, a 2-4 token subject, 1-3 after,
    a 1-4 token new target and a different true one."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        pre, subj, post, tn, tt = (int(torch.randint(a, b + 1, (1,), generator=g)) for a, b in ((0, 4), (2, 4), (1, 3), (1, 4), (1, 4)))
        prompt = " ".join(x for x in (words(g, pre, vocab), "{}", words(g, post, vocab)) if x)
        out.append(EditRequest(case_id=str(i), prompt=prompt, subject=words(g, subj, vocab), target_new=words(g, tn, vocab),
                               target_true=words(g, tt, vocab), record_index=i).validate())
    return out


def random_projector(d_k: int, keep: float, device: torch.device, seed: int) -> torch.Tensor:
    """``I - V V^T`` for a random orthonormal ``V`` of ``(1 - keep) d_k`` columns: a projector of
    rank ``keep * d_k`` (float32, on the device)."""
    g = torch.Generator(device=device).manual_seed(seed)
    v = torch.randn(d_k, int(round((1 - keep) * d_k)), device=device, generator=g)
    q, _ = torch.linalg.qr(v)
    return torch.eye(d_k, device=device) - q @ q.T


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matrix-multiply rate of the device (TFLOP/s): the roofline's ceiling."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def flops_per_token(model, adapter: ModelAdapter, upto: int, seq: int, edit_layers: list[int]) -> tuple[float, float]:
    """``(forward, moments)`` FLOPs per token of a statistics pass stopped after block ``upto``:
    2 per weight of blocks ``0..upto`` plus causal attention (``2 * seq * d_model`` per block on
    average: scores and weighted sum over half the context each), and ``2 d_k^2`` per edit layer
    for ``k k^T``."""
    fwd = 0.0
    for i in range(upto + 1):
        fwd += 2 * sum(p.numel() for n, p in adapter.layer(i).named_parameters() if p.dim() == 2)
    d_model = adapter.dims(0)[0]
    fwd += (upto + 1) * 2 * seq * d_model
    mom = sum(2 * adapter.dims(l)[1] ** 2 for l in edit_layers)
    return fwd, mom


@dataclass
class Settings:
    edits: int = 100
    steps: int = 25
    prefixes: int = 5
    prefix_len: int = 10
    one_at_a_time: int = 10
    one_at_a_time_full_forward: int = 1  # 0: skip that baseline (the slowest part of a GPU run)
    best_batch: int = 0  # 1: after the sweeps, a second full edit batch with the best buckets + attention
    stats_batches: int = 8
    stats_batch_size: int = 16
    stats_seq: int = 512
    l2: float = 10.0
    keep: float = 0.7
    solve_dtype: str = "float64"
    length_buckets: int = 3
    bucket_sweep: str = ""
    attn_sweep: str = ""
    sdpa_backends: str = "auto"
    eager_attention_mb: float = 64.0
    packed_eager_attention_mb: float = 0.0
    solver: str = "woodbury"
    pack_rows: int = 1  # 1: packed rows in the z optimization (the default), 0: padded length buckets
    pack_compare: int = 1  # 1: also time the z optimization of the same batch with the other packing setting
    longform_tokens: str = ""  # e.g. "250,500": AnyEdit batches with answers of these lengths (time, peak memory)
    longform_requests: int = 4
    longform_window: int = 40
    longform_steps: int = 25
    profile_steps: int = 0
    stream_batches: int = 0
    stream_steps: int = 5
    extra: dict = field(default_factory=dict)


def longform_batch(adapter, tok, method, layers, n_tok: int, s: Settings, device, name: str) -> dict:
    """An AnyEdit batch of ``s.longform_requests`` random questions (20 tokens) with answers of
    ``n_tok`` tokens in chunks of ``s.longform_window`` (no context prefixes, no KL term, the
    other positions' keys as zero-residual rows: configs/anyedit_llama3_8b_instruct.yaml), in
    ``joint`` and ``autoregressive`` mode: seconds per request (residuals + update, all steps)
    and the peak device memory of each."""
    from lightning_edit.engine.residuals import build_chunked_batch

    vocab = adapter.model.config.vocab_size
    g = torch.Generator().manual_seed(n_tok)
    items = []
    for _ in range(s.longform_requests):
        question, answer = words(g, 20, vocab), words(g, n_tok, vocab)
        text = question + " " + answer
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        offs = enc["offset_mapping"][20:]
        items.append((text, [(offs[i][0] - 1, offs[min(i + s.longform_window, len(offs)) - 1][1])
                             for i in range(0, len(offs), s.longform_window)]))
    batch = build_chunked_batch(tok, items)
    out = {"requests": s.longform_requests, "answer_tokens": n_tok, "chunks": batch.n_chunks, "window": s.longform_window,
           "steps": s.longform_steps}
    saved = {l: adapter.down_proj(l).weight.detach().clone() for l in layers}
    for mode in ("joint", "autoregressive"):
        cfg = ResidualConfig(lr=0.5, steps=s.longform_steps, weight_decay=0.5, clamp_norm_factor=4.0, kl_factor=0.0,
                             early_stop_loss=0.0, mode=mode, max_rows_per_forward=64)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        tb = PhaseTimer(device)
        with tb("z"):
            res = optimize_residuals(adapter, batch, max(layers), cfg)
        apply_update(adapter, batch, res.z_target, layers, method, max_rows=64, timer=tb, context=True)
        with torch.no_grad():  # the next mode starts from the same weights
            for l in layers:
                adapter.down_proj(l).weight.copy_(saved[l])
        total = sum(tb.seconds.values())
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        out[mode] = {"s_per_request": total / s.longform_requests, "phases_s": dict(tb.seconds), "peak_memory_gb": peak,
                     "mean_chunk_nll": float(res.nll.mean())}
        log(f"[{name}] long-form, answers of {n_tok} tokens ({s.longform_requests} requests, {batch.n_chunks} chunks of "
            f"{s.longform_window}), {mode}: {total / s.longform_requests:.2f} s per request "
            f"(z {tb.seconds['z']:.2f} s for the batch); peak memory {peak if peak is None else round(peak, 1)} GB")
    out["autoregressive_over_joint"] = out["autoregressive"]["s_per_request"] / out["joint"]["s_per_request"]
    return out


def bench_shape(name: str, s: Settings, device: torch.device, dtype: torch.dtype, time_eigh: bool) -> dict:
    shape = SHAPES[name]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build_model(shape, dtype, device)
    sync(device)
    build_s = time.perf_counter() - t0
    adapter = ModelAdapter(model)
    vocab = model.config.vocab_size
    tok = synthetic_tokenizer(vocab)
    layers = shape.layers
    z_layer = layers[-1]
    d_model, d_k = adapter.dims(layers[0])
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    log(f"[{name}] built {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters ({model_gb:.1f} GB, {dtype}) "
        f"on {device} in {build_s:.1f} s; edit layers {layers}, d_k {d_k}")

    packable = supports_packed_rows(model)
    log(f"[{name}] packed rows: {'supported' if packable else 'NOT supported (padded rows instead)'}")
    g = torch.Generator().manual_seed(1)
    prefixes = [words(g, s.prefix_len, vocab) + " " for _ in range(s.prefixes)]
    cfg = ResidualConfig(lr=shape.lr, steps=s.steps, early_stop_loss=0.0, clamp_norm_factor=4.0, kl_factor=0.0625,
                         anchor="subject_last", length_buckets=s.length_buckets, sdpa_backends=s.sdpa_backends,
                         eager_attention_mb=s.eager_attention_mb, pack_rows=bool(s.pack_rows),
                         packed_eager_attention_mb=s.packed_eager_attention_mb)
    solve = {"float32": torch.float32, "float64": torch.float64}[s.solve_dtype]
    projs = {l: random_projector(d_k, s.keep, device, seed=l) for l in layers}
    method = AlphaEditMethod(l2=s.l2, projectors=projs, solve_dtype=solve, solver=s.solver)

    def edit_batch(requests, c: ResidualConfig, timer: PhaseTimer | None):
        rb = build_residual_batch(tok, requests, prefixes, c.anchor)
        if timer is not None:
            with timer("z"):
                res = optimize_residuals(adapter, rb, z_layer, c)
        else:
            res = optimize_residuals(adapter, rb, z_layer, c)
        apply_update(adapter, rb, res.z_target, layers, method, timer=timer)
        return rb, res

    # warm-up batch: compiles/caches kernels and leaves a non-zero K_p K_p^T, as in a stream
    from dataclasses import replace

    log(f"[{name}] warm-up batch ({s.edits} edits, 2 steps) ...")
    edit_batch(random_requests(s.edits, vocab, seed=10), replace(cfg, steps=2), None)
    timer = PhaseTimer(device)
    reqs = random_requests(s.edits, vocab, seed=11)
    rb, res = edit_batch(reqs, cfg, timer)
    phases = {k: v for k, v in timer.seconds.items()}
    batch_s = sum(phases.values())
    rows, cols = rb.enc.input_ids.shape
    log(f"[{name}] edit batch: {batch_s:.2f} s for {s.edits} edits ({rows} rows); " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()))
    final_nll = float(res.nll.mean())

    # z optimization of the same batch with the other packing setting (ratio in the same run)
    pack_cmp = None
    if s.pack_compare:
        tb = PhaseTimer(device)
        with tb("z"):
            optimize_residuals(adapter, build_residual_batch(tok, reqs, prefixes, cfg.anchor), z_layer, replace(cfg, pack_rows=not s.pack_rows))
        other = tb.seconds["z"] * 100 / s.edits
        packed, padded = (phases["z"] * 100 / s.edits, other) if s.pack_rows else (other, phases["z"] * 100 / s.edits)
        pack_cmp = {"packed": packed, "padded": padded, "padded_over_packed": padded / packed}
        log(f"[{name}] z optimization: packed rows {packed:.2f} s, padded rows ({s.length_buckets} length buckets) {padded:.2f} s "
            f"per 100 edits: packing {padded / packed:.2f}x")
    # z optimization of the same batch with other length-bucket counts
    sweep = {}
    for b in [int(x) for x in s.bucket_sweep.split(",") if x.strip()]:
        tb = PhaseTimer(device)
        with tb("z"):
            optimize_residuals(adapter, build_residual_batch(tok, reqs, prefixes, cfg.anchor), z_layer, replace(cfg, length_buckets=b))
        sweep[b] = tb.seconds["z"] * 100 / s.edits
        log(f"[{name}] z optimization with {b} length buckets: {sweep[b]:.2f} s per 100 edits")
    # z optimization of the same batch with other attention kernels
    attn = {}
    for a in [x.strip() for x in s.attn_sweep.split(",") if x.strip()]:
        # "eager": transformers' eager attention in every step; "sdpa": torch's choice of SDPA
        # kernel; others: SDPA restricted to those backends ("efficient+math")
        c = replace(cfg, eager_attention_mb=float("inf"), packed_eager_attention_mb=float("inf")) if a == "eager" else \
            replace(cfg, eager_attention_mb=0.0, packed_eager_attention_mb=0.0, sdpa_backends="auto" if a == "sdpa" else a.replace("+", ","))
        tb = PhaseTimer(device)
        try:
            with tb("z"):
                optimize_residuals(adapter, build_residual_batch(tok, reqs, prefixes, cfg.anchor), z_layer, c)
            attn[a] = tb.seconds["z"] * 100 / s.edits
            log(f"[{name}] z optimization with attention {a}: {attn[a]:.2f} s per 100 edits")
        except Exception as err:  # a kernel that refuses the shape is a result too
            attn[a] = None
            log(f"[{name}] z optimization with attention {a}: failed ({type(err).__name__}: {str(err)[:200]})")
    best = None
    if s.best_batch and (sweep or attn):
        # the sweeps ran the z optimization alone; run the whole batch (update included) with the
        # fastest bucket count and attention together, on a fresh batch of the same shapes
        nb = min({s.length_buckets: phases["z"] * 100 / s.edits, **sweep}.items(), key=lambda x: x[1])[0]
        na = min({"default": phases["z"] * 100 / s.edits, **{k: v for k, v in attn.items() if v is not None}}.items(), key=lambda x: x[1])[0]
        c = replace(cfg, length_buckets=nb)
        if na == "eager":
            c = replace(c, eager_attention_mb=float("inf"), packed_eager_attention_mb=float("inf"))
        elif na != "default":
            c = replace(c, eager_attention_mb=0.0, packed_eager_attention_mb=0.0, sdpa_backends="auto" if na == "sdpa" else na.replace("+", ","))
        tb = PhaseTimer(device)
        edit_batch(random_requests(s.edits, vocab, seed=12), c, tb)
        best = {"length_buckets": nb, "attention": na, "s_per_100_edits": sum(tb.seconds.values()) * 100 / s.edits,
                "phases_s_per_100_edits": {k: v * 100 / s.edits for k, v in tb.seconds.items()}}
        log(f"[{name}] edit batch with {nb} length buckets and attention {na}: {best['s_per_100_edits']:.2f} s per 100 edits; "
            + ", ".join(f"{k} {v:.2f}" for k, v in best["phases_s_per_100_edits"].items()))
    profile = None
    if s.profile_steps:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=acts) as prof:
            optimize_residuals(adapter, build_residual_batch(tok, reqs, prefixes, cfg.anchor), z_layer, replace(cfg, steps=s.profile_steps))
            sync(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        profile = prof.key_averages().table(sort_by=sort, row_limit=20)
        log(f"[{name}] profile of z optimization ({s.profile_steps} steps, {s.edits} edits):\n{profile}")

    # a sequential stream: is the time per batch flat as edits accumulate?
    stream = None
    if s.stream_batches:
        times = []
        st_cfg = replace(cfg, steps=s.stream_steps)
        for b in range(s.stream_batches):
            tb = PhaseTimer(device)
            with tb("batch"):
                edit_batch(random_requests(s.edits, vocab, seed=1000 + b), st_cfg, None)
            times.append(tb.seconds["batch"])
        k = max(1, len(times) // 10)
        first, last = sum(times[:k]) / k, sum(times[-k:]) / k
        stream = {"batches": s.stream_batches, "edits": s.stream_batches * s.edits, "steps": s.stream_steps,
                  "batch_s": times, "first_tenth_mean_s": first, "last_tenth_mean_s": last, "last_over_first": last / first}
        log(f"[{name}] stream of {stream['edits']} edits ({s.stream_batches} batches, {s.stream_steps} steps): first tenth "
            f"{first:.2f} s per batch, last tenth {last:.2f} s, ratio {last / first:.2f}")

    # baselines on a subset: the previous code path (full forwards every step), one request at a time
    sub = reqs[: s.one_at_a_time]
    full_cfg = replace(cfg, prefix_cache=False, skip_lower_blocks=False)
    t = PhaseTimer(device)
    with t("batched"):
        z_fast = optimize_residuals(adapter, build_residual_batch(tok, sub, prefixes, cfg.anchor), z_layer, cfg)
    with t("batched_full_forward"):
        z_full = optimize_residuals(adapter, build_residual_batch(tok, sub, prefixes, cfg.anchor), z_layer, full_cfg)
    # the two paths compute the same thing (up to the model dtype's rounding)
    d_fast, d_full = z_fast.z_target - z_fast.z_init, z_full.z_target - z_full.z_init
    delta_rel_diff = float(((d_fast - d_full).norm(dim=-1) / d_full.norm(dim=-1).clamp_min(1e-12)).max())
    with t("one_at_a_time"):
        for r in sub:
            optimize_residuals(adapter, build_residual_batch(tok, [r], prefixes, cfg.anchor), z_layer, cfg)
    if s.one_at_a_time_full_forward:
        with t("one_at_a_time_full_forward"):
            for r in sub:
                optimize_residuals(adapter, build_residual_batch(tok, [r], prefixes, cfg.anchor), z_layer, full_cfg)
    sub_s = dict(t.seconds)
    scale = 100 / len(sub)
    update_s = batch_s - phases["z"]
    log(f"[{name}] z optimization of {len(sub)} requests: " + ", ".join(f"{k} {v:.2f} s" for k, v in sub_s.items())
        + f"; largest relative difference of the residual vectors, fast vs full forwards: {delta_rel_diff:.2e}")

    # the solve of one layer in both precisions
    keys, z_cur = anchor_keys_and_outputs(adapter, rb, [z_layer], z_layer)
    resid = res.z_target - z_cur
    solve_s = {}
    for dname, dt in (("float32", torch.float32), ("float64", torch.float64)):
        alphaedit_update(keys[z_layer], resid, projs[z_layer], method.prev_kkt[z_layer], s.l2, dt)  # warm
        tt = PhaseTimer(device)
        with tt("s"):
            alphaedit_update(keys[z_layer], resid, projs[z_layer], method.prev_kkt[z_layer], s.l2, dt)
        solve_s[dname] = tt.seconds["s"]
    # the factored solve as the engine runs it: direct vs the maintained inverse (Woodbury)
    from lightning_edit.engine.closed_form import alphaedit_factors, alphaedit_factors_woodbury

    base_inv = method._base_inverse(z_layer, device) if s.solver == "woodbury" else None
    for dname, fn in (("factors_direct", lambda: alphaedit_factors(keys[z_layer], resid, projs[z_layer], method.prev_kkt[z_layer], s.l2, solve)),
                      ("factors_woodbury", (lambda: alphaedit_factors_woodbury(keys[z_layer], resid, projs[z_layer], base_inv))
                       if base_inv is not None else None)):
        if fn is None:
            continue
        fn()  # warm
        tt = PhaseTimer(device)
        with tt("s"):
            fn()
        solve_s[dname] = tt.seconds["s"]
    log(f"[{name}] one-layer solve: " + ", ".join(f"{k} {v:.3f} s" for k, v in solve_s.items()))

    eigh_s = None
    if time_eigh:
        m = torch.randn(d_k, d_k // 2, device=device)
        m = (m @ m.T / d_k).double()
        tt = PhaseTimer(device)
        with tt("e"):
            torch.linalg.eigh(m)
        eigh_s = tt.seconds["e"]
        del m
        log(f"[{name}] eigh of one {d_k}x{d_k} moment (float64): {eigh_s:.2f} s")

    # key statistics: one pass for all edit layers, forward stopped after the last one
    gs = torch.Generator().manual_seed(2)
    blocks = [torch.randint(2, vocab, (s.stats_batch_size, s.stats_seq), generator=gs) for _ in range(s.stats_batches)]
    accumulate_moments(adapter, iter(blocks[:1]), layers)  # warm-up
    tt = PhaseTimer(device)
    with tt("stats"):
        accumulate_moments(adapter, iter(blocks), layers)
    tokens = sum(b.numel() for b in blocks)
    stats_tps = tokens / tt.seconds["stats"]
    peak_tflops = matmul_tflops(device, dtype)
    fwd_f, mom_f = flops_per_token(model, adapter, max(layers), s.stats_seq, layers)
    roof_fwd = peak_tflops * 1e12 / fwd_f
    roof_all = peak_tflops * 1e12 / (fwd_f + mom_f)
    log(f"[{name}] statistics: {stats_tps:,.0f} tokens/s; measured matmul {peak_tflops:.0f} TFLOP/s; roofline "
        f"{roof_fwd:,.0f} tokens/s (forward of blocks 0-{max(layers)}, {fwd_f / 1e9:.2f} GFLOP/token), "
        f"{roof_all:,.0f} tokens/s (forward + k k^T, {(fwd_f + mom_f) / 1e9:.2f} GFLOP/token)")

    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    longform = {}
    for n_tok in [int(x) for x in s.longform_tokens.split(",") if x.strip()]:
        try:
            longform[n_tok] = longform_batch(adapter, tok, method, layers, n_tok, s, device, name)
        except Exception as err:  # keep the main results of the run
            longform[n_tok] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
            log(f"[{name}] long-form, answers of {n_tok} tokens: failed ({longform[n_tok]['error']})")
    proj_gb = sum(p.numel() * p.element_size() for p in projs.values()) / 1e9
    kkt_gb = sum(p.numel() * p.element_size() for p in method.prev_kkt.values()) / 1e9
    inv_gb = sum(p.numel() * p.element_size() for p in method.inverse.values()) / 1e9
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "shape": name,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "edits": s.edits,
        "steps": s.steps,
        "prefixes": s.prefixes,
        "edit_layers": layers,
        "rows": rows,
        "s_per_100_edits": batch_s * 100 / s.edits,
        "phases_s_per_100_edits": {k: v * 100 / s.edits for k, v in phases.items()},
        "s_per_100_edits_one_at_a_time": sub_s["one_at_a_time"] * scale + update_s * 100 / s.edits,
        "s_per_100_edits_one_at_a_time_full_forward": (sub_s["one_at_a_time_full_forward"] * scale + update_s * 100 / s.edits
                                                         if "one_at_a_time_full_forward" in sub_s else None),
        "z_s_per_100_edits_subset": {k: v * scale for k, v in sub_s.items()},
        "z_subset_requests": len(sub),
        "pack_rows": bool(s.pack_rows),
        "packed_rows_supported": packable,
        "longform": longform,
        "z_s_per_100_edits_packed_vs_padded": pack_cmp,
        "z_s_per_100_edits_by_length_buckets": sweep,
        "z_s_per_100_edits_by_attention": attn,
        "best_batch": best,
        "solver": s.solver,
        "sdpa_backends": s.sdpa_backends,
        "stream": stream,
        "length_buckets": s.length_buckets,
        "delta_max_rel_diff_fast_vs_full_forward": delta_rel_diff,
        "solve_s_one_layer": solve_s,
        "solve_dtype": s.solve_dtype,
        "eigh_s_one_layer": eigh_s,
        "final_target_nll_mean": final_nll,
        "stats_tokens_per_s": stats_tps,
        "stats_tokens": tokens,
        "stats_roofline_tokens_per_s_forward": roof_fwd,
        "stats_roofline_tokens_per_s_forward_and_moments": roof_all,
        "stats_roofline_fraction": stats_tps / roof_fwd,
        "stats_roofline_fraction_with_moments": stats_tps / roof_all,
        "matmul_tflops_measured": peak_tflops,
        "flops_per_token_forward": fwd_f,
        "flops_per_token_moments": mom_f,
        "peak_memory_gb": peak_gb,
        "model_gb": model_gb,
        "projectors_gb": proj_gb,
        "kpkpt_gb": kkt_gb,
        "inverse_gb": inv_gb,
        "model_build_s": build_s,
        "settings": asdict(s),
    }
    log(f"[{name}] {out['s_per_100_edits']:.2f} s per 100 edits (one request at a time: "
        f"{out['s_per_100_edits_one_at_a_time']:.2f} s, ratio {out['s_per_100_edits_one_at_a_time'] / out['s_per_100_edits']:.2f}x); "
        f"peak memory {peak_gb if peak_gb is None else round(peak_gb, 1)} GB (model {model_gb:.1f}, projectors {proj_gb:.1f}, K_p K_p^T {kkt_gb:.1f}, "
        f"inverses {inv_gb:.1f})")
    del model, adapter, method, projs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table(results: list[dict]) -> str:
    cols = ["shape", "device", "s_per_100_edits", "z", "keys", "solve", "apply", "state", "s_per_100_edits_one_at_a_time",
            "stats_tokens_per_s", "stats_roofline_fraction", "peak_memory_gb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        ph = r["phases_s_per_100_edits"]
        vals = [r["shape"], r["device"], f"{r['s_per_100_edits']:.2f}", *(f"{ph.get(k, 0):.2f}" for k in ("z", "keys", "solve", "apply", "state")),
                f"{r['s_per_100_edits_one_at_a_time']:.2f}", f"{r['stats_tokens_per_s']:,.0f}", f"{r['stats_roofline_fraction']:.2f}",
                "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="model dtype (default bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--out", default=None, help="directory for one JSON file per shape")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs)")
    p.add_argument("--time-eigh", action="store_true", help="also time one float64 eigh of a d_k x d_k moment")
    for f in Settings.__dataclass_fields__.values():
        if f.name != "extra":
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    s = Settings(**{k: getattr(args, k) for k in Settings.__dataclass_fields__ if k != "extra"})
    results = []
    for name in args.shape.split(","):
        if name not in SHAPES:
            p.error(f"unknown shape {name!r}; choose from {sorted(SHAPES)}")
        r = bench_shape(name, s, device, dtype, args.time_eigh)
        results.append(r)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            slug = re.sub(r"[^a-z0-9]+", "-", r["device"].lower()).strip("-") or "cpu"
            f = out / f"{name}_{slug}.json"
            f.write_text(json.dumps(r, indent=2))
            log(f"[{name}] wrote {f}")
    log("\n" + table(results))
    return results


if __name__ == "__main__":
    main()
