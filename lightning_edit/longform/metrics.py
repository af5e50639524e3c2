"""Long-form metrics as :class:`torchmetrics.Metric` s (AnyEdit evaluation).

Every metric here keeps only additive states (``dist_reduce_fx="sum"``), so instances on
different processes combine by summing their states, and ``compute`` on the sums gives the
metric over all inputs (``nan`` before any input).

The n-gram arithmetic is torchmetrics' own (``torchmetrics.functional.text``): ROUGE with its
default normalization (lower-case, runs of characters other than ``a-z0-9`` become spaces; no
stemmer, so no ``nltk`` and no download) and sacreBLEU-style BLEU with the ``13a`` tokenizer.
What is added here is the per-text averaging in sum states (torchmetrics' ``ROUGEScore`` keeps
per-text lists, which gather rather than sum).

- :class:`RougeScores`: ROUGE-1/2/L F1, recall and precision, mean over texts.
- :class:`SentenceBLEU`: BLEU-4 of each text against its reference, mean over texts.
- :class:`CorpusBLEU`: corpus-level BLEU-4 (n-gram counts summed over texts, then one score).
- :class:`ExactReproduction`: share of generations equal to the target.
- :class:`TeacherForcedAccuracy`: teacher-forced top-1 token accuracy of the target tokens.
- :class:`AnswerContained`: share of generations containing the answer or an alias (sub-questions,
  multi-hop questions).
- :class:`LongFormMetrics`: ROUGE + sentence BLEU + exact reproduction in one update, with the
  report's names (``rouge_l``, ``bleu``, ``exact_match``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.text import rouge_score, sacre_bleu_score
from torchmetrics.text import SacreBLEUScore

from lightning_edit.errors import InputError
from lightning_edit.evaluation.metrics import TokenAccuracy

__all__ = [
    "ROUGE_KEYS",
    "AnswerContained",
    "CorpusBLEU",
    "ExactReproduction",
    "LongFormMetrics",
    "RougeScores",
    "SentenceBLEU",
    "TeacherForcedAccuracy",
    "normalize_text",
    "token_correct",
]

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
_PARTS = ("fmeasure", "recall", "precision")


def _pairs(preds: str | Sequence[str], targets: str | Sequence[str]) -> tuple[list[str], list[str]]:
    preds = [preds] if isinstance(preds, str) else list(preds)
    targets = [targets] if isinstance(targets, str) else list(targets)
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} generations but {len(targets)} targets")
    for i, (p, t) in enumerate(zip(preds, targets)):
        if not isinstance(p, str) or not isinstance(t, str):
            raise ValueError(f"item {i}: generations and targets must be strings, got {type(p).__name__} / {type(t).__name__}")
    return preds, targets


class _Mean(Metric):
    """Sum states ``value_<name>`` over ``total`` texts; ``compute`` gives the means."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self._names = tuple(names)
        for n in self._names:
            self.add_state(f"value_{n}", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, name: str, value: float | Tensor) -> None:
        state = getattr(self, f"value_{name}")
        setattr(self, f"value_{name}", state + torch.as_tensor(value, dtype=state.dtype, device=state.device))

    def _means(self) -> dict[str, Tensor]:
        n = int(self.total)
        return {k: (getattr(self, f"value_{k}") / n).float() if n else torch.tensor(float("nan"), device=self.total.device)
                for k in self._names}


class RougeScores(_Mean):
    """ROUGE-1, ROUGE-2 and ROUGE-L of each generation against its target, averaged over texts.

    ``update(preds, targets)``: generated texts and target texts (strings or equal-length lists).
    ``compute()``: ``{"rouge1_fmeasure", "rouge1_recall", "rouge1_precision", "rouge2_...",
    "rougeL_..."}``. The AnyEdit reference reports recall; F1 is the usual summary.
    """

    def __init__(self, rouge_keys: Sequence[str] = ROUGE_KEYS, **kwargs):
        bad = [k for k in rouge_keys if k not in ("rouge1", "rouge2", "rouge3", "rouge4", "rouge5", "rougeL")]
        if bad:
            raise InputError(f"unsupported ROUGE keys {bad} (rougeLsum needs nltk data; use rougeL)")
        self.rouge_keys = tuple(rouge_keys)
        super().__init__([f"{k}_{p}" for k in self.rouge_keys for p in _PARTS], **kwargs)

    def update(self, preds: str | Sequence[str], targets: str | Sequence[str]) -> None:
        preds, targets = _pairs(preds, targets)
        for p, t in zip(preds, targets):
            scores = rouge_score(p, t, rouge_keys=self.rouge_keys, use_stemmer=False)
            for name in self._names:
                self._add(name, scores[name])
        self.total += len(preds)

    def compute(self) -> dict[str, Tensor]:
        return self._means()


class SentenceBLEU(_Mean):
    """BLEU (default BLEU-4, uniform weights, brevity penalty) of each generation against its
    target, ``13a``-tokenized as sacreBLEU does, averaged over texts.

    Args:
        n_gram: highest n-gram order.
        smooth: torchmetrics' add-one smoothing of the precisions of orders 2 and up (Lin & Och).
            Note that torchmetrics scores 0 whenever some order has no match at all, smoothed or
            not; long texts almost always share a 4-gram, short ones may not.
        tokenize: sacreBLEU tokenizer (``"13a"``, ``"none"``, ``"char"``, ...).
        lowercase: compare case-insensitively.
    """

    def __init__(self, n_gram: int = 4, smooth: bool = False, tokenize: str = "13a", lowercase: bool = False, **kwargs):
        super().__init__(["bleu"], **kwargs)
        self.n_gram, self.smooth, self.tokenize, self.lowercase = n_gram, smooth, tokenize, lowercase

    def update(self, preds: str | Sequence[str], targets: str | Sequence[str]) -> None:
        preds, targets = _pairs(preds, targets)
        for p, t in zip(preds, targets):
            score = sacre_bleu_score([p], [[t]], n_gram=self.n_gram, smooth=self.smooth, tokenize=self.tokenize,
                                     lowercase=self.lowercase)
            self._add("bleu", score)
        self.total += len(preds)

    def compute(self) -> Tensor:
        return self._means()["bleu"]


class CorpusBLEU(SacreBLEUScore):
    """Corpus-level BLEU-4 (torchmetrics' ``SacreBLEUScore``: n-gram match counts and lengths are
    sum states). ``update(preds, targets)`` also takes one target string per generation."""

    def __init__(self, n_gram: int = 4, smooth: bool = False, tokenize: str = "13a", lowercase: bool = False, **kwargs):
        super().__init__(n_gram=n_gram, smooth=smooth, tokenize=tokenize, lowercase=lowercase, **kwargs)

    def update(self, preds: str | Sequence[str], targets: str | Sequence[str] | Sequence[Sequence[str]]) -> None:
        preds = [preds] if isinstance(preds, str) else list(preds)
        targets = [targets] if isinstance(targets, str) else list(targets)
        targets = [[t] if isinstance(t, str) else list(t) for t in targets]
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} generations but {len(targets)} targets")
        super().update(preds, targets)


_WS = re.compile(r"\s+")


def normalize_text(text: str, mode: Literal["strip", "whitespace", "none"] = "strip", drop: Sequence[str] = ()) -> str:
    """``text`` without the strings in ``drop`` (end tokens), then: ``"strip"`` leading / trailing
    whitespace removed; ``"whitespace"`` also every whitespace run made one space; ``"none"`` as is."""
    for d in drop:
        if d:
            text = text.replace(d, "")
    if mode == "none":
        return text
    if mode == "whitespace":
        return _WS.sub(" ", text).strip()
    if mode == "strip":
        return text.strip()
    raise InputError(f"normalize must be 'strip', 'whitespace' or 'none', got {mode!r}")


class ExactReproduction(_Mean):
    """Share of generations that reproduce the target exactly (after :func:`normalize_text`).

    Args:
        normalize: see :func:`normalize_text`.
        prefix: count a generation that starts with the target and goes on (did not stop).
        drop: strings removed from both texts first (e.g. ``"<|eot_id|>"``).
    """

    def __init__(self, normalize: Literal["strip", "whitespace", "none"] = "strip", prefix: bool = False,
                 drop: Sequence[str] = (), **kwargs):
        super().__init__(["exact"], **kwargs)
        normalize_text("", normalize)  # validates the mode
        self.normalize, self.prefix, self.drop = normalize, prefix, tuple(drop)

    def update(self, preds: str | Sequence[str], targets: str | Sequence[str]) -> None:
        preds, targets = _pairs(preds, targets)
        hits = 0
        for p, t in zip(preds, targets):
            p, t = normalize_text(p, self.normalize, self.drop), normalize_text(t, self.normalize, self.drop)
            hits += int(p.startswith(t) if self.prefix else p == t)
        self._add("exact", hits)
        self.total += len(preds)

    def compute(self) -> Tensor:
        return self._means()["exact"]


class AnswerContained(_Mean):
    """Share of generations that contain the answer or one of its aliases (case-insensitive,
    whitespace-normalized): UnKEBench sub-questions, MQuAKE multi-hop questions.

    ``update(preds, answers)``: ``answers[i]`` is a string or a list of acceptable strings.
    """

    def __init__(self, **kwargs):
        super().__init__(["hit"], **kwargs)

    def update(self, preds: str | Sequence[str], answers: str | Sequence[str | Sequence[str]]) -> None:
        preds = [preds] if isinstance(preds, str) else list(preds)
        answers = [answers] if isinstance(answers, str) else list(answers)
        if len(preds) != len(answers):
            raise ValueError(f"{len(preds)} generations but {len(answers)} answers")
        hits = 0
        for p, a in zip(preds, answers):
            options = [a] if isinstance(a, str) else list(a)
            text = normalize_text(p, "whitespace").lower()
            hits += int(any(o.strip() and normalize_text(o, "whitespace").lower() in text for o in options))
        self._add("hit", hits)
        self.total += len(preds)

    def compute(self) -> Tensor:
        return self._means()["hit"]


class TeacherForcedAccuracy(TokenAccuracy):
    """Teacher-forced top-1 accuracy of the answer tokens (prompt + gold answer fed in, is the
    argmax at each position the next gold token?).

    ``update(correct)``: a BoolTensor of per-token hits for one request, or a list of them (one per
    request), e.g. from :func:`token_correct`. ``average="prompt"`` (default): each request's
    accuracy, averaged over requests; ``"token"``: pooled over all tokens.
    """


def token_correct(logits: Tensor, input_ids: Tensor, positions: Tensor | Sequence[int]) -> Tensor:
    """Per-token teacher-forced hits: ``argmax(logits[p - 1]) == input_ids[p]`` for each target
    position ``p`` of one sequence (``logits (seq, vocab)``, ``input_ids (seq,)``)."""
    pos = torch.as_tensor(positions, dtype=torch.long, device=logits.device)
    if pos.numel() and int(pos.min()) < 1:
        raise ValueError("target position 0 has no preceding token to predict it")
    return logits[pos - 1].argmax(-1) == input_ids.to(logits.device)[pos]


def first_miss(correct: Tensor) -> int:
    """Index of the first ``False`` in a request's per-token hits (its length when every token is
    right). Under greedy decoding the model's own prefix equals the target's up to there, so this
    is where free generation first leaves the target: teacher-forced accuracy can be high while
    the first miss comes early, and the generation never returns to the target after it."""
    miss = (~correct.bool()).nonzero()
    return int(miss[0]) if miss.numel() else int(correct.numel())


class LongFormMetrics(Metric):
    """Generation quality for long-form edits in one update: ROUGE-1/2/L (F1 and recall),
    sentence BLEU-4 and exact reproduction.

    ``update(preds, targets)``; ``compute()`` returns ``{"rouge1", "rouge2", "rouge_l"`` (F1),
    ``"rouge1_recall", "rouge2_recall", "rouge_l_recall", "bleu", "exact_match", "count"}``.

    Args:
        drop: strings removed from generations and targets before scoring (end tokens).
        bleu_smooth: smoothing of the sentence BLEU.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, drop: Sequence[str] = (), bleu_smooth: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.drop = tuple(drop)
        self.rouge = RougeScores()
        self.bleu = SentenceBLEU(smooth=bleu_smooth)
        self.exact = ExactReproduction(drop=self.drop)

    def update(self, preds: str | Sequence[str], targets: str | Sequence[str]) -> None:
        preds, targets = _pairs(preds, targets)
        preds = [normalize_text(p, "none", self.drop) for p in preds]
        targets = [normalize_text(t, "none", self.drop) for t in targets]
        self.rouge.update(preds, targets)
        self.bleu.update(preds, targets)
        self.exact.update(preds, targets)

    def compute(self) -> dict[str, Tensor]:
        r = self.rouge.compute()
        return {
            "rouge1": r["rouge1_fmeasure"], "rouge2": r["rouge2_fmeasure"], "rouge_l": r["rougeL_fmeasure"],
            "rouge1_recall": r["rouge1_recall"], "rouge2_recall": r["rouge2_recall"], "rouge_l_recall": r["rougeL_recall"],
            "bleu": self.bleu.compute(), "exact_match": self.exact.compute(), "count": self._count(),
        }

    def _count(self) -> Tensor:
        """Texts scored, summed over processes (the children's states are only synced inside
        their own ``compute``; outside it they hold this process's share again)."""
        with self.rouge.sync_context(should_sync=self.rouge.sync_on_compute):
            return self.rouge.total.clone()

    def reset(self) -> None:
        super().reset()
        self.rouge.reset()
        self.bleu.reset()
        self.exact.reset()
