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
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SKELETON_KEY = "lightning_edit.skeleton"


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
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_nested(obj: dict, path: str | os.PathLike) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(obj, tensors, "checkpoint")
    atomic_save_file(tensors, path, metadata={SKELETON_KEY: json.dumps(skeleton)})


def load_nested(path: str | os.PathLike, map_location=None) -> dict:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if SKELETON_KEY not in meta:
        raise ValueError(f"{path} is not a lightning-edit checkpoint (no {SKELETON_KEY} metadata)")
    device = "cpu" if map_location is None or callable(map_location) or isinstance(map_location, dict) else str(map_location)
    tensors = load_file(str(path), device=device)
    return _unflatten(json.loads(meta[SKELETON_KEY]), tensors)


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning ``CheckpointIO`` writing/reading safetensors (see module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        save_nested(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        if not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path} not found")
        return load_nested(path, map_location)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


def save_edits(path: str | os.PathLike, weights: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write edited weights (HF parameter name -> tensor) with JSON-encoded metadata."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    atomic_save_file({k: v.detach().cpu().clone().contiguous() for k, v in weights.items()}, path, metadata=meta)
    return Path(path)


def read_edits(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return load_file(str(path)), meta


@torch.no_grad()
def load_edits(model: torch.nn.Module, path: str | os.PathLike, strict_fingerprint: bool = True) -> dict[str, str]:
    """Copy exported edited weights into ``model`` (in its own dtype/device). Checks every
    name and shape before changing anything; with ``strict_fingerprint`` also that the export
    was made from this base model (config fingerprint)."""

    weights, meta = read_edits(path)
    params = dict(model.named_parameters())
    for name, t in weights.items():
        if name not in params:
            raise KeyError(f"{path}: edited weight {name!r} does not exist in {type(model).__name__}")
        if tuple(params[name].shape) != tuple(t.shape):
            raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model's is {tuple(params[name].shape)}")
    if strict_fingerprint and "config_fingerprint" in meta and hasattr(model, "config"):
        fp = config_fingerprint(model)
        if meta["config_fingerprint"] != fp:
            raise ValueError(f"{path} was exported from a model with another config (fingerprint {meta['config_fingerprint']} != {fp}); pass strict_fingerprint=False to force")
    for name, t in weights.items():
        params[name].copy_(t.to(params[name].dtype))
    return meta


def config_fingerprint(model: torch.nn.Module) -> str:
    from .stats import _hash

    cfg = json.loads(model.config.to_json_string(use_diff=False))
    for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    return _hash(json.dumps(cfg, sort_keys=True))
