"""Causal tracing (ROME, Meng et al. 2022): where does a model recall a fact?

For each fact (a prompt template with ``{}``, a subject, an answer) three kinds of runs:

1. a **clean** run: the answer's score and every hidden state are recorded;
2. a **corrupted** run: Gaussian noise (std = ``noise_factor`` x the std of the input
   embedding matrix) is added to the input embeddings of the subject's tokens only;
3. **restored** runs: the corrupted run again, with the clean state of one layer ``l`` at one
   token position ``t`` written back in.

The *indirect effect* of ``(l, t)`` is ``score(restored) - score(corrupted)``, averaged over
``n_samples`` noise draws; a large effect means that state carries what the model needs to
recall the answer. The score is the probability of the answer's first token (``score="prob"``,
as in ROME) or the mean log-probability of all answer tokens (``score="logprob"``).

Everything for one fact runs as a few batched forwards: the rows of a batch are
``(noise sample, restoration)`` pairs; an embedding hook adds *the same* noise to every row
of one sample, and per-layer hooks overwrite the restored cells with the clean states.

Positions before the subject are never traced: with causal attention their states are the
same in the clean and the corrupted run, so restoring them changes nothing (effect 0).

Per-fact grids are averaged by token *role* (first / middle / last subject token, first token
after the subject, further tokens, last prompt token, as in ROME's figure) into a
``role x layer`` table, and a recommendation of the edit anchor (``subject_last`` or
``prompt_last``) and a window of layers is derived from it; see :func:`recommend`.

``lightning-edit trace --model PATH --dataset FILE --out DIR`` runs it from the command line
(:func:`main`) and writes ``trace.md``, ``trace.json`` and ``trace.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_edit.data.chat import chat_prompt
from lightning_edit.data.formats import records_to_requests
from lightning_edit.data.requests import EditRequest, target_text
from lightning_edit.data.sources import load_records
from lightning_edit.engine.arch import ModelAdapter, supports_logits_to_keep
from lightning_edit.engine.loading import load_pretrained
from lightning_edit.engine.tokens import Segment, TokenizationError, encode_segments
from lightning_edit.errors import InputError
from lightning_edit.resources import resolve

log = logging.getLogger(__name__)

Score = Literal["prob", "logprob"]
Kind = Literal["hidden", "mlp"]
AnswerMode = Literal["greedy", "true"]

ROLES: tuple[str, ...] = (
    "subject_first",
    "subject_middle",
    "subject_last",
    "after_subject_first",
    "further",
    "prompt_last",
)
ROLE_LABELS: dict[str, str] = {
    "subject_first": "first subject token",
    "subject_middle": "middle subject tokens",
    "subject_last": "last subject token",
    "after_subject_first": "first token after subject",
    "further": "further tokens",
    "prompt_last": "last prompt token",
}
ANCHOR_ROLES = ("subject_last", "prompt_last")


# ---- facts ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """One fact to trace.

    Args:
        prompt: template with exactly one ``{}`` where the subject goes.
        subject: the subject text.
        answer: the true object, or ``None`` to use the model's own greedy answer.
        case_id: a name for reports.
    """

    prompt: str
    subject: str
    answer: str | None = None
    case_id: str = ""

    @property
    def rendered_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the subject in :attr:`rendered_prompt`."""
        start = self.prompt.index("{}")
        return start, start + len(self.subject)


def _as_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("str")
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, str) and value.strip() else None


def as_fact(item: EditRequest | Fact | dict | Sequence[str], index: int = 0) -> Fact:
    """A :class:`Fact` from an :class:`EditRequest` (answer: ``target_true``), a ``Fact``, a
    ``(prompt, subject[, answer])`` tuple, or a dict with ``prompt`` and ``subject`` and an
    optional answer under ``answer`` / ``target_true`` / ``ground_truth`` / ``target``. A prompt
    without ``{}`` that contains the subject gets its first occurrence replaced by ``{}``;
    CounterFact's nested ``requested_rewrite`` is unwrapped."""
    if isinstance(item, Fact):
        fact = item
    elif isinstance(item, EditRequest):
        fact = Fact(item.prompt, item.subject, item.target_true, str(item.case_id))
    elif isinstance(item, dict):
        rec = item.get("requested_rewrite", item)
        if isinstance(rec, list):
            rec = rec[0]
        prompt, subject = rec.get("prompt"), rec.get("subject")
        answer = None
        for key in ("answer", "target_true", "ground_truth", "target"):
            answer = _as_text(rec.get(key))
            if answer is not None:
                break
        case_id = str(item.get("case_id", rec.get("case_id", index)))
        if not isinstance(prompt, str) or not isinstance(subject, str) or not subject:
            raise InputError(f"fact {index}: needs string fields 'prompt' and 'subject', got {sorted(rec)}")
        if "{}" not in prompt:
            if subject not in prompt:
                raise InputError(f"fact {index}: subject {subject!r} not found in prompt {prompt!r}")
            prompt = prompt.replace(subject, "{}", 1)
        fact = Fact(prompt, subject, answer, case_id)
    elif isinstance(item, (tuple, list)) and 2 <= len(item) <= 3:
        fact = Fact(item[0], item[1], item[2] if len(item) == 3 else None, str(index))
    else:
        raise InputError(f"fact {index}: cannot trace a {type(item).__name__}")
    if fact.prompt.count("{}") != 1:
        raise InputError(f"fact {fact.case_id or index}: prompt needs exactly one '{{}}': {fact.prompt!r}")
    return fact


@dataclass
class PreparedFact:
    """A fact tokenized (once, with offsets) and its answer fixed.

    Attributes:
        input_ids: ``(T_in,)`` the model input: the prompt, followed (for ``score="logprob"``)
            by all answer tokens but the last.
        subject_first, subject_last: token indices of the subject's first and last token.
        prompt_last: token index of the prompt's last token (it predicts the answer).
        answer_ids: ``(n_ans,)`` answer token ids that are scored (one for ``score="prob"``).
        answer_pos: ``(n_ans,)`` input positions whose logits predict ``answer_ids``.
        tokens: the prompt's tokens as text, ``prompt_last + 1`` entries.
        answer: the answer as text.
    """

    fact: Fact
    input_ids: torch.Tensor
    subject_first: int
    subject_last: int
    prompt_last: int
    answer_ids: torch.Tensor
    answer_pos: torch.Tensor
    tokens: list[str]
    answer: str


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prepare_fact(
    adapter: ModelAdapter, tokenizer, fact: Fact, answer: AnswerMode = "greedy", score: Score = "prob", greedy_tokens: int = 1
) -> PreparedFact:
    """Tokenize ``fact`` once (prompt + answer, with offsets; :mod:`lightning_edit.engine.tokens`)
    and locate the subject, the last prompt token and the answer tokens.

    ``answer="true"`` scores ``fact.answer``; ``answer="greedy"`` scores the model's own
    greedy continuation of the prompt (``greedy_tokens`` tokens; only the first counts for
    ``score="prob"``)."""
    if score not in ("prob", "logprob"):
        raise InputError(f"score must be 'prob' or 'logprob', got {score!r}")
    prompt = fact.rendered_prompt
    s_start, s_end = fact.subject_span
    if answer == "true":
        if fact.answer is None:
            raise InputError("no true object given (use answer='greedy')")
        text = prompt + target_text(prompt, fact.answer)
        seg = Segment(text, targets=[(len(prompt), len(text))], anchors=[None, s_start, s_end - 1])
    elif answer == "greedy":
        seg = Segment(prompt, anchors=[None, s_start, s_end - 1])
    else:
        raise InputError(f"answer must be 'greedy' or 'true', got {answer!r}")
    enc = encode_segments(tokenizer, [seg])
    ids = enc.input_ids[0]
    prompt_last, subject_first, subject_last = (int(a) for a in enc.anchor_pos[0])
    if not subject_first <= subject_last <= prompt_last:
        raise TokenizationError(
            f"subject tokens {subject_first}..{subject_last} do not lie inside the prompt (last token {prompt_last})"
        )

    device = _model_device(adapter.model)
    if answer == "true":
        target_pos = enc.target_tokens[0][0]
        answer_all = ids[target_pos]
        answer_text = fact.answer
    else:
        gen = ids.clone()
        for _ in range(max(1, greedy_tokens if score == "logprob" else 1)):
            logits = adapter.forward(gen[None].to(device)).logits[0, -1]
            gen = torch.cat([gen, logits.argmax().view(1).cpu()])
        answer_all = gen[len(ids):]
        ids = gen
        answer_text = tokenizer.decode(answer_all.tolist())
    n_ans = 1 if score == "prob" else len(answer_all)
    answer_ids = answer_all[:n_ans]
    answer_pos = prompt_last + torch.arange(n_ans)
    input_ids = ids[: prompt_last + n_ans]  # the last answer token is predicted, never read
    tokens = [tokenizer.decode([t]) for t in ids[: prompt_last + 1].tolist()]
    return PreparedFact(fact, input_ids, subject_first, subject_last, prompt_last, answer_ids, answer_pos, tokens, answer_text)


# ---- noise and restoration -----------------------------------------------------------------
def embedding_noise_std(model: nn.Module, noise_factor: float) -> float:
    """``noise_factor`` x the standard deviation of the input embedding matrix's entries."""
    weight = model.get_input_embeddings().weight
    return float(noise_factor) * float(weight.detach().float().std())


def sample_noise(n_samples: int, n_tokens: int, d_model: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise ``(n_samples, n_tokens, d_model)`` (float32, CPU, from ``generator``)."""
    return torch.randn(n_samples, n_tokens, d_model, generator=generator) * std


@contextlib.contextmanager
def noised_embeddings(model: nn.Module, start: int, noise_rows: torch.Tensor) -> Iterator[None]:
    """Add ``noise_rows`` ``(batch, n_tok, d_model)`` to the input embeddings at positions
    ``start .. start + n_tok - 1`` of every row, during forward passes inside the block.
    The hook sits on ``model.get_input_embeddings()``, so position embeddings (GPT-2) are
    added afterwards, unnoised."""
    end = start + noise_rows.shape[1]

    def hook(_m, _args, out):
        out = out.clone()
        out[:, start:end] += noise_rows.to(device=out.device, dtype=out.dtype)
        return out

    handle = model.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def clean_states(adapter: ModelAdapter, input_ids: torch.Tensor, kind: Kind = "hidden") -> tuple[torch.Tensor, torch.Tensor]:
    """One clean forward of ``input_ids`` ``(T,)``.

    Returns ``(logits (T, vocab), states (n_layers, T, d_model))`` where ``states[l]`` is block
    ``l``'s output (``kind="hidden"``) or its MLP output (``kind="mlp"``)."""
    ids = input_ids[None].to(_model_device(adapter.model))
    layers = range(adapter.n_layers)
    if kind == "hidden":
        with adapter.trace(output_layers=layers) as rec:
            out = adapter.forward(ids)
        states = [rec["outputs"][layer][0] for layer in layers]
    elif kind == "mlp":
        found: dict[int, torch.Tensor] = {}
        handles = []
        for layer in layers:
            def hook(_m, _args, out, layer=layer):
                found[layer] = out[0]
            handles.append(adapter.down_proj(layer).register_forward_hook(hook))
        try:
            out = adapter.forward(ids)
        finally:
            for h in handles:
                h.remove()
        states = [found[layer] for layer in layers]
    else:
        raise InputError(f"kind must be 'hidden' or 'mlp', got {kind!r}")
    return out.logits[0], torch.stack(states)


def answer_scores(logits: torch.Tensor, answer_ids: torch.Tensor, score: Score) -> torch.Tensor:
    """Score rows of logits ``(B, n_ans, vocab)`` (at the answer-predicting positions) for
    ``answer_ids`` ``(n_ans,)``: p(first answer token) or the mean log-prob; returns ``(B,)``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tok = logp.gather(-1, answer_ids.to(logp.device).view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(-1)
    return tok[:, 0].exp() if score == "prob" else tok.mean(-1)


@torch.no_grad()
def restored_scores(
    adapter: ModelAdapter,
    pf: PreparedFact,
    noise: torch.Tensor,
    states: torch.Tensor,
    restorations: Sequence[Sequence[tuple[int, int]]],
    kind: Kind = "hidden",
    score: Score = "prob",
    batch_size: int = 128,
) -> torch.Tensor:
    """Scores of corrupted runs with clean states restored, batched.

    Args:
        pf: the prepared fact.
        noise: ``(S, n_subject_tokens, d_model)`` one noise draw per sample, added to the
            subject's input embeddings; every restoration of sample ``s`` sees ``noise[s]``.
        states: ``(n_layers, T_in, d_model)`` clean states (:func:`clean_states`).
        restorations: ``R`` sets of ``(layer, position)`` cells restored together in one run;
            an empty set is the plain corrupted run.
        batch_size: rows per forward.

    Returns:
        ``(S, R)`` scores (see :func:`answer_scores`).
    """
    model = adapter.model
    device = _model_device(model)
    S, R = noise.shape[0], len(restorations)
    T = pf.input_ids.shape[0]
    states = states.to(device)
    keep = T - int(pf.answer_pos.min())
    kw = {"logits_to_keep": keep} if supports_logits_to_keep(model) else {}
    offset = T - keep if kw else 0
    pick = (pf.answer_pos - offset).to(device)
    cells = [list(r) for r in restorations]
    out = torch.empty(S * R)
    for a in range(0, S * R, batch_size):
        b = min(a + batch_size, S * R)
        rows = torch.arange(a, b)
        sample = rows // R
        per_layer: dict[int, tuple[list[int], list[int]]] = {}
        for j, k in enumerate(rows.tolist()):
            for layer, pos in cells[k % R]:
                rj, pj = per_layer.setdefault(layer, ([], []))
                rj.append(j)
                pj.append(pos)
        ids = pf.input_ids.to(device).expand(b - a, T)
        with contextlib.ExitStack() as stack:
            stack.enter_context(noised_embeddings(model, pf.subject_first, noise[sample]))
            for layer, (rj, pj) in per_layer.items():
                r_t = torch.tensor(rj, device=device)
                p_t = torch.tensor(pj, device=device)
                site = "block" if kind == "hidden" else "mlp"
                stack.enter_context(adapter.replace_at_positions(layer, r_t, p_t, states[layer, p_t], site=site))
            logits = adapter.forward(ids, **kw).logits
        out[a:b] = answer_scores(logits[:, pick], pf.answer_ids, score).cpu()
    return out.view(S, R)


# ---- one fact ------------------------------------------------------------------------------
@dataclass
class FactTrace:
    """The causal trace of one fact.

    Attributes:
        effects: ``(n_layers, n_prompt_tokens)`` mean indirect effect of restoring each cell
            (0 before the subject, where restoring cannot change anything).
        clean, corrupted: the answer's score in the clean run and (mean over noise samples)
            in the corrupted run.
    """

    case_id: str
    prompt: str
    subject: str
    answer: str
    tokens: list[str]
    subject_first: int
    subject_last: int
    prompt_last: int
    clean: float
    corrupted: float
    effects: torch.Tensor

    def role_positions(self) -> dict[str, list[int]]:
        """Token positions of each role (a role may be empty, and roles may share a token:
        a one-token subject is both its first and its last token)."""
        return role_positions(self.subject_first, self.subject_last, self.prompt_last)

    def to_dict(self) -> dict:
        return {
            "case_id": self.case_id,
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "tokens": self.tokens,
            "subject_tokens": [self.subject_first, self.subject_last],
            "prompt_last": self.prompt_last,
            "clean": self.clean,
            "corrupted": self.corrupted,
            "effects": [[None if math.isnan(float(v)) else round(float(v), 6) for v in row] for row in self.effects],
        }


def role_positions(f: int, s: int, p: int) -> dict[str, list[int]]:
    """Token positions of each role for a subject at tokens ``f..s`` and the last prompt token ``p``."""
    return {
        "subject_first": [f],
        "subject_middle": list(range(f + 1, s)),
        "subject_last": [s],
        "after_subject_first": [s + 1] if s + 1 <= p else [],
        "further": list(range(s + 2, p)),
        "prompt_last": [p],
    }


def _check_roles(roles: Sequence[str] | None) -> None:
    bad = [r for r in roles or () if r not in ROLES]
    if bad:
        raise InputError(f"unknown token role(s) {bad}; choose from {list(ROLES)}")


def restore_cells(layer: int, pos: int, n_layers: int, window: int = 1) -> list[tuple[int, int]]:
    """The cells restored for grid entry ``(layer, pos)``: ``window`` consecutive layers
    centred on ``layer`` (clipped to the model), at ``pos`` (ROME restores MLP windows)."""
    lo = max(0, layer - window // 2)
    hi = min(n_layers, lo + window)
    return [(j, pos) for j in range(lo, hi)]


@torch.no_grad()
def trace_fact(
    adapter: ModelAdapter,
    pf: PreparedFact,
    noise: torch.Tensor,
    kind: Kind = "hidden",
    score: Score = "prob",
    window: int = 1,
    batch_size: int = 128,
    layers: Sequence[int] | None = None,
    roles: Sequence[str] | None = None,
) -> FactTrace:
    """Trace one prepared fact: every (layer, position) from the subject's first token to the
    last prompt token, for every noise sample in ``noise`` ``(S, n_subject_tokens, d_model)``,
    in ``ceil(S * (1 + n_layers * n_positions) / batch_size)`` forwards.

    ``layers`` and ``roles`` restrict the grid to those layers (the centre of each restored
    window) and to the positions of those token roles; cells left out are NaN."""
    L = adapter.n_layers
    _check_roles(roles)
    layer_list = sorted(set(int(x) for x in layers)) if layers is not None else list(range(L))
    if not layer_list or not all(0 <= x < L for x in layer_list):
        raise InputError(f"layers to trace must lie in 0..{L - 1}, got {layers}")
    if roles is None:
        positions = list(range(pf.subject_first, pf.prompt_last + 1))
    else:
        rp = role_positions(pf.subject_first, pf.subject_last, pf.prompt_last)
        positions = sorted({t for r in roles for t in rp[r]})
    logits, states = clean_states(adapter, pf.input_ids, kind)
    clean = float(answer_scores(logits[pf.answer_pos][None], pf.answer_ids, score)[0])
    restorations = [()] + [restore_cells(layer, t, L, window) for layer in layer_list for t in positions]
    scores = restored_scores(adapter, pf, noise, states, restorations, kind, score, batch_size)
    corrupted = scores[:, 0].mean()
    effects = torch.zeros(L, pf.prompt_last + 1)
    effects[:, pf.subject_first :] = float("nan")
    if positions:
        grid = scores[:, 1:].mean(0).view(len(layer_list), len(positions)) - corrupted
        effects[torch.tensor(layer_list)[:, None], torch.tensor(positions)[None, :]] = grid
    f = pf.fact
    return FactTrace(
        f.case_id, f.rendered_prompt, f.subject, pf.answer, pf.tokens,
        pf.subject_first, pf.subject_last, pf.prompt_last, clean, float(corrupted), effects,
    )


# ---- aggregation and recommendation ---------------------------------------------------------
def fact_role_table(ft: FactTrace, n_layers: int) -> torch.Tensor:
    """``(n_roles, n_layers)``: the fact's mean effect over its tokens of each role (NaN where
    the fact has no token of the role or the cell was not traced)."""
    out = torch.full((len(ROLES), n_layers), float("nan"), dtype=torch.float64)
    for i, pos in enumerate(ft.role_positions().values()):
        if pos:
            out[i] = ft.effects[:, pos].double().nanmean(1)
    return out


def per_fact_tables(facts: Sequence[FactTrace], n_layers: int) -> torch.Tensor:
    """``(n_facts, n_roles, n_layers)`` role tables of all facts (:func:`fact_role_table`)."""
    return torch.stack([fact_role_table(ft, n_layers) for ft in facts])


def aggregate_by_role(facts: Sequence[FactTrace], n_layers: int) -> tuple[torch.Tensor, list[int]]:
    """Mean effect per role and layer: each fact contributes the mean over its tokens of that
    role, facts without the role (or cells not traced) are left out. Returns ``(effects
    (n_roles, n_layers)`` (NaN where no fact has a value), ``counts`` per role)."""
    tables = per_fact_tables(facts, n_layers)
    mean = tables.nanmean(0).float()
    counts = [int(c) for c in (~tables.isnan()).any(-1).sum(0).tolist()]
    return mean, counts


def best_window(row: torch.Tensor, width: int) -> tuple[int, float]:
    """Start and mean of the contiguous ``width`` entries of ``row`` ``(n_layers,)`` with the
    highest mean (the earliest on ties)."""
    width = max(1, min(width, row.numel()))
    win = row.double().unfold(0, width, 1)
    means = win.nanmean(1)  # untraced layers (NaN) do not count as zeros
    means = torch.where(win.isnan().all(1), torch.full_like(means, float("-inf")), means)
    start = int(means.argmax())
    return start, float(means[start])


@dataclass
class Recommendation:
    """Where to edit: the anchor rule (``"subject_last"`` or ``"prompt_last"``), the layers,
    the mean effect over them at the anchor's role, and why. ``anchor`` is ``None`` and
    ``layers`` empty when the effects do not stand clear of the noise (``clear`` False);
    ``candidate`` then holds the anchor and layers the means alone would have picked."""

    anchor: str | None
    layers: list[int]
    window_effect: float
    reason: str
    clear: bool = True
    stderr: float | None = None
    candidate: dict | None = None

    def to_dict(self) -> dict:
        return {"anchor": self.anchor, "layers": self.layers, "window_effect": self.window_effect, "reason": self.reason,
                "clear": self.clear, "stderr": self.stderr, "candidate": self.candidate}


def window_stats(per_fact: torch.Tensor, role: str, start: int, width: int) -> tuple[float, float, int]:
    """Mean, standard error and number of facts of the per-fact mean effect over layers
    ``start .. start + width - 1`` at ``role`` (``per_fact``: ``(n_facts, n_roles, n_layers)``)."""
    vals = per_fact[:, ROLES.index(role), start : start + width].double().nanmean(1)
    vals = vals[~vals.isnan()]
    n = int(vals.numel())
    if n == 0:
        return float("nan"), float("nan"), 0
    se = float(vals.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("inf")
    return float(vals.mean()), se, n


def recommend(
    effects: torch.Tensor, total_effect: float, kind: Kind = "hidden", n_layers_window: int = 3, subject_threshold: float = 0.5,
    per_fact: torch.Tensor | None = None, noise_z: float = 2.0,
) -> Recommendation:
    """Pick the edit anchor and layers from a ``(n_roles, n_layers)`` role table.

    The layers are the contiguous ``n_layers_window`` layers with the highest mean effect at
    the chosen anchor's role. The anchor:

    * ``kind="mlp"``: the role (last subject token or last prompt token) whose best window has
      the larger mean effect: that is where MLPs write what the answer needs.
    * ``kind="hidden"``: restoring the last prompt token's state in the final layer restores the
      output by construction, so that role always reaches the full effect late; hidden states
      can only say whether the subject's last token *carries* the fact. ``subject_last`` when
      its peak effect reaches ``subject_threshold`` x the total effect (mean clean - mean
      corrupted score), otherwise ``prompt_last`` (the fact is looked up at the last token,
      as in small toy models).

    With ``per_fact`` tables ``(n_facts, n_roles, n_layers)`` the pick is only recommended when
    it stands clear of the noise: the chosen window's mean effect over facts must exceed
    ``noise_z`` standard errors (of the per-fact window means), and for ``kind="mlp"`` so must
    its margin over the other anchor's best window. Otherwise ``anchor`` is ``None`` and the
    reason says so.
    """
    rows = {role: effects[ROLES.index(role)] for role in ANCHOR_ROLES}
    windows = {role: best_window(row if not row.isnan().all() else torch.zeros_like(row), n_layers_window) for role, row in rows.items()}
    width = max(1, min(n_layers_window, effects.shape[1]))
    if total_effect <= 0:
        anchor = "subject_last"
        reason = "corrupting the subject did not lower the answer's score: inconclusive, kept the default subject_last"
    elif kind == "mlp":
        anchor = max(ANCHOR_ROLES, key=lambda r: windows[r][1])
        other = ANCHOR_ROLES[1 - ANCHOR_ROLES.index(anchor)]
        reason = (
            f"restoring MLP outputs at the {ROLE_LABELS[anchor]} has the larger effect "
            f"({windows[anchor][1]:.3g} vs {windows[other][1]:.3g} at the {ROLE_LABELS[other]})"
        )
    else:
        peak = float(torch.nan_to_num(rows["subject_last"], nan=0.0).max())
        ratio = peak / total_effect
        anchor = "subject_last" if ratio >= subject_threshold else "prompt_last"
        reason = (
            f"restoring the last subject token's hidden state recovers up to {ratio:.0%} of the total effect "
            f"({peak:.3g} of {total_effect:.3g}; threshold {subject_threshold:.0%})"
        )
    start, mean = windows[anchor]
    layers = list(range(start, start + width))
    if per_fact is None or total_effect <= 0:
        return Recommendation(anchor, layers, mean, reason)
    m, se, n = window_stats(per_fact, anchor, start, width)
    problems = []
    if not (n > 1 and m > noise_z * se):
        problems.append(f"the effect over layers {layers} at the {ROLE_LABELS[anchor]} ({m:.3g} +- {se:.2g} s.e., {n} facts) "
                        f"is within {noise_z:g} standard errors of zero")
    if kind == "mlp" and not problems:
        other = ANCHOR_ROLES[1 - ANCHOR_ROLES.index(anchor)]
        o_start = windows[other][0]
        a = per_fact[:, ROLES.index(anchor), start : start + width].double().nanmean(1)
        b = per_fact[:, ROLES.index(other), o_start : o_start + width].double().nanmean(1)
        d = (a - b)[~(a - b).isnan()]
        if d.numel() > 1:
            d_se = float(d.std(unbiased=True) / math.sqrt(d.numel()))
            if not float(d.mean()) > noise_z * d_se:
                problems.append(f"its margin over the {ROLE_LABELS[other]} ({float(d.mean()):.3g} +- {d_se:.2g} s.e.) is within "
                                f"{noise_z:g} standard errors")
    if problems:
        candidate = {"anchor": anchor, "layers": layers, "window_effect": mean}
        why = "no recommendation: the effects do not stand clear of the noise (" + "; ".join(problems) + \
              "); trace more facts or noise samples, a wider --window, or other layers"
        return Recommendation(None, [], mean, why + f". Means alone: {reason}", clear=False, stderr=se, candidate=candidate)
    return Recommendation(anchor, layers, mean, reason + f"; {m:.3g} +- {se:.2g} s.e. over {n} facts", stderr=se)


# ---- the result ----------------------------------------------------------------------------
@dataclass
class TraceResult:
    """Causal tracing over a sample of facts.

    Attributes:
        effects: ``(n_roles, n_layers)`` mean indirect effect per token role (rows in
            :data:`ROLES` order) and layer; NaN where no fact has the role.
        role_counts: how many facts contributed to each role.
        n_facts: facts traced; ``skipped`` lists ``(case_id, reason)`` of the others.
        mean_clean, mean_corrupted: mean answer score in clean and corrupted runs.
        recommendation: where to edit (:func:`recommend`).
        settings: how it was run (kind, score, noise, samples, seed, ...).
        facts: the per-fact traces.
    """

    effects: torch.Tensor
    role_counts: list[int]
    n_facts: int
    mean_clean: float
    mean_corrupted: float
    recommendation: Recommendation
    settings: dict
    facts: list[FactTrace] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    roles: tuple[str, ...] = ROLES

    @property
    def n_layers(self) -> int:
        return self.effects.shape[1]

    def _score_name(self) -> str:
        return "p(answer)" if self.settings.get("score", "prob") == "prob" else "mean log p(answer)"

    def _site_name(self) -> str:
        return "hidden states (block outputs)" if self.settings.get("kind", "hidden") == "hidden" else "MLP outputs"

    def to_dict(self, include_facts: bool = True) -> dict:
        d = {
            "roles": list(self.roles),
            "role_labels": [ROLE_LABELS[r] for r in self.roles],
            "layers": list(range(self.n_layers)),
            "effects": [[None if math.isnan(v) else round(v, 6) for v in row.tolist()] for row in self.effects],
            "role_counts": self.role_counts,
            "n_facts": self.n_facts,
            "mean_clean": self.mean_clean,
            "mean_corrupted": self.mean_corrupted,
            "recommendation": self.recommendation.to_dict(),
            "settings": self.settings,
            "skipped": [list(s) for s in self.skipped],
        }
        if include_facts:
            d["facts"] = [f.to_dict() for f in self.facts]
        return d

    def to_json(self, indent: int | None = 2, include_facts: bool = True) -> str:
        return json.dumps(self.to_dict(include_facts), indent=indent)

    def to_markdown(self) -> str:
        s = self.settings
        score = self._score_name()
        lines = [
            "# Causal trace",
            "",
            f"Mean indirect effect on {score} of restoring clean {self._site_name()} into runs whose subject "
            "embeddings were noised, by token role and layer.",
            "",
            f"- facts traced: {self.n_facts}" + (f" (skipped {len(self.skipped)})" if self.skipped else ""),
            f"- noise: {s.get('noise_factor')} x std(embeddings) = {s.get('noise_std', float('nan')):.4g}, "
            f"{s.get('n_samples')} samples, seed {s.get('seed')}",
            f"- mean clean {score}: {self.mean_clean:.4f}; mean corrupted: {self.mean_corrupted:.4f}; "
            f"total effect: {self.mean_clean - self.mean_corrupted:.4f}",
            "",
            "| token role | facts | " + " | ".join(f"L{i}" for i in range(self.n_layers)) + " |",
            "|---|---:|" + "---:|" * self.n_layers,
        ]
        for role, count, row in zip(self.roles, self.role_counts, self.effects.tolist()):
            cells = " | ".join("–" if math.isnan(v) else f"{v:.3f}".replace("-0.000", "0.000") for v in row)
            lines.append(f"| {ROLE_LABELS[role]} | {count} | {cells} |")
        r = self.recommendation
        if r.anchor is None:
            lines += ["", f"**No recommendation:** {r.reason}."]
        else:
            lines += [
                "",
                f"**Recommendation:** anchor `{r.anchor}`, layers {r.layers} "
                f"(mean effect {r.window_effect:.3f} there): {r.reason}.",
            ]
        if s.get("kind", "hidden") == "hidden":
            lines += [
                "",
                "Hidden-state effects at the last prompt token always reach the total effect in the final "
                "layers; trace with `--kind mlp` to see which MLP layers write the fact.",
            ]
        if self.skipped:
            lines += ["", "Skipped facts: " + "; ".join(f"{cid}: {why}" for cid, why in self.skipped[:20])]
        return "\n".join(lines) + "\n"

    def save_heatmap(self, path: str | Path) -> Path:
        """Write a ``role x layer`` heat-map of :attr:`effects` (PNG; Agg, no display)."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = np.ma.masked_invalid(self.effects.numpy())
        fig = Figure(figsize=(max(4.0, 0.45 * self.n_layers + 3.0), 3.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        cmap = "Purples" if self.settings.get("kind", "hidden") == "hidden" else "Greens"
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_yticks(range(len(self.roles)), [ROLE_LABELS[r] for r in self.roles])
        step = max(1, self.n_layers // 16)
        ax.set_xticks(range(0, self.n_layers, step))
        ax.set_xlabel("layer")
        site = "hidden state" if self.settings.get("kind", "hidden") == "hidden" else "MLP output"
        ax.set_title(
            f"Causal trace: restoring the {site} ({self.n_facts} facts)\n"
            f"clean {self.mean_clean:.3f}, corrupted {self.mean_corrupted:.3f}; "
            f"noise {self.settings.get('noise_factor')}x std",
            fontsize=9,
        )
        cbar = fig.colorbar(im, ax=ax)
        cbar.set_label(f"mean indirect effect on {self._score_name()}", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``trace.md``, ``trace.json`` and ``trace.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "trace.md", "json": out / "trace.json", "heatmap": out / "trace.png"}
        paths["markdown"].write_text(self.to_markdown())
        paths["json"].write_text(self.to_json())
        self.save_heatmap(paths["heatmap"])
        return paths


def load_trace(path: str | Path, noise_z: float | None = None, n_layers_window: int | None = None) -> "TraceResult":
    """A saved ``trace.json`` (with its facts) as a :class:`TraceResult`, tables and
    recommendation recomputed by this code (e.g. with another ``noise_z`` or window width)."""
    d = json.loads(Path(path).read_text())
    s = dict(d["settings"])
    if noise_z is not None:
        s["noise_z"] = noise_z
    if n_layers_window is not None:
        s["n_layers_window"] = n_layers_window
    facts = [FactTrace(f["case_id"], f["prompt"], f["subject"], f["answer"], f["tokens"], f["subject_tokens"][0], f["subject_tokens"][1],
                       f["prompt_last"], f["clean"], f["corrupted"],
                       torch.tensor([[float("nan") if v is None else v for v in row] for row in f["effects"]]))
             for f in d["facts"]]
    n_layers = len(d["layers"])
    effects, counts = aggregate_by_role(facts, n_layers)
    mean_clean = sum(t.clean for t in facts) / len(facts)
    mean_corrupted = sum(t.corrupted for t in facts) / len(facts)
    rec = recommend(effects, mean_clean - mean_corrupted, s.get("kind", "hidden"), s.get("n_layers_window", 3),
                    s.get("subject_threshold", 0.5), per_fact=per_fact_tables(facts, n_layers), noise_z=s.get("noise_z", 2.0))
    return TraceResult(effects, counts, len(facts), mean_clean, mean_corrupted, rec, s, facts,
                       [tuple(x) for x in d.get("skipped", [])])


# ---- the whole run -------------------------------------------------------------------------
def sample_facts(items: Sequence, num_facts: int | None, seed: int = 0) -> list:
    """``num_facts`` items drawn without replacement with ``seed``, in their original order
    (all of them when ``num_facts`` is ``None`` or not smaller than the list)."""
    items = list(items)
    if num_facts is None or num_facts >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), num_facts))
    return [items[i] for i in keep]


def run_trace(
    model: nn.Module,
    tokenizer,
    requests_or_facts: Sequence[EditRequest | Fact | dict | tuple],
    n_samples: int = 10,
    noise_factor: float = 3.0,
    seed: int = 0,
    *,
    num_facts: int | None = None,
    score: Score = "prob",
    answer: AnswerMode = "greedy",
    kind: Kind = "hidden",
    window: int = 1,
    n_layers_window: int = 3,
    subject_threshold: float = 0.5,
    batch_size: int = 128,
    greedy_tokens: int = 1,
    adapter: ModelAdapter | None = None,
    progress: bool = False,
    layers: Sequence[int] | None = None,
    roles: Sequence[str] | None = None,
    noise_z: float = 2.0,
) -> TraceResult:
    """Causal tracing over a sample of facts.

    Args:
        model, tokenizer: a Hugging Face causal LM and its fast tokenizer.
        requests_or_facts: :class:`EditRequest` s (their ``target_true`` is the true object),
            :class:`Fact` s, dicts or tuples (see :func:`as_fact`).
        n_samples: noise draws per fact (the effect is their mean).
        noise_factor: noise std in units of the embedding matrix's std.
        seed: seeds the fact sample and the noise generator (facts are traced in order).
        num_facts: trace a seeded random sample of this many facts (all when ``None``).
        score: ``"prob"`` (p of the answer's first token) or ``"logprob"`` (mean log-prob of
            all answer tokens).
        answer: ``"greedy"`` (the model's own answer, as ROME) or ``"true"`` (the given object).
        kind: restore block outputs (``"hidden"``) or MLP outputs (``"mlp"``).
        window: layers restored together per grid cell (centred; ROME used 10 for MLPs).
        n_layers_window: width of the recommended layer window.
        subject_threshold: see :func:`recommend`.
        batch_size: rows per batched forward.
        greedy_tokens: answer length for ``answer="greedy"`` with ``score="logprob"``.
        adapter: a :class:`ModelAdapter` for models whose modules need naming.
        progress: show a progress bar over facts.
        layers: trace only these layers (window centres; the others are NaN in the tables).
        roles: trace only the tokens of these roles (e.g. ``["subject_last", "prompt_last"]``).
        noise_z: recommend only when the chosen window's effect exceeds this many standard
            errors over facts (see :func:`recommend`).
    """
    from tqdm.auto import tqdm

    choices = {"score": (score, ("prob", "logprob")), "answer": (answer, ("greedy", "true")), "kind": (kind, ("hidden", "mlp"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise InputError(f"{name} must be one of {allowed}, got {value!r}")
    _check_roles(roles)
    if n_samples < 1 or window < 1:
        raise InputError(f"n_samples and window must be >= 1, got {n_samples} and {window}")
    adapter = adapter or ModelAdapter(model)
    was_training = model.training
    model.eval()
    std = embedding_noise_std(model, noise_factor)
    d_model = model.get_input_embeddings().weight.shape[1]
    generator = torch.Generator().manual_seed(seed)
    chosen = sample_facts(requests_or_facts, num_facts, seed)
    traces: list[FactTrace] = []
    skipped: list[tuple[str, str]] = []
    try:
        for i, item in enumerate(tqdm(chosen, desc="tracing facts", unit="fact", disable=not progress)):
            try:
                fact = as_fact(item, i)
                pf = prepare_fact(adapter, tokenizer, fact, answer, score, greedy_tokens)
            except (ValueError, TypeError) as err:  # TokenizationError is a ValueError
                cid = getattr(item, "case_id", None) or (item.get("case_id") if isinstance(item, dict) else None) or str(i)
                skipped.append((str(cid), str(err)))
                log.warning("causal trace: skipped fact %s: %s", cid, err)
                continue
            n_subj = pf.subject_last - pf.subject_first + 1
            noise = sample_noise(n_samples, n_subj, d_model, std, generator)
            traces.append(trace_fact(adapter, pf, noise, kind, score, window, batch_size, layers=layers, roles=roles))
    finally:
        model.train(was_training)
    if not traces:
        raise InputError(f"no fact could be traced ({len(skipped)} skipped: {skipped[:3]})")
    effects, counts = aggregate_by_role(traces, adapter.n_layers)
    mean_clean = sum(t.clean for t in traces) / len(traces)
    mean_corrupted = sum(t.corrupted for t in traces) / len(traces)
    rec = recommend(effects, mean_clean - mean_corrupted, kind, n_layers_window, subject_threshold,
                    per_fact=per_fact_tables(traces, adapter.n_layers), noise_z=noise_z)
    settings = {
        "kind": kind, "score": score, "answer": answer, "noise_factor": noise_factor, "noise_std": std,
        "n_samples": n_samples, "seed": seed, "window": window, "n_layers_window": n_layers_window,
        "subject_threshold": subject_threshold, "layers": sorted(set(layers)) if layers is not None else None,
        "roles": list(roles) if roles is not None else None, "noise_z": noise_z,
    }
    return TraceResult(effects, counts, len(traces), mean_clean, mean_corrupted, rec, settings, traces, skipped)


# ---- command line --------------------------------------------------------------------------
def load_facts(path: str | Path) -> list[EditRequest | Fact]:
    """Edit records from a file, directory or dataset id (:func:`~lightning_edit.data.sources.load_records`),
    as :class:`EditRequest` s when :func:`~lightning_edit.data.formats.records_to_requests`
    recognizes them (CounterFact, flat CounterFact, ZsRE, factworld), else as simple dicts with
    ``prompt`` / ``subject`` / ``target`` (see :func:`as_fact`)."""
    records = load_records(str(path))
    try:
        return records_to_requests(records)
    except ValueError as err:  # RequestError: not a benchmark format; maybe simple dicts
        try:
            return [as_fact(r, i) for i, r in enumerate(records)]
        except (ValueError, TypeError):
            raise err from None


_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_layers(spec: str) -> list[int]:
    """``"0-15"``, ``"2,4,6"``, ``"0-29:3"`` (every 3rd) or combinations like ``"0-4,10"``."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        rng, _, step = part.partition(":")
        try:
            if "-" in rng:
                a, b = (int(x) for x in rng.split("-", 1))
                out.extend(range(a, b + 1, int(step) if step else 1))
            else:
                out.append(int(rng))
        except ValueError:
            raise InputError(f"--layers {spec!r}: cannot read {part!r} (use e.g. '0-15', '2,4,6' or '0-29:3')") from None
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-edit trace",
        description="Causal tracing (ROME): where does the model recall facts? Writes trace.md, trace.json, trace.png.",
    )
    p.add_argument("--model", required=True, help="hub id, local path, .gguf file or built-in name (smollm2:135m-instruct) of a causal LM")
    p.add_argument(
        "--dataset", required=True,
        help="JSON / JSONL file (or directory, dataset id) of edit records: CounterFact, ZsRE, factworld or prompt/subject/target dicts",
    )
    p.add_argument("--num_facts", type=int, default=50, help="facts to trace (a seeded sample); 0 for all")
    p.add_argument("--n_samples", type=int, default=10, help="noise samples per fact")
    p.add_argument("--noise_factor", type=float, default=3.0, help="noise std in units of the embedding matrix's std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", choices=["prob", "logprob"], default="prob")
    p.add_argument("--answer", choices=["greedy", "true"], default="greedy",
                   help="trace the model's own answer or the true object")
    p.add_argument("--kind", choices=["hidden", "mlp"], default="hidden", help="restore block outputs or MLP outputs")
    p.add_argument("--window", type=int, default=1,
                   help="layers restored together per cell, centred (ROME restores 10 MLP layers; single MLP layers of real models often show nothing)")
    p.add_argument("--layers", default=None, help="trace only these layers (window centres): '0-15', '2,4,6' or '0-9:3' (start-stop:step)")
    p.add_argument("--roles", default=None,
                   help=f"trace only the tokens of these roles, comma-separated, from {','.join(ROLES)} (e.g. subject_last,prompt_last)")
    p.add_argument("--noise_z", type=float, default=2.0, help="recommend only when the effect exceeds this many standard errors over facts")
    p.add_argument("--gguf_file", default=None, help="GGUF file inside --model (a --model path ending in .gguf works too)")
    p.add_argument("--chat_template", action="store_true", help="render prompts as chat turns (instruct models)")
    p.add_argument("--n_layers_window", type=int, default=3, help="width of the recommended layer window")
    p.add_argument("--batch_size", type=int, default=128, help="rows per batched forward")
    p.add_argument("--out", default="logs/trace", help="output directory")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="auto", help="auto: float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--layer_template", default=None, help="module name of block {} for unknown architectures")
    p.add_argument("--mlp_down_template", default=None, help="module name of block {}'s MLP down projection")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-edit trace``: trace a sample of facts and write the report."""
    args = build_parser().parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_pretrained(args.model, "float32" if args.dtype == "auto" else args.dtype, gguf_file=args.gguf_file)
    model = model.to(device)
    adapter = ModelAdapter(model, args.layer_template, args.mlp_down_template)
    facts = load_facts(resolve(args.dataset))
    if args.chat_template:
        facts = [dataclasses.replace(f, prompt=chat_prompt(tokenizer, f.prompt)) for f in (as_fact(x, i) for i, x in enumerate(facts))]
    roles = [r.strip() for r in args.roles.split(",") if r.strip()] if args.roles else None
    result = run_trace(
        model, tokenizer, facts, n_samples=args.n_samples, noise_factor=args.noise_factor, seed=args.seed,
        num_facts=args.num_facts or None, score=args.score, answer=args.answer, kind=args.kind, window=args.window,
        n_layers_window=args.n_layers_window, batch_size=args.batch_size, adapter=adapter, progress=True,
        layers=parse_layers(args.layers) if args.layers else None, roles=roles, noise_z=args.noise_z,
    )
    result.settings["model"] = args.model
    result.settings["dataset"] = str(args.dataset)
    paths = result.save(args.out)
    print(result.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
