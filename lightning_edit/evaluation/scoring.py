"""Batched scoring of (prompt, target) pairs, text perplexity and greedy generation.

All pairs are scored with one tokenization of ``prompt + target`` (see
:mod:`lightning_edit.engine.tokens`) and one right-padded forward pass per batch; targets are
joined onto prompts with :func:`lightning_edit.data.requests.target_text`. Functions run
under ``torch.no_grad`` with the model temporarily in eval mode (dropout off), on the
model's own device, and return CPU tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_edit.data.requests import target_text
from lightning_edit.engine.arch import logits_at
from lightning_edit.engine.tokens import encode_segments, flatten_targets, prompt_target_segment

__all__ = ["TargetScores", "target_scores", "top1_tokens", "pad_rows", "text_token_nll", "word_starts", "next_word_hits",
           "greedy_generate", "model_device"]


@dataclass
class TargetScores:
    """Scores of ``n`` (prompt, target) pairs, in input order (CPU tensors).

    Attributes:
        nll: ``(n,)`` mean NLL per target token (nats).
        all_correct: ``(n,)`` bool, teacher-forced argmax reproduces every target token.
        token_correct: per pair, ``(n_tok_i,)`` bool, argmax == target token.
        token_logprobs: per pair, ``(n_tok_i,)`` log-probability of each target token.
        pred_tokens: per pair, ``(n_tok_i,)`` teacher-forced argmax token ids at the target
            positions.
        target_ids: per pair, ``(n_tok_i,)`` the target token ids.
    """

    nll: Tensor
    all_correct: Tensor
    token_correct: list[Tensor] = field(default_factory=list)
    token_logprobs: list[Tensor] = field(default_factory=list)
    pred_tokens: list[Tensor] = field(default_factory=list)
    target_ids: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.nll.numel())

    @property
    def prob(self) -> Tensor:
        """``(n,)`` ``exp(-nll)``: the per-token geometric-mean probability of each target."""
        return torch.exp(-self.nll)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's input embeddings (first parameter as fallback)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the duration; the previous training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _padded(rows: Sequence[list[int]], pad_id: int, left: bool) -> tuple[Tensor, Tensor, list[int]]:
    """``(ids, attention_mask)`` of shape ``(len(rows), max_len)``, right- or left-padded, and the lengths."""
    lens = [len(r) for r in rows]
    T = max(lens)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for r, (row, n) in enumerate(zip(rows, lens)):
        sl = slice(T - n, T) if left else slice(0, n)
        ids[r, sl] = torch.tensor(row)
        mask[r, sl] = 1
    return ids, mask, lens


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive slices of ``order`` of at most ``batch_size`` indices."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def target_scores(model: nn.Module, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 64,
                  on_batch: Callable[[], object] | None = None) -> TargetScores:
    """Teacher-forced scores of each ``targets[i]`` after ``prompts[i]``.

    Each pair is tokenized once as ``prompt + target_text(prompt, target)``; a target token is
    one that ends inside the target's character span. Pairs are sorted by length and run
    ``batch_size`` at a time in one right-padded forward (attention mask, ``use_cache=False``).
    Only the logits of the positions that predict target tokens are computed and log-softmaxed
    (``(m, vocab)`` for ``m`` target tokens, never ``(batch, seq, vocab)``; the LM head runs at
    those positions only, :func:`lightning_edit.engine.arch.logits_at`); this is what
    :func:`lightning_edit.engine.tokens.gather_target_logprobs` computes, restricted to those rows.
    ``on_batch()`` is called after each of the ``ceil(len(prompts) / batch_size)`` forwards (progress).
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    n = len(prompts)
    if n == 0:
        return TargetScores(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    segments = [prompt_target_segment(p, target_text(p, t)) for p, t in zip(prompts, targets)]
    lp_out: list[Tensor | None] = [None] * n
    pred_out: list[Tensor | None] = [None] * n
    ids_out: list[Tensor | None] = [None] * n
    device = model_device(model)
    order = sorted(range(n), key=lambda i: len(segments[i].text))
    with inference(model):
        for idx in _batches(order, batch_size):
            enc = encode_segments(tokenizer, [segments[i] for i in idx])
            input_ids = enc.input_ids.to(device)
            rows, pos, _ = flatten_targets(enc)  # (m,) each
            # the LM head only at the m positions read (logits may sit on another device: device_map)
            logits = logits_at(model, input_ids, enc.attention_mask.to(device), rows, pos - 1)
            rows, pos = rows.to(logits.device), pos.to(logits.device)
            log_probs = logits.float().log_softmax(-1)  # (m, vocab)
            tgt = input_ids.to(logits.device)[rows, pos]  # (m,)
            lp = log_probs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu()  # (m,)
            pred = log_probs.argmax(-1).cpu()  # (m,)
            tgt = tgt.cpu()
            counts = [int(chunks[0].numel()) for chunks in enc.target_tokens]
            for i, a, b, c in zip(idx, lp.split(counts), pred.split(counts), tgt.split(counts)):
                lp_out[i], pred_out[i], ids_out[i] = a, b, c
            if on_batch is not None:
                on_batch()
    token_correct = [p == t for p, t in zip(pred_out, ids_out)]
    nll = torch.stack([-lp.mean() for lp in lp_out])
    all_correct = torch.stack([c.all() for c in token_correct])
    return TargetScores(nll, all_correct, token_correct, list(lp_out), list(pred_out), list(ids_out))


def pad_rows(rows: Sequence[Tensor], fill: int = -1) -> Tensor:
    """Stack 1-D LongTensors of different lengths into ``(n, max_len)``, padded with ``fill``."""
    width = max((r.numel() for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def top1_tokens(model: nn.Module, tokenizer, prompts: Sequence[str], answers: Sequence[str], batch_size: int = 64) -> Tensor:
    """Answer fingerprint of probe prompts, for :class:`lightning_edit.evaluation.metrics.Retention`.

    Returns ``(n, max_answer_tokens)`` LongTensor: the teacher-forced top-1 token at every
    position of the probe's reference answer (padded with -1). Two models give equal rows iff
    their greedy next-token choice agrees at every answer position, given the answer prefix;
    this determines whether the answer is reproduced (``all_correct``) and the first greedily
    generated token, and is exactly the quantity ZsRE-style token accuracy is computed from,
    without sampling a free-running generation.
    """
    return pad_rows(target_scores(model, tokenizer, prompts, answers, batch_size).pred_tokens)


def text_token_nll(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int | None = None) -> list[Tensor]:
    """Per-token NLL (nats) of each text under the model, for
    :class:`lightning_edit.evaluation.metrics.Perplexity`.

    Each text is tokenized with the tokenizer's special tokens (so a BOS, when added, lets the
    first word be scored) and truncated to ``max_length`` tokens (default: the model's context
    length from its config). Returns, per text, a ``(len_i - 1,)`` tensor: the NLL of tokens
    ``1..len_i-1`` given their prefix.
    """
    if not texts:
        return []
    if max_length is None:
        cfg = getattr(model, "config", None)
        max_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=max_length is not None, max_length=max_length)
    ids_list = enc["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[Tensor | None] = [None] * len(ids_list)
    device = model_device(model)
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    with inference(model):
        for idx in _batches(order, batch_size):
            ids, mask, lens = _padded([ids_list[i] for i in idx], pad_id, left=False)
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (b, T, vocab)
            ids = ids.to(logits.device)
            for r, i in enumerate(idx):
                L = lens[r]
                lp = logits[r, : L - 1].float().log_softmax(-1)  # (L-1, vocab)
                out[i] = -lp.gather(-1, ids[r, 1:L].unsqueeze(-1)).squeeze(-1).cpu()
    return list(out)


def word_starts(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """Indices of the tokens that begin a word of ``text``: a token (not the first) whose
    character span starts after whitespace, or with it (byte-level BPE folds the space into the
    token), and whose first non-space character is a letter or digit. Punctuation, sub-word
    continuations and special tokens (empty spans) are not word starts."""
    out = []
    for j, (a, b) in enumerate(offsets):
        if j == 0 or b <= a:
            continue
        if (text[a].isspace() or (a > 0 and text[a - 1].isspace())) and text[a:b].lstrip()[:1].isalnum():
            out.append(j)
    return out


def next_word_hits(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 16, max_length: int = 128,
                   on_batch: Callable[[], object] | None = None) -> list[Tensor]:
    """Per text, a ``(n_i,)`` bool tensor: at each token that starts a word (:func:`word_starts`),
    whether the model's top-1 next token, given the text before it, is that token: next-word
    accuracy, teacher-forced. Texts are tokenized with special tokens and truncated to
    ``max_length`` tokens; the LM head runs only at the ``n_i`` positions read."""
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ids_list = enc["input_ids"]
    starts = [word_starts(t, off) for t, off in zip(texts, enc["offset_mapping"])]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out: list[Tensor] = [torch.zeros(0, dtype=torch.bool) for _ in texts]
    device = model_device(model)
    order = sorted((i for i in range(len(ids_list)) if starts[i]), key=lambda i: len(ids_list[i]))
    with inference(model):
        for idx in _batches(order, batch_size):
            ids, mask, _ = _padded([ids_list[i] for i in idx], pad_id, left=False)
            rows = torch.tensor([r for r, i in enumerate(idx) for _ in starts[i]])
            pos = torch.tensor([j for i in idx for j in starts[i]])
            logits = logits_at(model, ids.to(device), mask.to(device), rows, pos - 1)  # (m, vocab)
            hits = (logits.argmax(-1).cpu() == ids[rows, pos]).split([len(starts[i]) for i in idx])
            for i, h in zip(idx, hits):
                out[i] = h
            if on_batch is not None:
                on_batch()
    return out


def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 50,
    batch_size: int = 32,
    include_prompt: bool = False,
) -> list[str]:
    """Deterministic greedy continuations of ``prompts``.

    Prompts are tokenized with special tokens, left-padded by hand (the tokenizer is not
    modified) and passed to ``model.generate`` with their attention mask, from which
    ``generate`` derives position ids (so left padding does not shift GPT-2's absolute
    positions). Generation stops at the model's EOS; tokens from the first EOS on are dropped.

    Returns the decoded continuations (special tokens skipped), prefixed with the prompt when
    ``include_prompt`` (as ROME's ``generate_fast`` returns them for the fluency metric).
    """
    if not prompts:
        return []
    ids_list = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (min(eos_ids) if eos_ids else 0)
    out: list[str | None] = [None] * len(ids_list)
    device = model_device(model)
    order = sorted(range(len(ids_list)), key=lambda i: len(ids_list[i]))
    with inference(model):
        for idx in _batches(order, batch_size):
            ids, mask, lens = _padded([ids_list[i] for i in idx], pad_id, left=True)
            T = ids.shape[1]
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad_id,
            )
            new = gen[:, T:].cpu()  # (b, <= max_new_tokens)
            for r, i in enumerate(idx):
                toks = new[r].tolist()
                for k, t in enumerate(toks):
                    if t in eos_ids:
                        toks = toks[:k]
                        break
                cont = _continuation(tokenizer, ids_list[i], toks)
                out[i] = prompts[i] + cont if include_prompt else cont
    return list(out)


def _continuation(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Decoded text of ``new_ids`` as it continues the prompt: decoded together with the prompt
    and the prompt's decoding cut off, so a leading space that a tokenizer drops at the start of
    a decode (SentencePiece) is kept."""
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    pre = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if full.startswith(pre):
        return full[len(pre) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)
