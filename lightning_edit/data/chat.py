"""Prompts for instruct models: wrap an edit request's prompts in the model's chat template.

An instruct model asked a bare question (ZsRE: "What is the capital of France?") often answers
with its end-of-turn token; rendered as a user turn followed by the assistant's opening
(``add_generation_prompt``), the same question is answered. The subject placeholder ``{}`` is
passed through the template as text, so anchors and targets are located as usual; the target
follows the assistant's opening directly (no space is inserted after a newline).
"""

from __future__ import annotations

import dataclasses

from lightning_edit.data.requests import EditRequest, RequestError
from lightning_edit.errors import InputError

CHAT_MARK = "chat_template"


def chat_prompt(tokenizer, text: str, system: str | None = None) -> str:
    """``text`` as a user turn, followed by the assistant's opening, in ``tokenizer``'s chat
    template. A BOS that the template writes and the tokenizer adds anyway is dropped."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise InputError(
            f"chat_template is on, but the tokenizer ({type(tokenizer).__name__}, {getattr(tokenizer, 'name_or_path', '')!r}) "
            "has no chat template; turn the option off for base models"
        )
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and out.startswith(bos) and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        out = out[len(bos):]
    return out


def wrap_request(tokenizer, req: EditRequest, system: str | None = None) -> EditRequest:
    """The request with its prompt, paraphrase, neighbourhood and generation prompts rendered
    as chat turns (idempotent: a wrapped request is returned unchanged)."""
    if req.extra.get(CHAT_MARK):
        return req
    prompt = chat_prompt(tokenizer, req.prompt, system)
    if prompt.count("{}") != 1:
        raise RequestError(req.record_index if req.record_index >= 0 else req.case_id, "prompt",
                           f"the chat template itself contains '{{}}': cannot place the subject in {prompt!r}")
    wrap = lambda p: chat_prompt(tokenizer, p, system)  # noqa: E731
    return dataclasses.replace(
        req,
        prompt=prompt,
        paraphrase_prompts=tuple(wrap(p) for p in req.paraphrase_prompts),
        locality=tuple((wrap(p), a) for p, a in req.locality),
        generation_prompts=tuple(wrap(p) for p in req.generation_prompts),
        extra={**req.extra, CHAT_MARK: True},
    )
