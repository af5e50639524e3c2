"""Files and identities the engine relies on: safetensors written atomically and verified by
content hash on read, nested checkpoints without pickle, and fingerprints of tensors and models.

* :func:`atomic_save_file` / :func:`read_verified`: a SHA-256 per tensor in the file's metadata,
  checked on read (a damaged or stale file is refused by path); temp file + ``os.replace``.
* :func:`save_nested` / :func:`load_nested`: a nested dict as one safetensors file (the tensors
  as entries, everything else as a JSON skeleton in the metadata).
* :func:`short_hash`, :func:`tensor_fingerprint`, :func:`config_fingerprint`,
  :func:`full_model_fingerprint`: identities of statistics caches and base models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lightning_edit.engine import sharding
from lightning_edit.errors import CheckpointError, InputError, MissingFileError

SKELETON_KEY = "lightning_edit.skeleton"
DIGEST_KEY = "lightning_edit.sha256"  # JSON {tensor name: sha256 of its bytes}, in every file we write
HEADER_DIGEST_KEY = "lightning_edit.metadata_sha256"  # SHA-256 of every other metadata entry (the JSON state)


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


def metadata_digest(metadata: dict[str, str]) -> str:
    """SHA-256 over every metadata entry but :data:`HEADER_DIGEST_KEY` itself (the tensor digests
    included, so the header's every byte of meaning is covered)."""
    body = {k: v for k, v in metadata.items() if k != HEADER_DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def verify_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path, require_digest: bool = False,
                   finite: bool = True) -> None:
    """Check every tensor against the digests in ``metadata`` and (``finite``) for finiteness;
    raise :class:`CorruptFileError` naming ``path`` and the tensor."""
    raw = (metadata or {}).get(DIGEST_KEY)
    stored = (metadata or {}).get(HEADER_DIGEST_KEY)
    if stored is not None and stored != metadata_digest(metadata):
        raise CorruptFileError(f"{path}: its metadata (the JSON state beside the tensors) does not match its stored hash "
                               "(the file was edited or is corrupted)")
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
    metadata[HEADER_DIGEST_KEY] = metadata_digest(metadata)
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


def short_hash(*parts) -> str:
    """A 24-hex-digit BLAKE2b of the parts (bytes, or their ``str``), each closed by a NUL."""
    h = hashlib.blake2b(digest_size=12)
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\x00")
    return h.hexdigest()


@torch.no_grad()
def tensor_fingerprint(t: torch.Tensor, max_elems: int = 1 << 16) -> str:
    """Hash of shape, dtype and an evenly strided sample of the values (fast on any size;
    any fine-tune or edit changes the sampled values). A sharded tensor is gathered first (the
    same hash as unsharded; every process must call)."""
    flat = sharding.full(t.detach()).reshape(-1)
    if flat.numel() > max_elems:
        # integer arithmetic: a float32 linspace rounds past the last index above 2^24 elements
        idx = torch.arange(max_elems, dtype=torch.int64, device=flat.device) * (flat.numel() - 1) // (max_elems - 1)
        flat = flat[idx]
    data = flat.float().cpu().numpy().tobytes()
    return short_hash(tuple(t.shape), t.dtype, data)


def config_fingerprint(model: torch.nn.Module) -> str:
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    for k in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    return short_hash(json.dumps(cfg, sort_keys=True))


@torch.no_grad()
def full_model_fingerprint(model: torch.nn.Module) -> str:
    """Identity of a whole model: its config and every parameter and buffer (a strided sample of
    each, :func:`tensor_fingerprint`), so a model that differs anywhere,
    also above the edit layers, gets another fingerprint. Take it on the *unedited* model."""
    parts: list = [config_fingerprint(model) if hasattr(model, "config") else type(model).__name__]
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        parts += [name, tensor_fingerprint(t)]
    return short_hash(*parts)


def check_export_target(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to export into ``out`` when it exists and is not an empty directory, unless
    ``overwrite``: an export never deletes what a user keeps there."""
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"export: {out} exists and is not an empty directory; choose a new path, or pass --overwrite "
                         "(Editor.export(..., overwrite=True)) to replace it")
    return out


def new_export_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """A fresh temporary directory beside ``out`` to write an export into, after checking that
    ``out`` may be written: a path that exists and is not an empty directory is refused unless
    ``overwrite`` (nothing is touched before the check). Finish with :func:`finish_export_dir`."""
    out = check_export_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


MANIFEST = "lightning_edit_manifest.json"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike) -> Path:
    """``lightning_edit_manifest.json`` in ``directory``: the size and SHA-256 of every file in it
    (recursively; relative POSIX paths), so :func:`verify_manifest` can tell a complete, unchanged
    export from a damaged or altered one."""
    root = Path(directory)
    files = {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}
    path = root / MANIFEST
    path.write_text(json.dumps({"format": 1, "algorithm": "sha256", "files": files}, indent=1))
    return path


def verify_manifest(directory: str | os.PathLike) -> list[str]:
    """Check a directory against its manifest (:func:`write_manifest`); returns the problems found
    (empty: every listed file is present with its size and digest, and no other file was added)."""
    root = Path(directory)
    path = root / MANIFEST
    if not path.is_file():
        return [f"{path}: no manifest (not a lightning-edit export, or written by an older version)"]
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return [f"{path}: unreadable manifest ({type(err).__name__}: {err})"]
    if not isinstance(files, dict) or not all(isinstance(w, dict) for w in files.values()):
        return [f"{path}: unreadable manifest (expected {{file: {{bytes, sha256}}}})"]
    problems = []
    for name, want in files.items():
        p = root / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != want.get("bytes") or file_sha256(p) != want.get("sha256"):
            problems.append(f"{name}: changed (its size or SHA-256 differs from the manifest)")
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
                   and p.relative_to(root).as_posix() not in files)
    problems += [f"{name}: not in the manifest (added after the export)" for name in extra]
    return problems


def finish_export_dir(tmp: Path, out: str | os.PathLike) -> Path:
    """Put the finished export ``tmp`` at ``out``, with its manifest (:func:`write_manifest`). An
    existing ``out`` (allowed by :func:`new_export_dir`) is moved aside first and deleted only
    once the new export is in place, so a kill at any point leaves the old or the new export at
    ``out``."""
    write_manifest(tmp)
    out = Path(out)
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
