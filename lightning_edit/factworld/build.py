"""Build (once) and cache the factworld: world files, tokenizer, pretrained model.

    python -m lightning_edit.factworld.build --root checkpoints/factworld --preset default
    python -m lightning_edit.factworld.build --config configs/factworld_pretrain.yaml

:func:`ensure_factworld` returns the paths of a finished build, building it on first use.
A build happens in a temporary sibling directory and is renamed into place only once
complete (the rename is atomic on one filesystem), with ``manifest.json`` written last: a
directory that has a manifest whose configuration matches is finished, anything else is
rebuilt. Two processes racing to build the same world both finish; the first rename wins and
the other discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .pretrain import ModelSpec, TrainSpec, pretrain, recall
from .tokenizer import train_tokenizer
from .world import FILES, WorldConfig, build_world

log = logging.getLogger(__name__)

#: bump when the world, tokenizer or training code changes what a build produces
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Preset:
    """Everything that defines a build besides the seed.

    Attributes:
        world: world sizes.
        vocab_size: BPE vocabulary size (upper bound; a small corpus saturates earlier).
        model: the model configuration.
        train: the optimisation settings.
        recall_sample: facts per split measured for the manifest (0 = all).
        min_recall: training-template recall the build is expected to reach (a shortfall is
            logged and recorded, not raised).
    """

    world: WorldConfig
    vocab_size: int
    model: ModelSpec
    train: TrainSpec
    recall_sample: int = 2000
    min_recall: float = 0.95


PRESETS: dict[str, Preset] = {
    # the quickstart model: ~10k facts, 1000 edit cases (a tenth of the world)
    "default": Preset(
        world=WorldConfig(n_subjects=1300, n_edits=1000),
        vocab_size=3072,
        model=ModelSpec(arch="gpt2", n_layer=6, d_model=192, n_head=6, mlp_ratio=4),
        train=TrainSpec(max_steps=1800, batch_size=32, block_size=128, lr=3e-3, warmup_steps=100),
        recall_sample=2000,
        min_recall=0.95,
    ),
    # for tests: small world and model, well under a minute on 2 CPU cores
    "tiny": Preset(
        world=WorldConfig(n_subjects=48, n_edits=4, n_neighbours=5, n_attribute=5, n_general=100),
        vocab_size=1024,
        model=ModelSpec(arch="gpt2", n_layer=2, d_model=64, n_head=2, mlp_ratio=4, max_positions=128),
        train=TrainSpec(max_steps=300, batch_size=16, block_size=128, lr=5e-3, warmup_steps=30),
        recall_sample=0,
        min_recall=0.9,
    ),
}


@dataclass(frozen=True)
class FactworldPaths:
    """Where a finished build lives. Data files are described in :meth:`FactWorld.write`."""

    root: Path
    model_dir: Path  # save_pretrained model (safetensors) + tokenizer
    corpus: Path  # corpus.jsonl: {"text"} per line (pretraining and statistics corpus)
    counterfact: Path  # counterfact.json: MEMIT nested CounterFact records
    zsre: Path  # zsre.json: MEND ZsRE records
    facts: Path  # facts.jsonl: every fact on every template, with split and edit_case_id
    references: Path  # references.json: {object: [texts]} for the consistency metric
    documents: Path  # documents.jsonl: {"subject", "text", "facts"} per subject
    world: Path  # world.json: sizes and relations
    manifest: Path  # manifest.json: seed, preset, versions, timings, recall

    @classmethod
    def at(cls, root: str | Path) -> "FactworldPaths":
        root = Path(root)
        return cls(root=root, model_dir=root / "model", manifest=root / "manifest.json",
                   **{k: root / v for k, v in FILES.items()})

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text())


def resolve_preset(preset: str, world: WorldConfig | None = None, model: ModelSpec | None = None,
                   train: TrainSpec | None = None) -> Preset:
    if preset not in PRESETS:
        raise ValueError(f"unknown factworld preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    return replace(p, world=world or p.world, model=model or p.model, train=train or p.train)


def _config_record(seed: int, preset_name: str, preset: Preset) -> dict:
    """What the cache is keyed on: the manifest must hold exactly this to be reused."""
    return {"format_version": FORMAT_VERSION, "seed": seed, "preset": preset_name, "settings": asdict(preset)}


def build_dir_name(seed: int, preset_name: str, preset: Preset) -> str:
    """``<preset>-seed<seed>``, plus a hash of the settings when they differ from the preset."""
    name = f"{preset_name}-seed{seed}"
    if preset != PRESETS[preset_name]:
        h = hashlib.sha1(json.dumps(asdict(preset), sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{h}"
    return name


def _is_complete(paths: FactworldPaths, config: dict) -> bool:
    try:
        manifest = paths.read_manifest()
    except (OSError, ValueError):
        return False
    return manifest.get("config") == config and (paths.model_dir / "model.safetensors").exists()


def _versions() -> dict:
    import lightning
    import tokenizers
    import transformers

    from .. import __version__

    return {"lightning_edit": __version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "python": platform.python_version()}


def _recall_samples(facts: list[dict], n: int, seed: int) -> dict[str, list[dict]]:
    """A fixed random sample of ``n`` facts per split (all facts when ``n`` is 0)."""
    rng = random.Random(f"factworld-{seed}-recall-sample")
    out = {}
    for split in ("train", "heldout"):
        pool = [f for f in facts if f["split"] == split]
        out[split] = pool if not n or n >= len(pool) else rng.sample(pool, n)
    return out


def build_factworld(root: str = "checkpoints/factworld", seed: int = 0, preset: str = "default",
                    max_minutes: float | None = 20.0, log_dir: str | None = None, force: bool = False,
                    progress_bar: bool = True, world: WorldConfig | None = None,
                    model: ModelSpec | None = None, train: TrainSpec | None = None) -> FactworldPaths:
    """Build the world, tokenizer and model for ``(seed, preset)`` under ``root`` (or reuse a
    finished build), and return its paths.

    Args:
        root: cache directory; the build lands in ``root/<preset>-seed<seed>``.
        seed: world and training seed.
        preset: ``default`` (quickstart model) or ``tiny`` (tests).
        max_minutes: safety cap on pretraining time (a capped run is recorded in the manifest
            as ``stopped_early``; its recall may fall short).
        log_dir: TensorBoard directory for the pretraining curves (default: ``<build>/tb``).
        force: rebuild even when a finished build exists.
        progress_bar: show Lightning's progress bar.
        world / model / train: override parts of the preset (the directory name then gets a
            hash of the settings).
    """
    spec = resolve_preset(preset, world, model, train)
    config = _config_record(seed, preset, spec)
    root_path = Path(root)
    final = FactworldPaths.at(root_path / build_dir_name(seed, preset, spec))
    if not force and _is_complete(final, config):
        return final

    root_path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{final.root.name}-", dir=root_path))
    try:
        paths = FactworldPaths.at(tmp)
        t0 = time.time()
        w = build_world(seed, spec.world)
        w.write(tmp)
        texts = w.corpus()
        t_world = time.time() - t0

        t1 = time.time()
        tokenizer = train_tokenizer(texts, vocab_size=spec.vocab_size)
        t_tok = time.time() - t1

        facts = w.fact_prompts()
        result = pretrain(
            texts, tokenizer, spec.model, spec.train, paths.model_dir,
            log_dir=log_dir or (tmp / "tb"), seed=seed, max_minutes=max_minutes, progress_bar=progress_bar,
        )

        t2 = time.time()
        from transformers import AutoModelForCausalLM

        # measure the saved model, exactly as users will load it
        lm = AutoModelForCausalLM.from_pretrained(str(paths.model_dir)).eval()
        samples = _recall_samples(facts, spec.recall_sample, seed)
        rec = {split: recall(lm, tokenizer, sample) for split, sample in samples.items()}
        t_eval = time.time() - t2
        size = (paths.model_dir / "model.safetensors").stat().st_size
        if rec["train"] < spec.min_recall:
            log.warning("factworld %s: training-template recall %.3f is below the expected %.2f",
                        final.root.name, rec["train"], spec.min_recall)
        manifest = {
            "config": config,
            "versions": _versions(),
            "world": w.stats(),
            "tokenizer": {"vocab_size": len(tokenizer)},
            "model": {"params": result["params"], "safetensors_bytes": size, "dtype": "float32"},
            "training": {k: result[k] for k in ("steps", "tokens_seen", "corpus_tokens", "final_loss", "stopped_early")},
            "recall": {**rec, "sample_per_split": {k: len(v) for k, v in samples.items()},
                       "min_recall": spec.min_recall, "ok": rec["train"] >= spec.min_recall},
            "seconds": {"world": round(t_world, 2), "tokenizer": round(t_tok, 2),
                        "pretrain": round(result["train_seconds"], 2), "recall": round(t_eval, 2),
                        "total": round(time.time() - t0, 2)},
            "machine": {"threads": torch.get_num_threads(), "platform": platform.platform()},
        }
        # the manifest is written last: its presence marks the build complete
        paths.manifest.write_text(json.dumps(manifest, indent=1))
        _install(tmp, final.root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Move a finished build into place atomically, replacing a stale one if present."""
    if final.exists():
        stale = final.with_name(f".stale-{final.name}-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(final, stale)
        except OSError:
            return  # another process just installed a build: keep theirs
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        # another process won the race between our check and our rename: theirs is as good
        if not (final / "manifest.json").exists():
            raise


def ensure_factworld(root: str = "checkpoints/factworld", seed: int = 0, preset: str = "default",
                     **kwargs) -> FactworldPaths:
    """The paths of the ``(seed, preset)`` factworld under ``root``, built on first use
    (see :func:`build_factworld` for the keyword arguments)."""
    return build_factworld(root=root, seed=seed, preset=preset, **kwargs)


def main(args: list[str] | None = None) -> FactworldPaths:
    """Command line: every :func:`build_factworld` argument as an option, plus ``--config``."""
    from jsonargparse import CLI

    logging.basicConfig(level=logging.INFO)
    paths = CLI(build_factworld, args=args, as_positional=False)
    manifest = paths.read_manifest()
    print(f"factworld ready at {paths.root}")
    print(json.dumps({k: manifest[k] for k in ("world", "model", "recall", "seconds")}, indent=1))
    return paths


if __name__ == "__main__":
    main()
