"""UnKE's block update: train a whole decoder block (attention and MLP) so that its outputs on the
edited texts carry the residual vectors, while its outputs on unrelated texts stay as they were.

This is the update of UnKE (Deng et al. 2025) in the chunked form that the AnyEdit code ships
(``unke_ARE``): the residual vectors ``z`` of every chunk are optimized as for MEMIT / AlphaEdit
(:mod:`lightning_edit.engine.residuals`); then, for each edit layer in ascending order, the
block's output on each edited text is the target everywhere, plus the layer's share of the
residual ``(z - z_cur) / layers_left`` at the chunk anchors, and the block's parameters take
``steps`` AdamW steps on

    mean_sq(block(h_edit) - target) + preserve_weight * mean_sq(block(h_pres) - out_pres)
                                    + memory * mean_sq(block(h_mem) - out_mem)

where ``h`` is the block's input (the lower blocks' output, computed once per layer and fed
through :meth:`~lightning_edit.engine.arch.ModelAdapter.skip_blocks`), ``out_pres`` the block's
unedited output on the preservation texts and the means run over real (unpadded) positions.
The last term (``memory`` > 0, not in the reference) keeps the earlier batches' edited texts
where the earlier updates put them: ``out_mem`` is the block's output on those texts before this
batch, so a later batch does not overwrite the answers written before it.
Nothing here is architecture-specific: the block runs inside the model's own forward, so
masks and rotary positions are the model's.

Every parameter of the block may change, so a batch's update is a dense delta per parameter:
``Delta = trained - before``, written back as ``before + Delta`` so that replaying the ledger
(the same addition) gives bit-identical weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.bars import progress_bar
from lightning_edit.engine.closed_form import (
    NonFiniteUpdateError,
    OversizedUpdateError,
    spread_residual,
)
from lightning_edit.engine.residuals import ResidualBatch
from lightning_edit.errors import InputError

DELTA_PREFIX = "d."  # ledger tensors of dense parameter deltas: "d.<parameter name>"
ROWS_IDS, ROWS_MASK = "rows.ids", "rows.mask"  # ledger tensors of a batch's edited texts (UnKE with memory)


@dataclass
class BlockUpdateMethod:
    """UnKE's block update (see the module docstring).

    Attributes:
        lr: AdamW learning rate (the reference's 2e-4).
        steps: AdamW steps per edit layer and batch (the reference's 50).
        weight_decay: AdamW weight decay of the block's matrices (1-D parameters, i.e. norms and
            biases, get none; the reference's 0.01).
        preserve_weight: weight of the preservation term (the reference's 1).
        preserve_ids, preserve_mask: the preservation texts, ``(n, seq)`` right-padded; each batch
            uses a seeded sample of ``n_preserve`` of them (the reference samples 20 texts).
        n_preserve: preservation texts per batch (0 = all).
        seed: the sample's seed (with the batch position).
        memory: weight of the earlier batches' edited texts (0 = off, as the reference).
        memory_rows: those texts, ``(ids, mask)`` per applied batch in stream order (the state
            of a stream with memory; rebuilt from the ledger by :meth:`reset_rows`).
        n_memory: earlier texts per batch, a sample seeded by ``seed`` and the stream position,
            so that a long stream's cost stops growing (0 = all of them).
    """

    lr: float = 2e-4
    steps: int = 50
    weight_decay: float = 0.01
    preserve_weight: float = 1.0
    preserve_ids: torch.Tensor | None = None
    preserve_mask: torch.Tensor | None = None
    n_preserve: int = 20
    seed: int = 0
    memory: float = 0.0
    memory_rows: list = field(default_factory=list)
    n_memory: int = 0
    needs_keys_after = False
    dense = True  # the update is a dense delta per block parameter, not U @ V of the down projections

    def __post_init__(self):
        if not self.lr > 0:
            raise InputError(f"UnKE lr must be > 0, got {self.lr}")
        if self.steps < 1:
            raise InputError(f"UnKE steps must be >= 1, got {self.steps}")
        if (self.weight_decay < 0 or self.preserve_weight < 0 or self.n_preserve < 0 or not self.memory >= 0
                or self.n_memory < 0):
            raise InputError("UnKE weight_decay, preserve_weight, n_preserve, memory and n_memory must be >= 0")

    def hparams(self) -> dict:
        hp = {"lr": self.lr, "steps": self.steps, "weight_decay": self.weight_decay,
              "preserve_weight": self.preserve_weight, "n_preserve": self.n_preserve}
        if self.memory:
            hp["memory"] = self.memory
            if self.n_memory:
                hp["n_memory"] = self.n_memory
        return hp

    def commit(self, new_keys) -> None:
        pass

    def reset(self, keys_per_batch: Iterable = ()) -> None:
        """A fresh stream's state (no earlier texts); the closed-form methods' keys do not apply."""
        self.memory_rows = []

    def reset_rows(self, rows_per_batch: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The state after the given batches: their edited texts ``(ids, mask)`` in stream order
        (the ledger's ``rows.ids`` / ``rows.mask``); nothing is kept without ``memory``."""
        self.memory_rows = [(i.cpu(), m.cpu()) for i, m in rows_per_batch] if self.memory else []

    def memory_batch(self, position: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The earlier batches' texts as one right-padded ``(ids, mask)`` (at most ``n_memory``
        of them, sampled with ``seed`` and the stream ``position``); None without any."""
        if not self.memory or not self.memory_rows:
            return None
        rows = [(i[r : r + 1], m[r : r + 1]) for i, m in self.memory_rows for r in range(len(i))]
        if self.n_memory and self.n_memory < len(rows):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + position + 500_009)  # not the preservation sample's
            rows = [rows[j] for j in torch.randperm(len(rows), generator=gen)[: self.n_memory].sort().values.tolist()]
        width = max(int(m.sum()) for _, m in rows)
        ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
        for at, (i, m) in enumerate(rows):
            w = min(width, i.shape[1])
            ids[at, :w], mask[at, :w] = i[0, :w], m[0, :w]
        return ids, mask

    def preserve_rows(self, position: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This batch's preservation texts: a sample of ``n_preserve`` seeded by ``seed`` and
        the stream ``position``; None without texts or with ``preserve_weight`` 0."""
        if self.preserve_ids is None or self.preserve_weight == 0 or len(self.preserve_ids) == 0:
            return None
        n = len(self.preserve_ids)
        if self.n_preserve and self.n_preserve < n:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + position)
            pick = torch.randperm(n, generator=gen)[: self.n_preserve].sort().values
        else:
            pick = torch.arange(n)
        ids, mask = self.preserve_ids[pick], self.preserve_mask[pick]
        width = int(mask.sum(1).max())
        return ids[:, :width], mask[:, :width]


def preservation_rows(tokenizer, texts: Iterable[str], n: int, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` non-empty ``texts``, one row each from the tokenizer's own start, cut to
    ``max_length`` tokens and right-padded: ``(ids, mask)``, ``(n, width)``."""
    rows = []
    for t in texts:
        if len(rows) >= n:
            break
        if t and t.strip():
            ids = tokenizer(t, truncation=True, max_length=max_length)["input_ids"]
            if ids:
                rows.append(torch.tensor(ids, dtype=torch.long))
    if not rows:
        raise InputError("UnKE: the statistics corpus gave no preservation texts (stats.corpus)")
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    return ids, mask


def check_float32_blocks(adapter: ModelAdapter, layers: Sequence[int]) -> None:
    """Raise :class:`InputError` naming the first parameter of the edit blocks that is not
    float32 (the block update trains them in place)."""
    for l in layers:
        for n, p in block_parameters(adapter, l).items():
            if p.dtype != torch.float32:
                raise InputError(f"the UnKE block update trains the edit blocks in float32; {n} is "
                                 f"{str(p.dtype).removeprefix('torch.')} (set --model.dtype=float32)")


def block_parameters(adapter: ModelAdapter, layer: int) -> dict[str, torch.nn.Parameter]:
    """Block ``layer``'s parameters by their full names in the model."""
    prefix = adapter.spec.layer_template.format(layer) + "."
    return {prefix + n: p for n, p in adapter.layer(layer).named_parameters()}


@torch.no_grad()
def _block_io(adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor, layer: int, z_layer: int | None = None):
    """Block ``layer``'s input (the previous block's output; None for block 0), the length of
    the tuple the blocks return, block ``layer``'s output and (with ``z_layer``) block
    ``z_layer``'s output, in one forward stopped after the highest of them."""
    outs = [layer] + ([layer - 1] if layer > 0 else []) + ([z_layer] if z_layer is not None else [])
    with adapter.trace(output_layers=outs, stop_after=max(outs)) as rec:
        adapter.forward(ids, mask)
    h_in = rec["outputs"][layer - 1] if layer > 0 else None
    tlen = rec["tuple_len"].get(layer - 1, 0) if layer > 0 else 0
    return h_in, tlen, rec["outputs"][layer], rec["outputs"].get(z_layer)


def _block_forward(adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor, layer: int, h_in, tlen: int) -> torch.Tensor:
    """Block ``layer``'s output on ``ids`` with its input taken from ``h_in`` (gradients reach
    the block's parameters)."""
    skip = adapter.skip_blocks(layer - 1, h_in, tlen) if h_in is not None else contextlib.nullcontext()
    with skip, adapter.trace(output_layers=[layer], stop_after=layer) as rec:
        adapter.forward(ids, mask)
    return rec["outputs"][layer]


def masked_mse(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real positions (``mask`` 1) and the hidden size of ``(out - target)^2``."""
    m = mask.to(out.dtype).unsqueeze(-1)
    return ((out - target) ** 2 * m).sum() / (m.sum() * out.shape[-1]).clamp_min(1)


def block_targets(out: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """The block's output as its target, plus ``resid[j]`` at ``(rows[j], positions[j])``."""
    target = out.detach().clone()
    target.index_put_((rows, positions), resid.to(target.dtype), accumulate=True)
    return target


def train_block(adapter: ModelAdapter, layer: int, method: BlockUpdateMethod, edit: tuple, preserve: tuple | None,
                on_step: Callable[[int, float], None] | None = None, before: dict[str, torch.Tensor] | None = None,
                remember: tuple | None = None) -> dict[str, torch.Tensor]:
    """``method.steps`` AdamW steps on block ``layer`` (see the module docstring). ``edit``,
    ``preserve`` (weighted by ``method.preserve_weight``) and ``remember`` (the earlier batches'
    texts, weighted by ``method.memory``) are ``(ids, mask, h_in, tuple_len, target)``. The
    block's parameters are trained in place, then written as ``before + Delta``; returns
    ``{name: Delta}``. ``before``: copies of the parameters' current values, by name (taken here
    when absent)."""
    params = block_parameters(adapter, layer)
    if before is None:
        before = {n: p.detach().clone() for n, p in params.items()}
    decay = [p for p in params.values() if p.ndim > 1]
    no_decay = [p for p in params.values() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": method.weight_decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
    opt = torch.optim.AdamW(groups, lr=method.lr, betas=(0.9, 0.999), eps=1e-8)
    was = {n: p.requires_grad for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for step in range(method.steps):
                opt.zero_grad(set_to_none=True)
                ids, mask, h_in, tlen, target = edit
                loss = masked_mse(_block_forward(adapter, ids, mask, layer, h_in, tlen), target, mask)
                for weight, term in ((method.preserve_weight, preserve), (method.memory, remember)):
                    if term is not None:
                        pids, pmask, ph, ptlen, ptarget = term
                        loss = loss + weight * masked_mse(_block_forward(adapter, pids, pmask, layer, ph, ptlen), ptarget, pmask)
                if not torch.isfinite(loss):
                    raise NonFiniteUpdateError(f"layer {layer}: the block update's loss is not finite at step {step}")
                loss.backward()
                opt.step()
                if on_step is not None:
                    on_step(step, float(loss.detach()))
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n])
    deltas = {}
    with torch.no_grad():
        for n, p in params.items():
            d = p.detach() - before[n]
            p.copy_(before[n])
            p.add_(d)  # exactly what replaying the ledger does
            deltas[n] = d
    return deltas


def apply_block_update(adapter: ModelAdapter, batch: ResidualBatch, z_target: torch.Tensor, layers: Sequence[int],
                       method: BlockUpdateMethod, position: int = 0, max_update: float = 0.0,
                       record: dict | None = None, on_record: Callable[[dict, dict], None] | None = None,
                       progress: bool = False, label: str = "edit batch") -> dict[str, float]:
    """One batch's block update of every edit layer, in ascending order (see the module
    docstring); all or nothing: if anything fails every block is restored and the error
    re-raised. ``record`` receives ``d.<name>`` (each parameter's delta); ``on_record(record,
    info)`` runs inside the all-or-nothing block (the ledger's append). ``max_update`` > 0 bounds
    each block's relative change ``||Delta||_F / ||W||_F`` over its parameters. ``progress``: a
    bar per block counting its steps (``label`` names the batch). Returns the relative change per
    layer and the final losses."""
    layers = sorted(layers)
    z_layer = layers[-1]
    device = next(adapter.model.parameters()).device
    check_float32_blocks(adapter, layers)
    rows = batch.bare_row_of_chunk.unique()
    ids, mask = batch.enc.input_ids[rows].to(device), batch.enc.attention_mask[rows].to(device)
    width = int(mask.sum(1).max())
    ids, mask = ids[:, :width], mask[:, :width]
    a_rows, a_pos, a_chunk = batch.anchors()
    bare = a_rows == batch.bare_row_of_chunk[a_chunk]
    local = torch.full((batch.enc.input_ids.shape[0],), -1, dtype=torch.long)
    local[rows] = torch.arange(len(rows))
    r_idx, p_idx, c_idx = local[a_rows[bare]].to(device), a_pos[bare].to(device), a_chunk[bare].to(device)
    pres = method.preserve_rows(position)
    mem = method.memory_batch(position)
    snapshot = {n: p.detach().clone() for l in layers for n, p in block_parameters(adapter, l).items()}
    info: dict[str, float] = {}
    record = record if record is not None else {}
    try:
        for i, l in enumerate(layers):
            h_in, tlen, out, z_out = _block_io(adapter, ids, mask, l, z_layer)
            resid = spread_residual(z_target.to(device)[c_idx], z_out[r_idx, p_idx].float(), len(layers) - i)
            edit = (ids, mask, h_in, tlen, block_targets(out, r_idx, p_idx, resid))
            preserve = None
            if pres is not None:
                pids, pmask = (t.to(device) for t in pres)
                ph, ptlen, pout, _ = _block_io(adapter, pids, pmask, l)
                preserve = (pids, pmask, ph, ptlen, pout.detach())
            remember = None
            if mem is not None:  # the earlier batches' texts, as this batch found them
                mids, mmask = (t.to(device) for t in mem)
                mh, mtlen, mout, _ = _block_io(adapter, mids, mmask, l)
                remember = (mids, mmask, mh, mtlen, mout.detach())
            last = {}
            with progress_bar(f"{label}: block {l} update", method.steps, "step", enabled=progress) as bar:
                def step(s: int, v: float, last: dict = last, bar=bar) -> None:
                    last.update(loss=v, **({"first": v} if s == 0 else {}))
                    bar.set_postfix(loss=f"{v:.4f}", refresh=False)
                    bar.update(1)

                deltas = train_block(adapter, l, method, edit, preserve, before=snapshot, remember=remember, on_step=step)
            num = sum(float(d.double().pow(2).sum()) for d in deltas.values()) ** 0.5
            den = sum(float(snapshot[n].double().pow(2).sum()) for n in deltas) ** 0.5
            size = num / max(den, 1e-12)
            if not all(bool(torch.isfinite(d).all()) for d in deltas.values()):
                raise NonFiniteUpdateError(f"layer {l}: the block update is not finite")
            if max_update > 0 and size > max_update:
                raise OversizedUpdateError(f"layer {l}: the block update's relative size {size:.3g} exceeds max_update={max_update:g}")
            info[f"update_norm/layer_{l}"] = size
            info[f"block_loss_start/layer_{l}"] = last.get("first", float("nan"))
            info[f"block_loss/layer_{l}"] = last.get("loss", float("nan"))
            record.update({DELTA_PREFIX + n: d.detach() for n, d in deltas.items()})
        if method.memory:  # this batch's texts, for the batches after it (and for a rebuilt stream)
            record.update({ROWS_IDS: ids.detach().cpu(), ROWS_MASK: mask.detach().cpu()})
        if on_record is not None:
            on_record(record, info)
        if method.memory:
            method.memory_rows.append((ids.detach().cpu(), mask.detach().cpu()))
    except BaseException:
        with torch.no_grad():
            for l in layers:
                for n, p in block_parameters(adapter, l).items():
                    p.copy_(snapshot[n])
        raise
    return info
