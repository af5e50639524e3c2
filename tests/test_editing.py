"""The editing engine on a tiny trained model: batched residuals, efficacy, the null-space
property of sequential AlphaEdit, and all-or-nothing updates."""

import copy
import dataclasses

import pytest
import torch
from conftest import ARCHS, FAST_RESIDUAL, counterfactual_requests, make_model

from lightning_edit.api import Editor
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.closed_form import NonFiniteUpdateError
from lightning_edit.engine.residuals import ResidualConfig, build_residual_batch, optimize_residuals
from lightning_edit.engine.stats import StatsConfig, iter_corpus_texts, packed_blocks
from lightning_edit.engine.update import MemitMethod, apply_update


def _stats(corpus_file, tmp_path):
    return StatsConfig(corpus=str(corpus_file), corpus_name=None, n_samples=600, max_length=64, batch_size=8,
                       cache_dir=str(tmp_path / "stats"))


@pytest.mark.parametrize("kl", [0.0625, 0.0])
def test_batched_residuals_equal_one_at_a_time(trained_gpt2, tokenizer, kl):
    ad = ModelAdapter(trained_gpt2)
    reqs = counterfactual_requests(5)
    prefixes = ["The cat sat. ", "Because of this. "]
    cfg = ResidualConfig(anchor="subject_last", steps=8, kl_factor=kl, early_stop_loss=0.0)
    together = optimize_residuals(ad, build_residual_batch(tokenizer, reqs, prefixes, cfg.anchor), 2, cfg)
    alone = torch.cat([optimize_residuals(ad, build_residual_batch(tokenizer, [r], prefixes, cfg.anchor), 2, cfg).z_target for r in reqs])
    torch.testing.assert_close(together.z_target, alone, rtol=1e-4, atol=1e-4)
    # micro-batching (gradient accumulation over row groups) is the same computation
    cfg_mb = ResidualConfig(anchor="subject_last", steps=8, kl_factor=kl, early_stop_loss=0.0, max_rows_per_forward=4)
    split = optimize_residuals(ad, build_residual_batch(tokenizer, reqs, prefixes, cfg.anchor), 2, cfg_mb)
    # summing the gradient over row groups changes it at float32 rounding; Adam divides by
    # sqrt(v), so on a coordinate whose gradient is near zero that rounding can move a step by a
    # visible fraction of lr (measured: one of 320 elements off by 5e-4 on some CPUs); a wrong
    # accumulation would be off by O(lr) = 0.5 on many
    torch.testing.assert_close(split.z_target, alone, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_on_scored_positions_only_is_the_same_computation(arch, tokenizer, monkeypatch):
    """``logits_to_keep`` (the LM head only where a loss reads it) changes nothing but speed,
    on every supported architecture."""
    import lightning_edit.engine.forward_plan as residuals  # where the plan asks for logits_to_keep

    model = make_model(arch, vocab_size=len(tokenizer), n_layer=3, width=32)
    ad = ModelAdapter(model)
    reqs = counterfactual_requests(4)
    cfg = ResidualConfig(anchor="prompt_last", steps=6, kl_factor=0.0625, early_stop_loss=0.0)
    batch = build_residual_batch(tokenizer, reqs, ["The cat sat. "], cfg.anchor)
    assert residuals.supports_logits_to_keep(model)
    kept = optimize_residuals(ad, batch, 2, cfg)
    monkeypatch.setattr(residuals, "supports_logits_to_keep", lambda model: False)
    full = optimize_residuals(ad, batch, 2, cfg)
    torch.testing.assert_close(kept.z_target, full.z_target, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kept.loss, full.loss, rtol=1e-4, atol=1e-5)


def test_early_stop_freezes_converged_chunks(trained_gpt2, tokenizer):
    ad = ModelAdapter(trained_gpt2)
    reqs = counterfactual_requests(4, start=5)
    cfg = ResidualConfig(anchor="prompt_last", steps=30, clamp_norm_factor=4.0, early_stop_loss=1.5)
    res = optimize_residuals(ad, build_residual_batch(tokenizer, reqs, [], cfg.anchor), 2, cfg)
    stopped = (res.steps < 30).nonzero().flatten().tolist()
    assert stopped and (res.loss[stopped] < 1.5).all()
    # a chunk that stopped early keeps exactly the vector it had when it stopped, while the
    # others went on optimizing in the same batch
    i = stopped[0]
    single = optimize_residuals(ad, build_residual_batch(tokenizer, reqs[i : i + 1], [], cfg.anchor), 2, cfg)
    assert int(single.steps[0]) == int(res.steps[i])
    torch.testing.assert_close(single.z_target[0], res.z_target[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,kwargs", [("memit", {"lam": 1.0}),
                                           ("alphaedit", {"l2": 1.0, "nullspace_threshold": 0.02, "threshold_mode": "relative"})])
def test_edits_take(trained_gpt2, tokenizer, corpus_file, tmp_path, method, kwargs):
    reqs = counterfactual_requests(12)
    ed = Editor(copy.deepcopy(trained_gpt2), tokenizer, layers=[1, 2], method=method, method_kwargs=kwargs,
                residual=FAST_RESIDUAL, stats=_stats(corpus_file, tmp_path), context_prefixes=2)
    before = ed.evaluate(reqs)["edit/efficacy"]
    ed.apply(reqs)
    after = ed.evaluate(reqs)
    assert before <= 0.05  # the model knew the true objects
    assert after["edit/efficacy"] >= 0.95, after


def _corpus_keys(adapter, tokenizer, cfg, layer):
    ks = []
    for ids in packed_blocks(tokenizer, iter_corpus_texts(cfg), cfg.max_length, cfg.batch_size):
        with adapter.trace(key_layers=[layer], stop_after=layer) as rec:
            adapter.forward(ids)
        ks.append(rec["keys"][layer].reshape(-1, rec["keys"][layer].shape[-1]))
    return torch.cat(ks).double()  # (n, d_k)


def test_sequential_alphaedit_preserves_corpus_keys(trained_gpt2, tokenizer, corpus_file, tmp_path):
    """After 12 sequential batches, ||dW K0|| / ||W K0|| on the statistics corpus's keys K0.

    Bound: every update is (P X)^T, so dW = dW P and ||dW K0|| <= ||dW||_2 ||P K0||_F; with the
    energy threshold eps, ||P K0||_F^2 <= eps ||K0||_F^2. Hence
    ratio <= ||dW||_2 sqrt(eps) ||K0||_F / ||W K0||_F, which we compute and assert, together
    with the ratio being tiny and far below MEMIT's on the same stream."""
    stats = _stats(corpus_file, tmp_path)
    layers = [1, 2]
    ratios, eds, sizes = {}, {}, {}
    eps = 1e-4
    for method, kw in [("alphaedit", {"l2": 1.0, "nullspace_threshold": eps, "threshold_mode": "energy"}),
                       ("memit", {"lam": 1.0})]:
        model = copy.deepcopy(trained_gpt2)
        ad = ModelAdapter(model)
        w0 = {l: ad.weight_as_linear(l).detach().double().clone() for l in layers}
        with torch.no_grad():
            k0 = {l: _corpus_keys(ad, tokenizer, stats, l) for l in layers}
        ed = Editor(model, tokenizer, layers=layers, method=method, method_kwargs=kw, residual=FAST_RESIDUAL,
                    stats=stats, context_prefixes=0)
        for b in range(12):
            ed.apply(counterfactual_requests(3, start=b * 3))
        eds[method] = ed
        ratios[method] = {}
        for l in layers:
            dw = ad.weight_as_linear(l).detach().double() - w0[l]
            k0[l] = k0[l].detach()
            w_k0 = (k0[l] @ w0[l].T).norm()
            if method == "alphaedit":
                sizes[l] = float(dw.norm() / w0[l].norm())
            ratios[method][l] = float((k0[l] @ dw.T).norm() / w_k0)
            if method == "alphaedit":
                bound = float(torch.linalg.matrix_norm(dw, ord=2) * eps ** 0.5 * k0[l].norm() / w_k0)
                assert ratios[method][l] <= bound * 1.01, (ratios, bound)
    for l in layers:
        assert ratios["alphaedit"][l] < 0.1, ratios
        assert ratios["alphaedit"][l] < ratios["memit"][l] / 5, ratios
        # and not because nothing changed: the accumulated update is a sizeable change of W
        assert sizes[l] > 0.1, sizes
    # (whether edits also take through so small a null space is a matter of model size: on this
    # 4-layer width-64 toy they mostly do not at eps=1e-4; see test_edits_take and the
    # factworld quickstart for efficacy)


def test_failed_update_leaves_weights_untouched(trained_gpt2, tokenizer):
    model = copy.deepcopy(trained_gpt2)
    ad = ModelAdapter(model)
    reqs = counterfactual_requests(2)
    cfg = ResidualConfig(**dict(FAST_RESIDUAL, steps=2))
    rb = build_residual_batch(tokenizer, reqs, [], cfg.anchor)
    res = optimize_residuals(ad, rb, 2, cfg)
    before = {l: ad.weight_as_linear(l).detach().clone() for l in (1, 2)}
    d_k = ad.dims(1)[1]
    # layer 1 solves fine, layer 2's moment is NaN: the batch must be rolled back whole
    method = MemitMethod(lam=1.0, moments={1: torch.eye(d_k), 2: torch.full((d_k, d_k), float("nan"))})
    with pytest.raises(NonFiniteUpdateError):
        apply_update(ad, rb, res.z_target, [1, 2], method)
    for l in (1, 2):
        assert torch.equal(ad.weight_as_linear(l), before[l])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("anchor", ["subject_last", "prompt_last"])
def test_prefix_cache_and_lower_block_skip_are_the_same_computation(arch, anchor, tokenizer):
    """Running the tokens before each anchor once (key/value cache, left-aligned rows) and only
    the suffix in every step, and computing the blocks up to the z layer once, each and both
    give the same residuals as full forwards, on every architecture, with context prefixes of
    different lengths, KL rows, row micro-batches and rows bucketed by length (a chunk's rows
    then run in different forwards)."""
    model = make_model(arch, vocab_size=len(tokenizer), n_layer=3, width=32)
    ad = ModelAdapter(model)
    reqs = counterfactual_requests(4)
    prefixes = ["The cat sat on the mat today. ", "Because. "]
    batch = build_residual_batch(tokenizer, reqs, prefixes, anchor)
    for rows in (0, 5):
        base = dict(anchor=anchor, steps=6, kl_factor=0.0625, early_stop_loss=0.0, max_rows_per_forward=rows, lr=0.5)
        full = optimize_residuals(ad, batch, 1, ResidualConfig(**base, prefix_cache=False, skip_lower_blocks=False))
        for cache, skip, buckets in ((True, False, 1), (False, True, 1), (True, True, 1), (True, True, 3)):
            fast = optimize_residuals(ad, batch, 1, ResidualConfig(**base, prefix_cache=cache, skip_lower_blocks=skip,
                                                                   length_buckets=buckets))
            assert not torch.equal(fast.z_target, fast.z_init)  # the deltas moved
            torch.testing.assert_close(fast.z_target, full.z_target, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fast.loss, full.loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_head_at_the_read_pairs_is_the_same_computation(arch, tokenizer):
    """The body + head split (the LM head only at the (row, position) pairs a loss reads) gives
    the residuals of the whole model's logits (``logits_to_keep`` columns)."""
    model = make_model(arch, vocab_size=len(tokenizer), n_layer=3, width=32)
    split = ModelAdapter(model)
    assert split.body_and_head() is not None
    whole = ModelAdapter(model)
    whole._body_head = None  # as for a model whose logits are more than its head (soft-capping, ...)
    batch = build_residual_batch(tokenizer, counterfactual_requests(4), ["Because. "], "subject_last")
    cfg = ResidualConfig(anchor="subject_last", steps=5, kl_factor=0.0625, early_stop_loss=0.0, lr=0.5, length_buckets=2)
    a, b = optimize_residuals(split, batch, 1, cfg), optimize_residuals(whole, batch, 1, cfg)
    assert not torch.equal(a.z_target, a.z_init)
    torch.testing.assert_close(a.z_target, b.z_target, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-5, atol=1e-6)
    # eager attention in the steps (the default for short padded rows) and SDPA give the same
    # residuals, padded and packed, and the model's own attention setting is left as it was
    before = model.config._attn_implementation
    for pack, knob in ((False, "eager_attention_mb"), (True, "packed_eager_attention_mb")):
        sdpa = optimize_residuals(split, batch, 1, dataclasses.replace(cfg, pack_rows=pack, **{knob: 0.0}))
        eager = optimize_residuals(split, batch, 1, dataclasses.replace(cfg, pack_rows=pack, **{knob: float("inf")}))
        assert model.config._attn_implementation == before
        torch.testing.assert_close(eager.z_target, sdpa.z_target, rtol=1e-5, atol=1e-5)
        seen = []
        hook = model.get_decoder().register_forward_pre_hook(lambda m, a: seen.append(model.config._attn_implementation))
        optimize_residuals(split, batch, 1, dataclasses.replace(cfg, steps=1, pack_rows=pack))
        hook.remove()
        # the defaults: padded short rows run eager, packed rows SDPA
        assert before != "eager" and ("eager" in seen) == (not pack), (pack, seen)


def test_body_and_head_refuses_a_model_with_scaled_logits(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer), n_layer=2, width=32)
    head = model.get_output_embeddings()
    orig = type(model).forward

    class Scaled(type(model)):  # logits = 2 x head(hidden): the split would be wrong
        def forward(self, *args, **kw):
            out = orig(self, *args, **kw)
            out.logits = out.logits * 2
            return out

    model.__class__ = Scaled
    assert ModelAdapter(model).body_and_head() is None
    assert head is model.get_output_embeddings()


def test_prefix_cache_layout_puts_every_anchor_at_the_split(tokenizer):
    from lightning_edit.engine.forward_plan import layout_rows as _layout

    reqs = counterfactual_requests(3)
    batch = build_residual_batch(tokenizer, reqs, ["The cat sat on the mat today. ", "Because. "], "subject_last")
    split = batch.enc.anchor_pos[:, 0]
    lay = _layout(batch.enc, split)
    assert lay.width == int(split.max())
    for r in range(batch.enc.input_ids.shape[0]):
        L = int(batch.enc.lengths[r])
        real = lay.ids[r][lay.mask[r].bool()]
        assert torch.equal(real, batch.enc.input_ids[r, :L])  # same tokens, in order
        assert int(lay.ids[r, lay.width]) == int(batch.enc.input_ids[r, split[r]])  # anchor token at the split
        assert int(lay.position_ids[r, lay.width]) == int(split[r])  # its original position


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_passes_start_where_the_last_update_ends_and_keys_after_need_no_pass(arch, tokenizer):
    """Each layer's keys pass skips the blocks below the previous edit layer (their output kept
    from that pass): the same keys as a pass from the embeddings. And the keys the ledger stores
    as 'after the update' are what a fresh pass over the edited model reads."""
    from lightning_edit.engine.update import AlphaEditMethod, anchor_keys_and_outputs

    model = make_model(arch, vocab_size=len(tokenizer), n_layer=4, width=32)
    ad = ModelAdapter(model)
    batch = build_residual_batch(tokenizer, counterfactual_requests(5), ["Because. ", "The cat sat. "], "subject_last")
    for rows in (0, 4):  # one forward, and row micro-batches
        kept: dict = {}
        anchor_keys_and_outputs(ad, batch, [1], 3, rows, keep_block=0, kept=kept)
        assert kept["block"] == 0 and len(kept["hidden"]) == (1 if rows == 0 else 4)
        fast, z_fast = anchor_keys_and_outputs(ad, batch, [2], 3, rows, start=kept)
        full, z_full = anchor_keys_and_outputs(ad, batch, [2], 3, rows)
        torch.testing.assert_close(fast[2], full[2], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(z_fast, z_full, rtol=1e-6, atol=1e-6)
    d_k = ad.dims(1)[1]
    res = optimize_residuals(ad, batch, 3, ResidualConfig(**dict(FAST_RESIDUAL, steps=3)))
    method = AlphaEditMethod(l2=1.0, projectors={l: torch.eye(d_k) for l in (1, 2, 3)})
    record: dict = {}
    before = {l: ad.weight_as_linear(l).detach().clone() for l in (1, 2, 3)}
    apply_update(ad, batch, res.z_target, [1, 2, 3], method, record=record)
    fresh, _ = anchor_keys_and_outputs(ad, batch, [1, 2, 3])
    for l in (1, 2, 3):
        assert not torch.equal(ad.weight_as_linear(l), before[l])  # every layer was edited
        torch.testing.assert_close(record[f"keys.{l}"], fresh[l], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(method.prev_kkt[l], fresh[l].T.double().__matmul__(fresh[l].double()).float(), rtol=1e-4, atol=1e-4)


def test_sdpa_backends_option_is_checked_before_any_work():
    from lightning_edit.engine.forward_plan import sdpa_backends as _sdpa_backends

    assert _sdpa_backends("auto") is None
    assert len(_sdpa_backends("efficient, math")) == 2
    with pytest.raises(ValueError, match="sdpa_backends"):
        ResidualConfig(sdpa_backends="fast")
    with pytest.raises(ValueError, match="sdpa_backends"):
        ResidualConfig(sdpa_backends=",")
