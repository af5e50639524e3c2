"""Spread the target residuals over the edit layers and apply the closed-form updates.

Plain functions and small method objects (no Lightning): the callbacks in
:mod:`lightning_edit.callbacks` and the notebook API both call :func:`apply_update`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lightning_edit.engine import sharding
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.closed_form import (
    NonFiniteUpdateError,
    alphaedit_base_inverse,
    alphaedit_factors,
    alphaedit_factors_woodbury,
    alphaedit_inverse_commit,
    alphaedit_ridge,
    alphaedit_update,
    check_update,
    memit_factors,
    memit_update,
    spread_residual,
)
from lightning_edit.engine.deviations import Deviations, deviation_keys
from lightning_edit.engine.profiling import PhaseTimer, phase
from lightning_edit.engine.residuals import ResidualBatch
from lightning_edit.errors import InputError


def _rows_device(adapter: ModelAdapter):
    return next(adapter.model.parameters()).device


@torch.no_grad()
def anchor_keys_and_outputs(
    adapter: ModelAdapter,
    batch: ResidualBatch,
    key_layers: Sequence[int],
    z_layer: int | None = None,
    max_rows: int = 0,
    start: dict | None = None,
    keep_block: int | None = None,
    kept: dict | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Keys of every chunk at ``key_layers`` (and block ``z_layer``'s output at the bare prompt).

    Keys are read at every anchor of every rewrite row (a long-form row holds one anchor per
    chunk) and averaged per chunk as the reference does: half the bare prompt, half the mean
    over context prefixes. The forward pass stops after ``max(key_layers + [z_layer])`` and at
    each row group's last anchor.

    ``keep_block``: also put block ``keep_block``'s output of every row group into ``kept``
    (``{"block", "hidden", "tuple_len"}``); ``start`` (such a ``kept``, same batch and
    ``max_rows``): blocks ``0 .. start["block"]`` are not run, their output is taken from it.
    Valid while those blocks' weights have not changed since: :func:`apply_update` edits
    layers in ascending order, so each layer's pass starts where the previous one's changes end.

    Returns ``({layer: (n_chunks, d_k)}, (n_chunks, d_model) or None)``.
    """
    device = _rows_device(adapter)
    rows = batch.rewrite_rows
    stop = max(list(key_layers) + ([z_layer] if z_layer is not None else []))
    groups = [rows] if max_rows <= 0 else list(rows.split(max_rows))
    a_rows, a_pos, a_chunk = batch.anchors()
    n_rows = batch.enc.input_ids.shape[0]
    per_anchor_keys: dict[int, list[torch.Tensor]] = {l: [] for l in key_layers}
    per_anchor_z: list[torch.Tensor] = []
    order: list[torch.Tensor] = []  # anchor indices in the order they were read
    outputs = ([z_layer] if z_layer is not None else []) + ([keep_block] if keep_block is not None else [])
    if kept is not None:
        kept.clear()
        kept.update(block=keep_block, hidden=[], tuple_len=0)
    for gi, g in enumerate(groups):
        local = torch.full((n_rows,), -1, dtype=torch.long)
        local[g] = torch.arange(len(g))
        sel = (local[a_rows] >= 0).nonzero().flatten()
        if len(sel) == 0:
            if kept is not None:
                kept["hidden"].append(None)
            continue
        width = int(a_pos[sel].max()) + 1  # causal: tokens after the last anchor cannot change its key
        ids = batch.enc.input_ids[g, :width].to(device)
        mask = batch.enc.attention_mask[g, :width].to(device)
        r, p = local[a_rows[sel]].to(device), a_pos[sel].to(device)
        skip = contextlib.nullcontext()
        if start is not None and start.get("block") is not None:
            skip = adapter.skip_blocks(start["block"], start["hidden"][gi], start["tuple_len"])
        with skip, adapter.trace(key_layers=key_layers, output_layers=outputs, stop_after=stop) as rec:
            adapter.forward(ids, mask)
        if kept is not None:
            kept["hidden"].append(rec["outputs"][keep_block] if keep_block is not None else None)
            kept["tuple_len"] = rec["tuple_len"].get(keep_block, 0)
        for l in key_layers:
            per_anchor_keys[l].append(rec["keys"][l][r, p].float())
        if z_layer is not None:
            per_anchor_z.append(rec["outputs"][z_layer][r, p].float())
        order.append(sel)
    idx = torch.cat(order)
    rows_a, chunk = a_rows[idx], a_chunk[idx].to(device)
    bare = (rows_a == batch.bare_row_of_chunk[a_chunk[idx]]).to(device)
    n = batch.n_chunks
    n_pref = torch.bincount(chunk[~bare], minlength=n).float()
    keys = {}
    for l in key_layers:
        k = torch.cat(per_anchor_keys[l])
        k_bare = torch.zeros(n, k.shape[1], device=device).index_add(0, chunk[bare], k[bare])
        k_pref = torch.zeros(n, k.shape[1], device=device).index_add(0, chunk[~bare], k[~bare])
        has_pref = (n_pref > 0).unsqueeze(1)
        avg = torch.where(has_pref, 0.5 * k_bare + 0.5 * k_pref / n_pref.clamp_min(1).unsqueeze(1), k_bare)
        keys[l] = avg
    z = None
    if z_layer is not None:
        zr = torch.cat(per_anchor_z)
        z = torch.zeros(n, zr.shape[1], device=device).index_add(0, chunk[bare], zr[bare])
    return keys, z


@torch.no_grad()
def context_keys(adapter: ModelAdapter, batch: ResidualBatch, layer: int) -> torch.Tensor:
    """Keys of ``layer`` at every real position of the bare rows that is not an anchor,
    ``(m, d_k)``: AnyEdit's zero-residual constraints, which ask the update to leave the rest of
    the edited text's states where they are. One forward over the bare rows, stopped after
    ``layer``."""
    device = _rows_device(adapter)
    rows = batch.bare_row_of_chunk.unique()
    mask = batch.enc.attention_mask[rows].bool().clone()
    a = batch.enc.anchor_pos[rows]
    r_idx = torch.arange(len(rows)).unsqueeze(1).expand_as(a)
    mask[r_idx[a >= 0], a[a >= 0]] = False
    with adapter.trace(key_layers=[layer], stop_after=layer) as rec:
        adapter.forward(batch.enc.input_ids[rows].to(device), batch.enc.attention_mask[rows].to(device))
    return rec["keys"][layer][mask.to(device)].float()


@dataclass(frozen=True)
class LayerOwnership:
    """Which process keeps and solves which edit layer when the weights are sharded: the
    ``i``-th edit layer (ascending) belongs to process ``i % world``. Only the owner holds the
    layer's statistics and solver state (``d_k x d_k`` matrices) and solves it; the others receive
    its factors (:func:`apply_update`)."""

    layers: tuple[int, ...]
    world: int
    rank: int

    def owner(self, layer: int) -> int:
        return self.layers.index(layer) % self.world

    def owns(self, layer: int) -> bool:
        return self.owner(layer) == self.rank

    def mine(self, per_layer: dict) -> dict:
        """``per_layer`` restricted to this process's layers."""
        return {l: v for l, v in per_layer.items() if self.owns(l)}


def _owned(method, per_layer: dict) -> dict:
    own = getattr(method, "ownership", None)
    return per_layer if own is None else own.mine(per_layer)


@dataclass
class MemitMethod:
    """MEMIT's update. ``moments[layer]`` is the normalized second moment ``C_0``;
    ``norm_lambda`` > 0 adds ENCORE's ``||Delta||_F^2`` term (see :func:`memit_update`);
    ``memory`` > 0 keeps the running ``K_p K_p^T`` of earlier batches' keys (as AlphaEdit does)
    and adds ``memory K_p K_p^T`` to the system, so later batches leave earlier edits in place."""

    lam: float
    moments: dict[int, torch.Tensor]
    solve_dtype: torch.dtype = torch.float64
    norm_lambda: float = 0.0
    ownership: LayerOwnership | None = None  # sharded weights: ``moments`` holds this process's layers only
    memory: float = 0.0
    prev_kkt: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def needs_keys_after(self) -> bool:
        return self.memory > 0

    def _prev(self, layer: int) -> torch.Tensor | None:
        return self.prev_kkt.get(layer) if self.memory else None

    def delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return memit_update(keys, resid, self.moments[layer].to(keys.device), self.lam, self.solve_dtype, self.norm_lambda,
                            self._prev(layer), self.memory)

    def factors(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return memit_factors(keys, resid, self.moments[layer].to(keys.device), self.lam, self.solve_dtype, self.norm_lambda,
                             self._prev(layer), self.memory)

    def commit(self, new_keys: dict[int, torch.Tensor]) -> None:
        if self.memory:
            self.prev_kkt = accumulate_kkt(self.prev_kkt, _owned(self, new_keys))

    def reset(self, keys_per_batch: Iterable[dict[int, torch.Tensor]] = ()) -> None:
        """The state after the given batches (see :meth:`AlphaEditMethod.reset`); without
        ``memory`` there is none (the batches' keys are not read)."""
        self.prev_kkt = {}
        if not self.memory:
            return
        for keys in keys_per_batch:
            self.commit(keys)

    def hparams(self) -> dict:
        hp = {"lam": self.lam, "solve_dtype": str(self.solve_dtype).removeprefix("torch.")}
        if self.norm_lambda:
            hp["norm_lambda"] = self.norm_lambda
        if self.memory:
            hp["memory"] = self.memory
        return hp


@dataclass
class AlphaEditMethod:
    """AlphaEdit's update with the running ``K_p K_p^T`` of earlier batches (the state that
    makes sequential edits not overwrite each other).

    ``solver``: ``woodbury`` (default) keeps ``B = (P K_p K_p^T + l2 I)^-1`` per layer (in
    ``solve_dtype``) and updates it by a rank-``n`` Woodbury step after every batch, so a batch
    costs ``O(d_k^2 n)`` instead of an ``O(d_k^3)`` solve per layer (one extra ``d_k x d_k``
    matrix per layer in memory); ``direct`` solves the full system every batch, as the reference.
    Both give the same update up to rounding (tests/test_closed_form.py).
    ``norm_lambda`` > 0: ENCORE's norm term on the applied update, i.e. the ridge ``l2 + norm_lambda``
    (:func:`~lightning_edit.engine.closed_form.alphaedit_ridge`)."""

    l2: float
    projectors: dict[int, torch.Tensor]
    prev_kkt: dict[int, torch.Tensor] = field(default_factory=dict)
    solve_dtype: torch.dtype = torch.float64
    solver: str = "woodbury"
    inverse: dict[int, torch.Tensor] = field(default_factory=dict)
    norm_lambda: float = 0.0
    ownership: LayerOwnership | None = None  # sharded weights: state of this process's layers only
    needs_keys_after = True

    def __post_init__(self):
        if self.solver not in ("woodbury", "direct"):
            raise InputError(f"AlphaEdit solver must be 'woodbury' or 'direct', got {self.solver!r}")

    @property
    def ridge(self) -> float:
        """The weight of ``||Delta P||_F^2``: ``l2`` (+ ENCORE's ``norm_lambda``)."""
        return alphaedit_ridge(self.l2, self.norm_lambda)

    def delta(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        prev = self.prev_kkt.get(layer)
        return alphaedit_update(keys, resid, self.projectors[layer].to(keys.device), None if prev is None else prev.to(keys.device), self.ridge, self.solve_dtype)

    def _base_inverse(self, layer: int, device) -> torch.Tensor:
        """``B`` of ``layer``: kept up to date by :meth:`commit`; computed directly from
        ``prev_kkt`` when missing (a fresh stream: exactly ``I / l2``)."""
        b = self.inverse.get(layer)
        if b is None:
            prev = self.prev_kkt.get(layer)
            b = alphaedit_base_inverse(self.projectors[layer].to(device), prev, self.ridge, self.solve_dtype)
            self.inverse[layer] = b
        return b.to(device)

    def factors(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        proj = self.projectors[layer].to(keys.device)
        if self.solver == "woodbury":
            return alphaedit_factors_woodbury(keys, resid, proj, self._base_inverse(layer, keys.device))
        prev = self.prev_kkt.get(layer)
        return alphaedit_factors(keys, resid, proj, None if prev is None else prev.to(keys.device), self.ridge, self.solve_dtype)

    def commit(self, new_keys: dict[int, torch.Tensor]) -> None:
        new_keys = _owned(self, new_keys)
        if self.solver == "woodbury":
            for l, k in new_keys.items():
                b = self._base_inverse(l, k.device)
                self.inverse[l] = alphaedit_inverse_commit(b, k, self.projectors[l].to(b.device))
        self.prev_kkt = accumulate_kkt(self.prev_kkt, new_keys)

    def reset(self, keys_per_batch: Iterable[dict[int, torch.Tensor]] = ()) -> None:
        """The state after the given batches (their keys after the update, in stream order),
        rebuilt with the same operations as live commits: bit-identical to an uninterrupted
        stream on the same device."""
        self.prev_kkt, self.inverse = {}, {}
        for keys in keys_per_batch:
            self.commit(keys)

    def hparams(self) -> dict:
        hp = {"l2": self.l2, "solve_dtype": str(self.solve_dtype).removeprefix("torch."), "solver": self.solver}
        if self.norm_lambda:
            hp["norm_lambda"] = self.norm_lambda
        return hp


def accumulate_kkt(prev: dict[int, torch.Tensor], new_keys: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """``K_p K_p^T += K K^T`` per layer (products in float64, sums in float32). The one
    definition used live and when the ledger rebuilds ``K_p K_p^T``, so both are bit-identical."""
    out = dict(prev)
    for l, k in new_keys.items():
        kkt = (k.T.double() @ k.double()).float()
        out[l] = out[l].to(kkt.device) + kkt if l in out else kkt
    return out


Gather = Callable[[torch.Tensor], torch.Tensor]


def _no_rows(adapter: ModelAdapter, layers: Sequence[int], keys: bool = True) -> dict[int, torch.Tensor]:
    """Zero-row keys ``(0, d_k)`` (or, ``keys=False``, residuals ``(0, d_v)``) per layer: what a
    process without requests in a batch contributes to the gathers."""
    device = _rows_device(adapter)
    return {l: torch.zeros(0, adapter.dims(l)[1 if keys else 0], device=device) for l in layers}


def master_copies(adapter: ModelAdapter, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Float32 master copies ``(d_model, d_k)`` of the edit layers' weights when the model keeps
    them in a lower precision (bf16 / fp16); empty for a float32 model. Updates accumulate in the
    master and the model holds its rounding, so small updates are not lost to bf16 rounding and
    the leakage onto preserved keys does not grow with the number of batches."""
    out = {}
    for l in layers:
        w = adapter.weight_as_linear(l)
        if w.dtype in (torch.bfloat16, torch.float16):
            out[l] = w.detach().float().clone()
    return out


@torch.no_grad()
def write_master(adapter: ModelAdapter, layer: int, master: torch.Tensor) -> None:
    """The model's weight of ``layer`` := the master copy rounded to the weight's dtype."""
    w = adapter.weight_as_linear(layer)
    w.copy_(master.to(device=w.device, dtype=w.dtype))


def apply_update(
    adapter: ModelAdapter,
    batch: ResidualBatch | None,
    z_target: torch.Tensor | None,
    layers: Sequence[int],
    method,
    gather: Gather | None = None,
    max_rows: int = 0,
    master: dict[int, torch.Tensor] | None = None,
    broadcast: Callable | None = None,
    record: dict | None = None,
    on_record: Callable[[dict, dict], None] | None = None,
    timer: PhaseTimer | None = None,
    context: bool = False,
    max_update: float = 0.0,
    context_weight: float = 1.0,
    deviations: Deviations | None = None,
    deviation_rows: bool = False,
) -> dict[str, float]:
    """Apply one edit batch's update to every edit layer, in ascending order.

    For layer ``l`` (the earlier layers already updated): keys and current ``z`` on the
    partly edited model, residual share ``(z - z_cur) / layers_left``, closed-form update,
    in-place add. ``gather`` concatenates per-process rows (keys, residuals) under DDP so that
    every process applies the same update; a process without requests in this batch passes
    ``batch=None`` (and ``z_target=None``): it contributes no rows but joins every gather.
    If anything fails (a non-finite solve, a bad shape), every edit layer is restored and the
    error re-raised: a batch is applied whole or not at all.
    With ``master`` (float32 copies of low-precision edit layers, :func:`master_copies`) the
    update is added to the master and the model's weight is written as its rounding.
    Methods with ``factors`` (MEMIT, AlphaEdit) give ``Delta = U @ V`` (float32, rank <= rows);
    ``broadcast`` (DDP) replaces every process's factors by rank 0's, so processes can never drift
    apart; ``record`` (a dict) receives ``u.{l}``, ``v.{l}`` and the keys after the update
    ``keys.{l}``: what the edit ledger stores to replay, undo and rebuild ``K_p K_p^T`` exactly;
    ``on_record(record, info)`` runs before the method commits, inside the all-or-nothing block.
    ``context``: also ask the update to leave the keys at every other position of the edited
    texts unchanged (zero-residual rows, AnyEdit's option; only the solve uses them, AlphaEdit's
    ``K_p K_p^T`` accumulates the edit keys as for facts); ``context_weight`` weighs those rows in
    the least squares (their keys scaled by its square root; 1 leaves them as they are).
    ``deviation_rows``: also ask each chunk's residual at its anchor's key in the slipped copies
    ``deviations`` (:func:`~lightning_edit.engine.deviations.make_deviations`; ``None`` on a process
    without any, which still joins the gathers); only the solve uses them, as the context rows.
    ``max_update`` > 0 bounds each layer's relative update ``||Delta||_F / ||W||_F``: a larger one
    (or a non-finite one) is refused before it is added, and the layers already updated are
    restored (:func:`~lightning_edit.engine.closed_form.check_update`).
    ``timer`` (optional) accumulates seconds per phase: ``keys``, ``solve``, ``apply`` and
    ``state`` (AlphaEdit's keys after the update, ``K_p K_p^T`` and the record).
    Returns summary numbers for logging.
    """
    gather = gather or (lambda t: t)
    layers = sorted(layers)
    z_layer = layers[-1]
    master = master if master is not None else {}
    snapshot = {l: adapter.weight_as_linear(l).detach().clone() for l in layers}
    master_snapshot = {l: m.clone() for l, m in master.items()}
    info: dict[str, float] = {}
    # each layer's pass starts from the input of the previous edit layer's block (nothing below
    # it changes any more); the keys a layer's solve uses are its keys after the batch too (its
    # own update does not move them, the layers below are final), so no pass runs afterwards
    carry: dict | None = None
    own_keys: dict[int, torch.Tensor] = {}
    try:
        for i, l in enumerate(layers):
            with phase(timer, "keys"):
                if batch is None:
                    keys, resid = _no_rows(adapter, [l]), _no_rows(adapter, [z_layer], keys=False)[z_layer]
                else:
                    nxt: dict = {}
                    keys, z_cur = anchor_keys_and_outputs(adapter, batch, [l], z_layer, max_rows, start=carry,
                                                          keep_block=l - 1 if l > 0 else None, kept=nxt)
                    carry = nxt if l > 0 else None
                    resid = spread_residual(z_target.to(z_cur.device), z_cur, len(layers) - i)
                own_keys[l] = keys[l]
                k_all, r_all = gather(keys[l]), gather(resid)
                if deviation_rows:
                    if deviations is not None and batch is not None and len(deviations):
                        kd, rd = deviation_keys(adapter, deviations, l), resid[deviations.read_chunk.to(resid.device)]
                    else:
                        kd, rd = _no_rows(adapter, [l])[l], resid.new_zeros(0, resid.shape[1])
                    k_all, r_all = torch.cat([k_all, gather(kd)]), torch.cat([r_all, gather(rd)])
                if context:
                    kc = gather(context_keys(adapter, batch, l) if batch is not None else _no_rows(adapter, [l])[l])
                    if context_weight != 1.0:
                        kc = kc * math.sqrt(context_weight)
                    k_all = torch.cat([k_all, kc])
                    r_all = torch.cat([r_all, r_all.new_zeros(kc.shape[0], r_all.shape[1])])
            info[f"update_norm/layer_{l}"] = _solve_and_add(adapter, method, l, k_all, r_all, master, broadcast, record, timer,
                                                             snapshot[l], max_update)
            _check_outputs(adapter, l, k_all)
        with phase(timer, "state"):
            if getattr(method, "needs_keys_after", False) or record is not None:
                keys_after = _gathered_keys(own_keys, gather, broadcast)
                if record is not None:
                    record.update({f"keys.{l}": k.detach() for l, k in keys_after.items()})
            if on_record is not None:
                on_record(record, info)  # e.g. the ledger's append: if it fails, the batch is rolled back
            if getattr(method, "needs_keys_after", False):
                method.commit(keys_after)
    except BaseException:
        with torch.no_grad():
            for l, w in snapshot.items():
                adapter.weight_as_linear(l).copy_(w)
            for l, m in master_snapshot.items():
                master[l].copy_(m)
        raise
    return info


def _solve_and_add(adapter: ModelAdapter, method, layer: int, k_all: torch.Tensor, r_all: torch.Tensor,
                   master: dict[int, torch.Tensor], broadcast: Callable | None, record: dict | None,
                   timer: PhaseTimer | None, weight: torch.Tensor, max_update: float) -> float:
    """One layer's closed-form update from all processes' keys and residuals, checked against
    ``weight`` (its value before the batch) and ``max_update``, then added to it (through the
    float32 master where one exists); returns the relative size ``||Delta|| / ||W||``. Factored
    methods give ``Delta = U @ V``; ``broadcast`` makes every process use rank 0's factors (the
    layer owner's, when the method has a :class:`LayerOwnership`); ``record`` gets them."""
    with phase(timer, "solve"):
        own = getattr(method, "ownership", None)
        if hasattr(method, "factors") and own is not None and broadcast is not None:
            # the layer's owner solves, every process gets its factors (or its error, so all raise)
            payload = None
            if own.owns(layer):
                try:
                    payload = tuple(t.cpu() for t in method.factors(layer, k_all, r_all))
                except Exception as err:  # noqa: BLE001 (re-raised on every process below)
                    payload = err
            payload = broadcast(payload, src=own.owner(layer))
            if isinstance(payload, BaseException):
                raise payload
            u, v = (t.to(k_all.device) for t in payload)
            if record is not None:
                record[f"u.{layer}"], record[f"v.{layer}"] = u.detach(), v.detach()
        elif hasattr(method, "factors"):
            u, v = method.factors(layer, k_all, r_all)
            if broadcast is not None:  # via CPU: pickled device tensors would land on rank 0's device
                u, v = (t.to(k_all.device) for t in broadcast((u.cpu(), v.cpu())))
            if record is not None:
                record[f"u.{layer}"], record[f"v.{layer}"] = u.detach(), v.detach()
        else:
            u, v = None, None
            delta = method.delta(layer, k_all, r_all)
    with phase(timer, "apply"):
        if u is not None:
            delta = u @ v
        size = check_update(delta, weight, layer, max_update)  # before anything is added
        if layer in master:
            sharding.add_(master[layer], delta)  # float32; sharded like the weight under sharded_edit
            write_master(adapter, layer, master[layer])
        else:
            adapter.add_to_weight(layer, delta)
    return size


@torch.no_grad()
def _check_outputs(adapter: ModelAdapter, layer: int, keys: torch.Tensor) -> None:
    """Raise :class:`NonFiniteUpdateError` when the edited layer's outputs on the batch's keys (all
    processes' rows, so every process decides alike) are not finite, e.g. a finite update that
    overflows a half-precision weight."""
    if keys.numel() == 0:
        return
    proj = adapter.down_proj(layer)
    w = proj.weight
    if sharding.is_sharded(w):  # outside its block's forward the module holds only a slice
        full = adapter.full_weight(layer)
        out = keys.to(device=full.device, dtype=full.dtype) @ full.T
    else:
        out = proj(keys.to(device=w.device, dtype=w.dtype))
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteUpdateError(f"layer {layer}: the edited layer's outputs on the batch's keys are not finite (inf/nan)")


def _gathered_keys(own_keys: dict[int, torch.Tensor], gather: Gather, broadcast: Callable | None) -> dict[int, torch.Tensor]:
    """Every process's keys after the update per layer (rank 0's under ``broadcast``)."""
    keys_after = {l: gather(k) for l, k in own_keys.items()}
    if broadcast is not None:
        dev = {l: k.device for l, k in keys_after.items()}
        keys_after = {l: k.to(dev[l]) for l, k in broadcast({l: k.cpu() for l, k in keys_after.items()}).items()}
    return keys_after
