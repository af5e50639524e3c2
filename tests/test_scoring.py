"""Batched scoring / generation / evaluation against slow per-pair references on tiny models
(GPT-2 with a byte-level BPE; Llama with a SentencePiece-style BPE that adds a BOS)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lightning_edit.data.requests import EditRequest, target_text
from lightning_edit.evaluation.evaluate import (
    COUNTERFACT_KEYS,
    ZSRE_KEYS,
    evaluate_generation,
    evaluate_requests,
    locality_probes,
    make_edit_metrics,
    update_edit_metrics,
)
from lightning_edit.evaluation.metrics import Perplexity, Retention
from lightning_edit.evaluation.scoring import greedy_generate, target_scores, text_token_nll, top1_tokens

SENTENCES = [
    "The mother tongue of Danielle Darrieux is French.",
    "The mother tongue of Danielle Darrieux is English.",
    "Toko Yasuda plays the guitar and the piano.",
    "What university did Watts Humphrey attend? Illinois Institute of Technology",
    "nq question: who played desmond doss father in hacksaw ridge: Hugo Weaving",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Autonomous University of Madrid is located in Spain, not in Sweden.",
] * 3

PAIRS = [
    ("The mother tongue of Danielle Darrieux is", "English"),
    ("The mother tongue of Danielle Darrieux is", "French"),
    ("Paris is the capital of", " France"),
    ("Rome is the capital of ", "Italy"),  # prompt ends in a space: none added
    ("What university did Watts Humphrey attend?", "Illinois Institute of Technology"),
    ("Toko Yasuda plays the", "guitar"),
    ("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving"),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread (no OpenMP sync on a busy CPU); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gpt2():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg), tokenizer  # dropout 0.1 in train mode: scoring must switch it off


def _llama():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(SENTENCES, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg), tokenizer


def _fit(model, tok, steps=20):
    """A few steps on SENTENCES, so that some target tokens are predicted right and the
    accuracy / comparison checks are not all trivially 0."""
    ids = tok(SENTENCES[:7])["input_ids"]
    batch = torch.full((len(ids), max(map(len, ids))), tok.eos_token_id)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(ids):
        batch[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    labels = batch.masked_fill(mask == 0, -100)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=batch, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_tok(request):
    model, tok = _gpt2() if request.param == "gpt2" else _llama()
    return _fit(model, tok), tok


def slow_pair(model, tok, prompt, target):
    """Independent reference: one sequence, target tokens = those ending after the prompt."""
    text = prompt + target_text(prompt, target)
    enc = tok(text, return_offsets_mapping=True)
    ids = enc["input_ids"]
    tpos = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if e > s and e > len(prompt)]
    assert tpos and tpos[0] > 0
    model.eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    token_lp = torch.stack([lp[t - 1, ids[t]] for t in tpos])
    pred = torch.stack([lp[t - 1].argmax() for t in tpos])
    return -token_lp.mean().item(), pred, torch.tensor([ids[t] for t in tpos])


def test_target_scores_match_slow_reference(model_tok):
    model, tok = model_tok
    model.train()
    prompts, targets = zip(*PAIRS)
    scores = target_scores(model, tok, prompts, targets, batch_size=3)
    assert model.training  # mode restored
    assert scores.nll.shape == (len(PAIRS),) and scores.all_correct.dtype == torch.bool
    hits = torch.cat(scores.token_correct)
    assert hits.any() and not hits.all()  # the fitted model makes the accuracy checks non-trivial
    for i, (p, t) in enumerate(PAIRS):
        nll, pred, ids = slow_pair(model, tok, p, t)
        assert scores.nll[i].item() == pytest.approx(nll, abs=1e-5)
        assert torch.equal(scores.target_ids[i], ids)
        assert torch.equal(scores.pred_tokens[i], pred)
        assert torch.equal(scores.token_correct[i], pred == ids)
        assert bool(scores.all_correct[i]) == bool((pred == ids).all())
    model.eval()
    fp = top1_tokens(model, tok, prompts, targets, batch_size=4)
    assert fp.shape == (len(PAIRS), max(len(x) for x in scores.pred_tokens))
    assert torch.equal(fp[0, : len(scores.pred_tokens[0])], scores.pred_tokens[0])
    r = Retention()
    r.update(fp, top1_tokens(model, tok, prompts, targets, batch_size=64))
    assert r.compute().item() == 1.0


def test_text_token_nll_and_perplexity(model_tok):
    model, tok = model_tok
    model.eval()
    texts = SENTENCES[:4]
    nlls = text_token_nll(model, tok, texts, batch_size=3)
    ppl = Perplexity()
    total, count = 0.0, 0
    for text, nll in zip(texts, nlls):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        ref = torch.stack([-lp[t - 1, ids[t]] for t in range(1, len(ids))])
        assert torch.allclose(nll.double(), ref, atol=1e-5)
        ppl.update(nll)
        total, count = total + ref.sum().item(), count + len(ref)
    assert ppl.compute().item() == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def _slow_greedy(model, tok, prompt, n):
    ids = tok(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return new


def test_greedy_generate_left_padding_matches_unpadded(model_tok):
    model, tok = model_tok
    model.eval()
    prompts = ["Paris is", "The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the guitar and"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)
    assert batched == greedy_generate(model, tok, prompts, max_new_tokens=6, batch_size=3)  # deterministic
    for p, text in zip(prompts, batched):
        prompt_ids = tok(p)["input_ids"]
        ref = tok.decode(prompt_ids + _slow_greedy(model, tok, p, 6), skip_special_tokens=True)
        assert tok.decode(prompt_ids, skip_special_tokens=True) + text == ref
    full = greedy_generate(model, tok, prompts[:1], max_new_tokens=6, include_prompt=True)
    assert full[0] == prompts[0] + batched[0]


def _requests():
    cf = [
        EditRequest(
            "1", "The mother tongue of {} is", "Danielle Darrieux", "English", "French",
            paraphrase_prompts=("Danielle Darrieux is a native speaker of", "Danielle Darrieux speaks"),
            locality=(("The mother tongue of Toko Yasuda is", "French"), ("Paris is the capital of", "France")),
            generation_prompts=("Danielle Darrieux was born in",),
        ),
        EditRequest("2", "{} is the capital of", "Rome", "Spain", "Italy", paraphrase_prompts=("Rome is located in",),
                    locality=(("Madrid is the capital of", "Spain"),)),
        EditRequest("3", "{} plays the", "Toko Yasuda", "piano", None, paraphrase_prompts=("Toko Yasuda plays",),
                    locality=(("Rome is the capital of", "Italy"),)),
    ]
    zsre = [
        EditRequest(
            "z1", "What university did {} attend?", "Watts Humphrey", "Illinois Institute of Technology", None,
            paraphrase_prompts=("What university did Watts Humphrey take part in?",),
            locality=(("nq question: who played desmond doss father in hacksaw ridge", "Hugo Weaving"),), family="zsre",
        ),
    ]
    return cf, zsre


def test_evaluate_requests_keys_values_and_efficacy(model_tok):
    model, tok = model_tok
    model.eval()
    cf, zsre = _requests()
    out = evaluate_requests(model, tok, cf + zsre, batch_size=4)
    assert set(out) == set(COUNTERFACT_KEYS) | set(ZSRE_KEYS)
    for k, v in out.items():
        assert (-1.0 <= v <= 1.0) if k == "edit/margin" else (0.0 <= v <= 1.0), k
    # efficacy and margin: requests 1, 2 (request 3 has no target_true), by hand
    wins, margin = [], []
    for r in cf[:2]:
        new = slow_pair(model, tok, r.rendered_prompt, r.target_new)[0]
        true = slow_pair(model, tok, r.rendered_prompt, r.target_true)[0]
        wins.append(true > new)
        margin.append(torch.tensor(-new).exp().item() - torch.tensor(-true).exp().item())
    assert out["edit/efficacy"] == pytest.approx(sum(wins) / 2)
    assert out["edit/margin"] == pytest.approx(sum(margin) / 2, abs=1e-5)
    # generalization over 3 paraphrases (requests 1, 2); specificity over all 4 locality pairs
    gen = [slow_pair(model, tok, p, r.target_true)[0] > slow_pair(model, tok, p, r.target_new)[0] for r in cf[:2] for p in r.paraphrase_prompts]
    assert out["edit/generalization"] == pytest.approx(sum(gen) / 3)
    spec = [slow_pair(model, tok, p, a)[0] < slow_pair(model, tok, p, r.target_new)[0] for r in cf for p, a in r.locality]
    assert out["edit/specificity"] == pytest.approx(sum(spec) / 4)
    # zsre: per-prompt token accuracy, one prompt each
    _, pred, ids = slow_pair(model, tok, zsre[0].rendered_prompt, zsre[0].target_new)
    assert out["zsre/rewrite"] == pytest.approx((pred == ids).double().mean().item())
    _, pred, ids = slow_pair(model, tok, *zsre[0].locality[0])
    assert out["zsre/locality"] == pytest.approx((pred == ids).double().mean().item())


def test_evaluate_requests_only_keys_with_data(model_tok):
    model, tok = model_tok
    cf, zsre = _requests()
    assert set(evaluate_requests(model, tok, [cf[2]])) == {"edit/specificity"}  # no target_true
    assert set(evaluate_requests(model, tok, zsre)) == set(ZSRE_KEYS)
    assert evaluate_requests(model, tok, []) == {}


def test_update_edit_metrics_subset_and_accumulation(model_tok):
    model, tok = model_tok
    model.eval()
    cf, _ = _requests()
    full = make_edit_metrics("counterfact")
    update_edit_metrics(full, model, tok, cf[:1])
    update_edit_metrics(full, model, tok, cf[1:])
    assert float(full["edit/efficacy"].compute()) == pytest.approx(evaluate_requests(model, tok, cf)["edit/efficacy"])
    subset = {"edit/efficacy": make_edit_metrics("counterfact")["edit/efficacy"]}
    update_edit_metrics(subset, model, tok, cf)
    assert int(subset["edit/efficacy"].total) == 2


def test_evaluate_generation_and_locality_probes(model_tok):
    model, tok = model_tok
    model.eval()
    cf, _ = _requests()
    refs = {"1": ["English is spoken in England.", "English language"]}
    out = evaluate_generation(model, tok, cf, references=refs, vectorizer=SENTENCES, max_new_tokens=8)
    assert set(out) == {"edit/fluency", "edit/consistency"}
    assert out["edit/fluency"] >= 0.0 and 0.0 <= out["edit/consistency"] <= 1.0 + 1e-9
    prompts, answers = locality_probes(cf)
    assert len(prompts) == len(answers) == 4 and answers[0] == "French"


def test_text_token_nll_truncates_to_the_models_context(model_tok):
    """A text longer than the model's positions is scored on its first context-length tokens
    (it used to index past GPT-2's position table)."""
    model, tok = model_tok
    ctx = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    long_text = " ".join(SENTENCES * (ctx // 3 + 2))
    assert len(tok(long_text)["input_ids"]) > ctx
    (nll,) = text_token_nll(model, tok, [long_text])
    assert nll.shape == (ctx - 1,) and torch.isfinite(nll).all()
