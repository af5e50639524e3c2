"""Precision on low-precision models (issue 9, item 4): float32 master copies of the edit layers,
the statistics' compute dtype and corpus encodings."""

import copy

import pytest
import torch
from conftest import FAST_RESIDUAL, counterfactual_requests, make_model

from lightning_edit import Editor
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.stats import StatsConfig, iter_corpus_texts, packed_blocks, second_moments


def test_alphaedit_leak_on_preserved_keys_stays_at_one_rounding_over_20_bf16_batches(trained_gpt2, tokenizer, corpus_file, tmp_path):
    """Bound (derived): with a float32 master W_m = W_0 + sum_i Delta_i and the model holding
    bf16(W_m) = W_m + E, the change on preserved keys K_0 is
        dW K_0^T = (W_m - W_0) K_0^T + E K_0^T.
    For preserved keys with no component in the null space the updates live in (rows of
    K_0 - K_0 P, from the statistics corpus), the first term vanishes up to float32 error
    (each Delta_i = Delta_i P, and P (I - P) = 0). E is ONE rounding: entry (i, j)
    is uniform in +-h_ij, h_ij = half a bf16 ulp of W_m[i, j] (2^(floor(log2|w|) - 8)), so
    E||E K_0^T||_F^2 = sum_ik sum_j h_ij^2 K_kj^2 / 3 =: sigma^2, and with this many independent
    terms the norm concentrates at sigma: we allow 1.5 sigma. Adding each update in bf16 instead
    accumulates 20 roundings (about sqrt(20) sigma) and fails this bound."""
    stats = {"corpus": str(corpus_file), "corpus_name": None, "n_samples": 600, "max_length": 64, "cache_dir": str(tmp_path / "s")}
    model = copy.deepcopy(trained_gpt2).to(torch.bfloat16)
    ed = Editor(model, tokenizer, layers=[1, 2], method="alphaedit", residual=FAST_RESIDUAL, context_prefixes=0, stats=stats,
                method_kwargs={"l2": 1.0, "nullspace_threshold": 0.01, "threshold_mode": "energy"})
    ad = ed.module.adapter
    cfg = StatsConfig(**stats)
    keys = {1: [], 2: []}
    with torch.no_grad():
        for ids in packed_blocks(tokenizer, iter_corpus_texts(cfg), 64, 16):
            with ad.trace(key_layers=[1, 2], stop_after=2) as rec:
                ad.forward(ids, torch.ones_like(ids))
            for l in (1, 2):
                keys[l].append(rec["keys"][l].reshape(-1, rec["keys"][l].shape[-1]).float())
    ed.prepare()
    assert set(ed.stream.master) == {1, 2} and all(m.dtype == torch.float32 for m in ed.stream.master.values())
    w0 = {l: ad.weight_as_linear(l).detach().float().clone() for l in (1, 2)}
    reqs = counterfactual_requests(40)
    for b in range(20):
        ed.apply(reqs[2 * b: 2 * b + 2])
    for l in (1, 2):
        p = ed.callback.method.projectors[l].float()
        k0 = torch.cat(keys[l])
        k0 = k0 - k0 @ p  # preserved keys: no component in the null space the updates live in
        w = ad.weight_as_linear(l).detach().float()
        wm = ed.stream.master[l]
        assert torch.equal(w, wm.to(torch.bfloat16).float())  # the model holds the master's rounding
        scale = float((w0[l] @ k0.T).norm())
        master_leak = float(((wm - w0[l]) @ k0.T).norm())
        assert master_leak <= 1e-4 * scale, (l, master_leak, scale)
        h = torch.where(wm == 0, torch.zeros_like(wm), 2.0 ** (torch.floor(torch.log2(wm.abs().clamp_min(1e-30))) - 8))
        sigma = float(((h ** 2) @ (k0 ** 2).T).sum().div(3).sqrt())
        leak = float(((w - w0[l]) @ k0.T).norm())
        assert leak <= master_leak + 1.5 * sigma, (l, leak, master_leak, sigma)
        assert float((wm - w0[l]).norm()) > 0.05 * float(w0[l].norm())  # the edits did move the weights


def test_float32_model_has_no_master_copy(trained_gpt2, tokenizer, corpus_file, tmp_path):
    from lightning_edit.engine.update import master_copies

    assert master_copies(ModelAdapter(trained_gpt2), [1, 2]) == {}
    half = copy.deepcopy(trained_gpt2).to(torch.float16)
    m = master_copies(ModelAdapter(half), [1])
    assert m[1].dtype == torch.float32 and torch.equal(m[1], ModelAdapter(half).weight_as_linear(1).float())


def _cfg(corpus, tmp_path, **kw):
    return StatsConfig(**{**dict(corpus=str(corpus), corpus_name=None, n_samples=200, max_length=32, batch_size=4,
                                 cache_dir=str(tmp_path / "stats"), save_every=0), **kw})


def _manual(adapter, tokenizer, cfg, layer, dtype):
    s, n = 0, 0
    for ids in packed_blocks(tokenizer, iter_corpus_texts(cfg), cfg.max_length, cfg.batch_size):
        out = {}
        h = adapter.down_proj(layer).register_forward_pre_hook(lambda m, a: out.setdefault("k", a[0]))
        with torch.no_grad():
            adapter.model(ids)
        h.remove()
        k = out["k"].reshape(-1, out["k"].shape[-1]).to(dtype)
        s, n = s + (k.T @ k).double(), n + k.shape[0]
    return s / n


def test_stats_dtype_is_the_compute_dtype(tokenizer, corpus_file, tmp_path):
    ad = ModelAdapter(make_model("gpt2", len(tokenizer), n_layer=2, width=32))
    m32 = second_moments(ad, tokenizer, [1], _cfg(corpus_file, tmp_path, dtype="float32"), show_progress=False)[1]
    m64 = second_moments(ad, tokenizer, [1], _cfg(corpus_file, tmp_path, dtype="float64"), show_progress=False)[1]
    ref64 = _manual(ad, tokenizer, _cfg(corpus_file, tmp_path), 1, torch.float64)
    ref32 = _manual(ad, tokenizer, _cfg(corpus_file, tmp_path), 1, torch.float32)
    assert not torch.equal(m32, m64)
    assert float((m64 - ref64).abs().max()) < float((m32 - ref64).abs().max())
    torch.testing.assert_close(m32, ref32, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stats.dtype"):
        second_moments(ad, tokenizer, [1], _cfg(corpus_file, tmp_path, dtype="bfloat16"), show_progress=False)


def test_per_text_encoding_is_one_text_per_row_from_bos(tokenizer, corpus_file, tmp_path):
    ad = ModelAdapter(make_model("gpt2", len(tokenizer), n_layer=2, width=32))
    cfg = _cfg(corpus_file, tmp_path, encoding="per_text", n_samples=30, max_length=8)
    got = second_moments(ad, tokenizer, [0], cfg, show_progress=False)[0]
    s, n = 0, 0
    for text in list(iter_corpus_texts(cfg)):
        ids = tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"][:, :8]
        out = {}
        h = ad.down_proj(0).register_forward_pre_hook(lambda m, a: out.setdefault("k", a[0]))
        with torch.no_grad():
            ad.model(ids)
        h.remove()
        k = out["k"][0].float()
        s, n = s + (k.T @ k).double(), n + k.shape[0]
    torch.testing.assert_close(got, s / n, rtol=1e-5, atol=1e-6)
    packed = second_moments(ad, tokenizer, [0], _cfg(corpus_file, tmp_path, n_samples=30, max_length=8), show_progress=False)[0]
    assert not torch.allclose(got, packed)  # another encoding, another cache entry
    with pytest.raises(ValueError, match="encoding"):
        second_moments(ad, tokenizer, [0], _cfg(corpus_file, tmp_path, encoding="nope"), show_progress=False)
