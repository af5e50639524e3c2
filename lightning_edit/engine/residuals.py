"""Target residual vectors z: what the last edit layer's output should be at each anchor.

For every *chunk* (a single fact is one chunk) a free vector ``delta`` is added to the output
of decoder block ``z_layer`` at the chunk's anchor token and optimized with Adam so the
frozen model assigns high likelihood to the chunk's target tokens (MEMIT's ``compute_z``):

    loss_c = mean_{rows r of c} mean_{target tokens} NLL
           + kl_factor * KL(p_now || p_init) at the anchor of "{subject} is a"
           + weight_decay * ||delta_c|| / ||z0_c||^2

with ``||delta_c||`` clamped to ``clamp_norm_factor * ||z0_c||`` after each step and per-chunk
early stopping once ``loss_c < early_stop_loss``. All chunks of a batch are optimized together:
one forward per step over every row's suffix, packed end to end (or padded rows; optionally split
into micro-batches with gradient accumulation), no Python loop over requests. Because the loss
is a sum of per-chunk terms and Adam is element-wise, this equals optimizing each request alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_edit.data.requests import EditRequest, target_text
from lightning_edit.engine.arch import (
    ModelAdapter,
    additive_mask,
    cache_layers,
    make_cache,
    prefix_cache_kwarg,
    supports_logits_to_keep,
    supports_packed_rows,
)
from lightning_edit.engine.tokens import Encoded, Segment, encode_segments, flatten_targets
from lightning_edit.errors import InputError

AnchorRule = Literal["subject_last", "prompt_last"]
# progress of the optimization: (Adam steps done, steps at most, per-chunk loss on the device
# (not synchronized: read it sparingly), chunks optimized in the current phase (CPU bool))
OnStep = Callable[[int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class ResidualConfig:
    """Hyper-parameters of the residual-vector optimization (reference defaults).

    Args:
        lr: Adam learning rate (``v_lr``: 0.5; 0.1 for Llama-3-8B).
        steps: maximum Adam steps (``v_num_grad_steps``).
        weight_decay: ``v_weight_decay`` on ``||delta|| / ||z0||^2``.
        clamp_norm_factor: ``||delta|| <= clamp_norm_factor * ||z0||``.
        kl_factor: weight of the KL term on ``"{subject} is a"`` (0 disables it).
        early_stop_loss: a chunk stops once its loss is below this.
        anchor: ``subject_last`` (the papers) or ``prompt_last`` (the token that predicts the
            target; where small models look facts up).
        max_rows_per_forward: split the padded batch into micro-batches of at most this many
            rows (packed rows with ``pack_rows``; gradients accumulate); bounds activation
            memory on big models. 0 = no split.
        prefix_cache: run the tokens before each row's anchor once per batch (their states
            cannot depend on the residual vectors) and only the rest in every step. Same
            result up to rounding; off runs every step on the whole sequence.
        skip_lower_blocks: compute the blocks up to ``z_layer`` once per batch (their states do
            not depend on the residual vectors) and run only the blocks above in every step.
        length_buckets: sort rows by the length of the part each step runs and split them into
            this many forwards (less padding, more forwards per step). 3 measured best of 1-4 on
            the Llama-3-8B shape on an H200 (benchmarks/results/run3_*).
        mode: for requests of several chunks (long-form editing): ``joint`` optimizes all
            chunks together, ``autoregressive`` chunk after chunk with the earlier chunks'
            deltas fixed (AnyEdit's reference). Single facts are one chunk: both are the same.
        sdpa_backends: on a GPU, the scaled-dot-product-attention kernels the optimization's
            forwards may use, comma-separated (``efficient``, ``flash``, ``cudnn``, ``math``);
            ``auto`` lets torch choose. Its forwards are many short rows attending to a cached
            prefix through a padding mask, a shape where the kernels differ a lot
            (``benchmarks/bench_scale.py --attn-sweep``). Ignored on the CPU.
        eager_attention_mb: a padded forward (``pack_rows`` off or unsupported) whose attention
            scores take at most this many MB per layer (rows x heads x queries x keys x 4 bytes)
            runs with transformers' eager
            attention, the rest with SDPA. The short rows of fact editing are fastest eager
            (Llama-3-8B shape, H200: 8.8 s per 100 edits vs 9.9-11.8 s with SDPA kernels, which
            also plan anew for every new shape); long answers would materialize big score
            matrices, so they keep SDPA. 0 = always SDPA.
        pack_rows: every step runs the rows' suffixes packed end to end into rows as long as
            the longest one or a little longer (several short sequences per row, each attending
            only to its own cached prefix and to itself through a 4-D attention mask), instead of
            ``length_buckets`` padded forwards. Fewer token slots (no padding) and bigger
            matrix products. Used where the model passes :func:`arch.supports_packed_rows`'s
            check; same result up to rounding.
        packed_eager_attention_mb: ``eager_attention_mb`` for packed forwards. Their 4-D mask
            is fastest with SDPA (Llama-3-8B shape, H200: z 6.46 s per 100 edits vs 9.16 s
            eager, benchmarks/results/run6_*), so 0 = always SDPA.
        max_tokens_per_forward: packed rows are split into equal forwards of at most this many
            token slots (packed rows x row length; ``max_rows_per_forward`` then caps the packed
            rows of each). A whole 100-edit batch (~3,000 slots) in one forward holds all its
            activations for the backward at once: on an H200, GPT-J shape, z peak 62 GB in one
            forward vs 38 GB in forwards of ~1,600 slots, and faster (5.94 vs 6.61 s;
            benchmarks/results/run9_*). 0 = no limit.
        warn_nll: after the optimization, warn (:class:`UnconvergedEditWarning`, once per batch)
            naming the requests whose target NLL (mean per token, ``ResidualResult.nll``) is
            still above this: their edits may not take. The default ``ln 2``: above it the
            target's mean token probability is under 1/2, so it need not be the most likely
            answer even at ``z`` (requests that ``mpes`` stopped are known to be, and are not
            named). 0 = never warn. Reporting only: the optimization is unchanged.
        mpes: most-probable early stopping (MPES, from ENCORE: Gupta et al. 2025, "Lifelong
            Knowledge Editing requires Better Regularization"). A chunk also stops at the
            ``mpes``-th step at which its new target is the most probable answer on every one of
            its rewrite rows (the bare prompt and each context-prefixed one): teacher-forced, at
            every target token position the target token has the largest logit (``argmax``) of the
            vocabulary. Steps are counted as the reference counts them, not necessarily in a row;
            the chunk keeps the vector that passed the check (checked before the step, like
            ``early_stop_loss``, which stays in force). 0 = off; 1 = the paper's rule (stop at the
            first such step); the reference's ENCORE configs use 2 (Llama-3-8B) and 4 (GPT2-XL).
        nas: norm-anchor scaling (NAS, "Norm Anchors Make Model Edits Last", 2026). After the
            optimization, each chunk's target MLP output ``v* = v0 + delta`` at block ``z_layer``
            (``v0``: that block's MLP output at the anchor, bare prompt) is rescaled to the norm
            anchor ``a``, the mean ``||v*||`` the same optimization reaches on the unedited model
            (``nas_samples`` requests of the stream; the top 5% dropped):
            ``z = z0 - v0 + v* a / ||v*||``; a chunk with ``||v*|| > nas_max_ratio * a`` is not
            edited (``z = z0``). Single-fact requests only; architectures whose block adds its MLP
            output to the residual stream unnormalized (not Gemma 2/3, OLMo 2, post-LN OPT).
        nas_samples: requests of the stream (a seeded sample; all when fewer) whose residual
            vectors, optimized on the unedited model before the first edit, give the norm anchor
            (the reference: 1,000 CounterFact requests). The anchor goes into checkpoints.
        nas_max_ratio: a chunk whose ``||v*||`` exceeds this many times the anchor is left
            unedited (the reference: 2). 0 = never.
        nas_anchor: the norm anchor itself; > 0 skips the calibration (e.g. a value an earlier
            run logged as ``z/nas_anchor``). 0 = calibrate.
    """

    lr: float = 0.5
    steps: int = 20
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    anchor: AnchorRule = "subject_last"
    max_rows_per_forward: int = 0
    prefix_cache: bool = True
    skip_lower_blocks: bool = True
    length_buckets: int = 3
    mode: Literal["joint", "autoregressive"] = "joint"
    sdpa_backends: str = "auto"
    eager_attention_mb: float = 64.0
    pack_rows: bool = True
    packed_eager_attention_mb: float = 0.0
    max_tokens_per_forward: int = 2048
    warn_nll: float = 0.693
    mpes: int = 0
    nas: bool = False
    nas_samples: int = 1000
    nas_max_ratio: float = 2.0
    nas_anchor: float = 0.0

    def __post_init__(self):
        if self.anchor not in ("subject_last", "prompt_last"):
            raise InputError(f"anchor must be 'subject_last' or 'prompt_last', got {self.anchor!r}")
        if self.steps < 1 or self.lr <= 0:
            raise InputError("steps must be >= 1 and lr > 0")
        if self.mode not in ("joint", "autoregressive"):
            raise InputError(f"mode must be 'joint' or 'autoregressive', got {self.mode!r}")
        _sdpa_backends(self.sdpa_backends)  # names checked before any work
        if self.max_tokens_per_forward < 0 or self.max_rows_per_forward < 0:
            raise InputError("max_tokens_per_forward and max_rows_per_forward must be >= 0 (0 = no limit)")
        if self.warn_nll < 0:
            raise InputError(f"warn_nll must be >= 0 (0 = never warn), got {self.warn_nll}")
        if isinstance(self.mpes, bool) or self.mpes < 0:
            raise InputError(f"mpes must be an integer >= 0 (0 = off, 1 = stop at the first most-probable step), got {self.mpes!r}")
        if self.nas_samples < 1 or self.nas_max_ratio < 0 or self.nas_anchor < 0:
            raise InputError(f"nas_samples must be >= 1, nas_max_ratio and nas_anchor >= 0; got {self.nas_samples}, "
                             f"{self.nas_max_ratio}, {self.nas_anchor}")


class UnconvergedEditWarning(UserWarning):
    """Requests whose residual optimization ended with a high target loss: their edits may not take."""


def unconverged_requests(res: "ResidualResult", batch: "ResidualBatch", threshold: float) -> list[tuple[int, float]]:
    """``[(request index, its NLL)]`` of the requests whose final target NLL (the largest of
    their chunks' for long-form requests) is above ``threshold`` (one device -> host copy).
    Chunks that MPES stopped do not count: their target is the most probable answer already."""
    if threshold <= 0 or res.nll.numel() == 0:
        return []
    nll = res.nll.detach().float().cpu()
    if res.most_probable is not None:
        nll = torch.where(res.most_probable.cpu(), torch.full_like(nll, float("-inf")), nll)
    owner = batch.chunk_request.long()
    per_request = torch.full((int(owner.max()) + 1,), float("-inf")).scatter_reduce(0, owner, nll, reduce="amax")
    return [(i, float(v)) for i, v in enumerate(per_request.tolist()) if v > threshold]


_SDPA = {"efficient": "EFFICIENT_ATTENTION", "flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def _sdpa_backends(spec: str) -> list | None:
    """``auto`` -> ``None``; else the ``torch.nn.attention.SDPBackend`` members named."""
    if spec.strip() == "auto":
        return None
    from torch.nn.attention import SDPBackend

    names = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [x for x in names if x not in _SDPA]
    if bad or not names:
        raise InputError(f"sdpa_backends: unknown {bad or spec!r}; use 'auto' or a comma list of {sorted(_SDPA)}")
    return [getattr(SDPBackend, _SDPA[x]) for x in names]


def _attention_kernels(cfg: ResidualConfig, device: torch.device):
    """The context that restricts attention to ``cfg.sdpa_backends`` (GPU only)."""
    backends = _sdpa_backends(cfg.sdpa_backends)
    if backends is None or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


class MultiAnchorError(ValueError):
    """Rows with several anchors but no map from anchors to chunks (each anchor must carry its
    own residual vector; a shared one is never silently used)."""


@dataclass
class ResidualBatch:
    """The encoded rows of a batch of requests.

    Single-fact rows are, per request: one per context prefix (the bare prompt first), then one
    KL row; ``row_chunk[r]`` is the chunk (request) a row belongs to; ``is_kl[r]`` marks KL rows.

    Long-form rows carry several chunks, each with its own anchor and target tokens:
    ``anchor_chunk[r, j]`` is the chunk of row ``r``'s ``j``-th anchor (and target span), -1 where
    absent; ``row_chunk[r]`` is then the row's first chunk. ``chunk_order[c]`` is the position of
    chunk ``c`` within its request (0 for single facts), ``chunk_request[c]`` its request.
    """

    enc: Encoded
    row_chunk: torch.Tensor  # (rows,)
    is_kl: torch.Tensor  # (rows,) bool
    n_chunks: int
    n_prefixes: int  # rewrite rows per request (1 bare + prefixes)
    anchor_chunk: torch.Tensor | None = None  # (rows, max_anchors)
    chunk_order: torch.Tensor | None = None  # (n_chunks,)
    chunk_request: torch.Tensor | None = None  # (n_chunks,)
    bare_row_of_chunk: torch.Tensor | None = None  # (n_chunks,)

    def __post_init__(self):
        a = self.enc.anchor_pos
        if self.anchor_chunk is None:
            multi = (a[:, 1:] >= 0).any(1) if a.shape[1] > 1 else torch.zeros(a.shape[0], dtype=torch.bool)
            if bool(multi.any()):
                r = int(multi.nonzero()[0])
                raise MultiAnchorError(
                    f"row {r} has {int((a[r] >= 0).sum())} anchors but the batch maps each row to one chunk; "
                    "give anchor_chunk (one residual vector per anchor) instead of sharing one"
                )
            self.anchor_chunk = torch.where(a >= 0, self.row_chunk.unsqueeze(1).expand_as(a), torch.full_like(a, -1))
        if self.anchor_chunk.shape != a.shape:
            raise ValueError(f"anchor_chunk has shape {tuple(self.anchor_chunk.shape)}, anchors {tuple(a.shape)}")
        if self.chunk_order is None:
            self.chunk_order = torch.zeros(self.n_chunks, dtype=torch.long)
        if self.chunk_request is None:
            self.chunk_request = torch.arange(self.n_chunks)
        if self.bare_row_of_chunk is None:
            per = self.n_prefixes + (1 if bool(self.is_kl.any()) else 0)
            self.bare_row_of_chunk = torch.arange(self.n_chunks) * per

    @property
    def rewrite_rows(self) -> torch.Tensor:
        return (~self.is_kl).nonzero().squeeze(-1)

    @property
    def bare_rows(self) -> torch.Tensor:
        """Row of each chunk's bare prompt, ``(n_chunks,)``."""
        return self.bare_row_of_chunk

    def anchors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, positions, chunk)`` of every anchor, flat ``(m,)`` each."""
        a = self.enc.anchor_pos
        valid = a >= 0
        rows = torch.arange(a.shape[0]).unsqueeze(1).expand_as(a)[valid]
        return rows, a[valid], self.anchor_chunk[valid]

    def bare_anchor_positions(self) -> torch.Tensor:
        """Position of each chunk's anchor in its bare row, ``(n_chunks,)``."""
        rows, pos, chunk = self.anchors()
        out = torch.full((self.n_chunks,), -1, dtype=torch.long)
        on_bare = rows == self.bare_row_of_chunk[chunk]
        out[chunk[on_bare]] = pos[on_bare]
        return out

    def target_chunks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, positions, chunk)`` of every target token, flat."""
        t_rows, t_pos, t_idx = flatten_targets(self.enc)
        return t_rows, t_pos, self.anchor_chunk[t_rows, t_idx]


def anchor_char(request: EditRequest, rule: AnchorRule) -> int | None:
    """Character index (in the rendered prompt) of the anchor, ``None`` = prompt's last token."""
    if rule == "prompt_last":
        return None
    return request.subject_span[1] - 1


def build_residual_batch(
    tokenizer, requests: Sequence[EditRequest], prefixes: Sequence[str], anchor: AnchorRule, kl: bool = True
) -> ResidualBatch:
    """Encode every request with the bare prompt, each context prefix, and the KL prompt."""
    segments: list[Segment] = []
    chunk, is_kl = [], []
    all_prefixes = [""] + [p for p in prefixes if p]
    for c, req in enumerate(requests):
        prompt = req.rendered_prompt
        tgt = target_text(prompt, req.target_new)
        a = anchor_char(req, anchor)
        for pre in all_prefixes:
            text = pre + prompt + tgt
            start = len(pre) + len(prompt)
            segments.append(Segment(text, [(start, len(text))], [None if a is None else len(pre) + a]))
            chunk.append(c)
            is_kl.append(False)
        if kl:
            text = f"{req.subject} is a"
            segments.append(Segment(text, (), [None if anchor == "prompt_last" else len(req.subject) - 1]))
            chunk.append(c)
            is_kl.append(True)
    enc = encode_segments(tokenizer, segments)
    return ResidualBatch(enc, torch.tensor(chunk), torch.tensor(is_kl), len(requests), len(all_prefixes))


def build_chunked_batch(
    tokenizer, items: Sequence[tuple[str, Sequence[tuple[int, int]]]], prefixes: Sequence[str] = ()
) -> ResidualBatch:
    """Long-form requests: ``items[i] = (text, spans)`` with the full text (prompt + answer) and
    the character spans of its target chunks in order. One row per request and context prefix
    (bare first); each chunk's anchor is the token before its first token, so chunk ``k`` is
    predicted from the prompt and the gold chunks before it. Chunks are numbered request by
    request; one residual vector per chunk, shared by the request's rows."""
    segments: list[Segment] = []
    row_chunk, anchor_chunk, order, request, bare = [], [], [], [], []
    all_prefixes = [""] + [p for p in prefixes if p]
    c0 = 0
    for i, (text, spans) in enumerate(items):
        if not spans:
            raise ValueError(f"long-form request {i}: no target chunks")
        k = len(spans)
        for j, pre in enumerate(all_prefixes):
            if j == 0:
                bare.extend([len(segments)] * k)
            segments.append(Segment(pre + text, [(len(pre) + s, len(pre) + e) for s, e in spans], [None] * k))
            row_chunk.append(c0)
            anchor_chunk.append(list(range(c0, c0 + k)))
        order.extend(range(k))
        request.extend([i] * k)
        c0 += k
    enc = encode_segments(tokenizer, segments)
    A = enc.anchor_pos.shape[1]
    ac = torch.full((len(segments), A), -1, dtype=torch.long)
    for r, cs in enumerate(anchor_chunk):
        ac[r, : len(cs)] = torch.tensor(cs)
    return ResidualBatch(enc, torch.tensor(row_chunk), torch.zeros(len(segments), dtype=torch.bool), c0, len(all_prefixes),
                         anchor_chunk=ac, chunk_order=torch.tensor(order), chunk_request=torch.tensor(request),
                         bare_row_of_chunk=torch.tensor(bare))


@torch.no_grad()
def block_outputs_at_anchors(adapter: ModelAdapter, batch: ResidualBatch, layer: int, values: bool = False):
    """Block ``layer``'s output at each chunk's anchor in its bare row: ``(n_chunks, d_model)``.
    One forward over the bare rows, stopped after that block. ``values``: also return the
    block's MLP output (its down projection's, bias included) there, from the same forward:
    ``(z0, v0)``."""
    device = next(adapter.model.parameters()).device
    rows = batch.bare_row_of_chunk
    uniq, inv = rows.unique(return_inverse=True)
    pos = batch.bare_anchor_positions()
    width = int(pos.max()) + 1
    ids = batch.enc.input_ids[uniq, :width].to(device)
    mask = batch.enc.attention_mask[uniq, :width].to(device)
    with adapter.trace(output_layers=[layer], stop_after=layer, value_layers=[layer] if values else ()) as rec:
        adapter.forward(ids, mask)
    at = (inv.to(device), pos.to(device))
    z0 = rec["outputs"][layer][at].float()
    return (z0, rec["values"][layer][at].float()) if values else z0


# ---- NAS: norm-anchor scaling of the target MLP outputs --------------------------------------

NAS_TRIM = 0.05  # the share of the largest calibration norms dropped (the reference's 0.95 quantile)
_POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")


def check_nas_architecture(adapter: ModelAdapter, layer: int) -> None:
    """Refuse NAS where block ``layer`` does not add its down projection's output to the residual
    stream as it is (a norm after the MLP: Gemma 2/3, OLMo 2; post-LN OPT): there ``z0 - v0`` is
    not the rest of the block's output and rescaling ``v*`` would mean something else."""
    block = adapter.layer(layer)
    names = [n for n in _POST_MLP_NORMS if getattr(block, n, None) is not None]
    if getattr(getattr(adapter.model, "config", None), "do_layer_norm_before", True) is False:
        names.append("a layer norm after the residual addition (do_layer_norm_before: false)")
    if names:
        raise InputError(f"residual.nas: block {layer} normalizes its MLP output before adding it to the residual stream "
                         f"({', '.join(names)}), so the MLP output cannot be rescaled on its own; NAS supports "
                         "pre-norm blocks (GPT-2, GPT-J, Llama, Mistral, Qwen, ...)")


def norm_anchor_targets(z0: torch.Tensor, v0: torch.Tensor, delta: torch.Tensor, anchor: float, max_ratio: float = 2.0,
                        eps: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """NAS's targets: ``v* = v0 + delta`` rescaled to norm ``anchor``, the block output
    ``z = (z0 - v0) + v* anchor / ||v*||``; a row with ``||v*|| > max_ratio * anchor``
    (``max_ratio`` > 0) keeps ``z = z0`` (not edited). Rows ``(n, d_model)``; returns
    ``(z, scale)`` with ``scale = anchor / ||v*||`` per row, 0 where not edited (``||v*|| <= eps``:
    ``v*`` kept as it is, scale 1, as the reference)."""
    v_star = v0 + delta
    norm = v_star.norm(dim=-1)
    scale = torch.where(norm > eps, anchor / norm.clamp_min(eps), torch.ones_like(norm))
    z = (z0 - v0) + v_star * scale.unsqueeze(-1)
    if max_ratio > 0:
        skip = norm > max_ratio * anchor
        z = torch.where(skip.unsqueeze(-1), z0, z)
        scale = torch.where(skip, torch.zeros_like(scale), scale)
    return z, scale


def trimmed_mean_norm(norms: torch.Tensor, trim: float = NAS_TRIM) -> float:
    """The mean of ``norms`` without its ``floor(trim * n)`` largest values (the reference's
    outlier policy for the norm anchor)."""
    x = norms.detach().double().flatten().sort().values
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        raise ValueError("norm anchor: no (finite) norms to average")
    drop = int(trim * x.numel())
    return float(x[: x.numel() - drop].mean() if drop < x.numel() else x.mean())


def _row_groups(suffix_len: torch.Tensor, max_rows: int, buckets: int) -> list[torch.Tensor]:
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
class ResidualResult:
    z_target: torch.Tensor  # (n_chunks, d_model) float32
    z_init: torch.Tensor  # (n_chunks, d_model)
    loss: torch.Tensor  # (n_chunks,) final per-chunk loss
    nll: torch.Tensor  # (n_chunks,) final per-chunk NLL term
    steps: torch.Tensor  # (n_chunks,) steps each chunk took
    # with residual.mpes: the chunks MPES stopped (their target is the argmax on every row)
    most_probable: torch.Tensor | None = None  # (n_chunks,) bool
    # with residual.nas: block z_layer's MLP output v0 at each anchor, ||v0 + delta|| (before any
    # scaling) and the factor NAS applied to v* (0: left unedited; None: no anchor given)
    v_init: torch.Tensor | None = None  # (n_chunks, d_model)
    v_star_norm: torch.Tensor | None = None  # (n_chunks,)
    nas_scale: torch.Tensor | None = None  # (n_chunks,)


@dataclass
class _Layout:
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


def _layout(enc: Encoded, split: torch.Tensor, end: torch.Tensor | None = None) -> _Layout:
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
    return _Layout(ids, mask, pos, width, split, suffix_len)


@torch.no_grad()
def _prefix_kv(
    adapter: ModelAdapter, lay: _Layout, groups: list[torch.Tensor], z_layer: int | None = None, add=None
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
def _lower_outputs(
    adapter: ModelAdapter, lay: _Layout, kv, groups: list[torch.Tensor], z_layer: int, cache_kw: str | None
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


def optimize_residuals(
    adapter: ModelAdapter, batch: ResidualBatch, z_layer: int, cfg: ResidualConfig, on_step: OnStep | None = None,
    norm_anchor: float | None = None,
) -> ResidualResult:
    """Optimize one ``delta`` per chunk (see module docstring).

    ``cfg.mode``: ``joint`` optimizes every chunk of every request together (one packed forward
    per step; a single fact is one chunk); ``autoregressive`` (AnyEdit's reference) optimizes the
    ``k``-th chunks of all requests together, phase after phase, with the earlier chunks' deltas
    held fixed at their anchors and later chunks left out.

    With ``cfg.prefix_cache`` (and a model that accepts a key/value cache with explicit
    position ids), the tokens before each row's first optimized anchor run once per phase:
    their states do not depend on the optimized deltas (causal attention), so every step only
    runs the suffix from there on, attending to the cached prefix.

    ``on_step(done, total, loss, chunks)`` (e.g. :class:`lightning_edit.progress.ResidualProgress`)
    is called after every step's loss: ``done`` Adam steps of at most ``total`` (``steps`` per
    phase), the per-chunk loss as a device tensor (reading it synchronizes) and the chunks of the
    current phase.

    With ``cfg.nas`` the result also holds block ``z_layer``'s MLP output ``v_init`` at each
    anchor and ``v_star_norm``; ``norm_anchor`` (> 0, with ``cfg.nas``) then rescales the targets
    (:func:`norm_anchor_targets`) and records the factor in ``nas_scale``.
    """
    device = next(adapter.model.parameters()).device
    with _attention_kernels(cfg, device):
        res = _optimize_residuals(adapter, batch, z_layer, cfg, device, on_step)
    if cfg.nas and norm_anchor is not None and norm_anchor > 0:
        z, scale = norm_anchor_targets(res.z_init, res.v_init, res.z_target - res.z_init, float(norm_anchor), cfg.nas_max_ratio)
        res.z_target, res.nas_scale = z.float(), scale
    return res


def _optimize_residuals(adapter: ModelAdapter, batch: ResidualBatch, z_layer: int, cfg: ResidualConfig, device,
                        on_step: OnStep | None = None) -> ResidualResult:
    n = batch.n_chunks
    order = batch.chunk_order
    v0 = None
    if cfg.nas:
        if int(order.max()) > 0:
            raise InputError("residual.nas rescales one target per single-fact request; it does not apply to requests of "
                             "several chunks (long-form editing)")
        check_nas_architecture(adapter, z_layer)
        z0, v0 = block_outputs_at_anchors(adapter, batch, z_layer, values=True)
    else:
        z0 = block_outputs_at_anchors(adapter, batch, z_layer)
    joint = cfg.mode == "joint" or int(order.max()) == 0
    phases = 1 if joint else int(order.max()) + 1

    def phase_progress(k: int, train: torch.Tensor):  # phase k's steps continue the count of the earlier phases
        if on_step is None:
            return None
        return lambda done, loss: on_step(k * cfg.steps + done, phases * cfg.steps, loss, train)

    if joint:
        train = torch.ones(n, dtype=torch.bool)
        delta, loss, nll, steps, top = _optimize_phase(adapter, batch, z_layer, cfg, z0, train, None, None, phase_progress(0, train))
    else:
        delta = torch.zeros_like(z0)
        loss, nll = torch.zeros(n, device=device), torch.zeros(n, device=device)
        steps = torch.zeros(n, dtype=torch.long, device=device)
        top = torch.zeros(n, dtype=torch.bool, device=device) if cfg.mpes > 0 else None
        for k in range(int(order.max()) + 1):
            train = order == k
            d_k, l_k, n_k, s_k, top_k = _optimize_phase(adapter, batch, z_layer, cfg, z0, train, order < k, delta, phase_progress(k, train))
            t = train.to(device)
            delta = torch.where(t.unsqueeze(1), d_k, delta)
            loss, nll, steps = torch.where(t, l_k, loss), torch.where(t, n_k, nll), torch.where(t, s_k, steps)
            if top is not None:
                top = torch.where(t, top_k, top)
    z = (z0 + delta).float()
    res = ResidualResult(z_target=z, z_init=z0, loss=loss, nll=nll, steps=steps, most_probable=top)
    if v0 is not None:  # v* from the delta as z carries it (the one NAS rescales)
        res.v_init, res.v_star_norm = v0, (v0 + (z - z0)).norm(dim=-1)
    return res


def _optimize_phase(
    adapter: ModelAdapter,
    batch: ResidualBatch,
    z_layer: int,
    cfg: ResidualConfig,
    z0: torch.Tensor,
    train: torch.Tensor,
    frozen: torch.Tensor | None,
    fixed: torch.Tensor | None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Adam on the deltas of the ``train`` chunks, with the ``frozen`` chunks' deltas ``fixed``
    (added at their anchors, no gradient) and every other chunk left out (no delta, no loss).
    Returns ``(delta, loss, nll, steps, most_probable)`` per chunk (meaningful for ``train``
    chunks; ``most_probable``: stopped by MPES, None without it).
    ``on_step(steps done, per-chunk loss)`` after each step's loss (progress only)."""
    model = adapter.model
    device = next(model.parameters()).device
    n = batch.n_chunks
    d_model = z0.shape[-1]
    z0_norm = z0.norm(dim=-1)
    frozen = torch.zeros(n, dtype=torch.bool) if frozen is None else frozen
    fixed = torch.zeros(n, d_model, device=device) if fixed is None else fixed.detach()
    delta = torch.zeros(n, d_model, device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)

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
    kl_rows_all = torch.nonzero(batch.is_kl & train[batch.row_chunk]).flatten() if cfg.kl_factor > 0 else torch.zeros(0, dtype=torch.long)
    kl_slot = torch.full((n_rows,), -1, dtype=torch.long)  # KL row -> its row of kl_init
    kl_slot[kl_rows_all] = torch.arange(len(kl_rows_all))
    kl_init: torch.Tensor | None = None  # (KL rows, vocab): the step-0 distributions
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
    lay = _layout(batch.enc, split, end)
    groups = [g[in_phase[g]] for g in _row_groups(lay.suffix_len, cfg.max_rows_per_forward, cfg.length_buckets)]
    groups = [g for g in groups if len(g)]
    W = lay.width
    # frozen deltas before the split act inside the cached prefix; the rest in every step
    in_prefix = (~a_train) & (a_pos < split[a_rows])
    pre_add = (a_rows[in_prefix], a_pos[in_prefix] - split[a_rows[in_prefix]] + W, fixed[a_chunk[in_prefix].to(device)])
    a_rows, a_pos, a_chunk, a_train = a_rows[~in_prefix], a_pos[~in_prefix], a_chunk[~in_prefix], a_train[~in_prefix]
    kv = _prefix_kv(adapter, lay, groups, z_layer, pre_add) if cache_kw is not None else None
    lower = _lower_outputs(adapter, lay, kv, groups, z_layer, cache_kw) if cfg.skip_lower_blocks else None
    a_suf = a_pos - split[a_rows]  # positions in suffix coordinates
    t_suf = t_pos - split[t_rows]
    kl_suf = kl_pos - split
    # a row runs while any optimized chunk it holds is still optimizing
    row_of = torch.cat([t_rows, kl_rows_all])
    chunk_of = torch.cat([t_chunk, batch.row_chunk[kl_rows_all]])

    active = train.to(device).clone()
    steps = torch.zeros(n, dtype=torch.long, device=device)
    mpes_hits = torch.zeros(n, dtype=torch.long, device=device) if cfg.mpes > 0 else None
    nll_c = torch.zeros(n, device=device)
    kl_c = torch.zeros(n, device=device)
    loss_c = torch.zeros(n, device=device)

    plans: dict[int, tuple[torch.Tensor, list[SimpleNamespace]]] = {}
    mcfg = getattr(model, "config", None)
    heads = int(getattr(mcfg, "num_attention_heads", None) or getattr(mcfg, "n_head", None) or 1)
    # packed rows: one forward over all rows of the phase, suffixes laid end to end
    pack = cfg.pack_rows and supports_packed_rows(model)
    step_groups = [torch.cat(groups).sort().values] if pack and groups else groups
    mask_dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)

    def _loss_fields(row_of: torch.Tensor, off_of: torch.Tensor) -> dict:
        """The device tensors every forward's deltas and losses read, given where each original
        row sits in the forward's input: row ``row_of[r]`` (-1: not in it), from column
        ``off_of[r]`` on (its suffix coordinates shifted). Shared by padded and packed forwards."""
        sel_a, sel_t = row_of[a_rows] >= 0, row_of[t_rows] >= 0
        tr, tp = row_of[t_rows[sel_t]], off_of[t_rows[sel_t]] + t_suf[sel_t]
        kl_rows = kl_rows_all[row_of[kl_rows_all] >= 0]
        kr, kp = row_of[kl_rows], off_of[kl_rows] + kl_suf[kl_rows]
        # the LM head and softmax only where a loss reads them: at the (row, position) pairs
        # (body + head split), else at the positions any row reads (``logits_to_keep``)
        need = torch.cat([tp - 1, kp]).unique()
        d_need = need.to(device)
        by_column = keep_kw and body_head is None
        return dict(
            kw={"logits_to_keep": d_need} if by_column else {},
            ar=row_of[a_rows[sel_a]].to(device), ap=(off_of[a_rows[sel_a]] + a_suf[sel_a]).to(device),
            vec_chunk=a_chunk[sel_a].to(device), a_train=a_train[sel_a].to(device).unsqueeze(1),
            tr=tr.to(device), tp=tp.to(device), t_label=lay.ids[t_rows[sel_t], W + t_suf[sel_t]].to(device),
            t_chunk=t_chunk[sel_t].to(device), t_weight=t_weight[sel_t.to(t_weight.device)],
            kl_rows=kl_rows, kr=kr.to(device), kp=kp.to(device),
            kl_slots=kl_slot[kl_rows].to(device), kl_chunk=batch.row_chunk[kl_rows].to(device),
            col=(lambda p: torch.searchsorted(d_need, p)) if by_column else (lambda p: p),
        )

    def _group_plan(rows: torch.Tensor) -> SimpleNamespace:
        """The device tensors of one padded row group's forward and loss (all but the deltas)."""
        local = torch.full((n_rows,), -1, dtype=torch.long)
        local[rows] = torch.arange(len(rows))
        fields = _loss_fields(local, torch.zeros(n_rows, dtype=torch.long))
        width = int(lay.suffix_len[rows].max())  # right padding: trim the tail
        d_rows = rows.to(device)
        if kv is not None:
            fields["kw"]["position_ids"] = lay.position_ids[rows, W : W + width].to(device)
        score_mb = len(rows) * heads * width * (W + width) * 4 / 2**20
        return SimpleNamespace(
            attention="eager" if score_mb <= cfg.eager_attention_mb else None,
            ids=lay.ids[rows, W : W + width].to(device),
            mask=lay.mask[rows, : W + width].to(device),
            kv=[(k[d_rows], v[d_rows]) for k, v in kv] if kv is not None else None,
            lower=lower[0][d_rows, :width] if lower is not None else None,
            **fields,
        )

    def _packed_units(rows: torch.Tensor) -> list[SimpleNamespace]:
        """``rows``' suffixes packed end to end (:func:`pack_rows`) into rows as long as the
        longest suffix (or up to twice that); each packed row's keys are its segments' cached
        prefixes, then its suffix columns; a 4-D mask lets a token see only its own segment (prefix + causal
        suffix). Split into equal forwards of at most ``max_tokens_per_forward`` slots and
        ``max_rows_per_forward`` packed rows."""
        lens = lay.suffix_len[rows].tolist()
        # the row length: the longest suffix or a little more, whichever leaves the fewest
        # empty slots (short suffixes then fill the gaps); ties go to the shorter row
        longest = max(lens)
        packings = [(pack_rows(lens, c), c) for c in sorted({longest, -(-5 * longest // 4), -(-3 * longest // 2), 2 * longest})]
        bins, cap = min(packings, key=lambda bc: (len(bc[0]) * bc[1], bc[1]))
        parts = 1
        if cfg.max_tokens_per_forward > 0:
            parts = max(parts, -(-len(bins) * cap // cfg.max_tokens_per_forward))
        if cfg.max_rows_per_forward > 0:
            parts = max(parts, -(-len(bins) // cfg.max_rows_per_forward))
        parts = min(parts, len(bins))
        size, extra = divmod(len(bins), parts)  # equal parts (the first ``extra`` one bin longer)
        units, b0 = [], 0
        for i in range(parts):
            b1 = b0 + size + (1 if i < extra else 0)
            units.append(_packed_unit([[int(rows[j]) for j in b] for b in bins[b0:b1]], cap))
            b0 = b1
        return units

    def _packed_unit(bins: list[list[int]], cap: int) -> SimpleNamespace:
        nb = len(bins)
        seg = torch.tensor([r for b in bins for r in b], dtype=torch.long)  # original row per segment
        seg_bin = torch.tensor([i for i, b in enumerate(bins) for _ in b], dtype=torch.long)
        slen = lay.suffix_len[seg]
        plen = split[seg] if kv is not None else torch.zeros_like(seg)
        # offsets of each segment inside its packed row (suffix columns, prefix key columns)
        first = torch.ones(len(seg), dtype=torch.bool)
        first[1:] = seg_bin[1:] != seg_bin[:-1]

        def offsets(x: torch.Tensor) -> torch.Tensor:
            c = torch.cumsum(x, 0) - x
            start = c[first]  # cumulative value at each bin's first segment
            return c - start[torch.cumsum(first.long(), 0) - 1]

        q_off, k_off = offsets(slen), offsets(plen)
        wp = int((k_off + plen).max()) if kv is not None else 0
        # one entry per suffix token: its segment, packed (row, column), original suffix index
        tok_seg = torch.repeat_interleave(torch.arange(len(seg)), slen)
        j = torch.arange(len(tok_seg)) - torch.repeat_interleave(torch.cumsum(slen, 0) - slen, slen)
        qb, qc = seg_bin[tok_seg], q_off[tok_seg] + j
        src = seg[tok_seg]
        ids = torch.zeros(nb, cap, dtype=torch.long)
        ids[qb, qc] = lay.ids[src, W + j]
        pos = torch.zeros(nb, cap, dtype=torch.long)
        pos[qb, qc] = lay.position_ids[src, W + j]
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
        d_kb, d_kc = kb.to(device), kc.to(device)
        d_pr, d_pc = seg[pk_seg].to(device), (W - plen[pk_seg] + pk_j).to(device)
        packed_kv = None
        if kv is not None:
            packed_kv = []
            for li, (k, v) in enumerate(kv):
                if lower is not None and li <= z_layer:  # skipped blocks never read their cache
                    packed_kv.append((k[:nb, :, :0], v[:nb, :, :0]))
                    continue
                pk = k.new_zeros(nb, k.shape[1], wp, k.shape[3])
                pv = v.new_zeros(nb, v.shape[1], wp, v.shape[3])
                pk[d_kb, :, d_kc] = k[d_pr, :, d_pc]
                pv[d_kb, :, d_kc] = v[d_pr, :, d_pc]
                packed_kv.append((pk, pv))
        packed_lower = None
        if lower is not None:
            packed_lower = lower[0].new_zeros(nb, cap, lower[0].shape[-1])
            packed_lower[qb.to(device), qc.to(device)] = lower[0][src.to(device), j.to(device)]
        # original row -> (packed row, column offset)
        bin_of = torch.full((n_rows,), -1, dtype=torch.long)
        off_of = torch.zeros(n_rows, dtype=torch.long)
        bin_of[seg], off_of[seg] = seg_bin, q_off
        fields = _loss_fields(bin_of, off_of)
        fields["kw"]["position_ids"] = pos.to(device)
        score_mb = nb * heads * cap * (wp + cap) * 4 / 2**20
        return SimpleNamespace(
            attention="eager" if score_mb <= cfg.packed_eager_attention_mb else None,
            ids=ids.to(device),
            mask=additive_mask(allowed[:, None].to(device), mask_dtype),
            kv=packed_kv,
            lower=packed_lower,
            **fields,
        )

    def _unit_step(plan: SimpleNamespace, step: int, wd_pending, nll_step: torch.Tensor, kl_step: torch.Tensor,
                   miss_step: torch.Tensor | None = None):
        """One forward + backward of one prepared row unit; adds its per-chunk NLL and KL terms
        to ``nll_step`` / ``kl_step`` (and, for MPES, its per-chunk count of target tokens that
        are not the argmax of their logits to ``miss_step``); the weight-decay term rides on the
        first unit's loss."""
        nonlocal kl_init
        vecs = torch.where(plan.a_train, delta[plan.vec_chunk], fixed[plan.vec_chunk])
        kw = dict(plan.kw)
        if kv is not None:
            kw[cache_kw] = make_cache(model, plan.kv)
        skip = contextlib.nullcontext()
        if lower is not None:
            skip = adapter.skip_blocks(z_layer, plan.lower, lower[1])
        with torch.enable_grad(), skip, adapter.attention_implementation(plan.attention), \
                adapter.add_at_positions(z_layer, plan.ar, plan.ap, vecs):
            if body_head is not None:
                hidden = body_head[0](input_ids=plan.ids, attention_mask=plan.mask, use_cache=kv is not None, **kw).last_hidden_state
                logits_at = lambda r, p: body_head[1](hidden[r, p])  # noqa: E731
            else:
                logits = model(input_ids=plan.ids, attention_mask=plan.mask, use_cache=kv is not None, **kw).logits
                logits_at = lambda r, p: logits[r, plan.col(p)]  # noqa: E731
        tr, tp, kl_rows = plan.tr, plan.tp, plan.kl_rows
        t_logp = logits_at(tr, tp - 1).float().log_softmax(-1)
        lp = t_logp.gather(-1, plan.t_label.unsqueeze(-1)).squeeze(-1)
        part_nll = torch.zeros(n, device=device).index_add(0, plan.t_chunk, -lp * plan.t_weight)
        if miss_step is not None:  # MPES: the logits this loss already has, no extra forward
            miss = (t_logp.detach().argmax(-1) != plan.t_label).long()
            miss_step.index_add_(0, plan.t_chunk, miss)
        part_kl = torch.zeros(n, device=device)
        if len(kl_rows):
            kl_logp = logits_at(plan.kr, plan.kp).float().log_softmax(-1)
            slots = plan.kl_slots
            if kl_init is None:
                kl_init = torch.zeros(len(kl_rows_all), kl_logp.shape[-1], device=device)
            if step == 0:
                kl_init[slots] = kl_logp.detach()
            kl = F.kl_div(kl_init[slots], kl_logp, log_target=True, reduction="none").sum(-1)
            part_kl = part_kl.index_add(0, plan.kl_chunk, cfg.kl_factor * kl)
        loss = part_nll.sum() + part_kl.sum()
        if wd_pending is not None:
            loss = loss + wd_pending
            wd_pending = None
        loss.backward()
        nll_step += part_nll.detach()
        kl_step += part_kl.detach()
        return wd_pending

    for step in range(cfg.steps + 1):
        opt.zero_grad(set_to_none=True)
        active_cpu = active.cpu()  # the step's one device -> host synchronization
        row_active = torch.zeros(n_rows, dtype=torch.bool)
        row_active[row_of[active_cpu[chunk_of]]] = True
        wd = cfg.weight_decay * delta.norm(dim=-1) / z0_norm.pow(2)
        # the loss is a sum of per-row terms (+ one weight-decay term per chunk): groups may
        # split a chunk's rows, their gradients and losses add up
        wd_pending = torch.where(active, wd, torch.zeros_like(wd)).sum()
        nll_step = torch.zeros(n, device=device)
        kl_step = torch.zeros(n, device=device)
        miss_step = torch.zeros(n, dtype=torch.long, device=device) if mpes_hits is not None else None
        for gi, rows in enumerate(step_groups):
            # only the rows of chunks still optimizing: converged chunks cost nothing more
            rows = rows[row_active[rows]]
            if len(rows) == 0:
                continue
            # everything but the deltas is the same every step: prepared once per row set
            cached = plans.get(gi)
            if cached is None or not torch.equal(cached[0], rows):
                cached = plans[gi] = (rows, _packed_units(rows) if pack else [_group_plan(rows)])
            for plan in cached[1]:
                wd_pending = _unit_step(plan, step, wd_pending, nll_step, kl_step, miss_step)
        nll_c = torch.where(active, nll_step, nll_c)
        kl_c = torch.where(active, kl_step, kl_c)
        loss_c = torch.where(active, nll_c + kl_c + wd.detach(), loss_c)
        active = active & (loss_c >= cfg.early_stop_loss)
        if mpes_hits is not None:
            # MPES: every target token of every row of the chunk is its row's argmax at this step
            mpes_hits += (active & (miss_step == 0)).long()
            active = active & (mpes_hits < cfg.mpes)
        if on_step is not None:
            on_step(step, loss_c)
        if step == cfg.steps or not bool(active.any()):
            break
        before = delta.detach().clone()
        opt.step()
        steps += active.long()
        with torch.no_grad():
            # converged chunks keep their vector (Adam's momentum would otherwise move them)
            delta.copy_(torch.where(active.unsqueeze(1), delta, before))  # (no boolean indexing: no sync)
            max_norm = cfg.clamp_norm_factor * z0_norm
            norm = delta.norm(dim=-1)
            scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
            delta.mul_(scale.unsqueeze(-1))
    top = None if mpes_hits is None else mpes_hits >= cfg.mpes
    return delta.detach(), loss_c.detach(), nll_c.detach(), steps, top
