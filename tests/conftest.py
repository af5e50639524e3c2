"""Tiny offline models and tokenizers for tests: built from config, never downloaded."""

from __future__ import annotations

import lightning as L
import pytest
import torch

# Tiny models are dominated by per-op overhead; one thread is faster, and far faster when the
# two cores are shared (measured here: 18 s vs 251 s for the same training).
torch.set_num_threads(1)

from lightning_edit.builtin.toy import (  # noqa: F401
    ARCHS,
    EDIT_NAMES,
    FILLER,
    NAMES,
    OBJECTS,
    TEMPLATES,
    corpus_sentences,
    counterfact_records,
    counterfactual_requests,
    facts,
    make_model,
    make_tokenizer,
    train_tiny,
)


@pytest.fixture(scope="session")
def trained_gpt2(tokenizer):
    return train_tiny("gpt2", tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, trained_gpt2):
    d = tmp_path_factory.mktemp("tiny_model")
    trained_gpt2.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    import json

    p = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(p, "w") as f:
        for s in corpus_sentences(600, seed=1):
            f.write(json.dumps({"text": s}) + "\n")
    return p


FAST_RESIDUAL = dict(anchor="prompt_last", clamp_norm_factor=4.0, steps=25)


class CrashAfterBatch(L.Callback):
    """Kills a run after a given edit batch (to test resume). Importable by the CLI as
    ``conftest.CrashAfterBatch`` while pytest runs.

    Args:
        batch: index of the batch after which to crash.
    """

    def __init__(self, batch: int = 1):
        self.batch = batch

    def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
        if b.index == self.batch:
            raise RuntimeError(f"simulated crash after batch {self.batch}")


def cli_args(model_dir, dataset, corpus, tmp, method="alphaedit", batch_size=4, extra=()):
    """CLI arguments for a small fit run on the tiny model."""
    editor = {"alphaedit": ["--editor=lightning_edit.callbacks.AlphaEdit", "--editor.l2=1", "--editor.threshold_mode=relative",
                            "--editor.nullspace_threshold=0.02"],
              "memit": ["--editor=lightning_edit.callbacks.MEMIT", "--editor.lam=1"],
              "unke": ["--editor=lightning_edit.callbacks.UnKE", "--editor.lr=3e-3", "--editor.steps=10", "--editor.n_preserve=8"]}[method]
    return [f"--model.model={model_dir}", "--model.layers=[1,2]", "--model.context_prefixes=2",
            "--model.residual.anchor=prompt_last", "--model.residual.clamp_norm_factor=4",
            f"--data.dataset={dataset}", f"--data.batch_size={batch_size}", *editor,
            f"--editor.stats.corpus={corpus}", "--editor.stats.corpus_name=null", "--editor.stats.n_samples=600",
            "--editor.stats.max_length=64", f"--editor.stats.cache_dir={tmp}/stats",
            f"--checkpoint.dirpath={tmp}/ckpt", f"--trainer.logger.init_args.save_dir={tmp}/logs",
            "--trainer.enable_progress_bar=false", *extra]
