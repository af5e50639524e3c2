"""Key statistics: correct sums, cache reuse and invalidation, resumable partial sums."""

import copy
import json

import pytest
import torch
from conftest import make_model

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.stats import StatsCache, StatsConfig, iter_corpus_texts, packed_blocks, projectors, second_moments


def _cfg(corpus, tmp_path, **kw):
    base = dict(corpus=str(corpus), corpus_name=None, n_samples=300, max_length=32, batch_size=4,
                cache_dir=str(tmp_path / "stats"), save_every=0)
    base.update(kw)
    return StatsConfig(**base)


def _manual_moment(adapter, tokenizer, cfg, layer):
    s, n = 0, 0
    for ids in packed_blocks(tokenizer, iter_corpus_texts(cfg), cfg.max_length, cfg.batch_size):
        with torch.no_grad():
            out = {}
            h = adapter.down_proj(layer).register_forward_pre_hook(lambda m, a: out.setdefault("k", a[0]))
            adapter.model(ids)  # full forward, no early stop
            h.remove()
        k = out["k"].reshape(-1, out["k"].shape[-1]).double()
        s, n = s + k.T @ k, n + k.shape[0]
    return s / n


def test_moment_matches_manual_and_cache_is_reused(tokenizer, corpus_file, tmp_path, monkeypatch):
    model = make_model("gpt2", len(tokenizer), n_layer=3, width=32)
    ad = ModelAdapter(model)
    cfg = _cfg(corpus_file, tmp_path)
    got = second_moments(ad, tokenizer, [0, 1], cfg, show_progress=False)
    for l in (0, 1):
        torch.testing.assert_close(got[l].double(), _manual_moment(ad, tokenizer, cfg, l), rtol=1e-5, atol=1e-7)
    # second call: from the cache, no forward pass at all
    import lightning_edit.engine.stats as st

    monkeypatch.setattr(st, "accumulate_moments", lambda *a, **k: pytest.fail("recomputed a cached moment"))
    again = second_moments(ad, tokenizer, [0, 1], cfg, show_progress=False)
    for l in (0, 1):
        assert torch.equal(again[l], got[l])


def test_cache_misses_when_model_layer_or_corpus_differ(tokenizer, corpus_file, tmp_path):
    model = make_model("gpt2", len(tokenizer), n_layer=3, width=32)
    ad = ModelAdapter(model)
    cfg = _cfg(corpus_file, tmp_path)
    cache = StatsCache(cfg)
    k0 = cache.key(ad, 0)
    assert cache.key(ad, 0) == k0
    assert cache.key(ad, 1)["model"] != k0["model"]  # another layer sees other weights
    # a change in a block *after* the layer does not matter; one before it does
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.transformer.h[2].mlp.c_fc.weight.add_(1.0)
    assert cache.key(ModelAdapter(other), 0)["model"] == k0["model"]
    with torch.no_grad():
        other.transformer.h[0].attn.c_attn.weight.mul_(1.01)
    assert cache.key(ModelAdapter(other), 0)["model"] != k0["model"]
    # another corpus (same name, other content), sample count or dtype: other key
    other_corpus = tmp_path / "c2.jsonl"
    other_corpus.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(50)))
    assert StatsCache(_cfg(other_corpus, tmp_path)).key(ad, 0)["corpus"] != k0["corpus"]
    assert StatsCache(_cfg(corpus_file, tmp_path, n_samples=10)).key(ad, 0) != k0
    assert StatsCache(_cfg(corpus_file, tmp_path, dtype="bfloat16")).key(ad, 0) != k0
    # a file stored under the right name but with mismatching metadata is never reused
    second_moments(ad, tokenizer, [0], cfg, show_progress=False)
    key = cache.key(ad, 0)
    path = cache.path(key)
    forged = dict(key, corpus="something-else")
    cache.save(forged, {"sum": torch.zeros(2, 2), "count": torch.ones(1)})
    cache.path(forged).replace(path)
    assert cache.load(key) is None


def test_interrupted_pass_resumes_from_partial_sum(tokenizer, corpus_file, tmp_path, monkeypatch):
    model = make_model("gpt2", len(tokenizer), n_layer=3, width=32)
    ad = ModelAdapter(model)
    full = second_moments(ad, tokenizer, [1], _cfg(corpus_file, tmp_path / "a"), show_progress=False)[1]
    cfg = _cfg(corpus_file, tmp_path / "b", save_every=2)
    import lightning_edit.engine.stats as st

    real = st.accumulate_moments

    def crash_after_5(adapter, blocks, layers, init=None, on_batch=None, progress=None, **kw):
        def limited():
            for i, b in enumerate(blocks):
                if i == 5:
                    raise RuntimeError("killed")
                yield b
        return real(adapter, limited(), layers, init=init, on_batch=on_batch, progress=progress, **kw)

    monkeypatch.setattr(st, "accumulate_moments", crash_after_5)
    with pytest.raises(RuntimeError, match="killed"):
        second_moments(ad, tokenizer, [1], cfg, show_progress=False)
    monkeypatch.setattr(st, "accumulate_moments", real)
    partial = list((tmp_path / "b" / "stats").glob("*.partial.*"))
    assert len(partial) == 1
    resumed = second_moments(ad, tokenizer, [1], cfg, show_progress=False)[1]
    torch.testing.assert_close(resumed, full, rtol=1e-6, atol=1e-9)
    assert not list((tmp_path / "b" / "stats").glob("*.partial.*"))


def test_projector_cache(tokenizer, corpus_file, tmp_path):
    model = make_model("gpt2", len(tokenizer), n_layer=2, width=32)
    ad = ModelAdapter(model)
    cfg = _cfg(corpus_file, tmp_path)
    m = second_moments(ad, tokenizer, [1], cfg, show_progress=False)
    p1, i1 = projectors(ad, m, cfg, 0.02, "relative")
    p2, i2 = projectors(ad, m, cfg, 0.02, "relative")
    assert torch.equal(p1[1], p2[1]) and i1[1]["rank"] == i2[1]["rank"]
    p3, i3 = projectors(ad, m, cfg, 0.2, "relative")
    assert i3[1]["rank"] > i1[1]["rank"]


def test_fingerprint_of_tensors_above_2_pow_24_elements():
    """SmolLM2's embedding (49,152 x 576 = 28,311,552 entries): a float32 linspace index rounded
    past the end (IndexError); the sample must also reach the first and the last entry."""
    from lightning_edit.engine.stats import tensor_fingerprint

    t = torch.zeros(49152 * 576, dtype=torch.int8)
    base = tensor_fingerprint(t)
    for pos in (0, t.numel() - 1):
        u = t.clone()
        u[pos] = 1
        assert tensor_fingerprint(u) != base, pos
    assert tensor_fingerprint(t.clone()) == base


def test_packer_separates_documents_not_turns():
    """An instruct tokenizer's EOS is its end-of-turn token: texts are packed with the document
    separator (here ``<|endoftext|>``), never with a token of the chat template."""
    from conftest import make_tokenizer

    from lightning_edit.engine.stats import document_separator_ids

    tok = make_tokenizer()
    doc = tok.convert_tokens_to_ids("<|endoftext|>")
    assert document_separator_ids(tok) == [doc]  # a base model: EOS is the separator
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    turn = tok.convert_tokens_to_ids("<|im_end|>")
    texts = ["Paris is a city.", "Rome is a city too."]
    blocks = list(packed_blocks(tok, iter(texts), max_length=1000, batch_size=1))
    ids = torch.cat([b.reshape(-1) for b in blocks]).tolist()
    assert turn not in ids
    first = tok(texts[0])["input_ids"]
    assert ids[: len(first) + 1] == first + [doc]
    assert ids.count(doc) == 2


def test_cache_entries_record_their_corpus(tokenizer, tmp_path, monkeypatch):
    """Each cached moment says which corpus it came from: the config's spec and, for a built
    corpus, its manifest (kind, exclusions, texts)."""
    from safetensors import safe_open

    model = make_model("gpt2", len(tokenizer), n_layer=2, width=32)
    cfg = StatsConfig(corpus="corpus:pydoc", n_samples=20, max_length=32, batch_size=4, cache_dir=str(tmp_path / "stats"),
                      save_every=0)
    monkeypatch.setenv("LIGHTNING_EDIT_CORPORA", str(tmp_path / "corpora"))
    second_moments(ModelAdapter(model), tokenizer, [1], cfg, show_progress=False)
    (entry,) = (tmp_path / "stats").glob("*.moment.*.safetensors")
    with safe_open(str(entry), "pt") as f:
        meta = f.metadata()
    assert meta["corpus_spec"] == "corpus:pydoc" and int(meta["tokens"]) > 0
    manifest = json.loads(meta["corpus_manifest"])
    assert manifest["settings"]["kind"] == "pydoc" and manifest["texts"] > 20
