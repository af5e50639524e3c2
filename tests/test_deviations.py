"""Deviation rows: slipped copies of a long-form answer (one target token per chunk replaced by
the model's most likely other token) whose anchors' keys the update also writes the chunk
residuals at."""

import copy

import torch
from conftest import make_model

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.deviations import deviation_keys, make_deviations
from lightning_edit.engine.residuals import ResidualConfig, build_chunked_batch, optimize_residuals
from lightning_edit.engine.update import MemitMethod, anchor_keys_and_outputs, apply_update, spread_residual

PROMPTS = ["Tell me about Danielle Darrieux.", "Tell me about Toko Yasuda."]
ANSWERS = [" Danielle Darrieux plays the violin and lives in Rome. She works for Nokia.",
           " Toko Yasuda speaks German and was born in Madrid."]


def _batch(tokenizer, size=4):
    items = []
    for p, a in zip(PROMPTS, ANSWERS):
        text = p + a
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        toks = [(s, e) for s, e in enc["offset_mapping"] if e > len(p)]
        spans = [(max(len(p), toks[i][0]), toks[min(i + size, len(toks)) - 1][1]) for i in range(0, len(toks), size)]
        items.append((text, spans))
    return build_chunked_batch(tokenizer, items)


def test_each_copy_slips_once_per_chunk_to_the_models_other_choice(tokenizer):
    model = make_model("llama", len(tokenizer), n_layer=3, width=32, seed=1).eval()
    batch = _batch(tokenizer)
    dev = make_deviations(ModelAdapter(model), batch, copies=2, seed=5)
    rows = batch.bare_row_of_chunk.unique()
    base = batch.enc.input_ids[rows]
    assert dev.input_ids.shape == (2 * len(rows), base.shape[1])
    with torch.no_grad():
        logits = model(input_ids=base, attention_mask=batch.enc.attention_mask[rows]).logits
    t_rows, t_pos, t_chunk = batch.target_chunks()
    a_rows, a_pos, a_chunk = batch.anchors()
    for j in range(2):
        for i, r in enumerate(rows.tolist()):
            new, sw = dev.input_ids[j * len(rows) + i], dev.swapped[j * len(rows) + i]
            assert torch.equal(new != base[i], sw)  # the model's other choice is never the target itself
            chunks = sorted(a_chunk[a_rows == r].tolist())
            for c in chunks:
                in_chunk = sw[t_pos[(t_rows == r) & (t_chunk == c)]]
                assert int(in_chunk.sum()) == (1 if c != chunks[-1] else 0), (j, i, c)
            for p in sw.nonzero().flatten().tolist():
                lp = logits[i, p - 1].clone()
                lp[base[i, p]] = float("-inf")
                assert int(new[p]) == int(lp.argmax())
    # reads: every anchor after the first of each answer, once per copy, with its own chunk
    later = [(int(r), int(p), int(c)) for r, p, c in zip(a_rows, a_pos, a_chunk) if int(batch.chunk_order[c]) > 0]
    assert len(dev) == 2 * len(later)
    got = sorted((int(dev.read_pos[m]), int(dev.read_chunk[m])) for m in range(len(dev)))
    assert got == sorted([(p, c) for _, p, c in later] * 2)
    # another seed slips elsewhere; the same seed is the same
    assert torch.equal(make_deviations(ModelAdapter(model), batch, 2, seed=5).input_ids, dev.input_ids)
    assert not torch.equal(make_deviations(ModelAdapter(model), batch, 2, seed=6).input_ids, dev.input_ids)
    assert make_deviations(ModelAdapter(model), batch, 0) is None


def test_deviation_rows_make_the_write_fire_after_a_slip(tokenizer, trained_gpt2):
    batch = _batch(tokenizer)
    layers = [1, 2]
    res = optimize_residuals(ModelAdapter(copy.deepcopy(trained_gpt2)), batch, layers[-1],
                             ResidualConfig(steps=15, lr=0.5, kl_factor=0.0, clamp_norm_factor=4.0))
    moments = {l: torch.eye(ModelAdapter(trained_gpt2).dims(l)[1]) for l in layers}
    dev = make_deviations(ModelAdapter(trained_gpt2), batch, copies=2, seed=0)

    def edited(**kw):
        model = copy.deepcopy(trained_gpt2)
        ad = ModelAdapter(model)
        apply_update(ad, batch, res.z_target, layers, MemitMethod(lam=0.5, moments=moments), context=True, **kw)
        return ad

    today, passed_off, on = edited(), edited(deviations=dev), edited(deviations=dev, deviation_rows=True)
    for l in layers:  # deviations passed without the flag: today's path bit for bit
        assert torch.equal(passed_off.weight_as_linear(l), today.weight_as_linear(l))
    # the first edit layer: its keys do not depend on its own update; its share of the residual
    l = layers[0]
    base = ModelAdapter(trained_gpt2)
    kd = deviation_keys(base, dev, l)
    _, z_cur = anchor_keys_and_outputs(base, batch, [l], layers[-1])
    want = spread_residual(res.z_target, z_cur, len(layers))[dev.read_chunk]
    w0 = base.weight_as_linear(l).detach()

    def miss(ad):
        return float(((ad.weight_as_linear(l).detach() - w0) @ kd.T).T.sub(want).norm() / want.norm())

    assert miss(on) < 0.8 * miss(today), (miss(on), miss(today))
