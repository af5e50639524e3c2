"""Why teacher forcing and free generation part, measured per edited answer.

Greedy generation reproduces the target exactly up to the first teacher-forced miss
(:func:`~lightning_edit.longform.metrics.first_miss`); after it the model reads its own tokens,
so the keys at the later chunks' anchors are no longer the teacher-forced keys the closed-form
update was solved for. :func:`divergence` measures, for one edited answer:

- where the miss falls: answer token, chunk, offset in the chunk (0 = the chunk's first token,
  predicted from its anchor), and how close the call was (``margin``: log-probability of the
  predicted token minus that of the target token, nats; ``target_rank``);
- what the edited model does after it: its own greedy continuation from the miss, and at every
  later chunk anchor the keys of each edit layer under that continuation against the
  teacher-forced keys (``key_distance``: ``||k_own - k_tf|| / ||k_tf||``), and how much of the
  edit's write survives there (``response``: ``||Delta k_own|| / ||Delta k_tf||`` with ``Delta``
  the edit layers' total update; 1 = the update writes as much as it was solved to, 0 = nothing).

Plain functions on a model adapter and :class:`~lightning_edit.longform.chunking.Chunks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.longform.chunking import Chunks
from lightning_edit.longform.metrics import first_miss, token_correct


def _chunk_of(chunks: Chunks, pos: int) -> int:
    for k, (a, b) in enumerate(chunks.token_spans):
        if a <= pos < b:
            return k
    return len(chunks.token_spans) - 1


@torch.no_grad()
def own_continuation(model, prefix: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation of ``prefix`` (``(seq,)`` token ids) by ``n`` tokens at most (fewer
    when the model emits its end-of-sequence token), with the prefix: ``(seq + m,)``."""
    ids = prefix.unsqueeze(0)
    if n <= 0:
        return prefix
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         num_beams=1, pad_token_id=eos if isinstance(eos, int) else (eos[0] if eos else 0))
    return gen[0]


@torch.no_grad()
def divergence(adapter: ModelAdapter, chunks: Chunks, layers: Sequence[int],
               deltas: dict[int, torch.Tensor] | None = None, tokenizer=None) -> dict:
    """The divergence of one edited answer (see the module's text).

    Args:
        adapter: the edited model.
        chunks: the answer as it was edited (prompt + answer + end text, its chunks and anchors).
        layers: the edit layers whose keys are compared.
        deltas: ``{layer: (d_model, d_k)}`` the edit layers' total update (``W_now - W_base``);
            without it no ``response`` is measured.
        tokenizer: to decode the expected / predicted tokens (optional).

    Returns a dict: ``first_miss``, ``answer_tokens`` and, when the answer is left, ``chunk``,
    ``offset``, ``margin``, ``target_rank``, ``expected`` / ``predicted`` (token ids, or text
    with a tokenizer), ``own_tokens`` (the continuation's length after the miss),
    ``later_anchors`` (anchors after the miss that the continuation reaches) and per layer
    ``key_distance`` / ``key_cosine`` / ``response`` (means over those anchors; absent when none).
    """
    model = adapter.model
    device = next(model.parameters()).device
    ids = torch.tensor(chunks.input_ids, device=device)
    logits = model(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()
    answer = list(chunks.answer_tokens)
    hits = token_correct(logits, ids, answer)
    i = first_miss(hits)
    out: dict = {"first_miss": i, "answer_tokens": len(answer)}
    if i >= len(answer):
        return out
    pos = answer[i]
    k = _chunk_of(chunks, pos)
    logp = torch.log_softmax(logits[pos - 1], -1)
    pred, want = int(logp.argmax()), int(ids[pos])
    dec = (lambda t: tokenizer.decode([t])) if tokenizer is not None else (lambda t: t)
    out.update(chunk=k, offset=pos - chunks.token_spans[k][0], margin=float(logp[pred] - logp[want]),
               target_rank=int((logp > logp[want]).sum()), expected=dec(want), predicted=dec(pred))
    own = own_continuation(model, ids[:pos], len(ids) - pos)
    out["own_tokens"] = int(own.numel() - pos)
    later = [a for a in chunks.anchors if pos <= a < own.numel()]
    out["later_anchors"] = len(later)
    if not later:
        return out
    layers = sorted(int(l) for l in layers)
    keys = {}
    for name, seq in (("tf", ids[: max(later) + 1]), ("own", own[: max(later) + 1])):
        with adapter.trace(key_layers=layers, stop_after=max(layers)) as rec:
            adapter.forward(seq.unsqueeze(0), torch.ones_like(seq).unsqueeze(0))
        keys[name] = {l: rec["keys"][l][0, later].float() for l in layers}
    dist, cos, resp = {}, {}, {}
    for l in layers:
        kt, ko = keys["tf"][l], keys["own"][l]
        dist[l] = float(((ko - kt).norm(dim=-1) / kt.norm(dim=-1).clamp_min(1e-12)).mean())
        cos[l] = float(torch.nn.functional.cosine_similarity(ko, kt, dim=-1).mean())
        if deltas is not None and l in deltas:
            d = deltas[l].to(device=device, dtype=torch.float32)
            wt, wo = (kt @ d.T).norm(dim=-1), (ko @ d.T).norm(dim=-1)
            resp[l] = float((wo / wt.clamp_min(1e-12)).mean())
    out["key_distance"], out["key_cosine"] = dist, cos
    if resp:
        out["response"] = resp
    return out


def summarize(rows: Sequence[dict]) -> dict[str, float]:
    """Means over answers of :func:`divergence` rows: ``divergence_left`` (share of answers
    generation leaves), ``divergence_margin`` (nats), ``divergence_at_chunk_start`` (share of
    misses at a chunk's first token), ``divergence_key_distance`` / ``divergence_key_cosine`` /
    ``divergence_response`` (over answers with later anchors, and over edit layers)."""
    rows = list(rows)
    if not rows:
        return {}
    left = [r for r in rows if "margin" in r]
    out = {"divergence_left": len(left) / len(rows)}
    if left:
        out["divergence_margin"] = sum(r["margin"] for r in left) / len(left)
        out["divergence_at_chunk_start"] = sum(r["offset"] == 0 for r in left) / len(left)
    for key, name in (("key_distance", "divergence_key_distance"), ("key_cosine", "divergence_key_cosine"),
                      ("response", "divergence_response")):
        vals = [sum(r[key].values()) / len(r[key]) for r in left if r.get(key)]
        if vals:
            out[name] = sum(vals) / len(vals)
    return out


def divergence_of_requests(adapter: ModelAdapter, tokenizer, requests: Sequence, chunks: Sequence[Chunks],
                           layers: Sequence[int], deltas: dict[int, torch.Tensor] | None = None) -> list[dict]:
    """:func:`divergence` of each edited long-form request (``chunks``: each request's chunks as it
    was edited, :func:`~lightning_edit.longform.edit.chunk_requests`), with its ``case_id``."""
    return [dict(divergence(adapter, c, layers, deltas, tokenizer), case_id=r.case_id) for r, c in zip(requests, chunks)]
