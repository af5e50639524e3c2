"""Build (once) and cache the factworld: world files, tokenizer, pretrained model.

    lightning-edit factworld --root checkpoints/factworld --preset default
    lightning-edit factworld --config configs/factworld_pretrain.yaml

:func:`ensure_factworld` returns the paths of a finished build, building it on first use
(or installing the pretrained model shipped in ``factworld/pretrained/`` when one matches the
settings exactly: the world files always come from the seed).
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lightning_edit.builtin.factworld.pretrain import ModelSpec, TrainSpec, pretrain_model, recall
from lightning_edit.builtin.factworld.tokenizer import train_tokenizer
from lightning_edit.builtin.factworld.world import FILES, WorldConfig, build_world
from lightning_edit.errors import InputError
from lightning_edit.version import __version__

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
        recall_every: log ``recall/train`` and ``recall/heldout`` (500 facts each) to
            TensorBoard every this many steps (0 = never).
        min_recall: training-template recall the build is expected to reach (a shortfall is
            logged and recorded, not raised).
    """

    world: WorldConfig
    vocab_size: int
    model: ModelSpec
    train: TrainSpec
    recall_sample: int = 2000
    min_recall: float = 0.95
    recall_every: int = 500


PRESETS: dict[str, Preset] = {
    # the quickstart model: ~10k facts, 1000 edit cases (a tenth of the world)
    "default": Preset(
        world=WorldConfig(n_subjects=1300, n_edits=1000),
        vocab_size=4608,  # every invented surname becomes one token
        model=ModelSpec(arch="gpt2", n_layer=6, d_model=192, n_head=6, mlp_ratio=4),
        train=TrainSpec(max_steps=3500, tokens_per_batch=2048, lr=3e-3, warmup_steps=200),
        recall_sample=2000,
        min_recall=0.95,
    ),
    # for tests: small world and model, well under a minute on 2 CPU cores
    "tiny": Preset(
        world=WorldConfig(n_subjects=32, n_edits=3, n_neighbours=5, n_attribute=5, n_general=50, general_per_object=1),
        vocab_size=1024,
        model=ModelSpec(arch="gpt2", n_layer=2, d_model=64, n_head=2, mlp_ratio=4, max_positions=128),
        train=TrainSpec(max_steps=500, tokens_per_batch=2048, lr=5e-3, warmup_steps=20),
        recall_sample=0,
        min_recall=0.9,
        recall_every=0,
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
    heldout: Path  # heldout.jsonl: {"text", "subject"} held-out documents (perplexity)
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
        raise InputError(f"unknown factworld preset {preset!r}; choose from {sorted(PRESETS)}")
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


def _is_complete(paths: FactworldPaths, config: dict, data: bool = True) -> bool:
    """A finished build of ``config``: manifest, model and (``data``) every world file."""
    try:
        manifest = paths.read_manifest()
    except (OSError, ValueError):
        return False
    return (manifest.get("config") == config and (paths.model_dir / "model.safetensors").exists()
            and (not data or all((paths.root / name).exists() for name in FILES.values())))


def _versions() -> dict:
    import lightning
    import tokenizers
    import transformers

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
                    max_minutes: float | None = 120.0, log_dir: str | None = None, force: bool = False,
                    use_shipped: bool = True, progress_bar: bool = True, world: WorldConfig | None = None,
                    model: ModelSpec | None = None, train: TrainSpec | None = None,
                    ship_model: bool = False) -> FactworldPaths:
    """Build the world, tokenizer and model for ``(seed, preset)`` under ``root`` (or reuse a
    finished build), and return its paths.

    When the package ships a pretrained model for exactly these settings (see :func:`ship`),
    it is installed instead of training one: the world files are regenerated from the seed
    (seconds) and the shipped weights are copied (stored in float16, installed as float32).

    Args:
        root: cache directory; the build lands in ``root/<preset>-seed<seed>``.
        seed: world and training seed.
        preset: ``default`` (quickstart model) or ``tiny`` (tests).
        max_minutes: safety cap on pretraining time (a capped run is recorded in the manifest
            as ``stopped_early``; its recall may fall short).
        log_dir: TensorBoard directory for the pretraining curves (default: ``<build>/tb``).
        force: rebuild even when a finished build exists.
        use_shipped: install a shipped pretrained model when one matches (False: always train).
        progress_bar: show Lightning's progress bar.
        world / model / train: override parts of the preset (the directory name then gets a
            hash of the settings).
        ship_model: (maintainers) afterwards copy the model into the package's
            ``factworld/pretrained/`` so that fresh installs skip the training (see :func:`ship`).
    """
    spec = resolve_preset(preset, world, model, train)
    config = _config_record(seed, preset, spec)
    root_path = Path(root)
    final = FactworldPaths.at(root_path / build_dir_name(seed, preset, spec))
    if not force and _is_complete(final, config):
        if ship_model:
            ship(final)
        return final

    root_path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{final.root.name}-", dir=root_path))
    try:
        shipped = SHIPPED_ROOT / final.root.name
        installed = use_shipped and _is_complete(FactworldPaths.at(shipped), config, data=False) and _install_shipped(shipped, tmp, seed, spec)
        if not installed:
            _build(tmp, seed, spec, config, final.root.name, max_minutes, log_dir, progress_bar)
        _install(tmp, final.root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if ship_model:
        ship(final)
    return final


def _build(tmp: Path, seed: int, spec: Preset, config: dict, name: str, max_minutes: float | None,
           log_dir: str | None, progress_bar: bool) -> None:
    """World files, tokenizer, pretraining, recall and manifest, all into ``tmp``."""
    paths = FactworldPaths.at(tmp)
    t0 = time.time()
    w = build_world(seed, spec.world)
    w.write(tmp)
    records = w.corpus_records()
    t_world = time.time() - t0

    t1 = time.time()
    tokenizer = train_tokenizer([r["text"] for r in records], vocab_size=spec.vocab_size)
    t_tok = time.time() - t1

    facts = w.fact_prompts()
    result = pretrain_model(
        records, tokenizer, spec.model, spec.train, paths.model_dir,
        log_dir=log_dir or (tmp / "tb"), seed=seed, max_minutes=max_minutes, progress_bar=progress_bar,
        recall_samples=_recall_samples(facts, 500, seed) if spec.recall_every else None, recall_every=spec.recall_every,
    )

    t2 = time.time()
    rec, sample_sizes = _measure_recall(paths.model_dir, facts, spec, seed)
    t_eval = time.time() - t2
    if rec["train"] < spec.min_recall:
        log.warning("factworld %s: training-template recall %.3f is below the expected %.2f", name, rec["train"], spec.min_recall)
    manifest = {
        "config": config,
        "source": "built",
        "corpus_sha256": _sha256(paths.corpus),
        "versions": _versions(),
        "world": w.stats(),
        "tokenizer": {"vocab_size": len(tokenizer)},
        "model": {"params": result["params"], "safetensors_bytes": (paths.model_dir / "model.safetensors").stat().st_size,
                  "dtype": "float32"},
        "training": {k: result[k] for k in ("steps", "tokens_seen", "corpus_tokens", "final_loss", "stopped_early")},
        "recall": {**rec, "sample_per_split": sample_sizes, "min_recall": spec.min_recall, "ok": rec["train"] >= spec.min_recall},
        "seconds": {"world": round(t_world, 2), "tokenizer": round(t_tok, 2), "pretrain": round(result["train_seconds"], 2),
                    "recall": round(t_eval, 2), "total": round(time.time() - t0, 2)},
        "machine": {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    # the manifest is written last: its presence marks the build complete
    paths.manifest.write_text(json.dumps(manifest, indent=1))


def _measure_recall(model_dir: Path, facts: list[dict], spec: Preset, seed: int) -> tuple[dict, dict]:
    """Recall of the saved model on a fixed sample of facts per split, loaded exactly as users
    will load it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    samples = _recall_samples(facts, spec.recall_sample, seed)
    return ({split: recall(lm, tokenizer, sample) for split, sample in samples.items()},
            {split: len(sample) for split, sample in samples.items()})


# --------------------------------------------------------------------------------------------
# Shipped models
# --------------------------------------------------------------------------------------------

#: pretrained factworld models shipped with the package, one directory per build name
SHIPPED_ROOT = Path(__file__).parent / "pretrained"


def ship(paths: FactworldPaths, dest_root: str | Path = SHIPPED_ROOT) -> Path:
    """Copy a finished build's model (as float16 safetensors), tokenizer and manifest to
    ``dest_root/<build name>``, for :func:`build_factworld` to install instead of training.
    Only the model is shipped: the world files are regenerated from the seed."""
    dest_root = Path(dest_root)
    dest_root.mkdir(parents=True, exist_ok=True)
    dest = dest_root / paths.root.name
    tmp = Path(tempfile.mkdtemp(prefix=f".shipping-{paths.root.name}-", dir=dest_root))
    try:
        _copy_model(paths.model_dir, tmp / "model", torch.float16)
        manifest = paths.read_manifest()
        manifest["shipped"] = {"dtype": "float16", "safetensors_bytes": (tmp / "model" / "model.safetensors").stat().st_size}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _copy_model(src: Path, dest: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` copy of the model in ``src`` stored as ``dtype``, with its tokenizer files."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    lm.to(dtype).save_pretrained(str(dest), safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy2(f, dest / f.name)
    _set_tokenizer_max_length(dest, getattr(lm.config, "n_positions", None) or lm.config.max_position_embeddings)


def _set_tokenizer_max_length(model_dir: Path, n_positions: int) -> None:
    """The tokenizer's ``model_max_length`` is the model's context (older builds declared 1024)."""
    cfg_path = model_dir / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("model_max_length") != n_positions:
            cfg["model_max_length"] = n_positions
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _install_shipped(shipped: Path, tmp: Path, seed: int, spec: Preset) -> bool:
    """World files from the seed, the shipped model upcast to float32, recall re-measured.

    Returns False (nothing installed) when the regenerated corpus differs from the one the
    shipped model was trained on -- the world code changed since -- so the caller trains.
    """
    t0 = time.time()
    paths = FactworldPaths.at(tmp)
    w = build_world(seed, spec.world)
    w.write(tmp)
    src = FactworldPaths.at(shipped)
    if src.read_manifest().get("corpus_sha256") != _sha256(paths.corpus):
        log.warning("factworld: the shipped model %s was trained on another corpus (world code changed); training instead", shipped.name)
        for f in tmp.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        return False
    # float32 on disk: editing and statistics run in float32, and a float16 checkpoint would
    # otherwise load as float16 wherever the loader keeps the saved dtype
    _copy_model(src.model_dir, paths.model_dir, torch.float32)
    manifest = src.read_manifest()
    rec, sample_sizes = _measure_recall(paths.model_dir, w.fact_prompts(), spec, seed)
    manifest["source"] = "shipped"
    manifest["built_recall"] = manifest["recall"]
    manifest["recall"] = {**rec, "sample_per_split": sample_sizes, "min_recall": spec.min_recall, "ok": rec["train"] >= spec.min_recall}
    manifest["install_seconds"] = round(time.time() - t0, 2)
    paths.manifest.write_text(json.dumps(manifest, indent=1))
    return True


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
