"""Metrics against hand-computed values, and the additive-state property DDP sync relies on."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_edit.evaluation.metrics import (
    KnownShare,
    LogProbDrop,
    NeighborhoodSuccess,
    NgramEntropy,
    Perplexity,
    ProbabilityMargin,
    Retention,
    RewriteSuccess,
    TfidfConsistency,
    TfidfVectorizer,
    TokenAccuracy,
    ngram_entropy,
    word_tokens,
)

NLL_NEW = torch.tensor([0.5, 2.0, 1.0, 3.0])
NLL_TRUE = torch.tensor([1.0, 1.0, 2.0, 0.5])


def test_rewrite_success():
    m = RewriteSuccess()
    m.update(NLL_NEW, NLL_TRUE)  # true > new at rows 0 and 2
    assert m.compute().item() == pytest.approx(2 / 4)


def test_neighborhood_success():
    m = NeighborhoodSuccess()
    m.update(NLL_NEW, NLL_TRUE)  # true < new at rows 1 and 3
    assert m.compute().item() == pytest.approx(2 / 4)
    m.update(torch.tensor([1.0]), torch.tensor([1.0]))  # a tie counts for neither
    assert m.compute().item() == pytest.approx(2 / 5)


def test_probability_margin():
    m = ProbabilityMargin()
    m.update(NLL_NEW, NLL_TRUE)
    expected = sum(math.exp(-a) - math.exp(-b) for a, b in zip(NLL_NEW.tolist(), NLL_TRUE.tolist())) / 4
    assert m.compute().item() == pytest.approx(expected, abs=1e-6)


def test_token_accuracy_token_and_prompt_average():
    p1 = torch.tensor([True, False, True, True])  # 3/4
    p2 = torch.tensor([False, True])  # 1/2
    by_token = TokenAccuracy(average="token")
    by_token.update([p1, p2])
    assert by_token.compute().item() == pytest.approx(4 / 6)
    by_prompt = TokenAccuracy()
    by_prompt.update([p1, p2])
    assert by_prompt.compute().item() == pytest.approx((3 / 4 + 1 / 2) / 2)
    single = TokenAccuracy()
    single.update(p1)  # one tensor = one prompt; equals the token share
    assert single.compute().item() == pytest.approx(3 / 4)


def test_retention():
    before = torch.tensor([[5, 6], [7, 8], [9, -1]])
    after = torch.tensor([[5, 6], [7, 1], [9, -1]])
    m = Retention()
    m.update(after, before)  # rows 0 and 2 unchanged
    assert m.compute().item() == pytest.approx(2 / 3)
    b = Retention()
    b.update(torch.tensor([True, False, True, True]), torch.tensor([True, True, True, False]))
    assert b.compute().item() == pytest.approx(2 / 4)


def test_word_tokens():
    assert word_tokens("Paris is big, isn't it?") == ["Paris", "is", "big", ",", "isn", "'", "t", "it", "?"]


def test_ngram_entropy_hand_computed():
    # tokens: a b a b a -> bigrams ab, ba, ab, ba (2 kinds, 1/2 each): H2 = 1 bit
    # trigrams aba, bab, aba (2/3, 1/3): H3 = -(2/3 log2 2/3 + 1/3 log2 1/3)
    h2 = 1.0
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected_1 = (2 / 3 * h2 + 4 / 3 * h3) / 2
    assert ngram_entropy("a b a b a") == pytest.approx(expected_1)
    # all distinct: 4 bigrams (H2 = 2 bits), 3 trigrams (H3 = log2 3)
    expected_2 = (2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2
    assert ngram_entropy("one two three four five") == pytest.approx(expected_2)
    assert ngram_entropy("alone") == 0.0
    m = NgramEntropy()
    m.update(["a b a b a", "one two three four five"])
    assert m.compute().item() == pytest.approx((expected_1 + expected_2) / 2, rel=1e-6)


CORPUS = ["the cat sat", "the dog sat down", "a bird flew"]


def test_tfidf_vectorizer_hand_computed():
    vec = TfidfVectorizer().fit(CORPUS)
    # "a" has one character: not a term
    assert sorted(vec.vocabulary_) == ["bird", "cat", "dog", "down", "flew", "sat", "the"]
    idf = lambda df: math.log((1 + 3) / (1 + df)) + 1  # noqa: E731
    assert vec.idf_[vec.vocabulary_["the"]].item() == pytest.approx(idf(2))
    assert vec.idf_[vec.vocabulary_["cat"]].item() == pytest.approx(idf(1))
    # "The cat, the CAT": tf the=2, cat=2 -> weights 2*idf(2), 2*idf(1), l2-normalized
    x = vec.transform(["The cat, the CAT", "zebra"])
    n = math.hypot(2 * idf(2), 2 * idf(1))
    assert x[0, vec.vocabulary_["the"]].item() == pytest.approx(2 * idf(2) / n)
    assert x[0, vec.vocabulary_["cat"]].item() == pytest.approx(2 * idf(1) / n)
    assert x[1].abs().sum().item() == 0.0  # out-of-vocabulary only
    # similarity equals the dot product of the dense rows
    y = vec.transform(["the dog sat", "cat sat"])
    assert vec.similarity("the dog sat", "cat sat") == pytest.approx(float(y[0] @ y[1]))


def test_tfidf_consistency_hand_computed():
    idf = lambda df: math.log(4 / (1 + df)) + 1  # noqa: E731
    m = TfidfConsistency(CORPUS)
    # case 1: "cat sat" vs refs joined "the cat" -> vectors (cat, sat) and (the, cat)
    a = {"cat": idf(1), "sat": idf(2)}
    b = {"the": idf(2), "cat": idf(1)}
    cos1 = a["cat"] * b["cat"] / (math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values())))
    # case 2: list of generations joined; "bird flew" vs "bird flew": cosine 1
    m.update(["cat sat", ["bird", "flew"]], [["the", "cat"], ["bird flew"]])
    assert m.compute().item() == pytest.approx((cos1 + 1.0) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        m.update(["x"], [])


def test_perplexity_hand_computed():
    m = Perplexity()
    m.update(torch.tensor([1.0, 2.0, 3.0]))
    m.update(torch.tensor([[4.0, 100.0]]), mask=torch.tensor([[True, False]]))
    assert m.compute().item() == pytest.approx(math.exp((1 + 2 + 3 + 4) / 4), rel=1e-6)


def test_empty_metric_is_nan():
    m = RewriteSuccess()
    m.update(torch.zeros(0), torch.zeros(0))
    assert int(m.total) == 0 and math.isnan(m.compute().item())


# (factory, first-half args, second-half args): two instances fed the halves, states summed
HALVES = [
    (RewriteSuccess, (NLL_NEW[:2], NLL_TRUE[:2]), (NLL_NEW[2:], NLL_TRUE[2:])),
    (NeighborhoodSuccess, (NLL_NEW[:3], NLL_TRUE[:3]), (NLL_NEW[3:], NLL_TRUE[3:])),
    (ProbabilityMargin, (NLL_NEW[:1], NLL_TRUE[:1]), (NLL_NEW[1:], NLL_TRUE[1:])),
    (TokenAccuracy, ([torch.tensor([True, False, True])],), ([torch.tensor([False]), torch.tensor([True, True])],)),
    (lambda: TokenAccuracy("token"), ([torch.tensor([True, False, True])],), ([torch.tensor([False]), torch.tensor([True, True])],)),
    (Retention, (torch.tensor([[1, 2]]), torch.tensor([[1, 2]])), (torch.tensor([[3, 4], [5, 6]]), torch.tensor([[3, 0], [5, 6]]))),
    (KnownShare, (torch.tensor([True, False]),), (torch.tensor([True, True, False]),)),
    (LogProbDrop, (-NLL_TRUE[:2], -NLL_NEW[:2]), (-NLL_TRUE[2:], -NLL_NEW[2:])),
    (NgramEntropy, (["a b a b a"],), (["one two three four", "x y x y"],)),
    (lambda: TfidfConsistency(CORPUS), (["cat sat"], [["the cat"]]), (["dog down", "bird"], [["the dog sat down"], ["a bird flew"]])),
    (Perplexity, (torch.tensor([0.5, 1.5]),), (torch.tensor([2.5]),)),
]


@pytest.mark.parametrize("factory,first,second", HALVES)
def test_summed_states_equal_one_instance_on_both_halves(factory, first, second):
    a, b, whole, merged = factory(), factory(), factory(), factory()
    a.update(*first)
    b.update(*second)
    whole.update(*first)
    whole.update(*second)
    for name, reduce_fx in merged._reductions.items():
        assert reduce_fx is not None  # every state is reducible across processes
        setattr(merged, name, getattr(a, name) + getattr(b, name))
        assert torch.allclose(getattr(merged, name).double(), getattr(whole, name).double(), atol=1e-6)
    merged._update_count = 1
    assert merged.compute().item() == pytest.approx(whole.compute().item(), rel=1e-6)
    assert type(a).full_state_update is False
