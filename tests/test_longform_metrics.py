"""Long-form metrics against values computed by hand on small strings."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_edit.longform.metrics import (
    AnswerContained,
    CorpusBLEU,
    ExactReproduction,
    LongFormMetrics,
    RougeScores,
    SentenceBLEU,
    TeacherForcedAccuracy,
    normalize_text,
    token_correct,
)

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")

CAT_P, CAT_T = "the cat sat on the mat", "the cat is on the mat"
# CAT: unigram overlap 5 of 6 each side; bigrams 3 of 5; LCS "the cat on the mat" = 5 of 6;
# trigrams 1 of 4; 4-grams 0 of 3
ABC_P, ABC_T = "a b c", "a b c d e f"
# ABC: unigrams 3/3 (P) 3/6 (R); bigrams 2/2, 2/5; LCS 3


def f1(p, r):
    return 2 * p * r / (p + r)


def test_rouge_hand_computed():
    m = RougeScores()
    m.update([CAT_P, ABC_P], [CAT_T, ABC_T])
    out = m.compute()
    assert out["rouge1_fmeasure"].item() == pytest.approx((5 / 6 + f1(1, 0.5)) / 2, abs=1e-6)
    assert out["rouge1_recall"].item() == pytest.approx((5 / 6 + 0.5) / 2, abs=1e-6)
    assert out["rouge1_precision"].item() == pytest.approx((5 / 6 + 1) / 2, abs=1e-6)
    assert out["rouge2_fmeasure"].item() == pytest.approx((3 / 5 + f1(1, 2 / 5)) / 2, abs=1e-6)
    assert out["rouge2_recall"].item() == pytest.approx((3 / 5 + 2 / 5) / 2, abs=1e-6)
    assert out["rougeL_fmeasure"].item() == pytest.approx((5 / 6 + f1(1, 0.5)) / 2, abs=1e-6)
    assert out["rougeL_recall"].item() == pytest.approx((5 / 6 + 0.5) / 2, abs=1e-6)
    # normalization: case and punctuation do not count
    m2 = RougeScores()
    m2.update("The Cat, SAT!", "the cat sat")
    assert m2.compute()["rougeL_fmeasure"].item() == pytest.approx(1.0)
    assert math.isnan(RougeScores().compute()["rouge1_fmeasure"].item())


def test_rouge_rejects_lsum():
    with pytest.raises(ValueError, match="rougeLsum"):
        RougeScores(rouge_keys=("rougeLsum",))


def test_sentence_bleu_hand_computed():
    m = SentenceBLEU()
    m.update([CAT_P], [CAT_T])
    assert m.compute().item() == 0.0  # no matching 4-gram, unsmoothed
    # torchmetrics' smoothing does not rescue a zero n-gram order: still 0
    s = SentenceBLEU(smooth=True)
    s.update([CAT_P], [CAT_T])
    assert s.compute().item() == 0.0
    # every order matches once at least: matches 6/7, 4/6, 2/5, 1/4; equal lengths (no penalty)
    pred, target = "the cat sat on the mat today", "the cat sat on a mat today"
    plain = SentenceBLEU()
    plain.update(pred, target)
    assert plain.compute().item() == pytest.approx((6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, abs=1e-5)
    smoothed = SentenceBLEU(smooth=True)
    smoothed.update(pred, target)
    # smoothed: first order raw, higher orders (m + 1) / (n + 1)
    assert smoothed.compute().item() == pytest.approx((6 / 7 * 5 / 7 * 3 / 6 * 2 / 5) ** 0.25, abs=1e-5)
    short = SentenceBLEU()
    short.update("the cat sat on", "the cat sat on the mat")  # brevity penalty exp(1 - 6/4)
    assert short.compute().item() == pytest.approx(math.exp(1 - 6 / 4), abs=1e-5)
    same = SentenceBLEU()
    same.update(["one two three four five .", CAT_P], ["one two three four five .", CAT_T])
    assert same.compute().item() == pytest.approx(0.5, abs=1e-6)  # mean of 1 and 0


def test_corpus_bleu_hand_computed():
    m = CorpusBLEU()
    m.update([CAT_P, "a b c d"], [CAT_T, "a b c d e f"])
    # counts summed over both texts: matches [9, 6, 3, 1] of [10, 8, 6, 4]; lengths 10 vs 12
    expected = math.exp(1 - 12 / 10) * (9 / 10 * 6 / 8 * 3 / 6 * 1 / 4) ** 0.25
    assert m.compute().item() == pytest.approx(expected, abs=1e-5)


def test_exact_reproduction():
    m = ExactReproduction()
    m.update([" Hello world.\n", "Hello  world.", "Hello world. And more", "Bye"], ["Hello world."] * 4)
    assert m.compute().item() == pytest.approx(1 / 4)
    w = ExactReproduction(normalize="whitespace")
    w.update(["Hello \n world.", "Hello world!"], ["Hello world.", "Hello world."])
    assert w.compute().item() == pytest.approx(1 / 2)
    p = ExactReproduction(prefix=True, drop=("<|eot|>",))
    p.update(["Hello world. And more", "Hello world.<|eot|>", "Hello"], ["Hello world."] * 3)
    assert p.compute().item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="normalize"):
        ExactReproduction(normalize="lower")
    assert normalize_text("  a \n\n b<e> ", "whitespace", drop=("<e>",)) == "a b"


def test_answer_contained():
    m = AnswerContained()
    m.update(["The president is Kolinda Grabar-Kitarović.", "It is Zagreb", "no idea"],
             [["Kolinda  Grabar-Kitarović", "Grabar-Kitarović"], "zagreb", "Paris"])
    assert m.compute().item() == pytest.approx(2 / 3)


def test_teacher_forced_accuracy_and_token_correct():
    vocab, ids = 5, torch.tensor([0, 3, 1, 4, 2])
    logits = torch.zeros(5, vocab)
    # position p is predicted at p - 1: predict 3, 1, 0 (wrong, gold 4), 2
    for p, tok in [(0, 3), (1, 1), (2, 0), (3, 2)]:
        logits[p, tok] = 1.0
    hits = token_correct(logits, ids, [1, 2, 3, 4])
    assert hits.tolist() == [True, True, False, True]
    with pytest.raises(ValueError):
        token_correct(logits, ids, [0, 1])
    m = TeacherForcedAccuracy()
    m.update([hits, torch.tensor([False, False])])
    assert m.compute().item() == pytest.approx((3 / 4 + 0) / 2)
    t = TeacherForcedAccuracy(average="token")
    t.update([hits, torch.tensor([False, False])])
    assert t.compute().item() == pytest.approx(3 / 6)


def test_longform_metrics_names_and_values():
    m = LongFormMetrics(drop=("<|eot|>",))
    m.update([CAT_P + "<|eot|>", ABC_P], [CAT_T, ABC_T])
    out = m.compute()
    assert set(out) == {"rouge1", "rouge2", "rouge_l", "rouge1_recall", "rouge2_recall", "rouge_l_recall", "bleu",
                        "exact_match", "count"}
    assert out["rouge_l"].item() == pytest.approx((5 / 6 + f1(1, 0.5)) / 2, abs=1e-6)
    assert out["rouge_l_recall"].item() == pytest.approx((5 / 6 + 0.5) / 2, abs=1e-6)
    assert out["exact_match"].item() == 0.0 and int(out["count"]) == 2
    m.update([CAT_T], [CAT_T + "<|eot|>"])
    assert m.compute()["exact_match"].item() == pytest.approx(1 / 3)
    m.reset()
    assert int(m.compute()["count"]) == 0


@pytest.mark.parametrize("make,args", [
    (RougeScores, ([CAT_P, ABC_P, "x y"], [CAT_T, ABC_T, "x y z"])),
    (SentenceBLEU, ([CAT_P, "one two three four five", "a"], [CAT_T, "one two three four five", "a b"])),
    (CorpusBLEU, ([CAT_P, "a b c d", "q r s t"], [CAT_T, "a b c d e f", "q r s t"])),
    (ExactReproduction, (["a", "b", "c"], ["a", "x", "c"])),
    (AnswerContained, (["a b", "c", "d e"], ["b", "z", "e"])),
])
def test_states_sum_across_processes(make, args):
    """Every state reduces by sum, and two processes' summed states give the metric of all inputs."""
    preds, targets = args
    whole = make()
    whole.update(preds, targets)
    part_a, part_b = make(), make()
    part_a.update(preds[:2], targets[:2])
    part_b.update(preds[2:], targets[2:])
    for name, reduce in part_a._reductions.items():
        assert reduce is not None and reduce.__name__ == "dim_zero_sum", name
        setattr(part_a, name, getattr(part_a, name) + getattr(part_b, name))
    got, want = part_a.compute(), whole.compute()
    if isinstance(want, dict):
        for k in want:
            assert got[k].item() == pytest.approx(want[k].item(), abs=1e-6)
    else:
        assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_first_miss_is_where_greedy_generation_leaves_the_target(trained_gpt2, tokenizer):
    """The diagnostic's promise, checked against the generation itself: up to the first
    teacher-forced miss the greedy generation is the target token for token, and at the miss it
    writes the predicted token instead of the expected one."""
    from lightning_edit.evaluation.scoring import greedy_generate
    from lightning_edit.longform.edit import LongFormConfig, evaluate_longform
    from lightning_edit.longform.metrics import first_miss
    from lightning_edit.longform.records import LongFormRequest

    assert first_miss(torch.tensor([True, True, False, True])) == 2
    assert first_miss(torch.tensor([True, True])) == 2 and first_miss(torch.tensor([], dtype=torch.bool)) == 0
    reqs = [LongFormRequest(case_id=str(i), question=q, answer=a) for i, (q, a) in enumerate([
        ("Tell me about Toko Yasuda.", " Toko Yasuda speaks French and lives in Paris. She plays the violin."),
        ("Where is the Louvre?", " The Louvre is in Paris, the capital of France."),
    ])]
    out, texts = evaluate_longform(trained_gpt2, tokenizer, reqs, LongFormConfig(), return_texts=True)
    assert 0.0 <= out["longform/prefix_kept"] <= 1.0
    kept = []
    for r, t in zip(reqs, texts):
        target = tokenizer(r.answer, add_special_tokens=False)["input_ids"]
        gen = greedy_generate(trained_gpt2, tokenizer, [r.question], max_new_tokens=len(target) + 2)[0]
        gen_ids = tokenizer(gen, add_special_tokens=False)["input_ids"]
        i = t["first_miss"]
        assert t["answer_tokens"] >= len(target) and i <= len(target)
        assert gen_ids[:i] == target[:i]
        if i < len(target):
            assert tokenizer.decode(gen_ids[i:i + 1]) == t["predicted"] != t["expected"] == tokenizer.decode(target[i:i + 1])
        kept.append(i / t["answer_tokens"])
    assert out["longform/prefix_kept"] == pytest.approx(sum(kept) / len(kept))
    assert any(t["first_miss"] < t["answer_tokens"] for t in texts)  # the miss branch was checked
