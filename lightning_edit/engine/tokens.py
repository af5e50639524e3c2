"""One tokenization of the full text, character offsets for everything else.

Anchors and target tokens are located from the offsets of a single tokenization of the
whole sequence (prompt + target), never from separately tokenized pieces, so token merges
at the prompt/target boundary and BOS tokens cannot shift them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_edit.errors import InputError


@dataclass
class Segment:
    """A text to encode, with the spans the caller cares about.

    Args:
        text: the full sequence (context prefix + prompt + target ...).
        targets: character spans ``[start, end)`` of target chunks, in order; a token belongs
            to the chunk in which it *ends*.
        anchors: one entry per chunk (or, with no targets, a single entry): ``None`` means "the
            token just before the chunk's first token" (the position whose output predicts the
            chunk), an ``int`` means "the token that contains this character" (e.g. the
            subject's last character). With no targets, ``None`` means the last token.
        tokens: ``(input_ids, offsets)`` of ``text`` when the caller has tokenized it already
            (with ``add_special_tokens=True``, e.g. :class:`~lightning_edit.longform.chunking.Chunks`),
            so it is not tokenized a second time; None: tokenized here.
    """

    text: str
    targets: Sequence[tuple[int, int]] = ()
    anchors: Sequence[int | None] = ()
    tokens: tuple[Sequence[int], Sequence[tuple[int, int]]] | None = None


@dataclass
class Encoded:
    """A right-padded batch.

    Attributes:
        input_ids, attention_mask: ``(rows, seq)``.
        anchor_pos: ``(rows, max_anchors)`` token index of each anchor, -1 where absent.
        target_tokens: per row, per chunk, a ``(n_tok,)`` LongTensor of token positions.
        lengths: ``(rows,)`` number of real tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    anchor_pos: torch.Tensor
    target_tokens: list[list[torch.Tensor]]
    lengths: torch.Tensor


class TokenizationError(InputError):
    """A text that cannot be tokenized as editing needs it (a target without tokens, a text
    too long, a slow tokenizer); the message quotes the text."""


def _token_containing(offsets: list[tuple[int, int]], char: int) -> int:
    for t, (s, e) in enumerate(offsets):
        if s <= char < e:
            return t
    # characters that no token covers (e.g. a space merged away): take the last token ending before
    best = -1
    for t, (s, e) in enumerate(offsets):
        if e <= char and e > s:
            best = t
    if best < 0:
        raise TokenizationError(f"no token covers character {char}")
    return best


def encode_segments(tokenizer, segments: Sequence[Segment], pad_id: int | None = None, max_length: int | None = None) -> Encoded:
    """Tokenize ``segments`` once each (with offsets) and locate anchors and target tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizationError("a fast (Rust) tokenizer is needed for character offsets")
    todo = [i for i, s in enumerate(segments) if s.tokens is None]  # the segments not tokenized yet, in one call
    enc = tokenizer([segments[i].text for i in todo], return_offsets_mapping=True, add_special_tokens=True) if todo else None
    tokenized = [s.tokens for s in segments]
    for j, i in enumerate(todo):
        tokenized[i] = (enc["input_ids"][j], enc["offset_mapping"][j])
    rows_ids, rows_anchor, rows_targets = [], [], []
    for seg, (ids, offsets) in zip(segments, tokenized):
        ids = list(ids)
        offsets = [tuple(o) for o in offsets]
        if max_length is not None and len(ids) > max_length:
            raise TokenizationError(f"text of {len(ids)} tokens exceeds max_length {max_length}: {seg.text[:80]!r}...")
        real = [t for t, (s, e) in enumerate(offsets) if e > s]  # skip special tokens (0, 0)
        chunk_tokens = []
        for ci, (cs, ce) in enumerate(seg.targets):
            toks = [t for t in real if cs < offsets[t][1] <= ce]
            if not toks:
                raise TokenizationError(f"target span {seg.text[cs:ce]!r} has no tokens in {seg.text!r}")
            if toks[0] == 0:
                raise TokenizationError(f"target {seg.text[cs:ce]!r} starts the sequence: nothing predicts it")
            chunk_tokens.append(torch.tensor(toks, dtype=torch.long))
        anchors = []
        spec = list(seg.anchors) if seg.anchors else [None] * max(1, len(seg.targets))
        for ai, a in enumerate(spec):
            if a is None:
                anchors.append(int(chunk_tokens[ai][0]) - 1 if seg.targets else len(ids) - 1)
            else:
                anchors.append(_token_containing(offsets, a))
        rows_ids.append(ids)
        rows_anchor.append(anchors)
        rows_targets.append(chunk_tokens)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n, T = len(rows_ids), max(len(r) for r in rows_ids)
    A = max(len(a) for a in rows_anchor)
    input_ids = torch.full((n, T), pad_id, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    anchor_pos = torch.full((n, A), -1, dtype=torch.long)
    for i, (ids, anc) in enumerate(zip(rows_ids, rows_anchor)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        anchor_pos[i, : len(anc)] = torch.tensor(anc)
    return Encoded(input_ids, mask, anchor_pos, rows_targets, mask.sum(1))


def prompt_target_segment(prompt: str, target: str, anchor_char: int | None = None, prefix: str = "") -> Segment:
    """``prefix + prompt + target`` with the target as the single chunk. ``anchor_char`` is a
    character index into ``prompt`` (shifted here by the prefix), or ``None`` for the prompt's
    last token."""
    text = prefix + prompt + target
    start = len(prefix) + len(prompt)
    anchor = None if anchor_char is None else len(prefix) + anchor_char
    return Segment(text=text, targets=[(start, len(text))], anchors=[anchor])


def gather_target_logprobs(log_probs: torch.Tensor, input_ids: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Log-probability of token ``input_ids[r, p]`` predicted at position ``p - 1``.

    Shapes: log_probs ``(rows, seq, vocab)``; rows, positions ``(m,)``; returns ``(m,)``.
    """
    return log_probs[rows, positions - 1].gather(-1, input_ids[rows, positions].unsqueeze(-1)).squeeze(-1)


def flatten_targets(enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All target tokens as flat ``(rows, positions, chunk_index)`` LongTensors."""
    rows, pos, chunk = [], [], []
    for r, chunks in enumerate(enc.target_tokens):
        for c, toks in enumerate(chunks):
            rows.append(torch.full_like(toks, r))
            pos.append(toks)
            chunk.append(torch.full_like(toks, c))
    if not rows:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    return torch.cat(rows), torch.cat(pos), torch.cat(chunk)
