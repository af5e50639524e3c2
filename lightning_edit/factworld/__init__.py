"""Factworld: an offline, synthetic fact world and a small LM that knows it.

On machines where no pretrained weights or benchmark files can be downloaded, this gives
lightning-edit a model with real (invented) knowledge to edit, and edit datasets about it in
the CounterFact and ZsRE formats.

    from lightning_edit.factworld import ensure_factworld
    paths = ensure_factworld("checkpoints/factworld", seed=0, preset="default")
    paths.model_dir, paths.corpus, paths.counterfact, paths.zsre, paths.facts

- :mod:`.world`: the world (subjects, relations, templates) and its exports.
- :mod:`.tokenizer`: the byte-level BPE trained on the corpus.
- :mod:`.pretrain`: Lightning pretraining and the recall measurement.
- :mod:`.build`: build-once-and-cache, presets, the command line.
"""

from .build import PRESETS, FactworldPaths, Preset, build_factworld, ensure_factworld, ship
from .pretrain import CorpusDataModule, ModelSpec, PretrainModule, TrainSpec, known_mask, pretrain, recall
from .tokenizer import train_tokenizer
from .world import RELATIONS, FactWorld, Relation, WorldConfig, build_world, read_jsonl

__all__ = [
    "PRESETS", "FactworldPaths", "Preset", "build_factworld", "ensure_factworld", "ship",
    "CorpusDataModule", "ModelSpec", "PretrainModule", "TrainSpec", "known_mask", "pretrain", "recall",
    "train_tokenizer", "RELATIONS", "FactWorld", "Relation", "WorldConfig", "build_world", "read_jsonl",
]
