"""Long-form (AnyEdit) editing on the shared engine: requests -> chunks -> one residual vector per
chunk -> the same MEMIT / AlphaEdit update; and the long-form evaluation.

Plain functions (no Lightning): the module, the report and the notebook API call them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torchmetrics import MeanMetric

from lightning_edit.data.requests import request_kind
from lightning_edit.engine.residuals import ResidualBatch, build_chunked_batch
from lightning_edit.errors import InputError
from lightning_edit.evaluation.scoring import greedy_generate
from lightning_edit.longform.chunking import ChunkingConfig, Chunks, chunk_answer, end_text_for, prompt_and_answer
from lightning_edit.longform.metrics import AnswerContained, LongFormMetrics, TeacherForcedAccuracy, first_miss, token_correct
from lightning_edit.longform.records import LongFormRequest


@dataclass
class LongFormConfig:
    """How long-form requests are edited and evaluated.

    Args:
        chunking: how answers are cut (``mode: window | sentence``, ``window``, ``overlap``,
            ``min_tokens``, ``max_tokens``); see :class:`ChunkingConfig`.
        single_anchor: edit each answer as ONE chunk with one residual vector at the prompt's last
            token (the plain MEMIT / AlphaEdit way; the comparison AnyEdit is measured against).
        context_keys: AnyEdit's zero-residual rows: the update also keeps the keys at the other
            positions of the edited texts where they are (measured: a 4-chunk answer is reproduced
            with them and not without, tests/test_longform_engine.py).
        context_weight: the zero-residual rows' weight in the update's least squares (each row's
            key is scaled by its square root; 1 = the reference's equal weight, below 1 lets the
            update move the rest of the text's states more, above 1 less).
        deviations: slipped copies of each answer whose anchors' keys the update must also write
            the chunk residuals at (one target token per chunk replaced by the model's most likely
            other token; :mod:`lightning_edit.engine.deviations`), so an edit still fires after
            free generation leaves the target; 0 = off (the reference's update).
        context_prefixes: prepend the module's generated context prefixes to long-form rows too
            (the AnyEdit reference does not).
        max_new_tokens: greedy generation length for evaluation; 0 = the target's token count + 8.
        eval_paraphrase: also generate from the paraphrased question where a record has one.
    """

    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    single_anchor: bool = False
    context_keys: bool = True
    context_weight: float = 1.0
    deviations: int = 0
    context_prefixes: bool = False
    max_new_tokens: int = 0
    eval_paraphrase: bool = True

    def __post_init__(self):
        if isinstance(self.chunking, dict):
            self.chunking = ChunkingConfig(**self.chunking)
        self.chunking.validate()
        if not (isinstance(self.context_weight, (int, float)) and math.isfinite(self.context_weight) and self.context_weight > 0):
            raise InputError(f"longform.context_weight must be a finite number > 0, got {self.context_weight!r}")
        if not isinstance(self.deviations, int) or isinstance(self.deviations, bool) or self.deviations < 0:
            raise InputError(f"longform.deviations must be an integer >= 0, got {self.deviations!r}")
        if self.max_new_tokens < 0:
            raise InputError(f"longform.max_new_tokens must be >= 0, got {self.max_new_tokens}")


def is_longform(requests: Sequence) -> bool:
    """True when the requests are long-form (:func:`~lightning_edit.data.requests.request_kind`);
    a mix of long-form and fact requests is an error."""
    return request_kind(requests) == "longform"


def chunk_requests(tokenizer, requests: Sequence[LongFormRequest], cfg: LongFormConfig, chat_template: bool = False,
                   system: str | None = None) -> list[Chunks]:
    """Each request's prompt + answer (+ end text) cut into chunks from one tokenization.
    ``single_anchor``: one chunk = the whole answer."""
    out = []
    chunking = cfg.chunking
    if cfg.single_anchor:
        chunking = ChunkingConfig(mode="window", window=1_000_000)
    for r in requests:
        prompt, answer = prompt_and_answer(tokenizer, r.question, r.answer, chat_template, system)
        out.append(chunk_answer(tokenizer, prompt, answer, chunking, chat_template=chat_template))
    return out


def build_longform_batch(tokenizer, requests: Sequence[LongFormRequest], cfg: LongFormConfig, prefixes: Sequence[str] = (),
                         chat_template: bool = False, system: str | None = None) -> tuple[ResidualBatch, list[Chunks]]:
    """The residual batch of long-form requests: one row per request (and context prefix when
    ``cfg.context_prefixes``), one anchor and residual vector per chunk."""
    chunks = chunk_requests(tokenizer, requests, cfg, chat_template, system)
    # the chunker's tokenization of each answer goes to the engine: the bare rows are not tokenized twice
    items = [(c.text, c.spans, (c.input_ids, c.offsets)) if c.add_special_tokens else (c.text, c.spans) for c in chunks]
    batch = build_chunked_batch(tokenizer, items, prefixes if cfg.context_prefixes else ())
    return batch, chunks


@torch.no_grad()
def evaluate_longform(model: nn.Module, tokenizer, requests: Sequence[LongFormRequest], cfg: LongFormConfig,
                      chat_template: bool = False, system: str | None = None, batch_size: int = 16,
                      return_texts: bool = False, light: bool = False):
    """Greedy generation from each question (and paraphrase) against the target answer:
    ROUGE-1/2/L (F1 and recall), BLEU-4, exact reproduction; teacher-forced token accuracy on
    the target; sub-question answers (UnKEBench) and multi-hop answers (AKEW) where present.
    Keys are ``longform/...``. With ``return_texts`` also the generations; ``light``: only the
    generation from the question (no paraphrase, token accuracy, sub- or multi-hop questions)."""
    requests = list(requests)
    # Under DDP every process evaluates its shard and the metrics' compute() sums the states
    # across processes: every process must then reach every compute(), even with an empty shard
    # or without paraphrases / sub-questions of its own (a family no process has data for comes
    # out NaN and is dropped by the caller).
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if not requests and not ddp:
        return ({}, []) if return_texts else {}
    device = next(model.parameters()).device
    end = end_text_for(tokenizer, chat_template)
    pa = [prompt_and_answer(tokenizer, r.question, r.answer, chat_template, system) for r in requests]
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pa]
    max_new = cfg.max_new_tokens or (max(lengths, default=0) + 8)
    gen = (lambda prompts, n: greedy_generate(model, tokenizer, prompts, max_new_tokens=n, batch_size=batch_size) if prompts else [])
    gens = gen([p for p, _ in pa], max_new)
    main = LongFormMetrics().to(device)  # (states on the model's device: NCCL gathers device tensors)
    main.update([g.strip() for g in gens], [a.strip() for _, a in pa])
    out = {f"longform/{k}": float(v) for k, v in main.compute().items()}
    para = [(i, r) for i, r in enumerate(requests) if r.paraphrase_question] if cfg.eval_paraphrase and not light else []
    para_gens: list[str] = []
    if para or (ddp and cfg.eval_paraphrase and not light):
        pp = [prompt_and_answer(tokenizer, r.paraphrase_question, r.answer, chat_template, system) for _, r in para]
        para_gens = gen([p for p, _ in pp], max_new)
        pm = LongFormMetrics().to(device)
        pm.update([g.strip() for g in para_gens], [a.strip() for _, a in pp])
        out.update({f"longform/paraphrase_{k}": float(v) for k, v in pm.compute().items()})
    if light:
        return (out, _texts(requests, pa, gens, para, para_gens)) if return_texts else out
    # teacher-forced token accuracy of the answer (and end text) given the prompt
    # and where greedy generation first leaves the target: the first teacher-forced miss
    acc, kept = TeacherForcedAccuracy().to(device), MeanMetric().to(device)
    misses: list[dict] = []
    for (p, a), r in zip(pa, requests):
        c = chunk_answer(tokenizer, p, a, ChunkingConfig(mode="window", window=1_000_000), end_text=end, chat_template=chat_template)
        ids = torch.tensor([c.input_ids], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0]
        hits = token_correct(logits, ids[0], list(c.answer_tokens))
        acc.update(hits)
        i = first_miss(hits)
        kept.update(i / max(hits.numel(), 1))
        miss = {"first_miss": i, "answer_tokens": int(hits.numel())}
        if i < hits.numel():
            pos = int(c.answer_tokens[i])
            miss.update(expected=tokenizer.decode([int(ids[0, pos])]), predicted=tokenizer.decode([int(logits[pos - 1].argmax())]))
        misses.append(miss)
    out["longform/token_accuracy"] = float(acc.compute())
    out["longform/prefix_kept"] = float(kept.compute())
    # short questions about the edited knowledge: does the generation contain the answer?
    subs = [(q, a) for r in requests for q, a in zip(r.sub_questions, r.sub_answers)]
    hops = [(q, [r.multihop_answer, *r.multihop_answer_aliases]) for r in requests for q in r.multihop_questions if r.multihop_answer]
    for name, pairs in (("sub_question_accuracy", subs), ("multihop_accuracy", hops)):
        if pairs or ddp:
            m = AnswerContained().to(device)
            prompts = [prompt_and_answer(tokenizer, q, "", chat_template, system)[0] for q, _ in pairs]
            m.update(gen(prompts, 32), [a for _, a in pairs])
            out[f"longform/{name}"] = float(m.compute())
    if not return_texts:
        return out
    texts = _texts(requests, pa, gens, para, para_gens)
    for t, miss in zip(texts, misses):
        t.update(miss)
    return out, texts


def _texts(requests, pa, gens, para, para_gens) -> list[dict]:
    texts = [{"case_id": r.case_id, "question": r.question, "target": a.strip(), "generation": g.strip()}
             for r, (_, a), g in zip(requests, pa, gens)]
    for (i, _), g in zip(para, para_gens):
        texts[i]["paraphrase_generation"] = g.strip()
    return texts


def rouge_l_of(texts: Sequence[dict]) -> float | None:
    """ROUGE-L F1 of already generated ``texts`` (``{"generation", "target"}``), no new generation."""
    if not texts:
        return None
    m = LongFormMetrics()
    m.update([t["generation"] for t in texts], [t["target"] for t in texts])
    return float(m.compute()["rouge_l"])
