"""Checkpoints and exports in safetensors, written atomically.

* :class:`SafetensorsCheckpointIO` stores a whole Lightning checkpoint (loop state, callback
  state with the edited tensors and AlphaEdit's ``K_p K_p^T``) as one safetensors file: the
  tensors as entries, everything else as a JSON skeleton in the metadata. No pickle, and a
  kill during a write never leaves a half-written file (temp file + ``os.replace``).
* :func:`save_edits` / :func:`load_edits`: the portable export, only the edited weights with
  their Hugging Face parameter names plus metadata, to apply onto the base model anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_edit.errors import CheckpointError, MissingFileError

SKELETON_KEY = "lightning_edit.skeleton"
DIGEST_KEY = "lightning_edit.sha256"  # JSON {tensor name: sha256 of its bytes}, in every file we write


class CorruptFileError(CheckpointError):
    """A saved tensor file (checkpoint, export, statistics cache) that is unreadable, does not
    match its stored content hash, or holds non-finite values. The message names the file."""


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes (any dtype), with its dtype and shape."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def verify_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path, require_digest: bool = False,
                   finite: bool = True) -> None:
    """Check every tensor against the digests in ``metadata`` and (``finite``) for finiteness;
    raise :class:`CorruptFileError` naming ``path`` and the tensor."""
    raw = (metadata or {}).get(DIGEST_KEY)
    if raw is None and require_digest:
        raise CorruptFileError(f"{path}: no content hash stored ({DIGEST_KEY}); written by another tool or an older version")
    digests = json.loads(raw) if raw is not None else {}
    if raw is not None and set(digests) != set(tensors):
        raise CorruptFileError(f"{path}: holds tensors {sorted(set(tensors) ^ set(digests))} not matching its stored content hashes")
    for name, t in tensors.items():
        if raw is not None and tensor_digest(t) != digests[name]:
            raise CorruptFileError(f"{path}: tensor {name!r} does not match its stored content hash (the file is corrupted)")
        if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CorruptFileError(f"{path}: tensor {name!r} holds non-finite values (inf/nan)")


def check_finite(tree, where: str, path: str = "") -> None:
    """Raise :class:`CorruptFileError` at the first non-finite float tensor in a nested state
    (``where`` names the file, ``path`` the entry)."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
            raise CorruptFileError(f"{where}: {path or 'tensor'} holds non-finite values (inf/nan)")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            check_finite(v, where, f"{path}.{k}" if path else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            check_finite(v, where, f"{path}[{i}]")


def read_verified(path: str | os.PathLike, device: str = "cpu", require_digest: bool = False,
                  finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and verify it (:func:`verify_tensors`); an unreadable or
    truncated file raises :class:`CorruptFileError` naming it."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device=device)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except Exception as err:  # safetensors raises its own error types on truncated / garbled headers
        raise CorruptFileError(f"{path}: unreadable safetensors file ({type(err).__name__}: {err})") from None
    verify_tensors(tensors, meta, path, require_digest, finite)
    return tensors, meta


def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise TypeError(f"checkpoint key {k!r} at {path} is not JSON-encodable")
            items.append([k, _flatten(v, tensors, f"{path}.{k}")])
        return {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors, f"{path}[{i}]") for i, v in enumerate(obj)], "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a safetensors checkpoint")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            vals = [_unflatten(v, tensors) for v in obj["__list__"]]
            return tuple(vals) if obj.get("tuple") else vals
        if "__dtype__" in obj:
            return getattr(torch, obj["__dtype__"])
    return obj


def atomic_save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {**(metadata or {}), DIGEST_KEY: json.dumps({k: tensor_digest(v) for k, v in tensors.items()})}
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_nested(obj: dict, path: str | os.PathLike) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, tensors, "checkpoint")
    atomic_save_file(tensors, path, metadata={SKELETON_KEY: json.dumps(skeleton)})


def load_nested(path: str | os.PathLike, map_location=None) -> dict:
    """Read a checkpoint written by :func:`save_nested`, refusing (by path) a corrupted one
    (content hashes; finiteness is checked by the owner of each entry: Lightning's own state
    legitimately holds ``inf``, e.g. ``ModelCheckpoint``'s ``kth_value``)."""
    tensors, meta = read_verified(path, "cpu", finite=False)
    if SKELETON_KEY not in meta:
        raise CheckpointError(f"{path} is not a lightning-edit checkpoint (no {SKELETON_KEY} metadata)")
    device = "cpu" if map_location is None or callable(map_location) or isinstance(map_location, dict) else str(map_location)
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return _unflatten(json.loads(meta[SKELETON_KEY]), tensors)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing/reading safetensors (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save_nested(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if not Path(path).exists():
            raise MissingFileError(f"checkpoint {path} not found")
        return load_nested(path, map_location)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def save_edits(path: str | os.PathLike, weights: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write edited weights (HF parameter name -> tensor) with JSON-encoded metadata."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_save_file({k: v.detach().cpu().clone().contiguous() for k, v in weights.items()}, path, metadata=meta)
    return Path(path)


def read_edits(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = read_verified(path)
    return tensors, {k: v for k, v in meta.items() if k != DIGEST_KEY}


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


def config_fingerprint(model: torch.nn.Module) -> str:
    from .stats import _hash

    cfg = json.loads(model.config.to_json_string(use_diff=False))
    for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    return _hash(json.dumps(cfg, sort_keys=True))


@torch.no_grad()
def full_model_fingerprint(model: torch.nn.Module) -> str:
    """Identity of a whole model: its config and every parameter and buffer (a strided sample of
    each, :func:`lightning_edit.stats.tensor_fingerprint`), so a model that differs anywhere,
    also above the edit layers, gets another fingerprint. Take it on the *unedited* model."""
    from .stats import _hash, tensor_fingerprint

    parts: list = [config_fingerprint(model) if hasattr(model, "config") else type(model).__name__]
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        parts += [name, tensor_fingerprint(t)]
    return _hash(*parts)


def export_pretrained(model: torch.nn.Module, tokenizer, ledger, directory: str | os.PathLike) -> Path:
    """The edited model as a full ``save_pretrained`` directory (safetensors weights, config,
    generation config, tokenizer) with ``edit_ledger.json`` beside it; written into a temporary
    sibling and renamed, so a kill never leaves a half-written export. Under DDP only rank 0 writes."""
    import shutil

    out = Path(directory)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return out  # one writer under DDP: every process holds the same weights
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "edit_ledger.json").write_text(json.dumps(ledger.summary(), indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
