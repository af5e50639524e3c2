"""Checkpoints and exports in safetensors, written atomically.

* :class:`SafetensorsCheckpointIO` stores a whole Lightning checkpoint (loop state, callback
  state with the edited tensors and AlphaEdit's ``K_p K_p^T``) as one safetensors file: the
  tensors as entries, everything else as a JSON skeleton in the metadata. No pickle, and a
  kill during a write never leaves a half-written file (temp file + ``os.replace``).
* :func:`save_edits` / :func:`load_edits`: the portable export, only the edited weights with
  their Hugging Face parameter names plus metadata, to apply onto the base model anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO

from lightning_edit.engine import sharding
from lightning_edit.engine.files import (  # noqa: F401  (re-exported: this module's public names before engine/files.py)
    DIGEST_KEY,
    HEADER_DIGEST_KEY,
    SKELETON_KEY,
    CorruptFileError,
    atomic_save_file,
    check_finite,
    config_fingerprint,
    finish_export_dir,
    full_model_fingerprint,
    load_nested,
    new_export_dir,
    read_verified,
    save_nested,
    tensor_digest,
    verify_tensors,
)
from lightning_edit.engine.loading import complete_export
from lightning_edit.errors import CheckpointError, MissingFileError
from lightning_edit.stream.ledger import anchored_state, portable_state


def write_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Write an edit checkpoint atomically, its ledger directory relative to ``path`` (so the run
    directory can be copied or moved whole)."""
    module = checkpoint.get("edit_module")
    if isinstance(module, dict) and isinstance(module.get("ledger"), dict):
        checkpoint = {**checkpoint, "edit_module": {**module, "ledger": portable_state(module["ledger"], path)}}
    save_nested(checkpoint, path)


def read_checkpoint(path: str | os.PathLike, map_location=None) -> dict[str, Any]:
    """Read and verify an edit checkpoint (every tensor's and the JSON state's digests), its
    ledger directory anchored at ``path``'s directory."""
    if not Path(path).exists():
        raise MissingFileError(f"checkpoint {path} not found")
    checkpoint = load_nested(path, map_location)
    module = checkpoint.get("edit_module")
    if isinstance(module, dict) and isinstance(module.get("ledger"), dict):
        state = anchored_state(module["ledger"], path)
        beside = Path(path).parent / "ledger"
        if state.get("directory") and not Path(state["directory"]).exists() and beside.is_dir():
            state = {**state, "directory": str(beside)}  # an earlier version's absolute path, and the run directory moved
        module["ledger"] = state
    return checkpoint


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing/reading safetensors (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        write_checkpoint(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path, map_location)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def save_edits(path: str | os.PathLike, weights: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write edited weights (HF parameter name -> tensor) with JSON-encoded metadata."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_save_file({k: v.detach().cpu().clone().contiguous() for k, v in weights.items()}, path, metadata=meta)
    return Path(path)


def save_edited_layers(path: str | os.PathLike, adapter, layers, method: str, model_name: str, num_edits: int,
                       batches: int, is_writer: bool = True, params: Sequence[str] = ()) -> Path:
    """Write the edit layers' weights of an edited model (``edited.safetensors``: HF parameter
    names, the model's dtype) with what they carry (method, base model, edits, batches), plus the
    named ``params`` (those a block update changed: the ledger's ``dense_names()``). Sharded
    weights are gathered one layer at a time (every process must call); only ``is_writer`` writes."""
    weights = {}
    for l in layers:
        w = sharding.full(adapter.down_proj(l).weight)
        if is_writer:
            weights[adapter.weight_name(l)] = w
    if params:
        named = dict(adapter.model.named_parameters())
        for n in params:
            w = sharding.full(named[n])
            if is_writer:
                weights[n] = w
    if not is_writer:
        return Path(path)
    meta = {"method": method, "base_model": str(model_name), "num_edits": num_edits, "batches": batches, "layers": list(layers),
            "config_fingerprint": config_fingerprint(adapter.model)}
    return save_edits(path, weights, meta)


def read_edits(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = read_verified(path)
    return tensors, {k: v for k, v in meta.items() if k not in (DIGEST_KEY, HEADER_DIGEST_KEY)}


@torch.no_grad()
def load_edits(model: torch.nn.Module, path: str | os.PathLike, strict_fingerprint: bool = True) -> dict[str, str]:
    """Copy exported edited weights into ``model`` (in its own dtype/device). Checks every
    name and shape before changing anything; with ``strict_fingerprint`` also that the export
    was made from this base model (config fingerprint)."""

    weights, meta = read_edits(path)
    params = dict(model.named_parameters())
    for name, t in weights.items():
        if name not in params:
            raise CheckpointError(f"{path}: edited weight {name!r} does not exist in {type(model).__name__}")
        if tuple(params[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the model's is {tuple(params[name].shape)}")
    if strict_fingerprint and "config_fingerprint" in meta and hasattr(model, "config"):
        fp = config_fingerprint(model)
        if meta["config_fingerprint"] != fp:
            raise CheckpointError(f"{path} was exported from a model with another config (fingerprint {meta['config_fingerprint']} != {fp}); pass strict_fingerprint=False to force")
    for name, t in weights.items():
        params[name].copy_(t.to(params[name].dtype))
    return meta


def export_pretrained(model: torch.nn.Module, tokenizer, ledger, directory: str | os.PathLike, overwrite: bool = False) -> Path:
    """The edited model as a full ``save_pretrained`` directory (safetensors weights, config,
    generation config, tokenizer) with ``edit_ledger.json`` beside it; written into a temporary
    sibling and renamed, so a kill never leaves a half-written export. A non-empty ``directory``
    is refused unless ``overwrite`` (then replaced only once the new export is complete). Under
    DDP only rank 0 writes."""
    out = Path(directory)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return out  # one writer under DDP: every process holds the same weights
    tmp = new_export_dir(out, overwrite)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        complete_export(tmp, tokenizer, ledger.summary())  # config readable by transformers 4 too, tokenizer, ledger
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_export_dir(tmp, out)
