"""Factworld: an offline, synthetic fact world and a small LM that knows it.

On machines where no pretrained weights or benchmark files can be downloaded, this gives
lightning-edit a model with real (invented) knowledge to edit, and edit datasets about it in
the CounterFact and ZsRE formats.

    from lightning_edit.builtin.factworld import ensure_factworld
    paths = ensure_factworld("checkpoints/factworld", seed=0, preset="default")
    paths.model_dir, paths.corpus, paths.counterfact, paths.zsre, paths.facts

- :mod:`.world`: the world (subjects, relations, templates) and its exports.
- :mod:`.tokenizer`: the byte-level BPE trained on the corpus.
- :mod:`.pretrain`: Lightning pretraining and the recall measurement.
- :mod:`.build`: build-once-and-cache, presets, the command line.
"""

import importlib

# name -> submodule, imported on first use (the package itself stays light; the resource
# resolver, lightning_edit.builtin.factworld.resource, imports what it needs)
_EXPORTS = {
    "PRESETS": "build", "FactworldPaths": "build", "Preset": "build", "build_factworld": "build",
    "ensure_factworld": "build", "ship": "build",
    "CorpusDataModule": "pretrain", "ModelSpec": "pretrain", "PretrainModule": "pretrain", "TrainSpec": "pretrain",
    "known_mask": "pretrain", "pretrain_model": "pretrain", "recall": "pretrain",
    "train_tokenizer": "tokenizer",
    "RELATIONS": "world", "FactWorld": "world", "Relation": "world", "WorldConfig": "world",
    "build_world": "world", "read_jsonl": "world",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
