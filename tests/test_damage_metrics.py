"""Metrics that tell damage from noise: retention_known, probe_logprob_drop, the unedited model's
efficacy / generalization / specificity, next-word accuracy on held-out prose; each checked on a
case whose answer is known, then end to end through the CLI (summary.json, summary.md,
TensorBoard, resume)."""

import copy
import dataclasses
import glob
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FAST_RESIDUAL, CrashAfterBatch, cli_args, counterfact_records, counterfactual_requests  # noqa: F401

from lightning_edit.builtin.toy import EDIT_NAMES, TEMPLATES, facts
from lightning_edit.evaluation.metrics import KnownShare, LogProbDrop

NEW_KEYS = ("efficacy_unedited", "generalization_unedited", "specificity_unedited", "retention_known",
            "retention_known_unedited", "probe_logprob_drop", "next_word_accuracy_before", "next_word_accuracy_after")


def _probes_file(path: Path) -> Path:
    """Every toy fact as a probe with its relation (the template): facts about edited subjects are
    marked ``edit_case_id`` (never probed, but their objects are the relation's objects too)."""
    rows = [{"prompt": t.format(n), "object": o, "relation_id": f"T{TEMPLATES.index(t)}", "subject": n,
             "edit_case_id": 0 if n in EDIT_NAMES else None} for t, n, o in facts()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- the metric classes ------------------------------------------------------------------------
def test_known_share_and_logprob_drop_hand_computed():
    k = KnownShare()
    k.update(torch.tensor([True, False, True, True]))
    assert float(k.compute()) == pytest.approx(0.75)
    d = LogProbDrop()
    d.update(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-3.0, -2.0, -0.25]))  # drops 2, 0, -0.25
    assert float(d.compute()) == pytest.approx((2.0 + 0.0 - 0.25) / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        d.update(torch.zeros(2), torch.zeros(3))


# ---- next-word accuracy on held-out prose --------------------------------------------------------
def test_word_starts_hand_checked():
    from lightning_edit.evaluation.scoring import word_starts

    text = "Use it, then 2 more."
    # byte-level BPE folds the space into the token; other tokenizers leave it outside the span
    folded = [(0, 3), (3, 6), (6, 7), (7, 12), (12, 14), (14, 16), (16, 19), (19, 20)]
    outside = [(0, 3), (4, 6), (6, 7), (8, 12), (13, 14), (15, 17), (17, 19), (19, 20)]
    assert word_starts(text, folded) == [1, 3, 4, 5]  # " it", " then", " 2", " mo"; never ",", "re", "."
    assert word_starts(text, outside) == [1, 3, 4, 5]
    assert word_starts(text, [(0, 0), (0, 3), (3, 6)]) == [2]  # a special token (empty span) is no word, "Use" is first


def test_next_word_hits_equal_a_full_forward(trained_gpt2, tokenizer):
    from lightning_edit.evaluation.scoring import next_word_hits, word_starts

    world = facts()[:12]
    texts = [t.format(n) + " " + o + "." for t, n, o in world] + ["Some say Paris matters most to the people who live there."]
    hits = next_word_hits(trained_gpt2, tokenizer, texts, batch_size=5)  # padded batches of different lengths
    for text, h in zip(texts, hits):
        enc = tokenizer(text, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            pred = trained_gpt2(input_ids=ids).logits[0].argmax(-1)
        starts = word_starts(text, enc["offset_mapping"])
        assert torch.equal(h, torch.tensor([bool(pred[j - 1] == ids[0, j]) for j in starts])), text
    # the model memorized the facts: the object's first token is its top-1 guess at the object's word start
    assert sum(bool(h[-1]) for h in hits[:12]) >= 11


def test_docstring_texts_are_held_out_and_skip_edited_names():
    from pydoc_data.topics import topics

    from lightning_edit.builtin.corpora import docstring_texts

    texts = docstring_texts(40)
    assert len(texts) == 40 and len({t["text"] for t in texts}) == 40 and texts == docstring_texts(40)
    assert all(t["source"].startswith("stdlib:") and "pydoc_data" not in t["source"] for t in texts)
    pydoc = " ".join(" ".join(v.split()) for v in topics.values())
    for t in texts:  # no sentence of the statistics corpus's source (corpus:pydoc)
        assert not any(s in pydoc for s in re.split(r"(?<=[.!?])\s+", t["text"]) if len(s) >= 40), t["source"]
    # a name of the edit stream never appears: drop a word that the first texts use
    word = next(w for w in re.findall(r"\b[A-Za-z]{6,}\b", texts[0]["text"]))
    kept = docstring_texts(40, exclude=[" " + word])
    assert len(kept) == 40 and not any(re.search(rf"\b{word}\b", t["text"]) for t in kept)


# ---- the unedited model's efficacy / generalization / specificity ---------------------------------
def _requests_with_paraphrases(n):
    reqs = counterfactual_requests(n)
    # the tiny model knows no paraphrase of its facts (another template's wording is not one, and
    # whether it still answers a prompt behind a filler such as "Indeed, " depends on the CPU's
    # float rounding in its training); the prompt itself is the one "paraphrase" it surely answers
    # with the true object, which is all these bookkeeping tests need
    return [dataclasses.replace(r, paraphrase_prompts=(r.rendered_prompt,)) for r in reqs]


def test_request_outcomes_add_up_to_the_metrics(trained_gpt2, tokenizer):
    from lightning_edit.evaluation.evaluate import evaluate_requests, outcome_metrics, request_outcomes

    reqs = _requests_with_paraphrases(8)
    rows = request_outcomes(trained_gpt2, tokenizer, reqs, batch_size=7)
    assert rows.shape == (8, 6) and rows[:, 1].tolist() == [1.0] * 8 and rows[:, 3].tolist() == [1.0] * 8
    for k in (3, 8):  # any prefix of the stream: the same numbers as evaluating that prefix
        ref = evaluate_requests(trained_gpt2, tokenizer, reqs[:k])
        got = outcome_metrics(rows[:k])
        assert set(got) == {"edit/efficacy", "edit/generalization", "edit/specificity"}
        for key, v in got.items():
            assert v == pytest.approx(ref[key]), key
    # known answer: the unedited model memorized the true facts, so no new target wins and every
    # neighbour keeps its answer
    assert outcome_metrics(rows) == {"edit/efficacy": 0.0, "edit/generalization": 0.0, "edit/specificity": 1.0}
    assert outcome_metrics(rows[:0]) == {}


# ---- retention_known and probe_logprob_drop on a probe edited on purpose --------------------------
def _brute_force_known(model, tokenizer, probes, objects):
    """Every object of the relation scored in full: is the true object the most likely?"""
    from lightning_edit.evaluation.scoring import target_scores

    out = []
    for p in probes:
        objs = objects[p["relation_id"]]
        ts = target_scores(model, tokenizer, [p["prompt"]] * len(objs), objs)
        lp = [float(x.sum()) for x in ts.token_logprobs]
        out.append(objs[max(range(len(objs)), key=lambda i: lp[i])] == p["object"])
    return out


def _true_logp(model, tokenizer, probes):
    from lightning_edit.evaluation.scoring import target_scores

    ts = target_scores(model, tokenizer, [p["prompt"] for p in probes], [p["object"] for p in probes])
    return torch.tensor([float(x.double().sum()) for x in ts.token_logprobs], dtype=torch.float64)


def test_a_probe_edited_to_a_rival_is_no_longer_known(trained_gpt2, tokenizer, corpus_file, tmp_path):
    from lightning_edit import Editor
    from lightning_edit.report import EditReport

    report = EditReport(probes=str(_probes_file(tmp_path / "probes.jsonl")), n_probes=1000, n_generation=0, n_examples=0,
                        next_word_texts=0)
    ed = Editor(copy.deepcopy(trained_gpt2), tokenizer, layers=[1, 2], method="memit", method_kwargs={"lam": 1.0},
                residual=FAST_RESIDUAL, context_prefixes=0,
                stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 600, "max_length": 64,
                       "cache_dir": str(tmp_path / "stats")})
    module = ed.module
    probes, objects = report._probes(), report.relation_objects()
    assert len(probes) == len([f for f in facts() if f[1] not in EDIT_NAMES])
    assert objects["T0"] == list(dict.fromkeys(o for t, _, o in facts() if t == TEMPLATES[0]))  # edited rows' objects too
    report.measure_unedited(SimpleNamespace(datamodule=None), module)
    # the unedited model knows every probe (it memorized the world): retention_known starts at 1.0
    assert report.known_unedited == 1.0 == sum(_brute_force_known(module.lm, tokenizer, probes, objects)) / len(probes)
    before = _true_logp(module.lm, tokenizer, probes)
    assert torch.allclose(report.probe_logp, before)
    assert report.probe_metrics(module) == {"retention": 1.0, "retention_known": 1.0, "probe_logprob_drop": 0.0}

    # edit one probe's own fact to a rival of its relation
    i = next(j for j, p in enumerate(probes) if p["relation_id"] == "T0")
    p = probes[i]
    rival = next(o for o in objects["T0"] if o != p["object"])
    ed.apply([{"prompt": TEMPLATES[0], "subject": p["subject"], "target_new": rival, "target_true": p["object"]}])
    expected = _brute_force_known(module.lm, tokenizer, probes, objects)
    assert expected[i] is False  # the edit made the rival more likely than the true object
    after = _true_logp(module.lm, tokenizer, probes)
    got = report.probe_metrics(module)
    assert got["retention_known"] == pytest.approx(sum(expected) / len(probes))
    assert got["retention_known"] < 1.0
    assert got["probe_logprob_drop"] == pytest.approx(float((before - after).mean()), abs=1e-5)
    assert float(before[i] - after[i]) > 1.0  # the edited probe's own drop, in nats
    # measured once per number of edits: the same numbers without scoring again
    assert report.measure_probes(module) is report._probe_cache[1]


def test_probes_without_relations_get_no_retention_known(trained_gpt2, tokenizer, tmp_path):
    from lightning_edit.module import EditModule
    from lightning_edit.report import EditReport

    path = tmp_path / "probes.jsonl"
    path.write_text("".join(json.dumps({"prompt": t.format(n), "answer": o}) + "\n" for t, n, o in facts()[:10]))
    report = EditReport(probes=str(path), n_generation=0, n_examples=0, next_word_texts=0)
    module = EditModule.from_model(copy.deepcopy(trained_gpt2), tokenizer, layers=[1])
    report.measure_unedited(SimpleNamespace(datamodule=None), module)
    assert report.known_unedited is None
    assert set(report.probe_metrics(module)) == {"retention", "probe_logprob_drop"}


def test_resume_never_measures_the_edited_model(trained_gpt2, tokenizer, tmp_path):
    """The unedited model's numbers come back from the callback's state; a state-less resume of an
    edited model measures nothing (and says so)."""
    from lightning_edit.module import EditModule
    from lightning_edit.report import EditReport

    reqs = _requests_with_paraphrases(4)
    dm = SimpleNamespace(requests=reqs, batch_size=2)
    module = EditModule.from_model(copy.deepcopy(trained_gpt2), tokenizer, layers=[1])
    kw = dict(probes=str(_probes_file(tmp_path / "probes.jsonl")), n_probes=20, n_generation=0, n_examples=0, next_word_texts=3)
    first = EditReport(**kw)
    first.on_fit_start(SimpleNamespace(datamodule=dm), module)
    assert first.unedited_at(4) == {"efficacy_unedited": 0.0, "generalization_unedited": 0.0, "specificity_unedited": 1.0}
    assert len(first.next_word_texts) == 3 and 0.0 <= first.next_word_before <= 1.0
    state = first.state_dict()

    def never(*a, **k):
        raise AssertionError("measured again")

    resumed = EditReport(**kw)
    resumed.measure_unedited = never
    resumed.load_state_dict(state)
    resumed.on_fit_start(SimpleNamespace(datamodule=dm), module)
    assert resumed.unedited_at(2) == first.unedited_at(2) and resumed.known_unedited == first.known_unedited == 1.0
    assert resumed.next_word_texts == first.next_word_texts and resumed.next_word_before == first.next_word_before
    assert torch.equal(resumed.probe_logp, first.probe_logp)

    module.ledger.records.append(SimpleNamespace(num_requests=2))  # an edited model, and a checkpoint without the report's state
    stateless = EditReport(**kw)
    stateless.measure_unedited = never
    with pytest.warns(UserWarning, match="without the report's saved state"):
        stateless.on_fit_start(SimpleNamespace(datamodule=dm), module)
    assert stateless.baseline is None and stateless.unedited_at(2) == {} and stateless.probe_metrics(module) == {}


# ---- end to end: the CLI's summary, TensorBoard, resume --------------------------------------------
def _summary(root: Path) -> tuple[dict, Path]:
    run = sorted(Path(p) for p in glob.glob(str(root / "logs" / "edit" / "version_*")))[-1]
    return json.loads((run / "summary.json").read_text()), run


def test_cli_reports_every_new_metric_and_resume_keeps_the_unedited_values(trained_gpt2, tokenizer, tiny_model_dir, corpus_file,
                                                                           tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from lightning_edit.cli import main
    from lightning_edit.data.formats import records_to_requests
    from lightning_edit.evaluation.evaluate import evaluate_requests

    records = counterfact_records(8)
    for r in records:
        # the prompt itself as the paraphrase (see _requests_with_paraphrases)
        r["paraphrase_prompts"] = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"])]
    dataset = tmp_path / "cf.json"
    dataset.write_text(json.dumps(records))
    probes = _probes_file(tmp_path / "probes.jsonl")
    extra = ["--model.eval_every=1", f"--report.probes={probes}", "--report.n_probes=30", "--report.n_generation=0",
             "--report.next_word_texts=6"]
    full = tmp_path / "full"
    main(["fit", *cli_args(tiny_model_dir, dataset, corpus_file, full, batch_size=2, extra=extra)])
    s, run = _summary(full)
    assert set(NEW_KEYS) <= set(s)
    # the unedited model: memorized facts, so no new target wins and every probe is known; the toy
    # records' neighbourhood prompts are answered with the edited fact's true object (CounterFact's
    # convention), which is not every neighbour's own answer: the unedited specificity is below 1
    unedited = evaluate_requests(trained_gpt2, tokenizer, records_to_requests(records))
    assert (s["efficacy_unedited"], s["generalization_unedited"]) == (0.0, 0.0)
    assert s["specificity_unedited"] == pytest.approx(unedited["edit/specificity"]) and s["specificity_unedited"] < 1.0
    assert s["retention_known_unedited"] == 1.0
    assert 0.0 <= s["retention_known"] <= 1.0 and 0.0 <= s["next_word_accuracy_after"] <= 1.0
    keys = list(s)
    assert keys.index("specificity_unedited") == keys.index("specificity") + 1  # beside the edited value
    md = (run / "summary.md").read_text()
    assert all(f"| {k} |" in md for k in NEW_KEYS)
    # the mid-stream curve carries the cheap ones at every evaluation
    assert [r["num_edits"] for r in s["curve"]] == [2, 4, 6, 8]
    assert all({"retention_known", "probe_logprob_drop", "specificity_unedited"} <= set(r) for r in s["curve"])
    # TensorBoard: scalars on the edit axis, and the final values as hparams metrics
    ea = EventAccumulator(str(run / "edits"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = ea.Tags()["scalars"]
    for key in ("retention_known", "probe_logprob_drop", "specificity_unedited", "efficacy_unedited"):
        assert [e.step for e in ea.Scalars(f"edit/{key}")] == [2, 4, 6, 8, 8], key  # every batch, then the final value
    for key in ("retention_known_unedited", "next_word_accuracy_before", "next_word_accuracy_after"):
        assert [(e.step, e.value) for e in ea.Scalars(f"edit/{key}")] == [(8, pytest.approx(s[key]))], key
    content = ea.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {f"final/{k}" for k in NEW_KEYS} <= metrics and all(t in scalars for t in metrics)

    # killed after the first batch and resumed: the unedited values come from the checkpoint
    part = tmp_path / "part"
    args = cli_args(tiny_model_dir, dataset, corpus_file, part, batch_size=2, extra=extra)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", *args, "--trainer.callbacks+=conftest.CrashAfterBatch", "--trainer.callbacks.batch=1"])
    main(["fit", *args, f"--ckpt_path={part}/ckpt/last.safetensors"])
    r, _ = _summary(part)
    for k in ("efficacy_unedited", "generalization_unedited", "specificity_unedited", "retention_known_unedited",
              "next_word_accuracy_before", "perplexity_before"):
        assert r.get(k) == s.get(k), k
    assert r["probe_logprob_drop"] == pytest.approx(s["probe_logprob_drop"], abs=1e-4)


def test_mid_stream_evaluations_score_a_fixed_size_sample(trained_gpt2, tokenizer):
    """eval_sample: each mid-stream evaluation scores a seeded sample of that many edited requests
    (flat cost over a long stream); the report's unedited values cover the same sample."""
    from lightning_edit.module import EditModule
    from lightning_edit.report import EditReport

    reqs = _requests_with_paraphrases(6)
    module = EditModule.from_model(copy.deepcopy(trained_gpt2), tokenizer, layers=[1], eval_every=1, eval_sample=3)
    scored = []
    module.evaluate = lambda rs: scored.append(list(rs)) or {"edit/efficacy": 0.5}
    for b in range(3):  # three batches of two, recorded as applied
        module.stream.requests.extend(reqs[2 * b: 2 * b + 2])
        module.record_applied(SimpleNamespace(requests=reqs[2 * b: 2 * b + 2], index=b))
    assert [len(s) for s in scored] == [2, 3, 3]  # all while there are at most 3, then 3
    idx = module.eval_indices
    assert idx == sorted(idx) and len(set(idx)) == 3 and scored[-1] == [reqs[i] for i in idx]
    assert module.mid_stream_sample() == idx  # seeded: the same sample for the same stream position
    report = EditReport(n_generation=0, n_examples=0, next_word_texts=0)
    report.measure_unedited(SimpleNamespace(datamodule=SimpleNamespace(requests=reqs)), module)
    from lightning_edit.evaluation.evaluate import outcome_metrics

    sample = outcome_metrics(report.unedited_rows[torch.tensor(idx)])
    assert report.unedited_at(6, idx)["specificity_unedited"] == pytest.approx(sample["edit/specificity"])
    with pytest.raises(Exception, match="eval_sample"):
        EditModule.from_model(copy.deepcopy(trained_gpt2), tokenizer, layers=[1], eval_sample=-1)
