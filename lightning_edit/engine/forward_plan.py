"""The forward plan of the z optimization: which tokens every Adam step runs, and how.

The objective (:mod:`lightning_edit.engine.residuals`) only says what is optimized; this module
makes each step cheap without changing the result beyond rounding:

* the tokens before each row's first read position run once per phase (their keys and values
  are cached: attention is causal, nothing there depends on a residual vector), and with
  ``skip_lower_blocks`` the blocks up to ``z_layer`` run once too;
* only the positions a loss or a vector reads run at all (later tokens are cut);
* the rows' suffixes are packed end to end into shared rows with a 4-D attention mask
  (``pack_rows``), or padded in length buckets, split into forwards of bounded size;
* the LM head runs only where a loss reads it; eager attention where its score matrices are
  small, SDPA (with the chosen kernels on a GPU) elsewhere.

:class:`PhasePlan` holds one phase's plan: built once per phase from the batch, the chunks
optimized and the chunks held fixed; :meth:`PhasePlan.units` gives the prepared forwards of the
rows still optimizing, :meth:`PhasePlan.forward` runs one with the current vectors added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_edit.engine.arch import (
    ModelAdapter,
    additive_mask,
    cache_layers,
    make_cache,
    prefix_cache_kwarg,
    supports_logits_to_keep,
    supports_packed_rows,
)
from lightning_edit.engine.tokens import Encoded
from lightning_edit.errors import InputError


@dataclass
class PlanConfig:
    """How the z optimization's forwards are laid out (speed and memory only: the result is the
    same up to rounding). The fields are :class:`~lightning_edit.engine.residuals.ResidualConfig`'s
    of the same names, documented there (``model.residual.*`` in a config)."""

    max_rows_per_forward: int = 0
    prefix_cache: bool = True
    skip_lower_blocks: bool = True
    length_buckets: int = 3
    sdpa_backends: str = "auto"
    eager_attention_mb: float = 64.0
    pack_rows: bool = True
    packed_eager_attention_mb: float = 0.0
    max_tokens_per_forward: int = 2048

    def __post_init__(self):
        sdpa_backends(self.sdpa_backends)  # names checked before any work
        if self.max_tokens_per_forward < 0 or self.max_rows_per_forward < 0:
            raise InputError("max_tokens_per_forward and max_rows_per_forward must be >= 0 (0 = no limit)")


@dataclass(frozen=True)
class Lockstep:
    """Processes that each optimize their own share of a batch through one model whose weights
    are sharded (FSDP): every forward of a sharded block gathers its weights from all of them,
    so they must run the same number of forwards and backwards in the same order, whatever their
    shares. ``all_max(n)`` is the largest ``n`` over the processes (a collective every process
    calls alike). A process with fewer forwards at some point runs a repeat of one of its own with
    zero weight (:meth:`count` says how many in all); the steps go on while any process has a
    vector still optimizing (:meth:`any`)."""

    all_max: Callable[[int], int]

    def count(self, n: int) -> int:
        """How many forwards every process runs where this one needs ``n``."""
        return int(self.all_max(int(n)))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on some process."""
        return self.all_max(int(bool(flag))) > 0

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process."""
        return self.all_max(int(not flag)) == 0


_SDPA = {"efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def sdpa_backends(spec: str) -> list | None:
    """``auto`` -> ``None``; else the ``torch.nn.attention.SDPBackend`` members named."""
    if spec.strip() == "auto":
        return None
    names = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [x for x in names if x not in _SDPA]
    if bad or not names:
        raise InputError(f"sdpa_backends: unknown {bad or spec!r}; use 'auto' or a comma list of {sorted(_SDPA)}")
    return [getattr(SDPBackend, _SDPA[x]) for x in names]


def attention_kernels(cfg: PlanConfig, device: torch.device):
    """The context that restricts attention to ``cfg.sdpa_backends`` (GPU only)."""
    backends = sdpa_backends(cfg.sdpa_backends)
    if backends is None or device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(backends)


def row_groups(suffix_len: torch.Tensor, max_rows: int, buckets: int) -> list[torch.Tensor]:
    """Rows of one padded forward each: with ``buckets > 1`` the rows sorted by suffix length
    and cut into that many equal parts (less padding, more forwards), each part further cut
    into forwards of at most ``max_rows`` rows (0 = no limit)."""
    n = len(suffix_len)
    if buckets <= 1 and (max_rows <= 0 or n <= max_rows):
        return [torch.arange(n)]
    order = torch.argsort(suffix_len, stable=True) if buckets > 1 else torch.arange(n)
    groups = []
    for part in order.tensor_split(max(1, min(buckets, n))):
        groups.extend(part.split(max_rows) if max_rows > 0 else [part])
    return [g for g in groups if len(g)]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: the indices of ``lengths`` grouped into bins whose
    lengths sum to at most ``capacity`` (every length must be ``<= capacity``). Deterministic;
    ``O(n * capacity)``. Used to lay short suffixes end to end in shared rows."""
    if any(x > capacity for x in lengths):
        raise ValueError(f"a length exceeds the capacity {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[list[int]] = [[] for _ in range(capacity + 1)]  # free[c]: bins with c slots left
    bins: list[list[int]] = []
    left: list[int] = []
    for i in order:
        need = lengths[i]
        b = -1
        for c in range(need, capacity + 1):  # the fullest bin it fits in
            if free[c]:
                b = free[c].pop()
                break
        if b < 0:
            b = len(bins)
            bins.append([])
            left.append(capacity)
        bins[b].append(i)
        left[b] -= need
        free[left[b]].append(b)
    return bins


@dataclass
class Layout:
    """Rows re-laid so every row's first read position sits in column ``width``: the columns
    before it (left-padded) are the *prefix*, computed once; the columns from it on the *suffix*,
    the only part a residual vector can change (attention is causal and every delta sits at or
    after the split). ``shift[r]`` maps an original position ``p`` of row ``r`` to ``p - shift[r]``
    in suffix coordinates."""

    ids: torch.Tensor  # (rows, width + suffix) left/right padded
    mask: torch.Tensor
    position_ids: torch.Tensor
    width: int  # prefix columns
    split: torch.Tensor  # (rows,) original position of each row's first suffix token
    suffix_len: torch.Tensor  # (rows,) suffix tokens a forward must run (up to the last one read)


def layout_rows(enc: Encoded, split: torch.Tensor, end: torch.Tensor | None = None) -> Layout:
    """``end[r]``: one past the last position of row ``r`` whose output is read (default: the
    row's length); later tokens are kept (as labels) but never run."""
    n, _ = enc.input_ids.shape
    lengths = enc.attention_mask.sum(1)
    width = int(split.max()) if n else 0
    suffix_len = (lengths if end is None else torch.minimum(end, lengths)) - split
    total = width + int((lengths - split).max())
    ids = torch.zeros((n, total), dtype=torch.long)  # padding slots are masked: any id will do
    mask = torch.zeros((n, total), dtype=torch.long)
    pos = torch.zeros((n, total), dtype=torch.long)
    for r in range(n):
        sh = width - int(split[r])
        L = int(lengths[r])
        ids[r, sh : sh + L] = enc.input_ids[r, :L]
        mask[r, sh : sh + L] = 1
        pos[r, sh : sh + L] = torch.arange(L)
    return Layout(ids, mask, pos, width, split, suffix_len)


@torch.no_grad()
def prefix_kv(
    adapter: ModelAdapter, lay: Layout, groups: list[torch.Tensor], z_layer: int | None = None, add=None
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Keys and values of every layer at the prefix columns of all rows (one no-grad pass per
    row group), with left-padding slots zeroed so nothing undefined can leak into attention.
    ``add = (rows, columns, vectors)``: fixed vectors added to block ``z_layer``'s output at
    those prefix columns (earlier chunks' deltas in autoregressive editing)."""
    if lay.width == 0:
        return None
    model = adapter.model
    device = next(model.parameters()).device
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    n_rows = lay.ids.shape[0]
    for rows in groups:
        mask = lay.mask[rows, : lay.width].to(device)
        hook = contextlib.nullcontext()
        if add is not None and len(add[0]):
            local = torch.full((n_rows,), -1, dtype=torch.long)
            local[rows] = torch.arange(len(rows))
            sel = local[add[0]] >= 0
            if bool(sel.any()):
                hook = adapter.add_at_positions(z_layer, local[add[0][sel]].to(device), add[1][sel].to(device),
                                                add[2][sel.to(add[2].device)])
        body_head = adapter.body_and_head()
        run, extra = (body_head[0], {}) if body_head is not None else \
            (model, {"logits_to_keep": 1} if supports_logits_to_keep(model) else {})  # no LM head over the prefix
        with hook:
            out = run(
                input_ids=lay.ids[rows, : lay.width].to(device),
                attention_mask=mask,
                position_ids=lay.position_ids[rows, : lay.width].to(device),
                use_cache=True,
                **extra,
            )
        cache = getattr(out, "cache", None)
        cache = cache if cache is not None else out.past_key_values
        keep = mask.bool()[:, None, :, None]
        layer_kv = [(torch.where(keep, k, 0), torch.where(keep, v, 0)) for k, v in cache_layers(cache)]
        if not all(bool(torch.isfinite(k).all() and torch.isfinite(v).all()) for k, v in layer_kv):
            raise FloatingPointError(
                "the prefix key/value cache has non-finite values (the attention kernel mishandles "
                "left padding?); set residual.prefix_cache: false"
            )
        parts.append(layer_kv)
    if len(parts) == 1 and len(groups[0]) == n_rows and bool((groups[0] == torch.arange(n_rows)).all()):
        return parts[0]
    # scatter the groups' rows back to row order (rows outside every group stay zero)
    out = []
    for i in range(len(parts[0])):
        k0, v0 = parts[0][i]
        k = torch.zeros((n_rows, *k0.shape[1:]), dtype=k0.dtype, device=k0.device)
        v = torch.zeros((n_rows, *v0.shape[1:]), dtype=v0.dtype, device=v0.device)
        for rows, part in zip(groups, parts):
            k[rows.to(device)] = part[i][0]
            v[rows.to(device)] = part[i][1]
        out.append((k, v))
    return out


@torch.no_grad()
def lower_outputs(
    adapter: ModelAdapter, lay: Layout, kv, groups: list[torch.Tensor], z_layer: int, cache_kw: str | None
) -> tuple[torch.Tensor, int]:
    """Block ``z_layer``'s output at every suffix column of every row (no delta: nothing up to
    that block depends on one), and the block's output structure (see ``ModelAdapter.trace``)."""
    model = adapter.model
    device = next(model.parameters()).device
    W = lay.width
    S = int(lay.suffix_len.max())
    out: torch.Tensor | None = None
    tuple_len = 0
    for rows in groups:
        d_rows = rows.to(device)
        kw = {}
        if kv is not None:
            kw = {cache_kw: make_cache(model, [(k[d_rows], v[d_rows]) for k, v in kv]),
                  "position_ids": lay.position_ids[rows, W : W + S].to(device), "use_cache": True}
        with adapter.trace(output_layers=[z_layer], stop_after=z_layer) as rec:
            adapter.forward(lay.ids[rows, W : W + S].to(device), lay.mask[rows, : W + S].to(device), **kw)
        h = rec["outputs"][z_layer]
        tuple_len = rec["tuple_len"][z_layer]
        if out is None:
            out = torch.zeros(lay.ids.shape[0], S, h.shape[-1], dtype=h.dtype, device=device)
        out[d_rows] = h
    return out, tuple_len


class PhasePlan:
    """The forwards of one optimization phase: the ``train`` chunks' vectors are optimized, the
    ``frozen`` chunks' vectors ``fixed`` (added at their anchors, no gradient), every other chunk
    left out. Everything but the vectors is prepared here once: the rows and the positions the
    losses read, the cached prefix keys and values, the lower blocks' outputs, the packing.

    Attributes read by the objective: ``n`` (chunks), ``fixed``, ``t_weight`` (each target
    token's weight in its chunk's mean NLL), ``kl_rows_all`` (the KL rows of optimized chunks),
    ``row_of`` / ``chunk_of`` (which chunk keeps which row running)."""

    def __init__(self, adapter: ModelAdapter, batch, z_layer: int, cfg: PlanConfig, kl: bool, train: torch.Tensor,
                 frozen: torch.Tensor | None, fixed: torch.Tensor | None, d_model: int, lockstep: Lockstep | None = None):
        model = adapter.model
        device = next(model.parameters()).device
        n = batch.n_chunks
        frozen = torch.zeros(n, dtype=torch.bool) if frozen is None else frozen
        fixed = torch.zeros(n, d_model, device=device) if fixed is None else fixed.detach()

        a_rows, a_pos, a_chunk = batch.anchors()
        keep_a = train[a_chunk] | frozen[a_chunk]
        a_rows, a_pos, a_chunk = a_rows[keep_a], a_pos[keep_a], a_chunk[keep_a]
        a_train = train[a_chunk]
        t_rows, t_pos, t_chunk = batch.target_chunks()
        keep_t = train[t_chunk]
        t_rows, t_pos, t_chunk = t_rows[keep_t], t_pos[keep_t], t_chunk[keep_t]
        n_rows = batch.enc.input_ids.shape[0]
        # target NLL: per (row, chunk) mean over its tokens, per chunk mean over the rows holding it
        pair = t_rows * n + t_chunk
        pair_u, pair_inv, pair_count = pair.unique(return_inverse=True, return_counts=True)
        rows_per_chunk = torch.bincount(pair_u % n, minlength=n).clamp_min(1).float()
        t_weight = (1.0 / pair_count[pair_inv].float() / rows_per_chunk[t_chunk]).to(device)
        kl_rows_all = torch.nonzero(batch.is_kl & train[batch.row_chunk]).flatten() if kl else torch.zeros(0, dtype=torch.long)
        kl_slot = torch.full((n_rows,), -1, dtype=torch.long)  # KL row -> its row of kl_init
        kl_slot[kl_rows_all] = torch.arange(len(kl_rows_all))
        keep_kw = supports_logits_to_keep(model)
        cache_kw = prefix_cache_kwarg(model) if cfg.prefix_cache else None
        body_head = adapter.body_and_head()
        if body_head is not None and cache_kw is not None and prefix_cache_kwarg(body_head[0]) != cache_kw:
            body_head = None  # the body names its cache differently: keep to the whole model

        # the rows this phase runs: those with targets (or a KL term) of an optimized chunk
        in_phase = torch.zeros(n_rows, dtype=torch.bool)
        in_phase[t_rows] = True
        in_phase[kl_rows_all] = True
        big = torch.iinfo(torch.long).max
        kl_pos = batch.enc.anchor_pos[:, 0]
        # where each row's suffix starts: its first optimized anchor, or an earlier position read
        if cache_kw is not None:
            split = torch.full((n_rows,), big, dtype=torch.long)
            split = split.scatter_reduce(0, a_rows[a_train], a_pos[a_train], reduce="amin")
            split = split.scatter_reduce(0, t_rows, t_pos - 1, reduce="amin")
            split[kl_rows_all] = torch.minimum(split[kl_rows_all], kl_pos[kl_rows_all])
            split = torch.where(split == big, torch.zeros_like(split), split).clamp_min(0)
        else:
            split = torch.zeros(n_rows, dtype=torch.long)
        # one past the last position a loss or an optimized delta reads: later tokens never run
        end = torch.zeros(n_rows, dtype=torch.long)
        end = end.scatter_reduce(0, a_rows[a_train], a_pos[a_train] + 1, reduce="amax")
        end = end.scatter_reduce(0, t_rows, t_pos, reduce="amax")  # predicted at t_pos - 1
        end[kl_rows_all] = torch.maximum(end[kl_rows_all], kl_pos[kl_rows_all] + 1)
        end = torch.maximum(end, split + 1)
        if lockstep is not None and cache_kw is not None and not lockstep.all(bool((split > 0).any())):
            # some process has no prefix to cache (it would run no prefix forward): none caches
            cache_kw, split = None, torch.zeros(n_rows, dtype=torch.long)
            end = torch.maximum(end, split + 1)
        lay = layout_rows(batch.enc, split, end)
        groups = [g[in_phase[g]] for g in row_groups(lay.suffix_len, cfg.max_rows_per_forward, cfg.length_buckets)]
        groups = [g for g in groups if len(g)]
        run_groups = groups  # under lockstep, as many prefix / lower forwards as the process with the most
        if lockstep is not None and (cache_kw is not None or cfg.skip_lower_blocks):
            run_groups = groups + [groups[0]] * (lockstep.count(len(groups)) - len(groups))
        W = lay.width
        # frozen deltas before the split act inside the cached prefix; the rest in every step
        in_prefix = (~a_train) & (a_pos < split[a_rows])
        pre_add = (a_rows[in_prefix], a_pos[in_prefix] - split[a_rows[in_prefix]] + W, fixed[a_chunk[in_prefix].to(device)])
        a_rows, a_pos, a_chunk, a_train = a_rows[~in_prefix], a_pos[~in_prefix], a_chunk[~in_prefix], a_train[~in_prefix]
        kv = prefix_kv(adapter, lay, run_groups, z_layer, pre_add) if cache_kw is not None else None
        lower = lower_outputs(adapter, lay, kv, run_groups, z_layer, cache_kw) if cfg.skip_lower_blocks else None
        a_suf = a_pos - split[a_rows]  # positions in suffix coordinates
        t_suf = t_pos - split[t_rows]
        kl_suf = kl_pos - split
        # a row runs while any optimized chunk it holds is still optimizing
        row_of = torch.cat([t_rows, kl_rows_all])
        chunk_of = torch.cat([t_chunk, batch.row_chunk[kl_rows_all]])

        plans: dict[int, tuple[torch.Tensor, list[SimpleNamespace]]] = {}
        mcfg = getattr(model, "config", None)
        heads = int(getattr(mcfg, "num_attention_heads", None) or getattr(mcfg, "n_head", None) or 1)
        # packed rows: one forward over all rows of the phase, suffixes laid end to end
        pack = cfg.pack_rows and supports_packed_rows(model)
        step_groups = [torch.cat(groups).sort().values] if pack and groups else groups
        mask_dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)

        for name, value in {"adapter": adapter, "model": model, "device": device, "n": n, "n_rows": n_rows, "batch": batch, "cfg": cfg, "z_layer": z_layer, "train": train, "frozen": frozen, "fixed": fixed, "a_rows": a_rows, "a_pos": a_pos, "a_chunk": a_chunk, "a_train": a_train, "a_suf": a_suf, "t_rows": t_rows, "t_pos": t_pos, "t_chunk": t_chunk, "t_suf": t_suf, "t_weight": t_weight, "kl_rows_all": kl_rows_all, "kl_slot": kl_slot, "kl_suf": kl_suf, "keep_kw": keep_kw, "cache_kw": cache_kw, "body_head": body_head, "split": split, "lay": lay, "groups": groups, "W": W, "kv": kv, "lower": lower, "row_of": row_of, "chunk_of": chunk_of, "plans": plans, "heads": heads, "pack": pack, "step_groups": step_groups, "mask_dtype": mask_dtype}.items():
            setattr(self, name, value)

    def _loss_fields(self, row_of: torch.Tensor, off_of: torch.Tensor) -> dict:
        """The device tensors every forward's deltas and losses read, given where each original
        row sits in the forward's input: row ``row_of[r]`` (-1: not in it), from column
        ``off_of[r]`` on (its suffix coordinates shifted). Shared by padded and packed forwards."""
        sel_a, sel_t = row_of[self.a_rows] >= 0, row_of[self.t_rows] >= 0
        tr, tp = row_of[self.t_rows[sel_t]], off_of[self.t_rows[sel_t]] + self.t_suf[sel_t]
        kl_rows = self.kl_rows_all[row_of[self.kl_rows_all] >= 0]
        kr, kp = row_of[kl_rows], off_of[kl_rows] + self.kl_suf[kl_rows]
        # the LM head and softmax only where a loss reads them: at the (row, position) pairs
        # (body + head split), else at the positions any row reads (``logits_to_keep``)
        need = torch.cat([tp - 1, kp]).unique()
        d_need = need.to(self.device)
        by_column = self.keep_kw and self.body_head is None
        return dict(
            kw={"logits_to_keep": d_need} if by_column else {},
            ar=row_of[self.a_rows[sel_a]].to(self.device), ap=(off_of[self.a_rows[sel_a]] + self.a_suf[sel_a]).to(self.device),
            vec_chunk=self.a_chunk[sel_a].to(self.device), a_train=self.a_train[sel_a].to(self.device).unsqueeze(1),
            tr=tr.to(self.device), tp=tp.to(self.device), t_label=self.lay.ids[self.t_rows[sel_t], self.W + self.t_suf[sel_t]].to(self.device),
            t_chunk=self.t_chunk[sel_t].to(self.device), t_weight=self.t_weight[sel_t.to(self.t_weight.device)],
            kl_rows=kl_rows, kr=kr.to(self.device), kp=kp.to(self.device),
            kl_slots=self.kl_slot[kl_rows].to(self.device), kl_chunk=self.batch.row_chunk[kl_rows].to(self.device),
            col=(lambda p: torch.searchsorted(d_need, p)) if by_column else (lambda p: p),
        )

    def _group_plan(self, rows: torch.Tensor) -> SimpleNamespace:
        """The device tensors of one padded row group's forward and loss (all but the deltas)."""
        local = torch.full((self.n_rows,), -1, dtype=torch.long)
        local[rows] = torch.arange(len(rows))
        fields = self._loss_fields(local, torch.zeros(self.n_rows, dtype=torch.long))
        width = int(self.lay.suffix_len[rows].max())  # right padding: trim the tail
        d_rows = rows.to(self.device)
        if self.kv is not None:
            fields["kw"]["position_ids"] = self.lay.position_ids[rows, self.W : self.W + width].to(self.device)
        score_mb = len(rows) * self.heads * width * (self.W + width) * 4 / 2**20
        return SimpleNamespace(
            attention="eager" if score_mb <= self.cfg.eager_attention_mb else None,
            ids=self.lay.ids[rows, self.W : self.W + width].to(self.device),
            mask=self.lay.mask[rows, : self.W + width].to(self.device),
            kv=[(k[d_rows], v[d_rows]) for k, v in self.kv] if self.kv is not None else None,
            lower=self.lower[0][d_rows, :width] if self.lower is not None else None,
            **fields,
        )

    def _packed_units(self, rows: torch.Tensor) -> list[SimpleNamespace]:
        """``rows``' suffixes packed end to end (:func:`pack_rows`) into rows as long as the
        longest suffix (or up to twice that); each packed row's keys are its segments' cached
        prefixes, then its suffix columns; a 4-D mask lets a token see only its own segment (prefix + causal
        suffix). Split into equal forwards of at most ``max_tokens_per_forward`` slots and
        ``max_rows_per_forward`` packed rows."""
        lens = self.lay.suffix_len[rows].tolist()
        # the row length: the longest suffix or a little more, whichever leaves the fewest
        # empty slots (short suffixes then fill the gaps); ties go to the shorter row
        longest = max(lens)
        packings = [(pack_rows(lens, c), c) for c in sorted({longest, -(-5 * longest // 4), -(-3 * longest // 2), 2 * longest})]
        bins, cap = min(packings, key=lambda bc: (len(bc[0]) * bc[1], bc[1]))
        parts = 1
        if self.cfg.max_tokens_per_forward > 0:
            parts = max(parts, -(-len(bins) * cap // self.cfg.max_tokens_per_forward))
        if self.cfg.max_rows_per_forward > 0:
            parts = max(parts, -(-len(bins) // self.cfg.max_rows_per_forward))
        parts = min(parts, len(bins))
        size, extra = divmod(len(bins), parts)  # equal parts (the first ``extra`` one bin longer)
        units, b0 = [], 0
        for i in range(parts):
            b1 = b0 + size + (1 if i < extra else 0)
            units.append(self._packed_unit([[int(rows[j]) for j in b] for b in bins[b0:b1]], cap))
            b0 = b1
        return units

    def _packed_unit(self, bins: list[list[int]], cap: int) -> SimpleNamespace:
        nb = len(bins)
        seg = torch.tensor([r for b in bins for r in b], dtype=torch.long)  # original row per segment
        seg_bin = torch.tensor([i for i, b in enumerate(bins) for _ in b], dtype=torch.long)
        slen = self.lay.suffix_len[seg]
        plen = self.split[seg] if self.kv is not None else torch.zeros_like(seg)
        # offsets of each segment inside its packed row (suffix columns, prefix key columns)
        first = torch.ones(len(seg), dtype=torch.bool)
        first[1:] = seg_bin[1:] != seg_bin[:-1]

        def offsets(x: torch.Tensor) -> torch.Tensor:
            c = torch.cumsum(x, 0) - x
            start = c[first]  # cumulative value at each bin's first segment
            return c - start[torch.cumsum(first.long(), 0) - 1]

        q_off, k_off = offsets(slen), offsets(plen)
        wp = int((k_off + plen).max()) if self.kv is not None else 0
        # one entry per suffix token: its segment, packed (row, column), original suffix index
        tok_seg = torch.repeat_interleave(torch.arange(len(seg)), slen)
        j = torch.arange(len(tok_seg)) - torch.repeat_interleave(torch.cumsum(slen, 0) - slen, slen)
        qb, qc = seg_bin[tok_seg], q_off[tok_seg] + j
        src = seg[tok_seg]
        ids = torch.zeros(nb, cap, dtype=torch.long)
        ids[qb, qc] = self.lay.ids[src, self.W + j]
        pos = torch.zeros(nb, cap, dtype=torch.long)
        pos[qb, qc] = self.lay.position_ids[src, self.W + j]
        q_seg = torch.full((nb, cap), -1, dtype=torch.long)
        q_seg[qb, qc] = tok_seg
        k_seg = torch.full((nb, wp), -2, dtype=torch.long)  # -2: an empty prefix slot, nobody's
        pk_seg = torch.repeat_interleave(torch.arange(len(seg)), plen)
        pk_j = torch.arange(len(pk_seg)) - torch.repeat_interleave(torch.cumsum(plen, 0) - plen, plen)
        kb, kc = seg_bin[pk_seg], k_off[pk_seg] + pk_j
        k_seg[kb, kc] = pk_seg
        col = torch.arange(cap)
        causal = col[None, :] <= col[:, None]  # (query, key) within the suffix
        allowed = torch.cat([q_seg[:, :, None] == k_seg[:, None, :],
                             (q_seg[:, :, None] == q_seg[:, None, :]) & causal[None]], dim=2)  # padding sees itself
        d_kb, d_kc = kb.to(self.device), kc.to(self.device)
        d_pr, d_pc = seg[pk_seg].to(self.device), (self.W - plen[pk_seg] + pk_j).to(self.device)
        packed_kv = None
        if self.kv is not None:
            packed_kv = []
            for li, (k, v) in enumerate(self.kv):
                if self.lower is not None and li <= self.z_layer:  # skipped blocks never read their cache
                    packed_kv.append((k[:nb, :, :0], v[:nb, :, :0]))
                    continue
                pk = k.new_zeros(nb, k.shape[1], wp, k.shape[3])
                pv = v.new_zeros(nb, v.shape[1], wp, v.shape[3])
                pk[d_kb, :, d_kc] = k[d_pr, :, d_pc]
                pv[d_kb, :, d_kc] = v[d_pr, :, d_pc]
                packed_kv.append((pk, pv))
        packed_lower = None
        if self.lower is not None:
            packed_lower = self.lower[0].new_zeros(nb, cap, self.lower[0].shape[-1])
            packed_lower[qb.to(self.device), qc.to(self.device)] = self.lower[0][src.to(self.device), j.to(self.device)]
        # original row -> (packed row, column offset)
        bin_of = torch.full((self.n_rows,), -1, dtype=torch.long)
        off_of = torch.zeros(self.n_rows, dtype=torch.long)
        bin_of[seg], off_of[seg] = seg_bin, q_off
        fields = self._loss_fields(bin_of, off_of)
        fields["kw"]["position_ids"] = pos.to(self.device)
        score_mb = nb * self.heads * cap * (wp + cap) * 4 / 2**20
        return SimpleNamespace(
            attention="eager" if score_mb <= self.cfg.packed_eager_attention_mb else None,
            ids=ids.to(self.device),
            mask=additive_mask(allowed[:, None].to(self.device), self.mask_dtype),
            kv=packed_kv,
            lower=packed_lower,
            **fields,
        )

    def rows_running(self, active: torch.Tensor) -> torch.Tensor:
        """``(rows,)`` bool: the rows that hold a chunk still optimizing (``active``, CPU)."""
        row_active = torch.zeros(self.n_rows, dtype=torch.bool)
        row_active[self.row_of[active[self.chunk_of]]] = True
        return row_active

    def units(self, row_active: torch.Tensor) -> Iterator[SimpleNamespace]:
        """The prepared forwards over the running rows, in order (prepared once per row set:
        converged chunks cost nothing more)."""
        for gi, rows in enumerate(self.step_groups):
            rows = rows[row_active[rows]]
            if len(rows) == 0:
                continue
            cached = self.plans.get(gi)
            if cached is None or not torch.equal(cached[0], rows):
                cached = self.plans[gi] = (rows, self._packed_units(rows) if self.pack else [self._group_plan(rows)])
            yield from cached[1]

    def forward(self, unit: SimpleNamespace, vecs: torch.Tensor):
        """Run ``unit`` with ``vecs`` added to block ``z_layer``'s output at its anchors; returns
        ``logits_at(rows, positions)``, the logits where a loss reads them (with gradients)."""
        kw = dict(unit.kw)
        if self.kv is not None:
            kw[self.cache_kw] = make_cache(self.model, unit.kv)
        skip = contextlib.nullcontext()
        if self.lower is not None:
            skip = self.adapter.skip_blocks(self.z_layer, unit.lower, self.lower[1])
        with torch.enable_grad(), skip, self.adapter.attention_implementation(unit.attention), \
                self.adapter.add_at_positions(self.z_layer, unit.ar, unit.ap, vecs):
            if self.body_head is not None:
                hidden = self.body_head[0](input_ids=unit.ids, attention_mask=unit.mask, use_cache=self.kv is not None,
                                           **kw).last_hidden_state
                return lambda r, p: self.body_head[1](hidden[r, p])
            logits = self.model(input_ids=unit.ids, attention_mask=unit.mask, use_cache=self.kv is not None, **kw).logits
            return lambda r, p: logits[r, unit.col(p)]
