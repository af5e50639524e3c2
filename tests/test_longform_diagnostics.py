"""Where free generation leaves an edited answer, and what the keys do after it: the divergence
diagnostic on a tiny model with hand-built answers whose first miss is known."""

import dataclasses

import pytest
import torch
from conftest import make_model

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.longform.chunking import ChunkingConfig, chunk_answer
from lightning_edit.longform.diagnostics import divergence, own_continuation, summarize

PROMPT = "Tell me about Danielle Darrieux."
ANSWER = " Danielle Darrieux plays the violin and lives in Rome. She works for Nokia and speaks German at home."


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = make_model("llama", len(tokenizer), n_layer=3, width=32, seed=3).eval()
    chunks = chunk_answer(tokenizer, PROMPT, ANSWER, ChunkingConfig(mode="window", window=4), end_text="")
    start = chunks.answer_tokens[0]
    n = len(chunks.answer_tokens)
    greedy = own_continuation(model, torch.tensor(chunks.input_ids[:start]), n)
    assert greedy.numel() == start + n  # the toy model's eos never wins here (the case needs the full length)
    return model, chunks, start, n, greedy


def _with_answer(chunks, ids):
    """The same chunk layout (spans, anchors) over other token ids: a hand-built target."""
    return dataclasses.replace(chunks, input_ids=tuple(int(i) for i in ids))


def _keys_by_hook(model, ids, layer, positions):
    """Reference keys: the down projection's input, read by a plain forward hook."""
    got = {}
    def hook(module, args, output):
        got["k"] = args[0].detach()

    h = model.model.layers[layer].mlp.down_proj.register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=ids.unsqueeze(0))
    h.remove()
    return got["k"][0, positions]


def test_no_miss_when_the_target_is_the_models_own_answer(setup):
    model, chunks, start, n, greedy = setup
    d = divergence(ModelAdapter(model), _with_answer(chunks, greedy), [0, 2])
    assert d == {"first_miss": n, "answer_tokens": n}
    assert summarize([d]) == {"divergence_left": 0.0}


def test_first_miss_keys_and_response_on_a_hand_built_answer(setup, tokenizer):
    model, chunks, start, n, greedy = setup
    miss = 5  # the target follows the model for 5 answer tokens, then asks for another token
    ids = greedy.clone()
    other = int(greedy[start + miss]) + 1
    ids[start + miss] = other
    ids[start + miss + 1:] = torch.tensor(chunks.input_ids[start + miss + 1:])  # and then the original text
    hand = _with_answer(chunks, ids)
    layers = [0, 2]
    torch.manual_seed(0)
    deltas = {l: torch.randn(32, 64) for l in layers}
    d = divergence(ModelAdapter(model), hand, layers, deltas, tokenizer)
    pos = start + miss
    assert d["first_miss"] == miss and d["answer_tokens"] == n
    assert d["expected"] == tokenizer.decode([other]) and d["predicted"] == tokenizer.decode([int(greedy[pos])])
    k = next(i for i, (a, b) in enumerate(hand.token_spans) if a <= pos < b)
    assert d["chunk"] == k and d["offset"] == pos - hand.token_spans[k][0]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids[:pos].unsqueeze(0)).logits[0, -1].float(), -1)
    assert d["margin"] == pytest.approx(float(logp[int(greedy[pos])] - logp[other]), abs=1e-4) and d["margin"] > 0
    assert d["target_rank"] == int((logp > logp[other]).sum()) >= 1
    # after the miss the model reads its own greedy tokens: the greedy answer from the start
    assert d["own_tokens"] == n - miss
    later = [a for a in hand.anchors if a >= pos]
    assert d["later_anchors"] == len(later) >= 2
    for l in layers:
        kt, ko = _keys_by_hook(model, ids, l, later), _keys_by_hook(model, greedy, l, later)
        ref = float(((ko - kt).norm(dim=-1) / kt.norm(dim=-1)).mean())
        assert d["key_distance"][l] == pytest.approx(ref, rel=1e-4) and ref > 0.01
        resp = float(((ko @ deltas[l].T).norm(dim=-1) / (kt @ deltas[l].T).norm(dim=-1)).mean())
        assert d["response"][l] == pytest.approx(resp, rel=1e-4)
    s = summarize([d, divergence(ModelAdapter(model), _with_answer(chunks, greedy), layers)])
    assert s["divergence_left"] == 0.5 and s["divergence_margin"] == pytest.approx(d["margin"])
    assert s["divergence_at_chunk_start"] == float(d["offset"] == 0)
    assert s["divergence_key_distance"] == pytest.approx(sum(d["key_distance"].values()) / 2)


def test_a_miss_at_a_chunk_start_is_counted(setup):
    model, chunks, start, n, greedy = setup
    a = chunks.token_spans[2][0]  # chunk 2's first token, predicted from its anchor
    ids = greedy.clone()
    ids[a] = int(greedy[a]) + 1
    d = divergence(ModelAdapter(model), _with_answer(chunks, ids), [1])
    assert d["chunk"] == 2 and d["offset"] == 0 and d["first_miss"] == a - start
    assert summarize([d])["divergence_at_chunk_start"] == 1.0
