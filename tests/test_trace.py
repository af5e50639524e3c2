"""Causal tracing on a tiny GPT-2 built from config (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from lightning_edit.data.requests import EditRequest
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.trace.cli import main
from lightning_edit.trace.core import (
    ROLES,
    Fact,
    as_fact,
    best_window,
    clean_states,
    embedding_noise_std,
    prepare_fact,
    recommend,
    restored_scores,
    sample_noise,
    trace_fact,
)
from lightning_edit.trace.run import run_trace

CORPUS = [
    "The mother tongue of Zorblax Quintavel is French",
    "Danielle Darrieux is a native speaker of French",
    "Mira Tolvanen plays the violin in the city of Helsinki",
    "In the city of Oskarvale, people speak Finnish",
    "Tomas Brellingham is a native speaker of English",
]

FACTS = [
    Fact("The mother tongue of {} is", "Zorblax Quintavel", "French", "a"),
    Fact("{} is a native speaker of", "Danielle Darrieux", "French", "b"),
    Fact("{} plays the", "Mira Tolvanen", "violin", "c"),
    Fact("In the city of {}, people speak", "Oskarvale", "Finnish", "d"),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and CI cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_model(tokenizer, n_layer: int = 3, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=n_layer, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        initializer_range=0.2,  # wider than GPT-2's 0.02, so the answer depends on the subject
    )
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


# ---- an independent reference: one forward per (sample, layer, position) ------------------
def slow_trace(model, pf, noise, states, kind, score):
    """Scores ``(S, L, n_positions)`` from one forward per (layer, position) cell (its S rows
    are the noise samples), with raw hooks on GPT-2's modules."""
    blocks = model.transformer.h
    S = noise.shape[0]
    positions = range(pf.subject_first, pf.prompt_last + 1)
    out = torch.zeros(S, len(blocks), len(positions))

    def add_noise(_m, _a, emb):
        emb = emb.clone()
        emb[:, pf.subject_first : pf.subject_last + 1] += noise
        return emb

    for layer in range(len(blocks)):
        for j, t in enumerate(positions):
            def restore(_m, _a, o, layer=layer, t=t):
                h = o[0] if isinstance(o, tuple) else o
                h = h.clone()
                h[:, t] = states[layer, t]
                return (h, *o[1:]) if isinstance(o, tuple) else h

            site = blocks[layer] if kind == "hidden" else blocks[layer].mlp.c_proj
            handles = [model.transformer.wte.register_forward_hook(add_noise), site.register_forward_hook(restore)]
            try:
                with torch.no_grad():
                    logits = model(pf.input_ids[None].expand(S, -1)).logits
            finally:
                for h in handles:
                    h.remove()
            logp = torch.log_softmax(logits[:, pf.answer_pos], -1).gather(-1, pf.answer_ids.expand(S, -1)[..., None])[..., 0]
            out[:, layer, j] = logp[:, 0].exp() if score == "prob" else logp.mean(-1)
    return out


# ---- tests ---------------------------------------------------------------------------------
def test_prepare_fact_finds_subject_and_answer(model, tokenizer):
    adapter = ModelAdapter(model)
    for fact in FACTS:
        pf = prepare_fact(adapter, tokenizer, fact, answer="true", score="logprob")
        subject = "".join(pf.tokens[pf.subject_first : pf.subject_last + 1]).strip()
        assert subject == fact.subject
        assert tokenizer.decode(pf.answer_ids.tolist()).strip() == fact.answer
        assert "".join(pf.tokens) == fact.rendered_prompt
        # the input holds the prompt and all answer tokens but the last
        assert pf.input_ids.shape[0] == pf.prompt_last + len(pf.answer_ids)
    pf = prepare_fact(adapter, tokenizer, FACTS[0], answer="greedy", score="prob")
    logits = model(pf.input_ids[None]).logits[0, -1]
    assert pf.answer_ids.tolist() == [int(logits.argmax())]
    assert pf.input_ids.shape[0] == pf.prompt_last + 1


def test_noise_only_on_subject_tokens(model, tokenizer):
    adapter = ModelAdapter(model)
    pf = prepare_fact(adapter, tokenizer, FACTS[1], answer="greedy")
    n_subj = pf.subject_last - pf.subject_first + 1
    noise = sample_noise(3, n_subj, 32, 0.5, torch.Generator().manual_seed(0))
    _, states = clean_states(adapter, pf.input_ids)
    seen = []
    handle = model.transformer.h[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            model(pf.input_ids[None])
        restored_scores(adapter, pf, noise, states, [()], batch_size=2)  # 3 rows in 2 batches
    finally:
        handle.remove()
    clean, corrupted = seen[0], torch.cat(seen[1:])
    assert corrupted.shape == (3, pf.input_ids.shape[0], 32)
    diff = corrupted - clean
    subj = torch.zeros(pf.input_ids.shape[0], dtype=torch.bool)
    subj[pf.subject_first : pf.subject_last + 1] = True
    assert torch.equal(diff[:, ~subj], torch.zeros_like(diff[:, ~subj]))
    torch.testing.assert_close(diff[:, subj], noise, atol=1e-5, rtol=1e-5)


def test_noise_std_is_factor_times_embedding_std(model):
    std = embedding_noise_std(model, 3.0)
    assert std == pytest.approx(3.0 * float(model.transformer.wte.weight.detach().std()))
    noise = sample_noise(200, 4, 32, std, torch.Generator().manual_seed(1))
    assert float(noise.std()) == pytest.approx(std, rel=0.05)


def test_restoring_all_positions_recovers_clean(model, tokenizer):
    adapter = ModelAdapter(model)
    pf = prepare_fact(adapter, tokenizer, FACTS[0], answer="greedy", score="prob")
    logits, states = clean_states(adapter, pf.input_ids)
    clean_p = torch.softmax(logits[pf.prompt_last], -1)[pf.answer_ids[0]]
    T = pf.input_ids.shape[0]
    noise = sample_noise(4, pf.subject_last - pf.subject_first + 1, 32, embedding_noise_std(model, 10.0), torch.Generator().manual_seed(0))
    restorations = [()] + [[(layer, t) for t in range(T)] for layer in range(adapter.n_layers)]
    scores = restored_scores(adapter, pf, noise, states, restorations)
    assert scores.shape == (4, 1 + adapter.n_layers)
    assert (scores[:, 0] - clean_p).abs().max() > 0.05 * clean_p  # the noise did something
    torch.testing.assert_close(scores[:, 1:], clean_p.expand(4, adapter.n_layers), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "kind,score,answer", [("hidden", "prob", "greedy"), ("hidden", "logprob", "true"), ("mlp", "prob", "true")]
)
def test_batched_equals_slow_loop(model, tokenizer, kind, score, answer):
    adapter = ModelAdapter(model)
    pf = prepare_fact(adapter, tokenizer, FACTS[3], answer=answer, score=score)
    noise = sample_noise(3, pf.subject_last - pf.subject_first + 1, 32, embedding_noise_std(model, 3.0), torch.Generator().manual_seed(3))
    ft = trace_fact(adapter, pf, noise, kind=kind, score=score, batch_size=7)  # chunks straddle samples
    _, states = clean_states(adapter, pf.input_ids, kind)
    slow = slow_trace(model, pf, noise, states, kind, score)
    restorations = [()]
    corrupted = restored_scores(adapter, pf, noise, states, restorations, kind, score).mean()
    assert ft.effects.shape == (adapter.n_layers, pf.prompt_last + 1)
    assert ft.corrupted == pytest.approx(float(corrupted), abs=1e-6)
    torch.testing.assert_close(ft.effects[:, pf.subject_first :], slow.mean(0) - corrupted, atol=1e-5, rtol=1e-4)
    assert torch.equal(ft.effects[:, : pf.subject_first], torch.zeros(adapter.n_layers, pf.subject_first))


def test_run_trace_shapes_and_reports(model, tokenizer, tmp_path):
    reqs = [
        EditRequest("0", "The mother tongue of {} is", "Zorblax Quintavel", "English", target_true="French"),
        EditRequest("1", "{} plays the", "Mira Tolvanen", "piano", target_true="violin"),
    ]
    res = run_trace(model, tokenizer, reqs + FACTS, n_samples=2, seed=0, num_facts=4, n_layers_window=2)
    L = model.config.n_layer
    assert res.n_facts == 4 and len(res.facts) == 4
    assert res.effects.shape == (len(ROLES), L)
    assert len(res.role_counts) == len(ROLES)
    assert res.role_counts[ROLES.index("subject_last")] == 4 == res.role_counts[ROLES.index("prompt_last")]
    assert 0 <= res.mean_corrupted <= 1 and 0 <= res.mean_clean <= 1
    assert res.recommendation.anchor in ("subject_last", "prompt_last")
    assert len(res.recommendation.layers) == 2
    # deterministic for a seed
    again = run_trace(model, tokenizer, reqs + FACTS, n_samples=2, seed=0, num_facts=4, n_layers_window=2)
    torch.testing.assert_close(again.effects, res.effects, equal_nan=True)

    paths = res.save(tmp_path / "out")
    md = paths["markdown"].read_text()
    assert "| token role | facts | L0 | L1 | L2 |" in md and "last subject token" in md and "Recommendation" in md
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert data["n_facts"] == 4 and len(data["effects"]) == len(ROLES) and len(data["facts"]) == 4
    assert data["recommendation"]["anchor"] == res.recommendation.anchor


def test_zero_noise_gives_zero_effects(model, tokenizer):
    res = run_trace(model, tokenizer, FACTS, n_samples=2, noise_factor=0.0, batch_size=16)
    for ft in res.facts:
        assert ft.corrupted == pytest.approx(ft.clean, abs=1e-6)
        assert ft.effects.abs().max() < 1e-6
    assert res.recommendation.reason.startswith("corrupting the subject did not lower")


def test_trace_finds_where_information_flows(tokenizer):
    """Attention only in block k: the last prompt token can read the subject only there, so
    restoring it before k does nothing and from k on restores everything; restoring subject
    tokens from k on, or the tokens between subject and last token anywhere, does nothing."""
    k = 1
    model = make_model(tokenizer, n_layer=4, seed=1)
    with torch.no_grad():
        for i, block in enumerate(model.transformer.h):
            if i != k:
                block.attn.c_proj.weight.zero_()
                block.attn.c_proj.bias.zero_()
    fact = Fact("{} is a native speaker of", "Danielle Darrieux", None, "x")
    res = run_trace(model, tokenizer, [fact], n_samples=4, noise_factor=10.0)
    ft = res.facts[0]
    total = ft.clean - ft.corrupted
    assert abs(total) > 1e-4
    last, s0, s1 = ft.prompt_last, ft.subject_first, ft.subject_last
    torch.testing.assert_close(ft.effects[:k, last], torch.zeros(k), atol=1e-6, rtol=0)
    torch.testing.assert_close(ft.effects[k:, last], torch.full((4 - k,), total), atol=1e-6, rtol=1e-5)
    assert ft.effects[k:, s0 : s1 + 1].abs().max() < 1e-6
    assert ft.effects[:, s1 + 1 : last].abs().max() < 1e-6
    assert ft.effects[:k, s0 : s1 + 1].abs().max() > 1e-6  # the subject matters before k


def test_recommend_rules():
    L = 6
    eff = torch.zeros(len(ROLES), L)
    eff[ROLES.index("prompt_last")] = torch.tensor([0.0, 0.0, 0.1, 0.5, 0.9, 1.0])
    # subject carries nothing: look-up at the last token (toy-model behaviour)
    rec = recommend(eff, total_effect=1.0, kind="hidden", n_layers_window=2)
    assert rec.anchor == "prompt_last" and rec.layers == [4, 5]
    eff[ROLES.index("subject_last")] = torch.tensor([0.8, 0.9, 0.7, 0.3, 0.1, 0.0])
    rec = recommend(eff, total_effect=1.0, kind="hidden", n_layers_window=3)
    assert rec.anchor == "subject_last" and rec.layers == [0, 1, 2]
    assert rec.window_effect == pytest.approx(0.8)
    mlp = torch.zeros(len(ROLES), L)
    mlp[ROLES.index("subject_last")] = torch.tensor([0.0, 0.1, 0.3, 0.4, 0.1, 0.0])
    mlp[ROLES.index("prompt_last")] = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.2, 0.1])
    rec = recommend(mlp, total_effect=0.5, kind="mlp", n_layers_window=2)
    assert rec.anchor == "subject_last" and rec.layers == [2, 3]
    assert best_window(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2) == (2, 2.0)


def test_as_fact_variants():
    f = as_fact({"prompt": "Danielle Darrieux is a native speaker of", "subject": "Danielle Darrieux", "target": "French"})
    assert f.prompt == "{} is a native speaker of" and f.answer == "French"
    f = as_fact({"case_id": 7, "requested_rewrite": {"prompt": "{} plays the", "subject": "Mira", "target_true": {"str": "violin"}}})
    assert (f.case_id, f.answer) == ("7", "violin")
    f = as_fact(EditRequest("3", "{} plays the", "Mira", "piano", target_true="violin"))
    assert (f.case_id, f.prompt, f.answer) == ("3", "{} plays the", "violin")
    with pytest.raises(ValueError):
        as_fact({"prompt": "no subject here", "subject": "Mira"})


def test_cli_main(model, tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    records = [{"prompt": f.prompt, "subject": f.subject, "target": f.answer} for f in FACTS]
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "trace"
    rc = main(["--model", str(model_dir), "--dataset", str(data), "--num_facts", "3", "--n_samples", "2",
               "--out", str(out), "--device", "cpu", "--dtype", "float32", "--answer", "true"])
    assert rc == 0
    for name in ("trace.md", "trace.json", "trace.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "trace.json").read_text())
    assert report["n_facts"] == 3 and report["settings"]["answer"] == "true"


def test_load_facts_reads_benchmark_files(tmp_path):
    from pathlib import Path

    from lightning_edit.trace.cli import load_facts

    facts = load_facts(Path(__file__).parent / "fixtures" / "counterfact_flat_sample.json")
    assert facts and all(isinstance(f, EditRequest) for f in facts)
    first = as_fact(facts[0])
    assert first.subject == "Danielle Darrieux" and first.answer == "French"
    assert first.rendered_prompt == "The mother tongue of Danielle Darrieux is"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(ValueError):
        load_facts(bad)


def test_restricted_layers_and_roles_match_the_full_grid(model, tokenizer):
    adapter = ModelAdapter(model)
    pf = prepare_fact(adapter, tokenizer, FACTS[0], answer="true")
    noise = sample_noise(3, pf.subject_last - pf.subject_first + 1, 32, embedding_noise_std(model, 3.0), torch.Generator().manual_seed(5))
    full = trace_fact(adapter, pf, noise, kind="mlp", window=2)
    part = trace_fact(adapter, pf, noise, kind="mlp", window=2, layers=[1, 2], roles=["subject_last", "prompt_last"])
    cols = [pf.subject_last, pf.prompt_last]
    torch.testing.assert_close(part.effects[1:3][:, cols], full.effects[1:3][:, cols], atol=1e-6, rtol=1e-5)
    assert part.corrupted == pytest.approx(full.corrupted, abs=1e-7)
    untraced = torch.ones_like(part.effects, dtype=torch.bool)
    untraced[1:3, cols] = False
    untraced[:, : pf.subject_first] = False  # before the subject: 0 by construction
    assert part.effects[untraced].isnan().all()
    with pytest.raises(ValueError, match="unknown token role"):
        trace_fact(adapter, pf, noise, roles=["subject"])
    with pytest.raises(ValueError, match="layers to trace"):
        trace_fact(adapter, pf, noise, layers=[99])


def test_run_trace_tables_leave_untraced_layers_empty(model, tokenizer):
    res = run_trace(model, tokenizer, FACTS, n_samples=2, kind="mlp", layers=[0, 2], roles=["prompt_last"])
    assert res.effects[:, 1].isnan().all()
    assert not res.effects[ROLES.index("prompt_last"), [0, 2]].isnan().any()
    assert res.effects[ROLES.index("subject_last")].isnan().all()
    assert res.settings["layers"] == [0, 2] and res.settings["roles"] == ["prompt_last"]


def test_recommend_only_when_clear_of_noise():
    L, n = 6, 12
    gen = torch.Generator().manual_seed(0)
    eff_rows = torch.zeros(n, len(ROLES), L)
    # pure noise: per-fact effects scatter around zero
    eff_rows[:, ROLES.index("subject_last")] = torch.randn(n, L, generator=gen) * 0.05
    eff_rows[:, ROLES.index("prompt_last")] = torch.randn(n, L, generator=gen) * 0.05
    rec = recommend(eff_rows.nanmean(0), 0.3, kind="mlp", n_layers_window=2, per_fact=eff_rows.double())
    assert rec.anchor is None and rec.layers == [] and not rec.clear
    assert "noise" in rec.reason and rec.candidate["anchor"] in ("subject_last", "prompt_last")
    # a consistent effect at the subject's last token in layers 2-3
    eff_rows[:, ROLES.index("subject_last"), 2:4] += 0.3
    rec = recommend(eff_rows.nanmean(0), 0.3, kind="mlp", n_layers_window=2, per_fact=eff_rows.double())
    assert rec.clear and rec.anchor == "subject_last" and rec.layers == [2, 3]


def test_parse_layers():
    from lightning_edit.trace.cli import parse_layers

    assert parse_layers("0-3") == [0, 1, 2, 3]
    assert parse_layers("2,4,6") == [2, 4, 6]
    assert parse_layers("0-9:3,20") == [0, 3, 6, 9, 20]
    with pytest.raises(ValueError, match="--layers"):
        parse_layers("a-b")


def test_cli_restricted_trace(model, tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f.prompt, "subject": f.subject, "target": f.answer}) for f in FACTS))
    out = tmp_path / "trace"
    assert main(["--model", str(model_dir), "--dataset", str(data), "--n_samples", "2", "--out", str(out), "--kind", "mlp",
                 "--window", "2", "--layers", "1-2", "--roles", "subject_last,prompt_last", "--answer", "true"]) == 0
    report = json.loads((out / "trace.json").read_text())
    assert report["settings"]["layers"] == [1, 2] and report["settings"]["window"] == 2
    assert report["effects"][ROLES.index("prompt_last")][0] is None
    md = (out / "trace.md").read_text()
    assert "Recommendation:**" in md


def test_saved_trace_reloads_with_the_same_tables(model, tokenizer, tmp_path):
    from lightning_edit.trace import load_trace

    res = run_trace(model, tokenizer, FACTS, n_samples=2, kind="mlp", layers=[0, 2], roles=["subject_last", "prompt_last"])
    paths = res.save(tmp_path / "t")
    assert "NaN" not in paths["json"].read_text()  # untraced cells are null: standard JSON
    again = load_trace(paths["json"])
    torch.testing.assert_close(again.effects, res.effects, equal_nan=True, atol=1e-5, rtol=0)
    assert again.recommendation.anchor == res.recommendation.anchor


def test_best_window_skips_untraced_layers():
    nan = float("nan")
    assert best_window(torch.tensor([0.3, nan, nan, 0.1, nan, nan]), 3) == (0, pytest.approx(0.3))
