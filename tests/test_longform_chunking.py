"""Chunking long-form answers from one tokenization, on real benchmark texts."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_edit.data.requests import RequestError
from lightning_edit.engine.tokens import encode_segments
from lightning_edit.longform.chunking import (
    ChatTemplateError,
    ChunkingConfig,
    check_all_fit,
    check_fits,
    chunk_answer,
    end_text_for,
    model_max_positions,
    prompt_and_answer,
    render_question,
    sentence_starts,
)
from lightning_edit.longform.records import LongFormRequest, load_longform

FIXTURES = Path(__file__).parent / "fixtures" / "longform"
FACTWORLD_TOKENIZER = Path(__file__).parents[1] / "lightning_edit" / "builtin" / "factworld" / "pretrained" / "default-seed0" / "model"

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# a template that writes the BOS itself (as Llama 3's does) and ends turns with <|eot|>
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|hdr|>' + m['role'] + '<|/hdr|>\n\n' + m['content'] + '<|eot|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|hdr|>assistant<|/hdr|>\n\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(FACTWORLD_TOKENIZER))


@pytest.fixture(scope="module")
def chat_tok():
    t = AutoTokenizer.from_pretrained(str(FACTWORLD_TOKENIZER))
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


@pytest.fixture(scope="module")
def samples():
    """Real long texts: UnKEBench, EditEverything (math with unicode symbols, code, poetry), AKEW."""
    unke = load_longform(str(FIXTURES / "unkebench_v2.json"))[:6]
    ev = load_longform(str(FIXTURES / "editeverything.json"))
    picked = {}
    for r in ev:  # one record of each category
        picked.setdefault(r.category, r)
    akew = load_longform(str(FIXTURES / "akew_mquake_cf.json"))[:3]
    return unke + list(picked.values()) + akew


def reference_answer_tokens(tokenizer, prompt: str, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Slow reference: tokenize the whole text once; a token is the answer's when its last
    character lies past the prompt (and it covers any character)."""
    enc = tokenizer(text, return_offsets_mapping=True)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    out = []
    for t in range(len(offsets)):
        s, e = offsets[t]
        if e > s and e - 1 >= len(prompt):
            out.append(t)
    return out, offsets


def reference_windows(answer_tokens: list[int], size: int, overlap: int) -> list[list[int]]:
    """Slow reference windows over the answer tokens (no multi-token characters in the text)."""
    out, i = [], 0
    while True:
        out.append(answer_tokens[i:i + size])
        if i + size >= len(answer_tokens):
            return out
        i += size - overlap


def chunk_token_lists(ch) -> list[list[int]]:
    lists = [list(c) for c in ch.chunk_tokens]
    # no zero-width tokens with these tokenizers: the token spans are the same lists
    assert lists == [list(range(a, b)) for a, b in ch.token_spans]
    return lists


def ascii_only(text: str) -> bool:
    return all(ord(c) < 128 for c in text)


@pytest.mark.parametrize("size,overlap", [(40, 0), (16, 0), (25, 5), (7, 6)])
def test_windows_match_slow_reference_and_cover_answer(tok, samples, size, overlap):
    for r in samples:
        ch = chunk_answer(tok, r.question, r.answer, ChunkingConfig(window=size, overlap=overlap))
        ref_tokens, offsets = reference_answer_tokens(tok, r.question, ch.text)
        assert list(ch.answer_tokens) == ref_tokens
        chunks = chunk_token_lists(ch)
        # every answer token in a chunk, in order; consecutive chunks share exactly `overlap`
        assert sorted(set(t for c in chunks for t in c)) == ref_tokens
        for a, b in zip(chunks, chunks[1:]):
            shared = set(a) & set(b)
            assert len(shared) == overlap or not ascii_only(r.answer)
            assert b[-1] > a[-1]
        if ascii_only(ch.text):
            assert chunks == reference_windows(ref_tokens, size, overlap)
            assert all(len(c) == size for c in chunks[:-1]) and 0 < len(chunks[-1]) <= size
        # anchors: the token before each chunk's first token; chunk 1's is the prompt's last
        assert [c[0] - 1 for c in chunks] == list(ch.anchors)
        assert offsets[ch.anchors[0]][1] <= len(r.question)


def test_no_overlap_chunks_partition_the_answer_exactly_once(tok, samples):
    for r in samples:
        ch = chunk_answer(tok, r.question, r.answer, ChunkingConfig(window=40))
        flat = [t for c in chunk_token_lists(ch) for t in c]
        assert flat == list(ch.answer_tokens)  # each answer token once, in order
        # spans touch, start at the answer and end at the text's end
        assert ch.spans[0][0] == len(r.question) and ch.spans[-1][1] == len(ch.text)
        assert all(a[1] == b[0] for a, b in zip(ch.spans, ch.spans[1:]))
        assert "".join(ch.chunk_texts()) == ch.text[len(r.question):]


@pytest.mark.parametrize("mode", ["window", "sentence"])
def test_spans_agree_with_encode_segments(tok, samples, mode):
    """The engine's encoder, reading the spans, finds exactly the chunk tokens and anchors."""
    cfg = ChunkingConfig(mode=mode, window=30, overlap=0 if mode == "sentence" else 10, min_tokens=12)
    for r in samples:
        ch = chunk_answer(tok, r.question, r.answer, cfg)
        enc = encode_segments(tok, [ch.segment()])
        got = [x.tolist() for x in enc.target_tokens[0]]
        assert got == chunk_token_lists(ch)
        assert enc.anchor_pos[0, : len(ch)].tolist() == list(ch.anchors)
        assert enc.input_ids[0, : len(ch.input_ids)].tolist() == list(ch.input_ids)
        # behind a context prefix the same characters are the targets
        prefix = "The old man walked to the station in the rain. "
        enc_p = encode_segments(tok, [ch.segment(prefix)])
        texts = [tok.decode(enc_p.input_ids[0, x].tolist()) for x in enc_p.target_tokens[0]]
        assert texts == [tok.decode([ch.input_ids[t] for t in c]) for c in ch.chunk_tokens]


def test_multibyte_characters_are_never_split(tok, samples):
    math = [r for r in samples if r.category in ("math", "physics") and not ascii_only(r.answer)]
    assert math, "the samples should hold symbols such as '≈' or 'π'"
    seen_shared = False
    for r in math:
        for size in (3, 5, 8):
            ch = chunk_answer(tok, r.question, r.answer, ChunkingConfig(window=size))
            for a, b in ch.token_spans[1:]:
                # the token before a chunk boundary ends before the chunk's first token does
                assert ch.offsets[a - 1][1] < ch.offsets[a][1]
            ends = [ch.offsets[t][1] for t in ch.answer_tokens]
            seen_shared |= len(set(ends)) < len(ends)
    assert seen_shared, "expected byte-level tokens sharing a character in the sample"


def test_eos_is_the_last_chunks_last_token(tok, samples):
    for r in samples[:5]:
        for cfg in (ChunkingConfig(window=40), ChunkingConfig(mode="sentence")):
            ch = chunk_answer(tok, r.question, r.answer, cfg)
            last = ch.token_spans[-1][1] - 1
            assert last == len(ch.input_ids) - 1
            assert ch.input_ids[last] == tok.eos_token_id and ch.end_text == tok.eos_token
            assert ch.text.endswith(tok.eos_token) and ch.answer_end == len(ch.text) - len(tok.eos_token)
    r = samples[0]
    # already ending with the EOS: not doubled
    ch = chunk_answer(tok, r.question, r.answer + tok.eos_token, ChunkingConfig(window=40))
    assert ch.text.count(tok.eos_token) == 1
    # no end text
    ch = chunk_answer(tok, r.question, r.answer, ChunkingConfig(window=40), end_text="")
    assert ch.input_ids[-1] != tok.eos_token_id and ch.text == r.question + r.answer


def test_sentence_chunks_respect_min_length_and_sentence_boundaries(tok, samples):
    for min_tokens in (1, 10, 25):
        for r in samples:
            ch = chunk_answer(tok, r.question, r.answer, ChunkingConfig(mode="sentence", min_tokens=min_tokens))
            sizes = [b - a for a, b in ch.token_spans]
            if len(ch.answer_tokens) >= min_tokens:
                assert min(sizes) >= min_tokens
            assert [t for c in chunk_token_lists(ch) for t in c] == list(ch.answer_tokens)
            # a chunk boundary sits where a sentence starts: the boundary token is the first that
            # ends past one of the sentence starts
            starts = [len(r.question) + s for s in sentence_starts(r.answer)]
            for a, _ in ch.token_spans[1:]:
                prev_end, first_end = ch.offsets[a - 1][1], ch.offsets[a][1]
                assert any(prev_end <= s < first_end for s in starts), (r.case_id, ch.text[prev_end - 20:first_end])
    # with min 1 every sentence of a plain English answer is its own chunk
    r = samples[0]
    ch = chunk_answer(tok, r.question, r.answer, ChunkingConfig(mode="sentence", min_tokens=1))
    assert len(ch) == len(sentence_starts(r.answer)) + 1


def test_sentence_max_tokens_cuts_long_chunks(tok, samples):
    r = max(samples, key=lambda s: len(s.answer))
    ch = chunk_answer(tok, r.question, r.answer, ChunkingConfig(mode="sentence", min_tokens=5, max_tokens=12))
    assert max(b - a for a, b in ch.token_spans) <= 12 + 3  # +3: a multi-byte character is never split
    assert [t for c in chunk_token_lists(ch) for t in c] == list(ch.answer_tokens)


def test_token_straddling_the_prompt_boundary_is_the_answers_first_token(tok):
    prompt, answer = "Where does Bob live? ", "Bob lives in Korrin."
    ch = chunk_answer(tok, prompt, answer, ChunkingConfig(window=40))
    first = ch.token_spans[0][0]
    s, e = ch.offsets[first]
    assert s < len(prompt) < e  # " Bob" starts with the prompt's trailing space
    assert tok.convert_ids_to_tokens(ch.input_ids[first]) == "ĠBob"
    assert ch.anchors[0] == first - 1 and ch.text[slice(*ch.offsets[first - 1])] == "?"
    # tokenizing the prompt separately (the reference's way) would put the answer one token later
    n_prompt_alone = len(tok(prompt)["input_ids"])
    assert n_prompt_alone != first


@pytest.mark.parametrize("cfg,match", [
    (dict(window=0), "positive"),
    (dict(window=-3), "positive"),
    (dict(window=10, overlap=10), "smaller than the window"),
    (dict(window=10, overlap=12), "smaller than the window"),
    (dict(window=10, overlap=-1), ">= 0"),
    (dict(mode="paragraph"), "'window' or 'sentence'"),
    (dict(mode="sentence", min_tokens=0), "min_tokens"),
])
def test_bad_settings_are_clear_errors(tok, cfg, match):
    with pytest.raises(ValueError, match=match):
        chunk_answer(tok, "Q?", "An answer.", ChunkingConfig(**cfg))
    with pytest.raises(ValueError, match="empty answer"):
        chunk_answer(tok, "Q?", "  ")


def test_chat_template_render_and_end_of_turn(chat_tok, samples):
    r = samples[0]
    q = render_question(chat_tok, r.question)
    assert q == f"<|im_start|>user\n{r.question}<|im_end|>\n<|im_start|>assistant\n"
    assert end_text_for(chat_tok, chat_template=True) == "<|im_end|>"
    assert end_text_for(chat_tok) == chat_tok.eos_token
    ch = chunk_answer(chat_tok, q, r.answer, ChunkingConfig(window=32), chat_template=True)
    assert ch.input_ids[-1] == chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert ch.token_spans[-1][1] == len(ch.input_ids)
    # chunk 1 is predicted by the last token of the assistant's opening
    assert ch.text[slice(*ch.offsets[ch.anchors[0]])].endswith("\n")
    with_system = render_question(chat_tok, "Hi?", system="Be brief.")
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_template_bos_is_not_doubled():
    t = AutoTokenizer.from_pretrained(str(FACTWORLD_TOKENIZER))
    t.add_special_tokens({"additional_special_tokens": ["<|hdr|>", "<|/hdr|>", "<|eot|>"]})
    t.chat_template = BOS_TEMPLATE
    q = render_question(t, "Who?")
    assert not q.startswith(t.bos_token)  # the tokenizer adds the BOS itself
    ids = t(q)["input_ids"]
    assert ids.count(t.bos_token_id) == 1 and ids[0] == t.bos_token_id
    assert end_text_for(t, chat_template=True) == "<|eot|>"


def test_chat_template_missing_names_the_tokenizer(tok):
    with pytest.raises(ChatTemplateError, match="has none") as err:
        render_question(tok, "Q?")
    assert type(tok).__name__ in str(err.value) and "pretrained" in str(err.value)
    with pytest.raises(ChatTemplateError):
        end_text_for(tok, chat_template=True)
    with pytest.raises(ChatTemplateError):
        chunk_answer(tok, "Q?", "A.", chat_template=True)


def test_check_fits_names_record_and_field(tok, samples):
    r = load_longform(str(FIXTURES / "akew_mquake_cf.json"))[1]
    n = check_fits(tok, r, max_positions=10_000)
    assert n == len(chunk_answer(tok, *prompt_and_answer(tok, r.question, r.answer)).input_ids)
    with pytest.raises(RequestError) as err:
        check_fits(tok, r, max_positions=n - 1)
    assert err.value.record == r.record_index and err.value.field == f"requested_rewrite[{r.extra['rewrite_index']}].fact_new_uns"
    assert f"{n} tokens" in str(err.value)
    with pytest.raises(RequestError) as err:
        check_fits(tok, r, max_positions=3)
    assert err.value.field.endswith(".question")
    assert check_fits(tok, r, max_positions=n) == n
    u = samples[0]
    assert u.paraphrase_question
    long_para = LongFormRequest(case_id="p", question="Q?", answer="A.", paraphrase_question="word " * 300,
                                record_index=7, raw_fields={"paraphrase_question": "para_question"})
    with pytest.raises(RequestError) as err:
        check_fits(tok, long_para, max_positions=64)
    assert (err.value.record, err.value.field) == (7, "para_question")


def test_model_max_positions():
    from transformers import GPT2Config, LlamaConfig

    assert model_max_positions(GPT2Config(n_positions=256)) == 256
    assert model_max_positions(LlamaConfig(max_position_embeddings=2048)) == 2048

    class NoCfg:
        pass

    assert model_max_positions(NoCfg()) is None


def test_prompt_and_answer(tok, chat_tok):
    assert prompt_and_answer(tok, "Tell me about Bob.", "Bob is a poet.") == ("Tell me about Bob.", " Bob is a poet.")
    assert prompt_and_answer(tok, "Question:\n", "Bob is a poet.") == ("Question:\n", "Bob is a poet.")
    prompt, answer = prompt_and_answer(chat_tok, "Who?", "Bob.", chat_template=True)
    assert prompt == render_question(chat_tok, "Who?") and answer == "Bob."
    with pytest.raises(ChatTemplateError):
        prompt_and_answer(tok, "Who?", "Bob.", chat_template=True)
    # with the chat template the length check counts the rendered prompt and the end-of-turn token
    req = LongFormRequest(case_id="c", question="Who?", answer="Bob is a poet.")
    n = check_fits(chat_tok, req, 10_000, chat_template=True)
    ch = chunk_answer(chat_tok, prompt, "Bob is a poet.", chat_template=True)
    assert n == len(ch.input_ids) and ch.input_ids[-1] == chat_tok.convert_tokens_to_ids("<|im_end|>")


def test_check_all_fit_stops_at_the_first_too_long(tok):
    reqs = load_longform(str(FIXTURES / "editeverything.json"))[:6]
    lengths = check_all_fit(tok, reqs, 100_000)
    assert len(lengths) == 6
    cut = sorted(lengths)[-2]  # the longest record no longer fits
    longest = max(range(6), key=lambda i: lengths[i])
    with pytest.raises(RequestError) as err:
        check_all_fit(tok, reqs, cut)
    assert err.value.record == reqs[longest].record_index and err.value.field == "answer"


@pytest.mark.parametrize("mode", ["window", "sentence"])
def test_the_engine_reuses_the_chunkers_tokenization(tok, samples, mode):
    """A long-form batch takes each answer's tokenization from the chunker (the bare rows are not
    tokenized again) and is exactly the batch built by tokenizing every row anew."""
    import torch

    from lightning_edit.engine.residuals import build_chunked_batch
    from lightning_edit.longform.edit import LongFormConfig, build_longform_batch

    cfg = LongFormConfig(chunking=ChunkingConfig(mode=mode, window=16), context_prefixes=True)
    prefixes = ["The cat sat. ", "Because of this, "]
    seen: list[str] = []

    class Counting:  # the tokenizer, recording every text it is asked to tokenize
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, text, *a, **k):
            seen.extend([text] if isinstance(text, str) else list(text))
            return self.inner(text, *a, **k)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    reqs = list(samples)
    got, chunks = build_longform_batch(Counting(tok), reqs, cfg, prefixes)
    fresh = build_chunked_batch(tok, [(c.text, c.spans) for c in chunks], prefixes)
    for name in ("input_ids", "attention_mask", "anchor_pos", "lengths"):
        assert torch.equal(getattr(got.enc, name), getattr(fresh.enc, name)), name
    assert all(torch.equal(a, b) for ra, rb in zip(got.enc.target_tokens, fresh.enc.target_tokens) for a, b in zip(ra, rb))
    assert torch.equal(got.anchor_chunk, fresh.anchor_chunk) and torch.equal(got.bare_row_of_chunk, fresh.bare_row_of_chunk)
    assert all(seen.count(c.text) == 1 for c in chunks)  # each answer's full text tokenized once, by the chunker
    assert sum(t.startswith(tuple(prefixes)) for t in seen) == len(prefixes) * len(chunks)  # prefixed rows: once each
