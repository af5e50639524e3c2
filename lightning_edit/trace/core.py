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

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_edit.data.requests import EditRequest, target_text
from lightning_edit.engine.arch import ModelAdapter, supports_logits_to_keep
from lightning_edit.engine.tokens import Segment, TokenizationError, encode_segments
from lightning_edit.errors import InputError

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


def check_roles(roles: Sequence[str] | None) -> None:
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
    check_roles(roles)
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


