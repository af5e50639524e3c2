"""Packed rows in the residual optimization: several short suffixes per row behind a 4-D mask
must compute what the padded rows compute."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from conftest import counterfactual_requests, make_model
from test_longform_engine import PREFIXES, _items

from lightning_edit.engine import forward_plan as residuals_mod
from lightning_edit.engine import residuals as residuals_engine
from lightning_edit.engine.arch import ModelAdapter, supports_packed_rows
from lightning_edit.engine.forward_plan import Lockstep, pack_rows
from lightning_edit.engine.residuals import (
    ResidualConfig,
    build_chunked_batch,
    build_residual_batch,
    optimize_residuals,
)
from lightning_edit.errors import InputError


def test_pack_rows_places_every_row_once_within_capacity():
    rng = random.Random(0)
    for trial in range(50):
        lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 80))]
        cap = max(lengths) + rng.randint(0, 3)
        bins = pack_rows(lengths, cap)
        flat = sorted(i for b in bins for i in b)
        assert flat == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= cap for b in bins)
        # best-fit decreasing never needs more than 11/9 OPT + 1 bins; OPT >= total / cap
        assert len(bins) <= 11 / 9 * -(-sum(lengths) // cap) + 1
    assert pack_rows([4, 1, 3, 2, 5, 5], 5) == [[4], [5], [0, 1], [2, 3]]
    with pytest.raises(ValueError, match="capacity"):
        pack_rows([3, 6], 5)


def _rel(a, b):
    return float(((a.z_target - b.z_target).norm(dim=-1) / (b.z_target - b.z_init).norm(dim=-1).clamp_min(1e-9)).max())


@pytest.mark.parametrize("arch", ["gpt2", "gptj", "llama", "qwen2"])
def test_packed_rows_equal_padded_rows_for_facts(tokenizer, arch):
    model = make_model(arch, vocab_size=len(tokenizer), n_layer=4, width=32)
    assert supports_packed_rows(model)
    ad = ModelAdapter(model)
    batch = build_residual_batch(tokenizer, counterfactual_requests(6), PREFIXES, "subject_last")
    base = ResidualConfig(steps=4, lr=0.5, early_stop_loss=0.0, clamp_norm_factor=4.0, pack_rows=False)
    padded = optimize_residuals(ad, batch, 2, base)
    for extra in ({}, {"max_rows_per_forward": 3}, {"max_tokens_per_forward": 20}, {"max_tokens_per_forward": 0},
                  {"prefix_cache": False, "skip_lower_blocks": False}):
        packed = optimize_residuals(ad, batch, 2, replace(base, pack_rows=True, **extra))
        assert _rel(packed, padded) < 1e-4, extra
        torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-4, atol=1e-5)
        assert torch.equal(packed.steps, padded.steps)


@pytest.mark.parametrize("mode", ["joint", "autoregressive"])
def test_packed_rows_equal_padded_rows_for_chunks(tokenizer, mode):
    model = make_model("llama", vocab_size=len(tokenizer), n_layer=3, width=32)
    ad = ModelAdapter(model)
    batch = build_chunked_batch(tokenizer, _items(tokenizer), PREFIXES)
    base = ResidualConfig(steps=4, lr=0.5, kl_factor=0.0, early_stop_loss=0.0, clamp_norm_factor=4.0, mode=mode, pack_rows=False)
    padded = optimize_residuals(ad, batch, 1, base)
    packed = optimize_residuals(ad, batch, 1, replace(base, pack_rows=True))
    assert _rel(packed, padded) < 1e-4


def test_a_model_that_ignores_the_packing_inputs_is_not_packed(tokenizer, monkeypatch):
    """GPT-2 with its position ids dropped: the packed check fails and the optimization keeps
    to padded rows, with the padded rows' result."""
    model = make_model("gpt2", vocab_size=len(tokenizer), n_layer=3, width=32)
    fwd = model.forward
    model.forward = lambda *a, position_ids=None, **k: fwd(*a, **k)
    assert not supports_packed_rows(model)
    ad = ModelAdapter(model)
    batch = build_residual_batch(tokenizer, counterfactual_requests(3), PREFIXES, "prompt_last", kl=False)
    cfg = ResidualConfig(anchor="prompt_last", steps=3, early_stop_loss=0.0, kl_factor=0.0, prefix_cache=False)
    calls = []
    real = residuals_mod.additive_mask
    monkeypatch.setattr(residuals_mod, "additive_mask", lambda *a: calls.append(1) or real(*a))
    a = optimize_residuals(ad, batch, 1, cfg)
    b = optimize_residuals(ad, batch, 1, replace(cfg, pack_rows=False))
    assert not calls and torch.equal(a.z_target, b.z_target)
    arch_mod_model = make_model("gpt2", vocab_size=len(tokenizer), n_layer=3, width=32)  # the same, unpatched: packed
    optimize_residuals(ModelAdapter(arch_mod_model), batch, 1, cfg)
    assert calls


def test_packed_forwards_respect_the_token_and_row_limits(tokenizer, monkeypatch):
    model = make_model("llama", vocab_size=len(tokenizer), n_layer=3, width=32)
    batch = build_residual_batch(tokenizer, counterfactual_requests(6), PREFIXES, "subject_last")
    shapes = []
    real = residuals_mod.additive_mask
    monkeypatch.setattr(residuals_mod, "additive_mask", lambda allowed, dtype: shapes.append(tuple(allowed.shape)) or real(allowed, dtype))
    base = ResidualConfig(steps=1, early_stop_loss=0.0)
    for extra, check in (({"max_tokens_per_forward": 0}, lambda n, cap: n == 1),
                         ({"max_tokens_per_forward": 30}, lambda n, cap: n > 1),
                         ({"max_tokens_per_forward": 0, "max_rows_per_forward": 2}, lambda n, cap: n > 1)):
        shapes.clear()
        optimize_residuals(ModelAdapter(model), batch, 1, replace(base, **extra))
        rows = [s[0] for s in shapes]
        cap = shapes[0][2]
        assert check(len(shapes), cap), (extra, shapes)
        assert max(rows) - min(rows) <= 1  # equal parts
        if extra.get("max_tokens_per_forward"):
            assert all(r * cap <= extra["max_tokens_per_forward"] for r in rows)
        if extra.get("max_rows_per_forward"):
            assert max(rows) <= extra["max_rows_per_forward"]


def test_negative_forward_limits_are_refused():
    for field in ("max_tokens_per_forward", "max_rows_per_forward"):
        with pytest.raises(ValueError, match=">= 0"):
            ResidualConfig(**{field: -1})


class _OthersStillBusy(Lockstep):
    """One process of a lockstep whose partners always need two more forwards and are still
    optimizing (so this one keeps stepping after its own chunks have stopped)."""

    def count(self, n: int) -> int:
        return n + 2

    def any(self, flag: bool) -> bool:
        return True

    def all(self, flag: bool) -> bool:
        return flag


@pytest.mark.parametrize("extra", [{}, {"pack_rows": False, "max_rows_per_forward": 2}])
def test_lockstep_extra_forwards_and_steps_change_nothing(tokenizer, trained_gpt2, monkeypatch, extra):
    """Under sharded weights each process runs as many forwards as the busiest one, and goes on
    stepping while any process optimizes: the repeated forwards carry zero weight and stopped
    chunks keep their vectors, so this process's result is bit for bit what it gets alone."""
    ad = ModelAdapter(trained_gpt2)
    batch = build_residual_batch(tokenizer, counterfactual_requests(4), PREFIXES, "subject_last")
    cfg = ResidualConfig(steps=20, lr=0.5, early_stop_loss=14.0, clamp_norm_factor=4.0, kl_factor=0.0625,
                         max_tokens_per_forward=24, **extra)
    alone = optimize_residuals(ad, batch, 1, cfg)
    assert int(alone.steps.min()) < int(alone.steps.max()) < cfg.steps  # the chunks stopped early alone, at different steps
    idle = []
    real_idle = residuals_engine._idle_step
    monkeypatch.setattr(residuals_engine, "_idle_step", lambda *a: (idle.append(1), real_idle(*a)))
    shared = optimize_residuals(ad, batch, 1, cfg, lockstep=_OthersStillBusy(all_max=int))
    assert len(idle) >= 2 * (cfg.steps + 1)  # two extra forwards at every step, and the steps went on to the end
    for name in ("z_target", "z_init", "loss", "nll", "steps"):
        assert torch.equal(getattr(shared, name), getattr(alone, name)), name
    chunks = build_chunked_batch(tokenizer, _items(tokenizer), ())
    with pytest.raises(InputError, match="joint only"):
        optimize_residuals(ad, chunks, 1, replace(cfg, mode="autoregressive"), lockstep=_OthersStillBusy(all_max=int))


class _OtherHasNoPrefix(_OthersStillBusy):
    """A partner process whose rows have no prefix to cache (it would run no prefix forward)."""

    def all(self, flag: bool) -> bool:
        return False


def test_lockstep_caches_no_prefix_when_some_process_has_none(tokenizer, trained_gpt2):
    """If some process has no prefix to cache, none caches (else the others' prefix forwards
    would gather block weights alone): the result is then that of prefix_cache=False."""
    ad = ModelAdapter(trained_gpt2)
    batch = build_residual_batch(tokenizer, counterfactual_requests(3), PREFIXES, "subject_last")
    cfg = ResidualConfig(steps=4, lr=0.5, early_stop_loss=0.0, clamp_norm_factor=4.0, max_tokens_per_forward=24)
    uncached = optimize_residuals(ad, batch, 1, replace(cfg, prefix_cache=False))
    cached = optimize_residuals(ad, batch, 1, cfg)
    shared = optimize_residuals(ad, batch, 1, cfg, lockstep=_OtherHasNoPrefix(all_max=int))
    for name in ("z_target", "loss", "steps"):
        assert torch.equal(getattr(shared, name), getattr(uncached, name)), name
    assert not torch.equal(cached.z_target, uncached.z_target)  # the two paths round differently: the check can tell them apart
