#!/usr/bin/env python
"""A question-answering factworld model for long-form editing experiments (a probe, not shipped).

The shipped factworld model never saw a question before a document, and its pretraining loss
skips subject-name tokens, so it cannot answer "Tell me about {person}." with a text about the
person. This script fine-tunes it (like instruction tuning of a base model) on its own corpus
plus, for every person, three question forms followed by the person's corpus document, with the
loss on every token of those (names included), then prints the greedy answers for three people.

    python benchmarks/factworld_qa_probe.py --steps 2000 --out checkpoints/factworld_qa
    # 2000 steps: 23 min on one CPU thread; the answers then name the person and state its facts

The held-out paraphrases of the long-form requests (``Who is {s}?``, ...) are not among the
training questions.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_edit.builtin.factworld.build import ensure_factworld  # noqa: E402
from lightning_edit.builtin.factworld.pretrain import CorpusDataModule, PretrainModule  # noqa: E402
from lightning_edit.builtin.factworld.world import read_jsonl  # noqa: E402

QUESTIONS = ("Tell me about {s}.", "Tell me something about {s}.", "What can you tell me about {s}?")


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="checkpoints/factworld_qa")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    paths = ensure_factworld()
    tok = AutoTokenizer.from_pretrained(str(paths.model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(paths.model_dir), dtype=torch.float32)
    corpus = [r if isinstance(r, dict) else {"text": r} for r in read_jsonl(paths.root / "corpus.jsonl")]
    docs = read_jsonl(paths.root / "documents.jsonl")
    qa = [{"text": q.format(s=d["subject"]) + " " + d["text"], "subject": None} for d in docs for q in QUESTIONS]
    records = corpus + qa
    random.Random(0).shuffle(records)
    print(f"{len(corpus)} corpus texts + {len(qa)} question -> document texts; {a.steps} steps", flush=True)
    L.seed_everything(0, verbose=False)
    module = PretrainModule(model, lr=a.lr, warmup_steps=20, max_steps=a.steps, min_lr_ratio=0.1)
    dm = CorpusDataModule(tok, records=records, tokens_per_batch=2048, max_length=256, mask_subjects=True, seed=0)
    trainer = L.Trainer(max_steps=a.steps, max_epochs=-1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        reload_dataloaders_every_n_epochs=1, gradient_clip_val=1.0, accelerator="cpu")
    t0 = time.time()
    trainer.fit(module, datamodule=dm)
    print(f"trained in {time.time() - t0:.0f} s, final loss {float(trainer.callback_metrics['train/loss']):.3f}", flush=True)
    out = Path(a.out)
    model = module.model.eval()
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    for d in docs[:3]:
        ids = torch.tensor([[tok.bos_token_id] + tok(QUESTIONS[0].format(s=d["subject"]), add_special_tokens=False).input_ids])
        gen = model.generate(ids, max_new_tokens=60, do_sample=False, pad_token_id=tok.pad_token_id)
        print(f"Q: {QUESTIONS[0].format(s=d['subject'])}\nA: {tok.decode(gen[0, ids.shape[1]:])}\ncorpus: {d['text'][:200]}\n", flush=True)
    print(f"saved to {out}")
    return out


if __name__ == "__main__":
    main()
