"""Knowledge-editing metrics as :class:`torchmetrics.Metric` subclasses.

Every metric keeps only additive states (``dist_reduce_fx="sum"``) and sets
``full_state_update = False``, so instances on different DDP processes combine by summing
their states, and ``compute`` on the summed states gives the metric over all inputs.

Each metric has a ``total`` state (the number of items averaged over: prompts, tokens,
texts, ...); ``compute`` returns ``nan`` while ``total`` is 0. Inputs may live on any device;
they are moved to the metric's device.

Metrics (definitions: docs/design.md, "Metrics"):

- :class:`RewriteSuccess`: share with ``nll_true > nll_new`` (CounterFact efficacy on the
  rewrite prompt, generalization on paraphrases).
- :class:`NeighborhoodSuccess`: share with ``nll_true < nll_new`` (specificity).
- :class:`ProbabilityMargin`: mean of ``exp(-nll_new) - exp(-nll_true)``.
- :class:`TokenAccuracy`: teacher-forced top-1 token accuracy (ZsRE).
- :class:`Retention`: share of probes whose answer did not change.
- :class:`KnownShare`: share of probes still known (their true object the most likely of the
  relation's objects; the report's ``retention_known``).
- :class:`LogProbDrop`: mean drop of a log-probability, before minus after (the report's
  ``probe_logprob_drop``).
- :class:`NgramEntropy`: ROME/MEMIT fluency, weighted bigram/trigram entropy.
- :class:`TfidfConsistency`: ROME/MEMIT consistency, TF-IDF cosine to reference texts
  (with the small :class:`TfidfVectorizer` implemented here).
- :class:`Perplexity`: ``exp`` of the mean token NLL.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_edit.errors import InputError

__all__ = [
    "RewriteSuccess",
    "NeighborhoodSuccess",
    "ProbabilityMargin",
    "TokenAccuracy",
    "Retention",
    "KnownShare",
    "LogProbDrop",
    "NgramEntropy",
    "TfidfConsistency",
    "TfidfVectorizer",
    "Perplexity",
    "word_tokens",
    "ngram_entropy",
]


class _SumMetric(Metric):
    """Base: a ``value`` sum over ``total`` items; ``compute`` = ``value / total``."""

    full_state_update = False
    is_differentiable = False
    higher_is_better: bool | None = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # float32 (not float64) so the states also live on devices without float64 (MPS)
        self.add_state("value", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, value: Tensor | float, count: int | Tensor) -> None:
        """Add a summed ``value`` over ``count`` items to the states."""
        if isinstance(value, Tensor):
            value = value.detach().to(device=self.value.device, dtype=self.value.dtype)
        self.value += value  # Python floats are summed in float64 before this
        self.total += int(count)

    def compute(self) -> Tensor:
        """``value / total`` as a float32 scalar (``nan`` with no data)."""
        if int(self.total) == 0:
            return torch.tensor(float("nan"), device=self.value.device)
        return (self.value / self.total).float()


def _as_1d(x: Tensor | Sequence[float], device: torch.device) -> Tensor:
    x = x if isinstance(x, Tensor) else torch.as_tensor(x)
    return x.detach().reshape(-1).to(device=device, dtype=torch.float32)


class RewriteSuccess(_SumMetric):
    """Share of prompts on which the new target is more likely than the true one.

    ``update(nll_new, nll_true)``: per-prompt mean target NLLs, shape ``(n,)`` each; counts
    ``nll_true > nll_new``. CounterFact efficacy (rewrite prompt) and generalization
    (paraphrase prompts).
    """

    def update(self, nll_new: Tensor, nll_true: Tensor) -> None:
        new, true = _as_1d(nll_new, self.value.device), _as_1d(nll_true, self.value.device)
        if new.shape != true.shape:
            raise ValueError(f"nll_new {tuple(new.shape)} and nll_true {tuple(true.shape)} differ in shape")
        self._add((true > new).sum(), new.numel())


class NeighborhoodSuccess(_SumMetric):
    """Share of neighbourhood (locality) prompts on which the true answer stays more likely
    than the edit's new target: counts ``nll_true < nll_new``. Shapes ``(n,)``."""

    def update(self, nll_new: Tensor, nll_true: Tensor) -> None:
        new, true = _as_1d(nll_new, self.value.device), _as_1d(nll_true, self.value.device)
        if new.shape != true.shape:
            raise ValueError(f"nll_new {tuple(new.shape)} and nll_true {tuple(true.shape)} differ in shape")
        self._add((true < new).sum(), new.numel())


class ProbabilityMargin(_SumMetric):
    """Mean of ``exp(-nll_new) - exp(-nll_true)`` (probability of the new target minus that of
    the true one, each from its per-token mean NLL). Shapes ``(n,)``."""

    def update(self, nll_new: Tensor, nll_true: Tensor) -> None:
        new, true = _as_1d(nll_new, self.value.device), _as_1d(nll_true, self.value.device)
        if new.shape != true.shape:
            raise ValueError(f"nll_new {tuple(new.shape)} and nll_true {tuple(true.shape)} differ in shape")
        self._add((torch.exp(-new) - torch.exp(-true)).sum(), new.numel())


class TokenAccuracy(_SumMetric):
    """Teacher-forced top-1 token accuracy (ZsRE rewrite / paraphrase / locality).

    ``update(correct)`` takes a BoolTensor of per-token hits (any shape) for *one* prompt, or a
    sequence of such tensors, one per prompt.

    Args:
        average: ``"prompt"`` (default, as ROME/MEMIT/EasyEdit report ZsRE): the accuracy of
            each prompt over its tokens, averaged over prompts. ``"token"``: hits over all
            tokens pooled. Both agree for a single prompt.
    """

    def __init__(self, average: Literal["prompt", "token"] = "prompt", **kwargs):
        super().__init__(**kwargs)
        if average not in ("prompt", "token"):
            raise InputError(f"average must be 'prompt' or 'token', got {average!r}")
        self.average = average

    def update(self, correct: Tensor | Sequence[Tensor]) -> None:
        groups = [correct] if isinstance(correct, Tensor) else list(correct)
        for g in groups:
            g = torch.as_tensor(g).detach().reshape(-1).to(self.value.device)
            if g.numel() == 0:
                continue
            if self.average == "token":
                self._add(g.sum(), g.numel())
            else:
                self._add(g.float().mean(), 1)


class Retention(_SumMetric):
    """Share of probes whose answer is unchanged.

    ``update(pred_after, pred_before)``: tensors of equal shape ``(n, ...)``, one row per
    probe (token ids, e.g. from :func:`lightning_edit.evaluation.scoring.top1_tokens`, or per-probe
    bools). A probe counts as retained when every entry of its row is equal.
    """

    def update(self, pred_after: Tensor, pred_before: Tensor) -> None:
        after, before = torch.as_tensor(pred_after), torch.as_tensor(pred_before)
        if after.shape != before.shape:
            raise ValueError(f"pred_after {tuple(after.shape)} and pred_before {tuple(before.shape)} differ in shape")
        if after.numel() == 0:
            return
        same = after.to(self.value.device) == before.to(self.value.device)
        same = same.reshape(same.shape[0], -1).all(dim=1) if same.dim() > 1 else same
        self._add(same.sum(), same.numel())


class KnownShare(_SumMetric):
    """Share of probes that are known: ``update(known)``, a BoolTensor with one entry per probe
    (e.g. from :func:`lightning_edit.builtin.realfacts.known_facts`: the true object is the most likely
    of its relation's objects)."""

    def update(self, known: Tensor) -> None:
        known = torch.as_tensor(known).detach().reshape(-1).to(self.value.device)
        self._add(known.sum(), known.numel())


class LogProbDrop(_SumMetric):
    """Mean of ``logp_before - logp_after`` (nats; positive = the answers became less likely).

    ``update(logp_before, logp_after)``: per-probe log-probabilities of the same answers, shape
    ``(n,)`` each (e.g. the sum of the answer's token log-probabilities)."""

    higher_is_better = False

    def update(self, logp_before: Tensor, logp_after: Tensor) -> None:
        before, after = _as_1d(logp_before, self.value.device), _as_1d(logp_after, self.value.device)
        if before.shape != after.shape:
            raise ValueError(f"logp_before {tuple(before.shape)} and logp_after {tuple(after.shape)} differ in shape")
        self._add((before - after).sum(), before.numel())


# ---------------------------------------------------------------- fluency

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Words and single punctuation marks (an approximation of ``nltk.word_tokenize``)."""
    return _WORD_RE.findall(text)


def _entropy_bits(counts: Iterable[int]) -> float:
    counts = [c for c in counts if c > 0]
    total = sum(counts)
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME/MEMIT n-gram entropy of one text: ``mean_k(weights[k] * H_{ns[k]})`` with ``H_n`` the
    entropy in bits of the frequency distribution of the text's word n-grams (0 when the text
    has fewer than ``n`` words). Default: ``(2/3 H2 + 4/3 H3) / 2``."""
    toks = word_tokens(text)
    terms = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
        terms.append(w * _entropy_bits(grams.values()))
    return sum(terms) / len(terms)


class NgramEntropy(_SumMetric):
    """Fluency: mean over texts of :func:`ngram_entropy`. ``update(texts: list[str])``."""

    def update(self, texts: Sequence[str]) -> None:
        if isinstance(texts, str):
            texts = [texts]
        self._add(sum(ngram_entropy(t) for t in texts), len(texts))


# ---------------------------------------------------------------- consistency


class TfidfVectorizer:
    """A small TF-IDF vectorizer with scikit-learn's defaults.

    Tokens: lower-cased runs of 2+ word characters (``(?u)\\b\\w\\w+\\b``); term frequency =
    raw count; ``idf = ln((1 + N) / (1 + df)) + 1`` (smooth idf) over the ``N`` documents
    given to :meth:`fit`; vectors are l2-normalized. Terms outside the fitted vocabulary are
    ignored.
    """

    token_pattern = re.compile(r"(?u)\b\w\w+\b")

    def __init__(self, lowercase: bool = True):
        self.lowercase = lowercase
        self.vocabulary_: dict[str, int] = {}
        self.idf_: Tensor = torch.zeros(0, dtype=torch.float64)
        self._idf: list[float] = []

    def tokenize(self, text: str) -> list[str]:
        """The terms of ``text``."""
        return self.token_pattern.findall(text.lower() if self.lowercase else text)

    def fit(self, documents: Sequence[str]) -> "TfidfVectorizer":
        """Vocabulary (sorted terms) and smooth idf ``(n_terms,)`` from ``documents``."""
        df: Counter[str] = Counter()
        for doc in documents:
            df.update(set(self.tokenize(doc)))
        terms = sorted(df)
        n = len(documents)
        self.vocabulary_ = {t: i for i, t in enumerate(terms)}
        self.idf_ = torch.tensor([math.log((1 + n) / (1 + df[t])) + 1.0 for t in terms], dtype=torch.float64)
        self._idf = []
        return self

    @classmethod
    def from_idf(cls, vocabulary: Mapping[str, int], idf: Sequence[float] | Tensor, lowercase: bool = True) -> "TfidfVectorizer":
        """A vectorizer with a precomputed vocabulary and idf (e.g. ROME's ``idf.npy`` and
        ``tfidf_vocab.json``)."""
        vec = cls(lowercase=lowercase)
        vec.vocabulary_ = dict(vocabulary)
        vec.idf_ = torch.as_tensor(idf, dtype=torch.float64).reshape(-1)
        if len(vec.vocabulary_) and max(vec.vocabulary_.values()) >= vec.idf_.numel():
            raise ValueError("vocabulary indices exceed the idf length")
        return vec

    def _weights(self, text: str) -> dict[int, float]:
        """Sparse l2-normalized tf-idf vector ``{term index: weight}``."""
        counts = Counter(self.vocabulary_[t] for t in self.tokenize(text) if t in self.vocabulary_)
        if len(self._idf) != self.idf_.numel():  # a plain-float copy of idf_ (fast indexing), made once
            self._idf = self.idf_.tolist()
        w = {i: c * self._idf[i] for i, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in w.values()))
        return {i: v / norm for i, v in w.items()} if norm > 0 else {}

    def transform(self, documents: Sequence[str]) -> Tensor:
        """Dense l2-normalized tf-idf matrix ``(n_docs, n_terms)`` (float64)."""
        out = torch.zeros(len(documents), len(self.vocabulary_), dtype=torch.float64)
        for r, doc in enumerate(documents):
            for i, v in self._weights(doc).items():
                out[r, i] = v
        return out

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the tf-idf vectors of ``a`` and ``b`` (0 if either is empty)."""
        wa, wb = self._weights(a), self._weights(b)
        return sum(v * wb.get(i, 0.0) for i, v in wa.items())


class TfidfConsistency(_SumMetric):
    """Consistency (ROME/MEMIT): mean over cases of the TF-IDF cosine between the generated
    text and the joined reference texts about the new object.

    Args:
        vectorizer: a fitted :class:`TfidfVectorizer`, or a list of documents (the reference
            corpus) to fit one on. The idf must not depend on the evaluated batch, so that
            values from different processes are comparable.

    ``update(generated, references)``: ``generated[i]`` is the text generated for case ``i``
    (a list of texts is joined with spaces), ``references[i]`` its reference texts (joined
    with spaces).
    """

    def __init__(self, vectorizer: TfidfVectorizer | Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.vectorizer = vectorizer if isinstance(vectorizer, TfidfVectorizer) else TfidfVectorizer().fit(list(vectorizer))

    def update(self, generated: Sequence[str | Sequence[str]], references: Sequence[Sequence[str]]) -> None:
        if len(generated) != len(references):
            raise ValueError(f"{len(generated)} generated texts but {len(references)} reference lists")
        total = 0.0
        for gen, refs in zip(generated, references):
            gen = gen if isinstance(gen, str) else " ".join(gen)
            refs = refs if isinstance(refs, str) else " ".join(refs)
            total += self.vectorizer.similarity(gen, refs)
        self._add(total, len(generated))


# ---------------------------------------------------------------- perplexity


class Perplexity(_SumMetric):
    """Perplexity ``exp(sum NLL / n_tokens)`` of a model on held-out text.

    ``update(token_nll, mask=None)``: per-token NLLs in nats (any shape, e.g. from
    :func:`lightning_edit.evaluation.scoring.text_token_nll`); ``mask`` (same shape, bool) selects the
    tokens that count.
    """

    higher_is_better = False

    def update(self, token_nll: Tensor, mask: Tensor | None = None) -> None:
        nll = torch.as_tensor(token_nll).detach().to(device=self.value.device, dtype=torch.float32)
        if mask is not None:
            nll = nll[torch.as_tensor(mask, dtype=torch.bool, device=nll.device)]
        self._add(nll.sum(), nll.numel())

    def compute(self) -> Tensor:
        """``exp(mean NLL)`` (``nan`` with no data)."""
        return torch.exp(super().compute())
