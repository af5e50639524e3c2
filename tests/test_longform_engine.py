"""The long-form (AnyEdit) side of the engine: several chunks per row, each with its own anchor
and residual vector, optimized jointly or autoregressively, and one closed-form update."""

import copy

import pytest
import torch
from conftest import counterfactual_requests, make_model

from lightning_edit.data.requests import target_text
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.residuals import (
    MultiAnchorError,
    ResidualBatch,
    ResidualConfig,
    build_chunked_batch,
    build_residual_batch,
    optimize_residuals,
)
from lightning_edit.engine.tokens import Segment, encode_segments
from lightning_edit.engine.update import MemitMethod, apply_update
from lightning_edit.evaluation.scoring import greedy_generate

PREFIXES = ["The cat sat on the mat. ", "Because. "]


def _window_spans(tokenizer, text: str, start: int, size: int):
    """Character spans of consecutive ``size``-token windows of ``text[start:]`` (one tokenization)."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    toks = [(s, e) for s, e in enc["offset_mapping"] if e > start]
    spans = []
    for i in range(0, len(toks), size):
        w = toks[i : i + size]
        spans.append((max(start, w[0][0]), w[-1][1]))
    return spans


def _items(tokenizer, n=2, size=3):
    prompts = ["Tell me about Danielle Darrieux.", "Tell me about Toko Yasuda."]
    answers = [" Danielle Darrieux plays the violin and lives in Rome. She works for Nokia.",
               " Toko Yasuda speaks German and was born in Madrid. The profession of Toko Yasuda is pilot."]
    out = []
    for p, a in list(zip(prompts, answers))[:n]:
        text = p + a
        out.append((text, _window_spans(tokenizer, text, len(p), size)))
    return out


def test_anchors_are_the_token_before_each_chunk(tokenizer):
    items = _items(tokenizer)
    batch = build_chunked_batch(tokenizer, items, PREFIXES)
    for r in range(batch.enc.input_ids.shape[0]):
        req = int(batch.chunk_request[batch.row_chunk[r]])
        text, spans = items[req]
        pre = [""] + PREFIXES
        prefix = pre[r % len(pre)]
        # slow reference: tokenize the row's whole text once; the anchor of chunk k is the token
        # that ends right where chunk k's first token starts
        enc = tokenizer(prefix + text, return_offsets_mapping=True, add_special_tokens=True)
        offs = enc["offset_mapping"]
        for k, (s, e) in enumerate(spans):
            first = next(t for t, (a, b) in enumerate(offs) if b > len(prefix) + s and b > a)
            assert int(batch.enc.anchor_pos[r, k]) == first - 1
            assert int(batch.anchor_chunk[r, k]) == int(batch.row_chunk[r]) + k
            toks = batch.enc.target_tokens[r][k]
            assert int(toks[0]) == first


def test_several_anchors_without_a_chunk_map_is_an_error(tokenizer):
    enc = encode_segments(tokenizer, [Segment("a b c d e f", [(2, 5), (6, 11)], [None, None])])
    with pytest.raises(MultiAnchorError, match="row 0 has 2 anchors"):
        ResidualBatch(enc, torch.tensor([0]), torch.tensor([False]), 1, 1)


@pytest.mark.parametrize("mode", ["joint", "autoregressive"])
def test_one_chunk_is_fact_editing_bit_for_bit(tokenizer, trained_gpt2, mode):
    reqs = counterfactual_requests(4)
    fact = build_residual_batch(tokenizer, reqs, PREFIXES, "prompt_last", kl=False)
    items = []
    for r in reqs:
        prompt = r.rendered_prompt
        text = prompt + target_text(prompt, r.target_new)
        items.append((text, [(len(prompt), len(text))]))
    chunked = build_chunked_batch(tokenizer, items, PREFIXES)
    assert torch.equal(fact.enc.input_ids, chunked.enc.input_ids)
    cfg = ResidualConfig(anchor="prompt_last", steps=5, kl_factor=0.0, early_stop_loss=0.0, clamp_norm_factor=4.0, mode=mode)
    ad = ModelAdapter(trained_gpt2)
    a = optimize_residuals(ad, fact, 2, cfg)
    b = optimize_residuals(ad, chunked, 2, cfg)
    assert torch.equal(a.z_target, b.z_target) and torch.equal(a.loss, b.loss)
    m1, m2 = copy.deepcopy(trained_gpt2), copy.deepcopy(trained_gpt2)
    moments = {l: torch.eye(ad.dims(l)[1]) for l in (1, 2)}
    apply_update(ModelAdapter(m1), fact, a.z_target, [1, 2], MemitMethod(lam=1.0, moments=moments))
    apply_update(ModelAdapter(m2), chunked, b.z_target, [1, 2], MemitMethod(lam=1.0, moments=moments))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def _slow_autoregressive(adapter, tokenizer, text, spans, prefixes, z_layer, cfg):
    """One request, one chunk at a time, full forwards, the earlier chunks' deltas fixed at
    their anchors: AnyEdit's reference loop written out plainly."""
    model = adapter.model
    rows = []
    for pre in [""] + list(prefixes):
        enc = tokenizer(pre + text, return_offsets_mapping=True, add_special_tokens=True)
        offs, ids = enc["offset_mapping"], enc["input_ids"]
        chunk_toks = [[t for t, (a, b) in enumerate(offs) if b > a and len(pre) + s < b <= len(pre) + e] for s, e in spans]
        rows.append((torch.tensor([ids]), [c[0] - 1 for c in chunk_toks], chunk_toks))
    with torch.no_grad(), adapter.trace(output_layers=[z_layer], stop_after=z_layer) as rec:
        adapter.forward(rows[0][0])
    z0 = [rec["outputs"][z_layer][0, a].float() for a in rows[0][1]]
    deltas = []
    for k in range(len(spans)):
        delta = torch.zeros_like(z0[k], requires_grad=True)
        opt = torch.optim.Adam([delta], lr=cfg.lr)
        for step in range(cfg.steps + 1):
            opt.zero_grad()
            nll = 0.0
            for ids, anchors, chunk_toks in rows:
                pos = torch.tensor(anchors[: k + 1])
                vecs = torch.stack(deltas + [delta])
                with adapter.add_at_positions(z_layer, torch.zeros(k + 1, dtype=torch.long), pos, vecs):
                    logits = model(input_ids=ids, use_cache=False).logits[0]
                t = torch.tensor(chunk_toks[k])
                lp = logits[t - 1].log_softmax(-1).gather(-1, ids[0, t].unsqueeze(-1))
                nll = nll - lp.mean() / len(rows)
            loss = nll + cfg.weight_decay * delta.norm() / z0[k].norm() ** 2
            if step == cfg.steps:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                mx = cfg.clamp_norm_factor * z0[k].norm()
                if delta.norm() > mx:
                    delta.mul_(mx / delta.norm())
        deltas.append(delta.detach())
    return torch.stack([z + d for z, d in zip(z0, deltas)])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_autoregressive_equals_a_slow_loop_and_joint_differs(tokenizer, arch):
    model = make_model(arch, vocab_size=len(tokenizer), n_layer=3, width=32)
    ad = ModelAdapter(model)
    items = _items(tokenizer)
    batch = build_chunked_batch(tokenizer, items, PREFIXES[:1])
    assert int(batch.chunk_order.max()) >= 2
    cfg = ResidualConfig(steps=6, lr=0.5, kl_factor=0.0, early_stop_loss=0.0, clamp_norm_factor=4.0, mode="autoregressive")
    fast = optimize_residuals(ad, batch, 1, cfg)
    slow = torch.cat([_slow_autoregressive(ad, tokenizer, t, s, PREFIXES[:1], 1, cfg) for t, s in items])
    torch.testing.assert_close(fast.z_target, slow, rtol=1e-4, atol=1e-4)
    # the full-forward path computes the same
    plain = optimize_residuals(ad, batch, 1, ResidualConfig(**{**cfg.__dict__, "prefix_cache": False, "skip_lower_blocks": False}))
    torch.testing.assert_close(plain.z_target, slow, rtol=1e-4, atol=1e-4)
    joint = optimize_residuals(ad, batch, 1, ResidualConfig(**{**cfg.__dict__, "mode": "joint"}))
    # joint mode is another optimization: every delta also answers for the later chunks' losses
    assert not torch.allclose(joint.z_target, fast.z_target, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", ["joint", "autoregressive"])
def test_a_multi_chunk_answer_is_reproduced_after_the_edit(tokenizer, trained_gpt2, mode):
    """Four 2-token chunks, each with its own residual vector, written by one closed-form
    update: greedy generation then reproduces the whole new answer, and only with the
    zero-residual rows of the other positions (without them the update moves the states between
    the anchors and the answer is lost).

    Each chunk is a new object (one the model gives ~0 probability there) plus ".", which the toy
    model always predicts after an object: the test is about the update, not about whether a
    4-layer toy can continue a bigram it never saw. (An earlier answer, " Rome. Toko Yasuda
    plays the piano.", depended on that: the attainable loss of its " Toko Yasuda" chunk ranged
    from 0.1 to 3.9 nats over tiny models that differ only in training seed or CPU kernels,
    AVX-512 vs AVX2; this answer reaches < 0.02 and is reproduced on all of them.)"""
    model = copy.deepcopy(trained_gpt2)
    ad = ModelAdapter(model)
    prompt = "Danielle Darrieux lives in"
    answer = " Rome. Paris. London. Tokyo."
    text = prompt + answer
    spans = _window_spans(tokenizer, text, len(prompt), 2)
    assert len(spans) == 4
    before = greedy_generate(model, tokenizer, [prompt], max_new_tokens=12)[0]
    assert not before.startswith(answer)
    batch = build_chunked_batch(tokenizer, [(text, spans)], [])
    cfg = ResidualConfig(steps=40, lr=0.5, kl_factor=0.0, early_stop_loss=0.01, clamp_norm_factor=4.0, mode=mode)
    layers = [1, 2]
    res = optimize_residuals(ad, batch, layers[-1], cfg)
    assert float(res.nll.max()) < 0.05  # every chunk's vector produces its chunk (converges to ~0.01)
    moments = {l: torch.eye(ad.dims(l)[1]) for l in layers}
    without = copy.deepcopy(model)
    apply_update(ad, batch, res.z_target, layers, MemitMethod(lam=0.01, moments=moments), context=True)
    after = greedy_generate(model, tokenizer, [prompt], max_new_tokens=12)[0]
    assert after.startswith(answer), (before, after)
    apply_update(ModelAdapter(without), batch, res.z_target, layers, MemitMethod(lam=0.01, moments=moments), context=False)
    lost = greedy_generate(without, tokenizer, [prompt], max_new_tokens=12)[0]
    assert not lost.startswith(answer), lost


def test_context_weight_scales_the_zero_residual_rows(tokenizer, trained_gpt2, monkeypatch):
    """``context_weight`` w weighs the zero-residual rows in the least squares: bit-equal to the
    update solved with those keys scaled by sqrt(w) (w = 4: x2, exact in floating point), and
    w = 1 is today's path bit for bit; a larger weight moves the text's other states less."""
    import lightning_edit.engine.update as upd

    prompt, answer = "Danielle Darrieux lives in", " Rome. Paris. London. Tokyo."
    text = prompt + answer
    batch = build_chunked_batch(tokenizer, [(text, _window_spans(tokenizer, text, len(prompt), 2))], [])
    layers = [1, 2]
    cfg = ResidualConfig(steps=10, lr=0.5, kl_factor=0.0, clamp_norm_factor=4.0)
    res = optimize_residuals(ModelAdapter(copy.deepcopy(trained_gpt2)), batch, layers[-1], cfg)
    moments = {l: torch.eye(ModelAdapter(trained_gpt2).dims(l)[1]) for l in layers}

    def edited(weight=None, scale=None):
        model = copy.deepcopy(trained_gpt2)
        ad = ModelAdapter(model)
        with monkeypatch.context() as m:
            if scale is not None:
                orig = upd.context_keys
                m.setattr(upd, "context_keys", lambda a, b, l: orig(a, b, l) * scale)
            kw = {} if weight is None else {"context_weight": weight}
            apply_update(ad, batch, res.z_target, layers, MemitMethod(lam=0.5, moments=moments), context=True, **kw)
        return ad, {l: ad.weight_as_linear(l).clone() for l in layers}

    _, today = edited()
    _, one = edited(1.0)
    _, four = edited(4.0)
    _, scaled = edited(scale=2.0)
    for l in layers:
        assert torch.equal(one[l], today[l]) and torch.equal(four[l], scaled[l])
        assert not torch.equal(four[l], today[l])
    base = ModelAdapter(trained_gpt2)
    kc = upd.context_keys(base, batch, layers[0])  # the first layer's context keys do not depend on its own update
    w0 = base.weight_as_linear(layers[0]).detach()
    moved = {w: float(((four if w == 4.0 else today)[layers[0]] - w0).matmul(kc.T).norm()) for w in (1.0, 4.0)}
    assert moved[4.0] < moved[1.0]
