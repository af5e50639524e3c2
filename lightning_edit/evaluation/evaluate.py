"""Evaluation of edit requests: CounterFact likelihood comparisons and ZsRE token accuracy.

Two levels:

- :func:`update_edit_metrics` feeds metric objects (e.g. the :class:`MetricCollection` from
  :func:`make_edit_metrics` kept on a LightningModule, so they sync across processes and can be
  logged); every (prompt, target) pair needed by the requested metrics is collected first,
  de-duplicated, and scored in one :func:`~lightning_edit.evaluation.scoring.target_scores` call.
- :func:`evaluate_requests` does the same with fresh metrics and returns plain floats, only for
  metrics that received data.

Metric keys:

- ``counterfact`` requests: ``edit/efficacy`` (rewrite prompt, ``NLL(true) > NLL(new)``),
  ``edit/generalization`` (same over all paraphrase prompts), ``edit/margin`` (mean
  ``p(new) - p(true)`` on rewrite prompts) -- these need ``target_true`` and skip requests
  without it -- and ``edit/specificity`` (over all locality pairs ``(prompt, answer)``:
  ``NLL(answer) < NLL(target_new)``).
- ``zsre`` requests: ``zsre/rewrite``, ``zsre/paraphrase`` (teacher-forced top-1 token accuracy
  of ``target_new``), ``zsre/locality`` (of the locality answer), averaged per prompt.

:func:`evaluate_generation` adds ``edit/fluency`` and ``edit/consistency`` from greedy
generations on the requests' ``generation_prompts``.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Literal

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection

from lightning_edit.data.requests import EditRequest
from lightning_edit.engine.bars import progress_bar
from lightning_edit.errors import InputError
from lightning_edit.evaluation.metrics import (
    NeighborhoodSuccess,
    NgramEntropy,
    ProbabilityMargin,
    RewriteSuccess,
    TfidfConsistency,
    TfidfVectorizer,
    TokenAccuracy,
)
from lightning_edit.evaluation.scoring import greedy_generate, target_scores

__all__ = [
    "COUNTERFACT_KEYS",
    "ZSRE_KEYS",
    "make_edit_metrics",
    "update_edit_metrics",
    "evaluate_requests",
    "evaluate_generation",
    "locality_probes",
    "OUTCOME_KEYS",
    "request_outcomes",
    "outcome_metrics",
]

COUNTERFACT_KEYS = ("edit/efficacy", "edit/generalization", "edit/specificity", "edit/margin")
ZSRE_KEYS = ("zsre/rewrite", "zsre/paraphrase", "zsre/locality")


def make_edit_metrics(family: Literal["counterfact", "zsre", "all"] = "all") -> MetricCollection:
    """Fresh metric objects for ``family``, keyed as in the module docstring.

    ``compute_groups=False``: metrics of the same class (efficacy and generalization) are fed
    different data and must never share states.
    """
    metrics: dict[str, Metric] = {}
    if family in ("counterfact", "all"):
        metrics.update({
            "edit/efficacy": RewriteSuccess(),
            "edit/generalization": RewriteSuccess(),
            "edit/specificity": NeighborhoodSuccess(),
            "edit/margin": ProbabilityMargin(),
        })
    if family in ("zsre", "all"):
        metrics.update({k: TokenAccuracy(average="prompt") for k in ZSRE_KEYS})
    if not metrics:
        raise InputError(f"unknown metric family {family!r} (counterfact, zsre, all)")
    return MetricCollection(metrics, compute_groups=False)


class _Pairs:
    """De-duplicated (prompt, target) pairs; :meth:`add` returns a pair's index."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.targets: list[str] = []
        self._index: dict[tuple[str, str], int] = {}

    def add(self, prompt: str, target: str) -> int:
        key = (prompt, target)
        if key not in self._index:
            self._index[key] = len(self.prompts)
            self.prompts.append(prompt)
            self.targets.append(target)
        return self._index[key]


def update_edit_metrics(
    metrics: MutableMapping[str, Metric] | MetricCollection,
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    batch_size: int = 64,
    progress: bool = False,
) -> None:
    """Update those of ``metrics`` (keys from :data:`COUNTERFACT_KEYS` / :data:`ZSRE_KEYS`)
    that are present, with one batched scoring call over all pairs of all ``requests``.

    Each request contributes to the keys of its own ``family``; keys not in ``metrics`` are
    neither scored nor updated. ``progress``: a bar over the scoring forwards (stderr).
    """
    want = {k for k in (*COUNTERFACT_KEYS, *ZSRE_KEYS) if k in metrics}
    pairs = _Pairs()
    # key -> list of (index of new-target pair, index of true-answer pair)  [CounterFact]
    compare: dict[str, list[tuple[int, int]]] = {k: [] for k in COUNTERFACT_KEYS}
    # key -> list of pair indices whose token accuracy counts  [ZsRE]
    accuracy: dict[str, list[int]] = {k: [] for k in ZSRE_KEYS}
    for req in requests:
        rewrite = req.rendered_prompt
        if req.family == "counterfact":
            if req.target_true is not None:
                if want & {"edit/efficacy", "edit/margin"}:
                    pair = (pairs.add(rewrite, req.target_new), pairs.add(rewrite, req.target_true))
                    compare["edit/efficacy"].append(pair)
                    compare["edit/margin"].append(pair)
                if "edit/generalization" in want:
                    for p in req.paraphrase_prompts:
                        compare["edit/generalization"].append((pairs.add(p, req.target_new), pairs.add(p, req.target_true)))
            if "edit/specificity" in want:
                for p, answer in req.locality:
                    compare["edit/specificity"].append((pairs.add(p, req.target_new), pairs.add(p, answer)))
        elif req.family == "zsre":
            if "zsre/rewrite" in want:
                accuracy["zsre/rewrite"].append(pairs.add(rewrite, req.target_new))
            if "zsre/paraphrase" in want:
                accuracy["zsre/paraphrase"].extend(pairs.add(p, req.target_new) for p in req.paraphrase_prompts)
            if "zsre/locality" in want:
                accuracy["zsre/locality"].extend(pairs.add(p, answer) for p, answer in req.locality)
        else:
            raise ValueError(f"request {req.case_id!r}: unknown metric family {req.family!r}")
    if not pairs.prompts:
        return

    n_batches = -(-len(pairs.prompts) // max(1, batch_size))
    with progress_bar(f"evaluation ({len(requests)} requests)", n_batches, "batch", enabled=progress) as bar:
        scores = target_scores(model, tokenizer, pairs.prompts, pairs.targets, batch_size=batch_size, on_batch=bar.update)
    for key, idx in compare.items():
        if key in want and idx:
            new, true = torch.tensor(idx).T  # (n,), (n,)
            metrics[key].update(scores.nll[new], scores.nll[true])
    for key, idx in accuracy.items():
        if key in want and idx:
            metrics[key].update([scores.token_correct[i] for i in idx])


def _has_data(metric: Metric) -> bool:
    """Whether ``metric`` has counted any item (its ``total`` state, see :mod:`lightning_edit.evaluation.metrics`)."""
    return int(metric.total) > 0


def evaluate_requests(model: nn.Module, tokenizer, requests: Sequence[EditRequest], batch_size: int = 64,
                      progress: bool = False) -> dict[str, float]:
    """Edit metrics of ``model`` on ``requests`` as ``{key: value in [0, 1]}`` (``edit/margin``
    in ``[-1, 1]``), only for keys that received data. ``progress``: a bar over the scoring forwards."""
    families = {r.family for r in requests}
    if not families:
        return {}
    metrics = make_edit_metrics("all" if len(families) > 1 else next(iter(families)))
    update_edit_metrics(metrics, model, tokenizer, requests, batch_size=batch_size, progress=progress)
    return {k: float(m.compute()) for k, m in metrics.items() if _has_data(m)}


OUTCOME_KEYS = ("edit/efficacy", "edit/generalization", "edit/specificity")


def request_outcomes(model: nn.Module, tokenizer, requests: Sequence[EditRequest], batch_size: int = 64, progress: bool = False,
                     desc: str = "evaluation") -> torch.Tensor:
    """Per-request counts behind :data:`OUTCOME_KEYS`, from one batched scoring pass:
    ``(n, 6)`` float64 rows ``[efficacy hits, efficacy prompts, generalization hits, paraphrase
    prompts, specificity hits, neighbourhood prompts]`` with the comparisons of
    :func:`update_edit_metrics`. The report keeps these of the unedited model, so the
    "pre-edited" values of any prefix of the stream are sums (:func:`outcome_metrics`) and never
    need the unedited model again. ZsRE requests give zero rows. ``progress``: a bar (``desc``)."""
    pairs = _Pairs()
    cols: list[tuple[int, int, int, int]] = []  # (request, hits column, new-target pair, true-answer pair)
    for i, req in enumerate(requests):
        if req.family != "counterfact":
            continue
        rewrite = req.rendered_prompt
        if req.target_true is not None:
            cols.append((i, 0, pairs.add(rewrite, req.target_new), pairs.add(rewrite, req.target_true)))
            for p in req.paraphrase_prompts:
                cols.append((i, 2, pairs.add(p, req.target_new), pairs.add(p, req.target_true)))
        for p, answer in req.locality:
            cols.append((i, 4, pairs.add(p, req.target_new), pairs.add(p, answer)))
    out = torch.zeros(len(requests), 6, dtype=torch.float64)
    if not pairs.prompts:
        return out

    n_batches = -(-len(pairs.prompts) // max(1, batch_size))
    with progress_bar(f"{desc} ({len(requests)} requests)", n_batches, "batch", enabled=progress) as bar:
        nll = target_scores(model, tokenizer, pairs.prompts, pairs.targets, batch_size=batch_size, on_batch=bar.update).nll
    for i, c, new, true in cols:
        # efficacy / generalization: the new target wins (NLL(true) > NLL(new)); specificity: the true answer does
        hit = nll[true] < nll[new] if c == 4 else nll[true] > nll[new]
        out[i, c] += float(hit)
        out[i, c + 1] += 1
    return out


def outcome_metrics(rows: torch.Tensor) -> dict[str, float]:
    """:data:`OUTCOME_KEYS` from summed :func:`request_outcomes` rows ``(n, 6)`` (e.g. of the
    requests edited so far); a key without prompts is left out."""
    tot = rows.sum(0) if rows.numel() else torch.zeros(6, dtype=torch.float64)
    return {k: float(tot[2 * j] / tot[2 * j + 1]) for j, k in enumerate(OUTCOME_KEYS) if tot[2 * j + 1] > 0}


def locality_probes(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    """All locality ``(prompts, answers)`` of ``requests``, flattened in order; feed them to
    :func:`lightning_edit.evaluation.scoring.top1_tokens` before and after editing and compare with
    :class:`lightning_edit.evaluation.metrics.Retention`."""
    prompts = [p for r in requests for p, _ in r.locality]
    answers = [a for r in requests for _, a in r.locality]
    return prompts, answers


def evaluate_generation(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    references: Mapping[str, Sequence[str]] | None = None,
    vectorizer: TfidfVectorizer | Sequence[str] | None = None,
    max_new_tokens: int = 100,
    batch_size: int = 32,
) -> dict[str, float]:
    """Fluency and consistency of greedy generations on the requests' ``generation_prompts``.

    ``edit/fluency``: :class:`~lightning_edit.evaluation.metrics.NgramEntropy` over the generated texts
    (prompt included, as in ROME). ``edit/consistency``: per request with reference texts in
    ``references`` (keyed by ``case_id``), the TF-IDF cosine between its joined generations and
    its joined references, with ``vectorizer`` (fitted, or a corpus to fit on); only computed
    when both are given. Returns only keys with data.
    """
    prompts = [p for r in requests for p in r.generation_prompts]
    if not prompts:
        return {}
    texts = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, include_prompt=True)
    out: dict[str, float] = {}
    fluency = NgramEntropy()
    fluency.update(texts)
    out["edit/fluency"] = float(fluency.compute())
    if references is not None and vectorizer is not None:
        consistency = TfidfConsistency(vectorizer)
        pos = 0
        for r in requests:
            gen = texts[pos : pos + len(r.generation_prompts)]
            pos += len(r.generation_prompts)
            if gen and r.case_id in references:
                consistency.update([gen], [references[r.case_id]])
        if _has_data(consistency):
            out["edit/consistency"] = float(consistency.compute())
    return out
