"""A whole trace: sample the facts, trace each, aggregate, recommend."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence

import torch
from torch import nn

from lightning_edit.data.requests import EditRequest
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.errors import InputError
from lightning_edit.trace.core import (
    AnswerMode,
    Fact,
    FactTrace,
    Kind,
    Score,
    aggregate_by_role,
    as_fact,
    check_roles,
    embedding_noise_std,
    per_fact_tables,
    prepare_fact,
    recommend,
    sample_noise,
    trace_fact,
)
from lightning_edit.trace.result import TraceResult

log = logging.getLogger(__name__)


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
    check_roles(roles)
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


