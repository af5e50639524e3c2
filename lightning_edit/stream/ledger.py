"""The edit ledger: the one record of everything an edit stream has done to a model.

Per applied batch (:class:`BatchRecord`): the request ids and a one-line description of each
request (``Danielle Darrieux: French -> English``), the method and its hyper-parameters,
the update's factors ``U``, ``V`` per edit layer (``Delta = U @ V``, rank <= rows of the batch)
and the keys of every edit layer after the update (AlphaEdit's ``K_p K_p^T`` is the sum of their
``K K^T``). Plus the stream position (``len(records)``) and the evaluation history.

From the base model and the ledger everything else is rebuilt exactly, in the order it was built
live: the edited weights (:meth:`EditLedger.replay`, with the float32 master of a bf16 / fp16
model), ``K_p K_p^T`` (:meth:`EditLedger.prev_kkt`). So

* a checkpoint appends one small file per batch (``O(rows x (d_model + 2 d_k))`` per layer)
  instead of rewriting the edited weights and the ``d_k x d_k`` matrices;
* undo (:meth:`EditLedger.truncate` and a replay) is bit-identical to a run that never applied
  the undone batches;
* a resumed run carries the full history (mid-stream evaluations after a resume cover every edit).

Batch files: ``<directory>/batch_<index>-<digest>.safetensors``, each with a SHA-256 per tensor
and over its metadata; the checkpoint lists every file's name and digest, so a stale or damaged
file is refused by path. A file is never rewritten: a batch taken back by undo and then replaced
by another continuation gets a new file (its digest differs), so a backup of an earlier checkpoint
stays valid. In a checkpoint the directory is stored relative to the checkpoint file
(:func:`portable_state` / :func:`anchored_state`), so a copied or moved run directory reads its
own files; a stream resumed into another directory links (or copies) the files it carries there,
so every checkpoint directory is self-contained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightning_edit.engine import sharding
from lightning_edit.engine.block_update import DELTA_PREFIX, ROWS_IDS, ROWS_MASK
from lightning_edit.engine.files import (
    CorruptFileError,
    atomic_save_file,
    check_finite,
    read_verified,
    tensor_digest,
)
from lightning_edit.engine.update import accumulate_kkt, write_master
from lightning_edit.errors import CheckpointError

LEDGER_FORMAT = 1
DENSE_METHODS = ("unke",)  # methods whose batches hold dense parameter deltas (d.<name>) instead of U, V per layer


@dataclass
class BatchRecord:
    """One applied edit batch.

    Attributes:
        index: position of the batch in the stream (0-based).
        request_ids: ``case_id`` of every request of the batch, in order.
        method: ``alphaedit`` / ``memit``.
        hparams: the method's hyper-parameters for this batch.
        info: logged numbers (relative update norm per layer, ...).
        tensors: ``u.{layer}`` ``(d_model, n)``, ``v.{layer}`` ``(n, d_k)``, ``keys.{layer}``
            ``(n, d_k)`` (float32, CPU); None while only on disk.
        file: the batch file (None: kept in memory only).
        digest: hash of the tensors (over their per-tensor SHA-256), checked when read back.
        descriptions: one short line per request (:func:`describe_request`), in the order of
            ``request_ids``; empty for batches recorded before descriptions existed.
    """

    index: int
    request_ids: list[str]
    method: str
    hparams: dict
    info: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] | None = None
    file: str | None = None
    digest: str | None = None
    descriptions: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.descriptions = [str(d) for d in (self.descriptions or [])]
        if self.descriptions and len(self.descriptions) != len(self.request_ids):
            raise ValueError(f"edit ledger batch {self.index}: {len(self.descriptions)} request descriptions for "
                             f"{len(self.request_ids)} requests")

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    def meta(self) -> dict:
        return {"index": self.index, "request_ids": list(self.request_ids), "method": self.method, "hparams": self.hparams,
                "info": self.info, "file": self.file, "digest": self.digest, "descriptions": list(self.descriptions)}


def describe_request(request) -> str:
    """One short line saying what a request changes, for ledgers and logs (the request's
    :meth:`~lightning_edit.data.requests.Request.describe`; its case id for other objects)."""
    describe = getattr(request, "describe", None)
    return describe() if callable(describe) else str(getattr(request, "case_id", request))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(f"{k}={tensor_digest(tensors[k])};".encode())
    return h.hexdigest()


class EditLedger:
    """The state of an edit stream (see the module docstring).

    Args:
        directory: where batch files are appended (None: keep every batch in memory; the API's
            default, and what a checkpoint of a run without a checkpoint directory embeds).
        meta: what the stream edits: ``model`` (name or path), ``dtype``, ``layers``, ``method``,
            templates; written into checkpoints and exports.
    """

    def __init__(self, directory: str | os.PathLike | None = None, meta: dict | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.meta: dict = dict(meta or {})
        self.records: list[BatchRecord] = []
        self.evals: list[dict] = []  # {"num_edits", "edit/efficacy", ...}, in stream order

    # ---- reading ------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Batches applied (the stream position)."""
        return len(self.records)

    @property
    def num_edits(self) -> int:
        return sum(r.num_requests for r in self.records)

    def request_ids(self) -> list[str]:
        return [i for r in self.records for i in r.request_ids]

    def tensors(self, record: BatchRecord) -> dict[str, torch.Tensor]:
        """A batch's tensors, read (and verified) from its file when not in memory."""
        if record.tensors is not None:
            return record.tensors
        path = self._resolve(record.file)
        tensors, _ = read_verified(path, require_digest=True)
        if record.digest is not None and _digest(tensors) != record.digest:
            raise CorruptFileError(f"{path}: ledger batch {record.index} does not match the digest its checkpoint recorded "
                                   "(a stale or overwritten batch file)")
        return tensors

    def _resolve(self, file: str | None) -> Path:
        if file is None:
            raise CorruptFileError("ledger batch has neither tensors in memory nor a file")
        p = Path(file)
        if not p.is_absolute():  # a name in the ledger's directory
            if self.directory is None:
                raise CorruptFileError(f"ledger batch file {file!r} is named without a ledger directory")
            return self.directory / p
        # earlier versions stored absolute paths: the ledger's own directory first (a copied or moved run)
        if self.directory is not None and (self.directory / p.name).exists():
            return self.directory / p.name
        return p

    def history(self) -> list[dict]:
        """One row per applied batch: index, requests (count, ids and ``descriptions``, one line
        per request, empty for batches recorded without them), method, hyper-parameters, edits
        applied after it, and its logged numbers."""
        rows, total = [], 0
        for r in self.records:
            total += r.num_requests
            rows.append({"batch": r.index, "num_requests": r.num_requests, "num_edits": total, "request_ids": list(r.request_ids),
                         "descriptions": list(r.descriptions), "method": r.method, "hparams": dict(r.hparams), **{k: v for k, v in r.info.items()}})
        return rows

    def batch_bytes(self, record: BatchRecord) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors(record).values())

    # ---- writing ------------------------------------------------------------------------
    def add_eval(self, num_edits: int, metrics: dict) -> dict:
        """Record evaluation results at stream position ``num_edits`` (merged into that
        position's row when there is one)."""
        for row in reversed(self.evals):
            if int(row.get("num_edits", -1)) == int(num_edits):
                row.update(metrics)
                return row
        row = {"num_edits": int(num_edits), **metrics}
        self.evals.append(row)
        return row

    def append(self, record: BatchRecord, write: bool = True) -> BatchRecord:
        """Add the next batch; with a directory (and ``write``, i.e. on the writing process) its
        tensors go to ``batch_<index>.safetensors`` and leave memory."""
        if record.index != self.position:
            raise ValueError(f"ledger holds {self.position} batches; batch {record.index} cannot be appended")
        record.tensors = {k: v.detach().float().cpu().contiguous() for k, v in (record.tensors or {}).items()}
        record.digest = _digest(record.tensors)
        if self.directory is not None and write:
            self._adopt_files()  # a stream resumed into another directory: its checkpoints there are self-contained
        if self.directory is not None:
            # named by content: another continuation after an undo never overwrites this batch's file
            path = self.directory / f"batch_{record.index:06d}-{record.digest[:16]}.safetensors"
            if write:
                atomic_save_file(record.tensors, path, metadata={"lightning_edit.ledger_batch": str(record.index),
                                                                 "request_ids": json.dumps(record.request_ids),
                                                                 "descriptions": json.dumps(record.descriptions)})
            record.file = path.name
            record.tensors = None  # other processes read rank 0's file when they need it (shared storage, like checkpoints)
        self.records.append(record)
        return record

    def truncate(self, position: int) -> list[BatchRecord]:
        """Take back every batch from ``position`` on (and the evaluations made after it);
        returns the removed records."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind the ledger to batch {position}: it holds {self.position} batches")
        removed, self.records = self.records[position:], self.records[:position]
        n = self.num_edits
        self.evals = [e for e in self.evals if int(e.get("num_edits", 0)) <= n]
        return removed

    # ---- rebuilding ---------------------------------------------------------------------
    def keys_per_batch(self, layers: Sequence[int], device=None):
        """Each batch's keys after its update ``{layer: (n, d_k)}``, in stream order."""
        for r in self.records:
            t = self.tensors(r)
            yield {l: t[f"keys.{l}"].to(device) for l in layers}

    def rows_per_batch(self):
        """The edited texts ``(ids, mask)`` of each batch that recorded them (block updates with
        memory), in stream order."""
        for r in self.records:
            t = self.tensors(r)
            if ROWS_IDS in t:
                yield t[ROWS_IDS].long(), t[ROWS_MASK].long()

    def prev_kkt(self, layers: Sequence[int], device=None) -> dict[int, torch.Tensor]:
        """``K_p K_p^T`` per layer, summed over the batches in stream order (bit-identical to the
        live accumulation, :func:`lightning_edit.engine.update.accumulate_kkt`)."""
        out: dict[int, torch.Tensor] = {}
        for keys in self.keys_per_batch(layers, device):
            out = accumulate_kkt(out, keys)
        return out

    @torch.no_grad()
    def total_update(self, layers: Sequence[int], device=None) -> dict[int, torch.Tensor]:
        """``{layer: sum of every batch's U @ V}`` (float32, ``(d_model, d_k)``): what the stream
        added to each edit layer; layers no batch touched are absent."""
        out: dict[int, torch.Tensor] = {}
        for r in self.records:
            t = self.tensors(r)
            for l in layers:
                if f"u.{l}" in t:
                    d = t[f"u.{l}"].to(device).float() @ t[f"v.{l}"].to(device).float()
                    out[l] = out[l] + d if l in out else d
        return out

    def dense_names(self) -> list[str]:
        """The parameters that block updates (UnKE) changed, by full name, in first-touched order."""
        names: dict[str, None] = {}
        for r in self.records:
            if r.method in DENSE_METHODS:
                names.update(dict.fromkeys(k[len(DELTA_PREFIX):] for k in self.tensors(r) if k.startswith(DELTA_PREFIX)))
        return list(names)

    @torch.no_grad()
    def replay(self, adapter, layers: Sequence[int], base: dict[int, torch.Tensor], master: dict[int, torch.Tensor],
               param_base: dict[str, torch.Tensor] | None = None) -> None:
        """Write ``base`` (the unedited weights as ``(d_model, d_k)``) plus every batch's
        ``U @ V`` into the model, in stream order, exactly as :func:`apply_update` added them:
        into the float32 ``master`` where one exists (then the model holds its rounding), in
        place in the weight otherwise. Batches of block updates add their dense deltas
        (``d.<name>``) to the named parameters, whose unedited values are ``param_base``
        (default: their current values, i.e. the model must be unedited)."""
        param_base = dict(param_base or {})
        params = dict(adapter.model.named_parameters()) if param_base or any(r.method in DENSE_METHODS for r in self.records) else {}
        for l in layers:
            if l in master:
                master[l].copy_(base[l].float())
            else:
                adapter.weight_as_linear(l).copy_(base[l])
        written: set[str] = set()  # block parameters set to their unedited value (at their first delta)
        for r in self.records:
            t = self.tensors(r)
            if r.method in DENSE_METHODS:
                for k, d in t.items():
                    if not k.startswith(DELTA_PREFIX):
                        continue
                    n = k[len(DELTA_PREFIX):]
                    if n not in params:
                        raise CheckpointError(f"edit ledger batch {r.index}: its block update changes {n!r}, which this model does not have")
                    if n not in written:
                        if n in param_base:  # else the model's current value is the unedited one
                            params[n].copy_(param_base[n])
                        written.add(n)
                    params[n].add_(d.to(params[n].device))
                continue
            for l in layers:
                w = adapter.weight_as_linear(l)
                delta = t[f"u.{l}"].to(w.device) @ t[f"v.{l}"].to(w.device)
                if l in master:
                    sharding.add_(master[l], delta)  # float32 (sharded like the weight under sharded_edit)
                else:
                    adapter.add_to_weight(l, delta)
        for n in set(param_base) - written:  # undone block updates: back to the unedited values
            params[n].copy_(param_base[n])
        for l in layers:
            if l in master:
                write_master(adapter, l, master[l])

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Checkpoint form: metadata of every batch (file + digest); a batch without a file
        embeds its tensors."""
        return {"format": LEDGER_FORMAT, "meta": json.dumps(self.meta), "evals": json.dumps(self.evals),
                "directory": str(self.directory) if self.directory is not None else None,
                "records": [{"meta": json.dumps(r.meta()), **({"tensors": r.tensors} if r.file is None else {})} for r in self.records]}

    def load_state_dict(self, state: dict, check_files: bool = True) -> None:
        if int(state.get("format", 0)) != LEDGER_FORMAT:
            raise CheckpointError(f"edit ledger format {state.get('format')!r} is not supported (expected {LEDGER_FORMAT})")
        self.meta = json.loads(state.get("meta", "{}"))
        self.evals = json.loads(state.get("evals", "[]"))
        stored = Path(state["directory"]) if state.get("directory") else None
        if stored is not None and self.directory is None:
            self.directory = stored
        moved = stored is not None and self.directory is not None and os.path.abspath(stored) != os.path.abspath(self.directory)
        self.records = []
        for i, r in enumerate(state.get("records", [])):
            m = json.loads(r["meta"])
            rec = BatchRecord(index=int(m["index"]), request_ids=list(m["request_ids"]), method=m["method"], hparams=m["hparams"],
                              info=m.get("info", {}), tensors=r.get("tensors"), file=m.get("file"), digest=m.get("digest"),
                              descriptions=list(m.get("descriptions") or []))  # absent in ledgers written before them
            if rec.index != i:
                raise CheckpointError(f"edit ledger is out of order: record {i} is batch {rec.index}")
            if moved and rec.tensors is None and rec.file is not None and not Path(rec.file).is_absolute():
                rec.file = str(stored / rec.file)  # read from the checkpoint's directory until the stream goes on here
            if check_files and rec.tensors is None:
                self.tensors(rec)  # fail now, by path, rather than mid-stream
            if rec.tensors is not None:
                check_finite(rec.tensors, f"edit ledger batch {i} (embedded in the checkpoint)")
                if rec.digest is not None and _digest(rec.tensors) != rec.digest:
                    raise CorruptFileError(f"edit ledger batch {i} (embedded in the checkpoint) does not match its digest")
            self.records.append(rec)

    def _adopt_files(self) -> None:
        """Bring every batch file that lives outside this ledger's directory (a checkpoint of
        another run directory that this stream resumed from) into it: a hard link where the file
        system allows, else a copy, each written atomically and verified against its digest first."""
        for rec in self.records:
            if rec.file is None or not Path(rec.file).is_absolute():
                continue
            src = self._resolve(rec.file)
            dst = self.directory / src.name
            if dst.exists():
                self.tensors(BatchRecord(rec.index, rec.request_ids, rec.method, rec.hparams, file=str(dst), digest=rec.digest))
            else:
                self.tensors(rec)  # a damaged source is refused by path, not copied
                dst.parent.mkdir(parents=True, exist_ok=True)
                tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, dst)
            rec.file = dst.name

    def summary(self) -> dict:
        """JSON summary (written beside exports): what the model carries."""
        return {"format": LEDGER_FORMAT, **self.meta, "batches": self.position, "num_edits": self.num_edits,
                "history": [{k: v for k, v in h.items()} for h in self.history()]}


# ---- the ledger's directory inside a checkpoint -------------------------------------------------


def portable_state(state: dict, checkpoint: str | os.PathLike) -> dict:
    """A ledger ``state_dict`` with its directory written relative to the checkpoint file that
    holds it (when the directory lies beside or below that file), so the run directory can be
    copied or moved as a whole."""
    directory = state.get("directory")
    if not directory:
        return state
    base = os.path.dirname(os.path.abspath(checkpoint))
    rel = os.path.relpath(os.path.abspath(directory), base)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return state  # elsewhere: stays absolute
    return {**state, "directory": Path(rel).as_posix(), "directory_relative": True}


def anchored_state(state: dict, checkpoint: str | os.PathLike) -> dict:
    """The inverse of :func:`portable_state` for a checkpoint read from ``checkpoint``."""
    if not state.get("directory_relative"):
        return state
    base = os.path.dirname(os.path.abspath(checkpoint))
    return {**{k: v for k, v in state.items() if k != "directory_relative"}, "directory": os.path.join(base, state["directory"])}
