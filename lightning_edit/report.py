"""The end-of-stream report: what editing did to the model's knowledge.

:class:`EditReport` (a callback, ``report:`` in a config) measures, besides the edit metrics of
:class:`~lightning_edit.module.EditModule`:

* ``retention``: share of never-edited facts whose answer fingerprint (teacher-forced top-1
  tokens, :func:`~lightning_edit.evaluation.scoring.top1_tokens`) is unchanged from the unedited model;
* ``retention_known``: share of those facts still *known* by the criterion that selected the
  real-facts probes (:func:`~lightning_edit.builtin.realfacts.known_facts`: the true object is the most
  likely of its relation's objects), with ``retention_known_unedited``, the unedited model's;
* ``probe_logprob_drop``: mean drop of the true object's log-probability on those facts (nats);
* ``efficacy_unedited`` / ``generalization_unedited`` / ``specificity_unedited``: the unedited
  model's values on the same prompts (the papers' "pre-edited" row), measured once at fit start;
* ``first_batch_efficacy``: efficacy of the first batch's edits, measured at the end;
* ``fluency`` / ``consistency``: n-gram entropy and TF-IDF consistency of generations;
* ``perplexity_before`` / ``perplexity_after`` on held-out corpus text;
* ``next_word_accuracy_before`` / ``_after``: top-1 next-word accuracy on held-out prose from the
  standard library's docstrings (:func:`~lightning_edit.builtin.corpora.docstring_texts`);

logs the probe metrics and the unedited values as curves against edits applied, and writes
``summary.json``, ``summary.md`` and ``summary.png`` into the run's log directory, printing the
table at the end. Everything measured on the unedited model is kept in the callback's
checkpoint state, so a resumed run never measures it on an edited model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import lightning as L
import torch

from lightning_edit.builtin.corpora import docstring_texts
from lightning_edit.builtin.realfacts import known_facts
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.bars import progress_bar
from lightning_edit.engine.loading import load_pretrained
from lightning_edit.engine.sharding import model_is_sharded
from lightning_edit.errors import InputError, MissingFileError
from lightning_edit.evaluation.evaluate import evaluate_generation, outcome_metrics, request_outcomes
from lightning_edit.evaluation.metrics import KnownShare, LogProbDrop, Perplexity, Retention, TokenAccuracy
from lightning_edit.evaluation.scoring import greedy_generate, next_word_hits, pad_rows, target_scores, text_token_nll
from lightning_edit.longform.diagnostics import divergence_of_requests
from lightning_edit.longform.diagnostics import summarize as summarize_divergence
from lightning_edit.longform.edit import chunk_requests, evaluate_longform, is_longform, rouge_l_of
from lightning_edit.longform.finetune import finetune_layers
from lightning_edit.longform.metrics import LongFormMetrics
from lightning_edit.longform.records import LongFormRequest
from lightning_edit.module import EditModule
from lightning_edit.resources import resolve
from lightning_edit.tblog import add_image_file, add_text, log_hparams, run_settings

SUMMARY_KEYS = ("method", "num_edits", "efficacy", "generalization", "specificity", "retention", "first_batch_efficacy")


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _input_file(spec: str, what: str) -> str:
    """``spec`` (a path or a built-in resource name) resolved to a file that exists, or a clear error."""
    path = resolve(spec)
    if not Path(path).is_file():
        raise MissingFileError(f"{what} {spec!r}: no such file ({Path(path).resolve()})")
    return path


class EditReport(L.Callback):
    """The end-of-stream report: retention, perplexity, fluency and before / after generations.

    It measures retention (strict and ``retention_known``), the probes' log-probability drop,
    the unedited model's edit metrics, first-batch efficacy, fluency / consistency, perplexity and
    next-word accuracy before and after, before / after generations; ``summary.json``, ``summary.md``,
    ``summary.png`` in the run's log directory and the same in TensorBoard (the run's ``edits``
    sub-run: text, image, hparams with the final metrics)."""

    def __init__(self, probes: str | None = None, n_probes: int = 1000, perplexity_corpus: str | None = None,
                 n_perplexity: int = 200, references: str | None = None, n_generation: int = 50,
                 max_new_tokens: int = 30, seed: int = 0, n_examples: int = 3, example_tokens: int = 12,
                 single_anchor_baseline: bool = True, n_text_samples: int = 3, unedited_metrics: bool = True,
                 next_word_texts: int = 40, finetune_baseline: bool = False, finetune_steps: int = 100,
                 finetune_lr: float = 5e-4, longform_locality: int = 0):
        """What the report measures (each ``--report.*`` option).

        Args:
            probes: JSONL of facts ``{prompt, object|answer[, edit_case_id, relation_id, subject]}`` for
                retention (e.g. ``realfacts:smollm2:135m-instruct/probes``, ``factworld:default/facts``);
                only facts that are never edited are used. Facts with a ``relation_id`` also give
                ``retention_known`` (null = no probe metrics).
            n_probes: how many probe facts to sample for retention (fixed seed).
            perplexity_corpus: JSONL/text corpus (field ``text``) for perplexity before and after
                editing; its last ``n_perplexity`` texts are used (null = no perplexity).
            n_perplexity: number of corpus texts perplexity is measured on.
            references: JSON ``{object: [texts]}`` of reference texts for the consistency metric
                (e.g. ``factworld:default/references``; null = no consistency).
            n_generation: edited requests whose generation prompts are sampled for fluency and
                consistency (0 = off).
            max_new_tokens: tokens generated per prompt for fluency and consistency.
            seed: sampling seed for probes and generation requests.
            n_examples: the first this many edits of the stream get a greedy continuation of their
                prompt before and after editing, shown in ``summary.md`` and TensorBoard (0 = off).
            example_tokens: tokens per before/after continuation.
            single_anchor_baseline: long-form streams: also edit the same requests, batch for
                batch, on a fresh copy of the base model with ONE residual vector per answer at the
                prompt's last token (the plain MEMIT / AlphaEdit way) and report its
                ``single_anchor_rouge_l`` beside AnyEdit's.
            finetune_baseline: long-form streams: also fine-tune the edit layers' down projections of
                the unedited model on the same answers, batch for batch (Adam on the teacher-forced
                answer NLL, :func:`~lightning_edit.longform.finetune.finetune_layers`), and report its
                ROUGE-L, token accuracy, retention, perplexity and next-word accuracy as
                ``finetune_*`` beside the edit's (the edited weights are restored afterwards).
            finetune_steps: the fine-tuning baseline's Adam steps per batch (it stops early below
                0.01 nats per answer token).
            finetune_lr: the fine-tuning baseline's Adam learning rate.
            longform_locality: long-form streams: this many questions of records the stream does not
                edit (the next ones of the same part of the dataset,
                :meth:`~lightning_edit.data.datamodule.EditDataModule.outside_requests`) are answered
                greedily before and after editing: ``locality_rouge_l`` (ROUGE-L F1 of the answer
                after against before; 1 = unchanged) and ``locality_unchanged`` (share identical).
            n_text_samples: long-form streams: requests whose question, target and generations
                before / after go to TensorBoard and ``summary.md``.
            unedited_metrics: measure efficacy, generalization and specificity of the unedited
                model on every request of the stream at fit start (one batched pass; the papers'
                "pre-edited" row), reported beside the edited values as ``*_unedited``.
            next_word_texts: held-out paragraphs of the standard library's docstrings (none naming
                an edited subject or target; never the ``corpus:pydoc`` texts) on which top-1
                next-word accuracy is measured before and after editing (0 = off).
        """
        self.probes_spec, self.n_probes = probes, n_probes
        self.ppl_spec, self.n_ppl = perplexity_corpus, n_perplexity
        self.refs_spec, self.n_generation, self.max_new_tokens, self.seed = references, n_generation, max_new_tokens, seed
        self.single_anchor_baseline, self.n_text_samples = single_anchor_baseline, n_text_samples
        self.unedited_metrics, self.n_next_word = unedited_metrics, next_word_texts
        if finetune_steps < 1 or not finetune_lr > 0:
            raise InputError(f"report.finetune_steps must be >= 1 and report.finetune_lr > 0, got {finetune_steps} and {finetune_lr}")
        self.finetune_baseline, self.finetune_steps, self.finetune_lr = finetune_baseline, finetune_steps, finetune_lr
        if longform_locality < 0:
            raise InputError(f"report.longform_locality must be >= 0, got {longform_locality}")
        self.longform_locality = longform_locality
        self.locality_before: list[dict] = []  # {"case_id", "question", "before"} of unedited long-form questions
        self.longform_unedited: dict[str, float] = {}  # the unedited model's long-form metrics on the stream's requests
        self.text_before: list[dict] = []
        # measured once, on the unedited model, at the first fit start (then restored from checkpoints)
        self.unedited_measured = False
        self.baseline: torch.Tensor | None = None  # (n_probes, max_answer_tokens) answer fingerprint
        self.probe_logp: torch.Tensor | None = None  # (n_probes,) log-probability of each probe's true object
        self.known_unedited: float | None = None  # share of the probes the unedited model knows
        self.unedited_rows: torch.Tensor | None = None  # (n_requests, 6) request_outcomes of the stream
        self.next_word_texts: list[str] = []
        self.next_word_before: float | None = None
        self.ppl_before: float | None = None
        self._probe_rows: list[dict] | None = None
        self._probe_cache: tuple[int, dict] | None = None  # (num_edits, measurement): the model is unchanged between
        self._module: EditModule | None = None
        self.summary: dict = {}
        self.n_examples, self.example_tokens = n_examples, example_tokens
        self.examples: list[dict] = []
        self._t0 = time.time()
        self._elapsed_before = 0.0  # stream time of the run(s) this one resumes

    def elapsed(self) -> float:
        """Seconds spent on the edit stream, over every resumed part of the run."""
        return self._elapsed_before + (time.time() - self._t0)

    # ---- inputs --------------------------------------------------------------------------
    def _probes(self) -> list[dict]:
        """The sampled never-edited probe facts ``{prompt, object|answer[, relation_id, subject]}``."""
        if not self.probes_spec:
            return []
        if self._probe_rows is None:
            facts = [f for f in _read_jsonl(_input_file(self.probes_spec, "report.probes")) if f.get("edit_case_id") is None]
            rng = random.Random(self.seed)
            self._probe_rows = rng.sample(facts, min(self.n_probes, len(facts)))
        return self._probe_rows

    def _probe_pairs(self) -> tuple[list[str], list[str]]:
        facts = self._probes()
        return [f["prompt"] for f in facts], [_answer(f) for f in facts]

    def relation_objects(self) -> dict[str, list[str]]:
        """Each relation's objects, the candidates of ``retention_known``: those of the
        ``known.json`` beside the probes file (a real-facts set: every candidate fact the
        known-fact filter ranked against, so the probes are re-ranked exactly as they were
        selected), then those of every row of the probes file (edited ones included)."""
        path = Path(_input_file(self.probes_spec, "report.probes"))
        objects: dict[str, list[str]] = {}

        def add(rid, obj):
            if rid is not None and obj is not None and obj not in objects.setdefault(rid, []):
                objects[rid].append(obj)

        known = path.parent / "known.json"
        if known.is_file():
            try:
                detail = json.loads(known.read_text()).get("facts_detail", [])
            except (OSError, json.JSONDecodeError, AttributeError):
                detail = []
            for d in detail:
                add(d.get("relation_id"), d.get("object"))
        for f in _read_jsonl(str(path)):
            add(f.get("relation_id"), _answer(f))
        return objects

    def _ppl_texts(self) -> list[str]:
        if not self.ppl_spec:
            return []
        path = _input_file(self.ppl_spec, "report.perplexity_corpus")
        texts = [r["text"] for r in _read_jsonl(path)] if path.endswith(".jsonl") else Path(path).read_text().splitlines()
        return [t for t in texts if t.strip()][-self.n_ppl:]

    # ---- measurements ----------------------------------------------------------------------
    @torch.no_grad()
    def measure_probes(self, module: EditModule) -> dict | None:
        """The probes on the model as it is now: ``fingerprint`` ``(n, max_answer_tokens)``
        (:func:`~lightning_edit.evaluation.scoring.top1_tokens`), ``logp`` ``(n,)`` (float64; the sum of the
        true object's token log-probabilities) and, for the probes that name their
        ``relation_id``, ``known`` ``(m,)`` bool (:func:`~lightning_edit.builtin.realfacts.known_facts`
        over :meth:`relation_objects`, each probe on its own prompt). Measured once per number
        of edits applied (the model only changes when a batch lands)."""
        facts = self._probes()
        if not facts:
            return None
        if self._probe_cache is not None and self._probe_cache[0] == module.num_edits:
            return self._probe_cache[1]
        prompts, answers = self._probe_pairs()
        ts = target_scores(module.lm, module.tokenizer, prompts, answers, module.eval_batch_size)
        out = {"fingerprint": pad_rows(ts.pred_tokens), "logp": torch.stack([lp.double().sum() for lp in ts.token_logprobs])}
        ranked = [f for f in facts if f.get("relation_id") is not None]
        if ranked:
            res = known_facts(module.lm, module.tokenizer, [(f["relation_id"], f.get("subject", ""), _answer(f)) for f in ranked],
                              objects=self.relation_objects(), templates=[f["prompt"] for f in ranked],
                              batch_size=module.eval_batch_size, progress=module.progress_enabled())
            out["known"] = torch.tensor([r.known for r in res])
        self._probe_cache = (module.num_edits, out)
        return out

    def fingerprint(self, module: EditModule) -> torch.Tensor | None:
        now = self.measure_probes(module)
        return None if now is None else now["fingerprint"]

    def probe_metrics(self, module: EditModule) -> dict[str, float]:
        """``retention``, ``retention_known`` and ``probe_logprob_drop`` of the model as it is now
        (each only where the probes and the unedited measurement allow)."""
        if self.baseline is None:
            return {}
        now = self.measure_probes(module)
        out: dict[str, float] = {}
        ret = Retention()
        ret.update(now["fingerprint"], self.baseline)
        out["retention"] = float(ret.compute())
        if "known" in now:
            known = KnownShare()
            known.update(now["known"])
            out["retention_known"] = float(known.compute())
        if self.probe_logp is not None:
            drop = LogProbDrop()
            drop.update(self.probe_logp, now["logp"])
            out["probe_logprob_drop"] = float(drop.compute())
        return out

    def retention(self, module: EditModule) -> float | None:
        return self.probe_metrics(module).get("retention")

    def unedited_at(self, num_edits: int, indices: list[int] | None = None) -> dict[str, float]:
        """The unedited model's efficacy, generalization and specificity on the first
        ``num_edits`` requests of the stream, or on those of them at ``indices`` (the sample a
        mid-stream evaluation scored), as ``{"efficacy_unedited": ...}``, from the counts
        measured at fit start."""
        if self.unedited_rows is None:
            return {}
        rows = self.unedited_rows[:num_edits] if indices is None else self.unedited_rows[torch.tensor(indices, dtype=torch.long)]
        return {f"{k.split('/', 1)[1]}_unedited": v for k, v in outcome_metrics(rows).items()}

    @torch.no_grad()
    def next_word_accuracy(self, module: EditModule) -> float | None:
        """Top-1 next-word accuracy of the model on :attr:`next_word_texts` (None without texts)."""
        if not self.next_word_texts:
            return None
        acc = TokenAccuracy(average="token")
        n = len(self.next_word_texts)
        with progress_bar(f"next-word accuracy ({n} texts)", -(-n // 16), "batch", enabled=module.progress_enabled()) as bar:
            acc.update(next_word_hits(module.lm, module.tokenizer, self.next_word_texts, batch_size=16, on_batch=bar.update))
        return float(acc.compute())

    @torch.no_grad()
    def perplexity(self, module: EditModule) -> float | None:
        texts = self._ppl_texts()
        if not texts:
            return None
        m = Perplexity()
        for nll in text_token_nll(module.lm, module.tokenizer, texts, batch_size=16):
            m.update(nll)
        return float(m.compute())

    # ---- hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module: EditModule) -> None:
        # restored from a checkpoint on resume: never re-measured on an edited model
        self._module = pl_module
        self._probe_cache = None
        if self.finetune_baseline and model_is_sharded(pl_module.lm):
            raise InputError("report.finetune_baseline is not supported under the sharded_edit strategy (it fine-tunes "
                             "the edit layers' weights, which are sharded); run it on one device or set it to false")
        if self.refs_spec:  # read at the end of the stream: a missing file fails now, before any edit
            _input_file(self.refs_spec, "report.references")
        if not self.unedited_measured and pl_module.num_edits > 0:
            # a checkpoint without this callback's state: the model is edited, nothing "before" can be measured
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"report: resuming after {pl_module.num_edits} edits without the report's saved state; the "
                           "unedited model's measurements (retention baseline, *_unedited, *_before) are left out")
            self.unedited_measured = True
        if not self.unedited_measured:
            self.measure_unedited(trainer, pl_module)
        self._t0 = time.time()

    def measure_unedited(self, trainer, pl_module: EditModule) -> None:
        """Everything the report compares against, on the unedited model (at the first fit start)."""
        self.unedited_measured = True
        dm = getattr(trainer, "datamodule", None)
        reqs = list(getattr(dm, "requests", []) or [])
        probes = self.measure_probes(pl_module)
        if probes is not None:
            self.baseline, self.probe_logp = probes["fingerprint"], probes["logp"]
            if "known" in probes:
                self.known_unedited = float(probes["known"].float().mean())
        self.ppl_before = self.perplexity(pl_module)
        if self.unedited_metrics and reqs and not is_longform(reqs):
            self.unedited_rows = request_outcomes(pl_module.lm, pl_module.tokenizer, reqs, batch_size=pl_module.eval_batch_size,
                                                  progress=pl_module.progress_enabled(), desc="unedited model: evaluation")
        if self.n_next_word > 0:
            # never a text that names an edited subject or target
            terms = {t for r in reqs for t in (getattr(r, "subject", None), getattr(r, "target_new", None),
                                                 getattr(r, "target_true", None)) if isinstance(t, str)}
            self.next_word_texts = [t["text"] for t in docstring_texts(self.n_next_word, exclude=sorted(terms), seed=self.seed)]
            self.next_word_before = self.next_word_accuracy(pl_module)
        if reqs and is_longform(reqs):
            out, texts = evaluate_longform(pl_module.lm, pl_module.tokenizer, reqs, pl_module.longform_cfg, pl_module.chat_template,
                                           pl_module.system_prompt, batch_size=min(pl_module.eval_batch_size, 32),
                                           return_texts=True, light=True)
            self.longform_unedited = {k.removeprefix("longform/"): v for k, v in out.items() if k in ("longform/rouge_l", "longform/bleu")}
            self.text_before = [{"question": t["question"], "target": t["target"], "before": t["generation"]}
                                for t in texts[: self.n_text_samples]]
            outside = getattr(dm, "outside_requests", None)
            if self.longform_locality and outside is not None:
                others = outside(self.longform_locality)
                self.locality_before = [{"case_id": r.case_id, "question": r.question, "before": b}
                                        for r, b in zip(others, self.longform_answers(pl_module, others))]
        elif self.n_examples and reqs:
            reqs = reqs[: self.n_examples]
            before = self.continuations(pl_module, [r.rendered_prompt for r in reqs])
            self.examples = [{"prompt": r.rendered_prompt, "target_true": r.target_true, "target_new": r.target_new, "before": b}
                             for r, b in zip(reqs, before)]

    def longform_answers(self, pl_module: EditModule, requests: list) -> list[str]:
        """Greedy answers of long-form ``requests``' questions, as the long-form evaluation generates them
        (``longform.max_new_tokens`` tokens, or 128 when it is 0: the same length before and after)."""
        cfg = dataclasses.replace(pl_module.longform_cfg, max_new_tokens=pl_module.longform_cfg.max_new_tokens or 128)
        _, texts = evaluate_longform(pl_module.lm, pl_module.tokenizer, requests, cfg, pl_module.chat_template,
                                     pl_module.system_prompt, batch_size=min(pl_module.eval_batch_size, 32), return_texts=True,
                                     light=True)
        return [t["generation"] for t in texts]

    def locality(self, pl_module: EditModule) -> dict[str, float]:
        """``locality_rouge_l`` / ``locality_unchanged`` of the unedited long-form questions now."""
        if not self.locality_before:
            return {}
        others = [LongFormRequest(question=t["question"], answer=t["before"] or ".", case_id=t["case_id"]) for t in self.locality_before]
        after = self.longform_answers(pl_module, others)
        before = [t["before"] for t in self.locality_before]
        m = LongFormMetrics()
        m.update(after, before)
        return {"locality_rouge_l": float(m.compute()["rouge_l"]),
                "locality_unchanged": sum(a == b for a, b in zip(after, before)) / len(before)}

    def on_train_batch_end(self, trainer, pl_module: EditModule, outputs, batch, batch_idx) -> None:
        every = pl_module.eval_every
        if every and (batch.index + 1) % every == 0:
            m = {**self.probe_metrics(pl_module), **self.unedited_at(pl_module.num_edits, getattr(pl_module, "eval_indices", None))}
            if m:
                m = {f"edit/{k}": v for k, v in m.items()}
                # into the edit ledger's evaluation history (the row of this stream position)
                pl_module.ledger.add_eval(pl_module.num_edits, m)
                pl_module.log_edit_metrics(m)

    @property
    def history(self) -> list[dict]:
        """Retention over the stream ``[{"num_edits", "retention"}]`` (from the ledger)."""
        evals = self._module.stream_history if self._module is not None else []
        return [{"num_edits": e["num_edits"], "retention": e["edit/retention"]} for e in evals if "edit/retention" in e]

    def state_dict(self) -> dict:
        # the curves live in the module's edit ledger (checkpointed with it); here only what the
        # report measured on the unedited model, the stream time so far and the example texts
        return {"baseline": self.baseline, "ppl_before": self.ppl_before, "elapsed_s": self.elapsed(),
                "text_before": json.dumps(self.text_before), "examples": json.dumps(self.examples),
                "locality_before": json.dumps(self.locality_before), "longform_unedited": json.dumps(self.longform_unedited),
                "unedited_measured": self.unedited_measured, "probe_logp": self.probe_logp, "known_unedited": self.known_unedited,
                "unedited_rows": self.unedited_rows, "next_word_texts": json.dumps(self.next_word_texts),
                "next_word_before": self.next_word_before}

    def load_state_dict(self, state: dict) -> None:
        # a saved state comes from a run that started on the unedited model: whatever it did not
        # measure then stays unmeasured (older checkpoints lack the newer keys)
        self.unedited_measured = True
        self.baseline = state.get("baseline")
        self.ppl_before = state.get("ppl_before")
        self.probe_logp = state.get("probe_logp")
        self.known_unedited = state.get("known_unedited")
        self.unedited_rows = state.get("unedited_rows")
        self.next_word_texts = json.loads(state.get("next_word_texts", "[]"))
        self.next_word_before = state.get("next_word_before")
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        self.text_before = json.loads(state.get("text_before", "[]"))
        self.locality_before = json.loads(state.get("locality_before", "[]"))
        self.longform_unedited = json.loads(state.get("longform_unedited", "{}"))
        self.examples = json.loads(state.get("examples", "[]"))

    def continuations(self, module: EditModule, prompts: list[str]) -> list[str]:
        return greedy_generate(module.lm, module.tokenizer, prompts, max_new_tokens=self.example_tokens)

    def on_fit_end(self, trainer, pl_module: EditModule) -> None:
        dm = trainer.datamodule
        edited = list(dm.requests[: pl_module.num_edits]) if dm is not None else list(pl_module.edit_history)
        first = edited[: getattr(dm, "batch_size", len(edited))]
        if edited and is_longform(edited):
            return self._longform_end(trainer, pl_module, edited, first)
        final = dict(pl_module.last_eval) if getattr(pl_module, "last_eval", None) else pl_module.evaluate(edited)
        s: dict = {"method": _method_name(trainer), "num_edits": pl_module.num_edits}
        unedited = self.unedited_at(pl_module.num_edits)
        for key in ("efficacy", "generalization", "specificity", "margin"):
            if f"edit/{key}" in final:
                s[key] = final[f"edit/{key}"]
                s[f"{key}_unedited"] = unedited.get(f"{key}_unedited")  # beside the edited value
        for key in ("rewrite", "paraphrase", "locality"):
            if f"zsre/{key}" in final:
                s[f"zsre_{key}"] = final[f"zsre/{key}"]
        fb = pl_module.evaluate(first)
        s["first_batch_efficacy"] = fb.get("edit/efficacy", fb.get("zsre/rewrite"))
        s.update(self._knowledge_and_ability(pl_module))
        if self.n_generation and edited:
            rng = random.Random(self.seed)
            sample = rng.sample(edited, min(self.n_generation, len(edited)))
            refs = json.loads(Path(_input_file(self.refs_spec, "report.references")).read_text()) if self.refs_spec else None
            by_case = {r.case_id: refs.get(r.target_new.strip(), []) for r in sample} if refs else None
            corpus = [t for texts in refs.values() for t in texts] if refs else None
            gen = evaluate_generation(pl_module.lm, pl_module.tokenizer, sample, references=by_case, vectorizer=corpus,
                                      max_new_tokens=self.max_new_tokens)
            s["fluency"] = gen.get("edit/fluency")
            s["consistency"] = gen.get("edit/consistency")
        examples = [dict(e) for e in self.examples if edited and e["prompt"] in {r.rendered_prompt for r in edited}]
        for e, after in zip(examples, self.continuations(pl_module, [e["prompt"] for e in examples])):
            e["after"] = after
        s["wall_time_s"] = round(self.elapsed(), 1)
        s = {k: v for k, v in s.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.summary = s
        out = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank: log_dir is a broadcast under DDP
        if trainer.is_global_zero:
            pl_module.log_edit_metrics({f"edit/{k}": v for k, v in s.items() if k in _FINAL_SCALARS})
            write_summary(out, s, _merge_history([], pl_module.stream_history, s), examples)
            self.to_tensorboard(trainer, pl_module, s, out, {"report/examples": examples_markdown(examples)})
            print("\n" + summary_markdown(s))
            print(f"summary written to {out}/summary.md, summary.json, summary.png")

    def _knowledge_and_ability(self, pl_module: EditModule) -> dict:
        """The end of the stream's probe metrics (with the unedited model's share known beside
        ``retention_known``), perplexity and next-word accuracy before / after."""
        probes = self.probe_metrics(pl_module)
        s = {"retention": probes.get("retention"), "retention_known": probes.get("retention_known"),
             "retention_known_unedited": self.known_unedited if "retention_known" in probes else None,
             "probe_logprob_drop": probes.get("probe_logprob_drop"),
             "perplexity_before": self.ppl_before, "perplexity_after": self.perplexity(pl_module)}
        if self.next_word_texts:
            s["next_word_accuracy_before"], s["next_word_accuracy_after"] = self.next_word_before, self.next_word_accuracy(pl_module)
        return s

    def to_tensorboard(self, trainer, pl_module: EditModule, s: dict, out: Path, texts: dict[str, str]) -> None:
        """The report on TensorBoard's edit axis (the run's ``edits`` sub-run, at the number of
        edits applied; call on rank 0): the summary table and ``texts`` (tag -> Markdown) as text,
        ``summary.png`` as an image, the run's settings as hparams with the summary's numbers as
        ``final/<key>`` metrics."""
        if pl_module.logger is None:
            return
        n = pl_module.num_edits
        add_text(trainer, "report/summary", summary_markdown(s), n)
        for tag, text in texts.items():
            if text:
                add_text(trainer, tag, text, n)
        if (out / "summary.png").is_file():
            add_image_file(trainer, "report/summary_png", out / "summary.png", n)
        params = run_settings(trainer, pl_module)
        params.update({f"summary.{k}": v for k, v in s.items() if isinstance(v, str)})  # method, mode
        metrics = {f"final/{k}": float(v) for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        log_hparams(trainer, params, metrics, n)


    # ---- long-form streams ------------------------------------------------------------------
    def _longform_end(self, trainer, pl_module: EditModule, edited: list, first: list) -> None:
        final, texts = pl_module.evaluate_longform(edited, return_texts=True)
        cfg = pl_module.longform_cfg
        s: dict = {"method": _method_name(trainer), "num_edits": pl_module.num_edits,
                   "mode": "single_anchor" if cfg.single_anchor else pl_module.residual_cfg.mode}
        for key in ("rouge_l", "rouge_l_recall", "rouge1", "rouge2", "bleu", "exact_match", "token_accuracy", "prefix_kept",
                    "sub_question_accuracy", "multihop_accuracy"):
            if f"longform/{key}" in final:
                s[key] = final[f"longform/{key}"]
        for key in ("rouge_l", "bleu", "exact_match"):
            if f"longform/paraphrase_{key}" in final:
                s[f"{key}_paraphrase"] = final[f"longform/paraphrase_{key}"]

        s.update({f"{k}_unedited": v for k, v in self.longform_unedited.items()})
        first_ids = {r.case_id for r in first}
        s["first_batch_rouge_l"] = rouge_l_of([t for t in texts if t["case_id"] in first_ids])
        # each batch's records scored at the end, in stream order: how much later batches overwrote earlier ones
        by_batch = [{str(i) for i in row.get("request_ids", [])} for row in pl_module.stream.history()]
        s["rouge_l_by_batch"] = [rouge_l_of([t for t in texts if str(t["case_id"]) in ids]) for ids in by_batch]
        s.update(self.locality(pl_module))
        diverged = divergence_of_requests(pl_module.adapter, pl_module.tokenizer, edited,
                                          chunk_requests(pl_module.tokenizer, edited, cfg, pl_module.chat_template, pl_module.system_prompt),
                                          pl_module.layers, pl_module.stream.ledger.total_update(pl_module.layers))
        s.update(summarize_divergence(diverged))
        for t, d in zip(texts, diverged):
            t.update({k: d[k] for k in _DIVERGENCE_FIELDS if k in d})
        s.update(self._knowledge_and_ability(pl_module))
        s["wall_time_s"] = round(self.elapsed(), 1)
        if self.single_anchor_baseline and not cfg.single_anchor:
            t0 = time.time()
            s["single_anchor_rouge_l"] = single_anchor_rouge_l(trainer, pl_module, edited, getattr(trainer.datamodule, "batch_size", len(edited)))
            s["single_anchor_wall_time_s"] = round(time.time() - t0, 1)
        if self.finetune_baseline and not cfg.single_anchor:
            t0 = time.time()
            s.update(self.finetune_metrics(pl_module, edited, getattr(trainer.datamodule, "batch_size", len(edited))))
            s["finetune_wall_time_s"] = round(time.time() - t0, 1)
        s = {k: v for k, v in s.items() if v is not None and not (isinstance(v, float) and math.isnan(v))}
        self.summary = s
        before = {t["question"]: t["before"] for t in self.text_before}
        samples = [dict(t, before=before.get(t["question"])) for t in texts[: self.n_text_samples]]
        out = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            pl_module.log_edit_metrics({f"longform/{k}": v for k, v in s.items() if isinstance(v, float)})
            write_summary(out, s, _merge_history([], pl_module.stream_history, s))
            self.to_tensorboard(trainer, pl_module, s, out,
                                {f"longform/sample_{i}": longform_samples_markdown([t]) for i, t in enumerate(samples)})
            with open(out / "summary.md", "a") as f:
                f.write("\n" + longform_samples_markdown(samples))
            data = json.loads((out / "summary.json").read_text())
            data["samples"] = samples
            (out / "summary.json").write_text(json.dumps(data, indent=1))
            print("\n" + summary_markdown(s))
            print(f"summary written to {out}/summary.md, summary.json")

    @torch.no_grad()
    def finetune_metrics(self, pl_module: EditModule, requests: list, batch_size: int) -> dict:
        """The fine-tuning baseline (``finetune_baseline``): the edit layers set back to the base
        model's weights, fine-tuned batch for batch on the same answers, measured as the edit is
        (``finetune_rouge_l``, ``finetune_token_accuracy``, ``finetune_prefix_kept``,
        ``finetune_retention_known``, ``finetune_probe_logprob_drop``, ``finetune_perplexity_after``,
        ``finetune_next_word_accuracy_after``), then the edited weights put back. ``{}`` when the
        base model cannot be reloaded by name."""
        if not isinstance(pl_module.model_name, str):
            return {}
        p = next(pl_module.lm.parameters())
        base, _ = load_pretrained(pl_module.model_name, str(p.dtype).removeprefix("torch."))  # type: ignore[arg-type]
        ad, layers = pl_module.adapter, pl_module.layers
        base_ad = ModelAdapter(base, *pl_module.templates)
        base_w = {l: base_ad.weight_as_linear(l).detach().to(p.device).clone() for l in layers}
        del base, base_ad
        edited = {l: ad.weight_as_linear(l).detach().clone() for l in layers}
        cache, self._probe_cache = self._probe_cache, None
        cfg = pl_module.longform_cfg
        tok = pl_module.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        try:
            for l in layers:
                ad.weight_as_linear(l).copy_(base_w[l])
            losses = []
            for i in range(0, len(requests), batch_size):
                chunks = chunk_requests(tok, requests[i : i + batch_size], cfg, pl_module.chat_template, pl_module.system_prompt)
                with torch.enable_grad():
                    losses.append(finetune_layers(ad, chunks, layers, self.finetune_steps, self.finetune_lr, pad_id=pad,
                                                  progress=pl_module.progress_enabled())["loss"])
            out = evaluate_longform(pl_module.lm, tok, requests, cfg, pl_module.chat_template, pl_module.system_prompt,
                                    batch_size=min(pl_module.eval_batch_size, 32))
            s = {f"finetune_{k}": out.get(f"longform/{k}") for k in ("rouge_l", "bleu", "token_accuracy", "prefix_kept")}
            s["finetune_rouge_l_paraphrase"] = out.get("longform/paraphrase_rouge_l")
            s["finetune_last_loss"] = losses[-1] if losses else None
            know = self._knowledge_and_ability(pl_module)
            s.update({f"finetune_{k}": know.get(k) for k in ("retention", "retention_known", "probe_logprob_drop", "perplexity_after",
                                                               "next_word_accuracy_after")})
            return s
        finally:
            for l in layers:
                ad.weight_as_linear(l).copy_(edited[l])
            self._probe_cache = cache


# the summary's values that go to TensorBoard's edit axis as ``edit/<key>`` at the end (the edit
# metrics themselves are logged by the module's evaluation)
_FINAL_SCALARS = ("retention", "retention_known", "retention_known_unedited", "probe_logprob_drop", "first_batch_efficacy",
                  "fluency", "consistency", "efficacy_unedited", "generalization_unedited", "specificity_unedited",
                  "next_word_accuracy_before", "next_word_accuracy_after")


def _answer(fact: dict) -> str:
    return fact.get("object", fact.get("answer"))


# what a sample shows of where its generation left the target (:func:`divergence`)
_DIVERGENCE_FIELDS = ("chunk", "offset", "margin", "target_rank", "key_distance", "response")


def longform_samples_markdown(samples: list[dict]) -> str:
    """Question, target and generations before / after the edits, as Markdown."""
    out = ["## Samples", ""]
    for t in samples:
        out += [f"**Question:** {t['question']}", "", f"**Target:** {t['target']}", ""]
        if t.get("before") is not None:
            out += [f"**Before:** {t['before']}", ""]
        out += [f"**After:** {t['generation']}", ""]
        if t.get("expected") is not None:  # where greedy generation first leaves the target
            where = f" (chunk {t['chunk']}, its token {t['offset']}; {t['margin']:.2f} nats behind)" if "margin" in t else ""
            out += [f"**First miss:** answer token {t['first_miss']} of {t['answer_tokens']}: {t['predicted']!r} instead of "
                    f"{t['expected']!r}{where}", ""]
        if t.get("paraphrase_generation"):
            out += [f"**After (paraphrased question):** {t['paraphrase_generation']}", ""]
    return "\n".join(out)


def single_anchor_rouge_l(trainer, pl_module: EditModule, requests: list, batch_size: int) -> float | None:
    """ROUGE-L F1 of the same long-form requests edited batch for batch by a replica of the run's
    stream (:meth:`EditStream.replica`: the same method, statistics, projector, L2 / lam, a fresh
    ``K_p K_p^T``) on a fresh copy of the base model, with one residual vector per answer at the
    prompt's last token: the plain MEMIT / AlphaEdit way. ``None`` when the base model cannot be
    reloaded by name."""
    if pl_module.stream.method is None or not isinstance(pl_module.model_name, str):
        return None
    p = next(pl_module.lm.parameters())
    model, _ = load_pretrained(pl_module.model_name, str(p.dtype).removeprefix("torch."))  # type: ignore[arg-type]
    model.to(p.device).eval()
    cfg = dataclasses.replace(pl_module.longform_cfg, single_anchor=True)
    stream = pl_module.stream.replica(ModelAdapter(model, *pl_module.templates), longform=cfg)
    stream.apply_all(requests, batch_size, label="single-anchor baseline")
    out = evaluate_longform(model, pl_module.tokenizer, requests, cfg, pl_module.chat_template, pl_module.system_prompt,
                            batch_size=min(pl_module.eval_batch_size, 32), light=True)
    del model, stream
    return out.get("longform/rouge_l")


def _method_name(trainer) -> str | None:
    for cb in trainer.callbacks:
        if hasattr(cb, "method_name"):
            return cb.method_name
    return None


def _merge_history(retention: list[dict], stream: list[dict], final: dict) -> list[dict]:
    """One row per evaluation point: ``{"num_edits", "retention", "efficacy", ...}``, ending
    with the final summary."""
    rows: dict[int, dict] = {}
    for h in retention:
        rows.setdefault(h["num_edits"], {"num_edits": h["num_edits"]})["retention"] = h.get("retention")
    for h in stream:
        row = rows.setdefault(h["num_edits"], {"num_edits": h["num_edits"]})
        row.update({k.split("/", 1)[1]: v for k, v in h.items() if k.startswith("edit/")})
    end = rows.setdefault(final["num_edits"], {"num_edits": final["num_edits"]})
    end.update({k: final[k] for k in _CURVE_ROW if k in final})
    return [rows[n] for n in sorted(rows)]


_CURVES = ("efficacy", "generalization", "specificity", "retention", "retention_known")  # plotted in summary.png
_CURVE_ROW = _CURVES + ("efficacy_unedited", "generalization_unedited", "specificity_unedited", "probe_logprob_drop")


def summary_markdown(s: dict) -> str:
    rows = ["| metric | value |", "|---|---|"]
    for k, v in s.items():
        rows.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(rows)


def examples_markdown(examples: list[dict]) -> str:
    """Before/after greedy continuations of edited prompts as a markdown table."""
    if not examples:
        return ""
    esc = lambda t: str(t).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    rows = ["## Before / after (greedy continuations of edited prompts)", "",
            "| prompt | true -> new | before | after |", "|---|---|---|---|"]
    for e in examples:
        rows.append(f"| {esc(e['prompt'])} | {esc(e.get('target_true'))} -> {esc(e['target_new'])} | {esc(e['before'])} | {esc(e.get('after', ''))} |")
    return "\n".join(rows) + "\n"


def write_summary(out: Path, s: dict, history: list[dict], examples: list[dict] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({**s, "curve": history, "examples": examples or []}, indent=1))
    (out / "summary.md").write_text(f"# Edit run summary ({s.get('method')}, {s.get('num_edits')} edits)\n\n" + summary_markdown(s) + "\n"
                                    + ("\n" + examples_markdown(examples) if examples else ""))
    curves = {k: [(h["num_edits"], h[k]) for h in history if h.get(k) is not None] for k in _CURVES}
    if any(curves.values()):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.5, 3.4))
        ax = fig.add_subplot()
        for key, pts in curves.items():
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=key)
        if "first_batch_efficacy" in s:
            ax.axhline(s["first_batch_efficacy"], linestyle="--", linewidth=0.8, color="C7", label="first_batch_efficacy (end)")
        if "specificity_unedited" in s:
            ax.axhline(s["specificity_unedited"], linestyle=":", linewidth=0.8, color="C2", label="specificity, unedited model")
        ax.set_xlabel("edits applied")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{s.get('method')}: knowledge over the edit stream")
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(out / "summary.png", dpi=120)
