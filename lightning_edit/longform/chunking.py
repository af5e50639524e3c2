"""Chunking a long-form answer into target spans, from ONE tokenization of ``prompt + answer``.

AnyEdit optimizes one residual vector per chunk of the answer, anchored at the token that
predicts the chunk's first token (the prompt's last token for chunk 1, the last token of chunk
k-1 for chunk k). The reference tokenizes the question and the answer pieces separately, which
misplaces anchors wherever the tokenizer merges across a boundary. Here the whole text
``prompt + answer + end_text`` is tokenized once with character offsets, and everything (which
tokens are the answer's, where chunks start and end) is read from those offsets.

Conventions (shared with :func:`lightning_edit.engine.tokens.encode_segments`):

* A token belongs to the span in which it *ends*: token ``t`` with offsets ``(s, e)`` is in chunk
  ``(cs, ce)`` iff ``cs < e <= ce``. So a token that straddles the prompt/answer boundary is the
  answer's first token (and the token before it is chunk 1's anchor).
* Tokens with empty offsets (``e <= s``: BOS / special tokens the tokenizer adds) are never
  targets.
* Byte-level tokenizers split one multi-byte character (``"≈"``, ``"π"``) into several tokens
  with the *same* offsets; a chunk boundary is never put between them (it moves to the end of the
  character), since no character span could tell them apart.

The answer gets the model's end text appended (``tokenizer.eos_token`` for a base model, the chat
template's end-of-turn token for an instruct model, see :func:`end_text_for`), so the edited model
also learns to stop; it is the last chunk's last token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lightning_edit.data.requests import RequestError, target_text
from lightning_edit.engine.tokens import Segment
from lightning_edit.errors import InputError

__all__ = [
    "ChatTemplateError",
    "ChunkingConfig",
    "Chunks",
    "check_all_fit",
    "check_fits",
    "chunk_answer",
    "end_text_for",
    "model_max_positions",
    "prompt_and_answer",
    "render_question",
    "sentence_starts",
]

ChunkMode = Literal["window", "sentence"]


class ChatTemplateError(InputError):
    """A chat template was asked of a tokenizer that has none."""


@dataclass(frozen=True)
class ChunkingConfig:
    """How an answer is cut into chunks.

    Args:
        mode: ``"window"``: fixed windows of ``window`` tokens, consecutive windows sharing
            ``overlap`` tokens (the last window may be shorter); ``"sentence"``: one chunk per
            sentence (``pysbd``, rule-based, no downloads), chunks shorter than ``min_tokens``
            merged into the next chunk (the last one into the previous), chunks longer than
            ``max_tokens`` (if set) cut into windows of ``max_tokens``.
        window: window size in tokens (> 0).
        overlap: tokens shared by consecutive windows (0 <= overlap < window).
        min_tokens: sentence mode: the shortest chunk (>= 1).
        max_tokens: sentence mode: the longest chunk (``None``: no limit).
        language: sentence mode: ``pysbd`` language code.
    """

    mode: ChunkMode = "window"
    window: int = 40
    overlap: int = 0
    min_tokens: int = 8
    max_tokens: int | None = None
    language: str = "en"

    def validate(self) -> "ChunkingConfig":
        """Raise :class:`~lightning_edit.errors.InputError` (a ``ValueError``) naming the bad setting."""
        if self.mode not in ("window", "sentence"):
            raise InputError(f"chunking mode must be 'window' or 'sentence', got {self.mode!r}")
        if not isinstance(self.window, int) or self.window <= 0:
            raise InputError(f"chunking window must be a positive number of tokens, got {self.window!r}")
        if not isinstance(self.overlap, int) or self.overlap < 0:
            raise InputError(f"chunking overlap must be >= 0 tokens, got {self.overlap!r}")
        if self.overlap >= self.window:
            raise InputError(f"chunking overlap ({self.overlap}) must be smaller than the window ({self.window})")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 1:
            raise InputError(f"chunking min_tokens must be >= 1, got {self.min_tokens!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InputError(f"chunking max_tokens must be >= 1 or None, got {self.max_tokens!r}")
        return self


@dataclass(frozen=True)
class Chunks:
    """An answer cut into chunks, located in one tokenization of :attr:`text`.

    Attributes:
        text: ``prompt + answer + end_text`` (``end_text`` left out when the answer already ends
            with it), the exact string that was tokenized.
        prompt_end: ``len(prompt)``: the answer starts at this character.
        answer_end: where the answer ends and ``end_text`` begins.
        end_text: the appended end-of-sequence / end-of-turn text (``""`` for none).
        spans: per chunk, the character span ``(start, end)`` in :attr:`text`; the chunk's
            tokens are those ending in ``(start, end]``; ``spans[0][0] == prompt_end``,
            ``spans[-1][1] == len(text)``. Without overlap consecutive spans touch.
        token_spans: per chunk, token indices ``[first, last + 1)`` in :attr:`input_ids`.
        chunk_tokens: per chunk, its target token indices (those of ``token_spans`` less any
            zero-width token a tokenizer may emit inside the answer), exactly what
            :func:`lightning_edit.engine.tokens.encode_segments` finds from :attr:`spans`.
        anchors: per chunk, the token whose output predicts the chunk's first token
            (``token_spans[k][0] - 1``).
        input_ids: the token ids of :attr:`text` (with the special tokens the tokenizer adds
            when ``add_special_tokens``).
        offsets: the character offsets of :attr:`input_ids`.
        add_special_tokens: how :attr:`text` was tokenized.
    """

    text: str
    prompt_end: int
    answer_end: int
    end_text: str
    spans: tuple[tuple[int, int], ...]
    token_spans: tuple[tuple[int, int], ...]
    chunk_tokens: tuple[tuple[int, ...], ...]
    anchors: tuple[int, ...]
    input_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    add_special_tokens: bool = True

    def __len__(self) -> int:
        return len(self.spans)

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        """Target token indices of the answer (and the end token), in order, without repeats."""
        return tuple(sorted({t for c in self.chunk_tokens for t in c}))

    def chunk_texts(self) -> list[str]:
        """The text of each chunk (its span of :attr:`text`)."""
        return [self.text[s:e] for s, e in self.spans]

    def segment(self, prefix: str = ""):
        """The :class:`lightning_edit.engine.tokens.Segment` of ``prefix + text``: one target per chunk
        (spans shifted by ``len(prefix)``), each anchored at the token before its first token.
        With a prefix (a context prefix) the text is tokenized anew by the encoder; the chunks keep
        their characters."""
        k = len(prefix)
        return Segment(text=prefix + self.text, targets=[(a + k, b + k) for a, b in self.spans],
                       anchors=[None] * len(self.spans))


# --------------------------------------------------------------------------------------------
# Chat template and end text
# --------------------------------------------------------------------------------------------


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}({name!r})" if name else type(tokenizer).__name__


def _require_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"a chat template was asked for, but the tokenizer {_tokenizer_name(tokenizer)} has none "
            "(a base model's tokenizer?); turn the chat template option off, or use the instruct model's tokenizer"
        )


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def render_question(tokenizer, question: str, system: str | None = None) -> str:
    """``question`` as a user turn followed by the assistant's opening, in the tokenizer's chat
    template (``apply_chat_template(..., add_generation_prompt=True, tokenize=False)``).

    A BOS that the template writes is dropped when the tokenizer adds one itself, so the result
    is meant to be tokenized *with* special tokens (as every other text here) without doubling it.

    Raises:
        ChatTemplateError: the tokenizer has no chat template (the message names the tokenizer).
    """
    _require_chat_template(tokenizer)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and out.startswith(bos) and _adds_bos(tokenizer):
        out = out[len(bos):]
    return out


_MARK = "\u2063LONGFORM-ANSWER-MARK\u2063"


def _special_texts(tokenizer) -> set[str]:
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for tok in decoder.values():
        if getattr(tok, "special", False):
            texts.add(str(tok))
    return texts


def end_text_for(tokenizer, chat_template: bool = False) -> str:
    """The text appended to an answer so the edited model learns to stop.

    Base models: ``tokenizer.eos_token``. With ``chat_template``: the end-of-turn token of the
    template, found by rendering a conversation whose assistant turn is a marker and taking the
    first special token written after it (``<|eot_id|>`` for Llama 3, ``<|im_end|>`` for ChatML);
    the EOS token when the template writes none.

    Raises:
        ChatTemplateError: ``chat_template`` and the tokenizer has none.
        InputError: (a ``ValueError``) the tokenizer has no EOS token (and no end-of-turn token was found).
    """
    if chat_template:
        _require_chat_template(tokenizer)
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        at = rendered.find(_MARK)
        if at >= 0:
            rest = rendered[at + len(_MARK):]
            specials = sorted(_special_texts(tokenizer), key=len, reverse=True)
            best = None
            for s in specials:
                pos = rest.find(s)
                if pos >= 0 and (best is None or pos < best[0]):
                    best = (pos, s)
            if best is not None:
                return best[1]
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise InputError(f"the tokenizer {_tokenizer_name(tokenizer)} has no EOS token; pass end_text explicitly ('' for none)")
    return eos


def prompt_and_answer(tokenizer, question: str, answer: str, chat_template: bool = False,
                      system: str | None = None) -> tuple[str, str]:
    """The prompt and the answer text as the model sees them, ready for :func:`chunk_answer`.

    With ``chat_template`` the prompt is :func:`render_question` (it ends with the assistant's
    opening, the answer follows directly). Without, the prompt is the bare question and the answer
    gets a leading space when neither side has whitespace at the join
    (:func:`lightning_edit.data.requests.target_text`), as running text would have it
    (``"Tell me about X." + " X is ..."``).
    """
    if chat_template:
        return render_question(tokenizer, question, system), answer
    return question, target_text(question, answer)


# --------------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------------


def sentence_starts(text: str, language: str = "en") -> list[int]:
    """Character positions in ``text`` where a sentence other than the first starts (``pysbd``,
    rule-based; whitespace after a sentence belongs to it)."""
    import pysbd

    segmenter = pysbd.Segmenter(language=language, clean=False)
    starts, cursor = [], 0
    for sentence in segmenter.segment(text):
        core = sentence.strip()
        if not core:
            continue
        at = text.find(core, cursor)
        if at < 0:  # pysbd altered the sentence; skip this boundary
            continue
        if at > 0 and (not starts or at > starts[-1]):
            starts.append(at)
        cursor = at + len(core)
    return starts


# --------------------------------------------------------------------------------------------
# Chunking
# --------------------------------------------------------------------------------------------


def _snap(units_end: Sequence[int], i: int) -> int:
    """Move a token boundary ``i`` (in answer-token positions) forward to the end of a
    character: ``units_end[k]`` is the end offset of answer token k."""
    while 0 < i < len(units_end) and units_end[i] == units_end[i - 1]:
        i += 1
    return i


def _windows(n: int, size: int, overlap: int, ends: Sequence[int]) -> list[tuple[int, int]]:
    """Windows ``[a, b)`` over ``n`` answer tokens."""
    step = size - overlap
    out: list[tuple[int, int]] = []
    start = 0
    while True:
        a = _snap(ends, start)
        if out and a <= out[-1][0]:
            a = _snap(ends, out[-1][0] + 1)
        b = _snap(ends, min(n, a + size))
        if out and b <= out[-1][1]:  # snapped onto the previous window's end: adds no token
            start = a + 1
            continue
        out.append((a, b))
        if b >= n:
            break
        start = a + step
    return out


def _sentence_groups(ends: Sequence[int], boundaries: Sequence[int], cfg: ChunkingConfig) -> list[tuple[int, int]]:
    """Token ranges ``[a, b)`` per sentence chunk: a token belongs to the sentence in which it
    ends; short sentences merge forwards (the last backwards); long ones are cut."""
    n = len(ends)
    cuts = [0]
    for b in boundaries:  # first answer token ending after the boundary
        k = cuts[-1]
        while k < n and ends[k] <= b:
            k += 1
        if k > cuts[-1] and k < n:
            cuts.append(k)
    cuts.append(n)
    groups = [(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1) if cuts[i + 1] > cuts[i]]
    merged: list[tuple[int, int]] = []
    pending = None
    for a, b in groups:
        if pending is not None:
            a = pending
        if b - a >= cfg.min_tokens:
            merged.append((a, b))
            pending = None
        else:
            pending = a
    if pending is not None:
        if merged:
            merged[-1] = (merged[-1][0], n)
        else:
            merged.append((pending, n))
    if cfg.max_tokens is None:
        return merged
    out = []
    for a, b in merged:
        if b - a <= cfg.max_tokens:
            out.append((a, b))
            continue
        for wa, wb in _windows(b - a, cfg.max_tokens, 0, [ends[a + k] for k in range(b - a)]):
            out.append((a + wa, a + wb))
    return out


def chunk_answer(
    tokenizer,
    prompt: str,
    answer: str,
    config: ChunkingConfig | None = None,
    end_text: str | None = None,
    chat_template: bool = False,
    add_special_tokens: bool = True,
) -> Chunks:
    """Cut ``answer`` (following ``prompt``) into chunks located in one tokenization.

    Args:
        tokenizer: a fast (Rust) Hugging Face tokenizer (character offsets are needed).
        prompt: the text before the answer, exactly as the model sees it (a rendered chat prompt
            for instruct models, see :func:`render_question`).
        answer: the target answer (may already end with ``end_text``; it is not doubled). It
            follows ``prompt`` exactly as given: :func:`prompt_and_answer` adds the space a base
            model expects between a question and its answer.
        config: how to chunk (default: windows of 40 tokens, no overlap).
        end_text: the text appended to the answer; ``None``: :func:`end_text_for` (the EOS token,
            or the template's end-of-turn token when ``chat_template``); ``""``: nothing.
        chat_template: where ``end_text`` is ``None``, use the chat template's end-of-turn token.
        add_special_tokens: passed to the tokenizer (BOS as the model was trained).

    Returns:
        :class:`Chunks`.

    Raises:
        InputError: (a ``ValueError``) bad ``config``, empty answer, a slow tokenizer, or an ``end_text`` that does
            not tokenize as the last token(s) of the text.
        ChatTemplateError: ``chat_template`` asked of a tokenizer without one.
    """
    cfg = (config or ChunkingConfig()).validate()
    if not isinstance(answer, str) or not answer.strip():
        raise InputError("empty answer: nothing to chunk")
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"a fast (Rust) tokenizer is needed for character offsets, got {_tokenizer_name(tokenizer)}")
    if end_text is None:
        end_text = end_text_for(tokenizer, chat_template)
    appended = end_text if end_text and not answer.endswith(end_text) else ""
    text = prompt + answer + appended
    prompt_end = len(prompt)
    answer_end = len(text) - len(appended) if appended else len(text) - len(end_text or "")

    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    answer_toks = [t for t, (s, e) in enumerate(offsets) if e > s and e > prompt_end]
    if not answer_toks:
        raise InputError(f"the answer has no tokens after the prompt in {text[-80:]!r}")
    if answer_toks[0] == 0:
        raise InputError("the answer starts the sequence (empty prompt and no BOS): no token predicts its first token")
    if end_text:
        last_s, last_e = offsets[answer_toks[-1]]
        if text[last_s:last_e] != end_text and not text[last_s:last_e].endswith(end_text):
            raise InputError(
                f"the end text {end_text!r} did not tokenize as the text's last token (the tokenizer "
                f"{_tokenizer_name(tokenizer)} splits it: last token covers {text[last_s:last_e]!r})"
            )
    ends = [offsets[t][1] for t in answer_toks]
    if cfg.mode == "window":
        ranges = _windows(len(answer_toks), cfg.window, cfg.overlap, ends)
    else:
        boundaries = [prompt_end + s for s in sentence_starts(text[prompt_end:answer_end], cfg.language)]
        ranges = _sentence_groups(ends, boundaries, cfg)

    spans, token_spans, chunk_tokens, anchors = [], [], [], []
    for a, b in ranges:
        start = prompt_end if a == 0 else ends[a - 1]
        spans.append((start, ends[b - 1]))
        token_spans.append((answer_toks[a], answer_toks[b - 1] + 1))
        chunk_tokens.append(tuple(answer_toks[a:b]))
        anchors.append(answer_toks[a] - 1)
    return Chunks(
        text=text, prompt_end=prompt_end, answer_end=answer_end, end_text=end_text or "",
        spans=tuple(spans), token_spans=tuple(token_spans), chunk_tokens=tuple(chunk_tokens), anchors=tuple(anchors),
        input_ids=tuple(ids), offsets=tuple(offsets), add_special_tokens=add_special_tokens,
    )


# --------------------------------------------------------------------------------------------
# Length checks
# --------------------------------------------------------------------------------------------


def model_max_positions(model_or_config) -> int | None:
    """The model's maximum number of positions (``max_position_embeddings``, ``n_positions``,
    ``n_ctx``, ``seq_length`` or ``max_sequence_length`` of its config), ``None`` if it has none."""
    cfg = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_fits(
    tokenizer,
    request,
    max_positions: int,
    chat_template: bool = False,
    system: str | None = None,
    end_text: str | None = None,
    add_special_tokens: bool = True,
) -> int:
    """Raise if ``request``'s question + answer (+ end text) does not fit ``max_positions``.

    Checks, each as the model will see it (:func:`prompt_and_answer`: rendered with the chat
    template when asked): the question alone, question + answer + end text, and the paraphrase
    question.

    Args:
        request: a :class:`~lightning_edit.longform.records.LongFormRequest` (anything with
            ``question``, ``answer``, ``paraphrase_question`` and ``error(field, problem)``).
        max_positions: the model's maximum positions (see :func:`model_max_positions`).

    Returns:
        The number of tokens of question + answer + end text.

    Raises:
        RequestError: naming the record and the (raw) field: ``question`` (the question alone is
            too long), ``answer`` (together they are), ``paraphrase_question``.
        ChatTemplateError: ``chat_template`` asked of a tokenizer without one.
    """
    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def fail(name: str, problem: str):
        if hasattr(request, "error"):
            return request.error(name, problem)
        return RequestError(getattr(request, "case_id", "?"), name, problem)

    prompt, answer = prompt_and_answer(tokenizer, request.question, request.answer, chat_template, system)
    n_q = n_tokens(prompt)
    if n_q >= max_positions:
        raise fail("question", f"the question is {n_q} tokens; the model has {max_positions} positions")
    if end_text is None:
        end_text = end_text_for(tokenizer, chat_template)
    answer = answer if (not end_text or answer.endswith(end_text)) else answer + end_text
    n_all = n_tokens(prompt + answer)
    if n_all > max_positions:
        raise fail(
            "answer",
            f"question + answer{' + end token' if end_text else ''} is {n_all} tokens, more than the model's "
            f"{max_positions} positions (the answer alone is about {n_all - n_q} tokens)",
        )
    para = getattr(request, "paraphrase_question", None)
    if para:
        p = render_question(tokenizer, para, system) if chat_template else para
        n_p = n_tokens(p)
        if n_p >= max_positions:
            raise fail("paraphrase_question", f"the paraphrase question is {n_p} tokens; the model has {max_positions} positions")
    return n_all


def check_all_fit(tokenizer, requests, max_positions: int, chat_template: bool = False, system: str | None = None,
                  end_text: str | None = None, add_special_tokens: bool = True) -> list[int]:
    """:func:`check_fits` for every request, in order, before anything is edited; returns their
    token counts. Raises on the first request that does not fit."""
    return [check_fits(tokenizer, r, max_positions, chat_template, system, end_text, add_special_tokens) for r in requests]

