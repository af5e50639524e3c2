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

This module is the objective (the loss, Adam, the clamp, early stopping, joint / autoregressive
phases); how each step's forwards are laid out is :mod:`lightning_edit.engine.forward_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_edit.data.requests import EditRequest, target_text
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.forward_plan import Lockstep, PhasePlan, PlanConfig, attention_kernels
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
        self.plan  # the forward plan's settings checked before any work
        if self.warn_nll < 0:
            raise InputError(f"warn_nll must be >= 0 (0 = never warn), got {self.warn_nll}")
        if isinstance(self.mpes, bool) or self.mpes < 0:
            raise InputError(f"mpes must be an integer >= 0 (0 = off, 1 = stop at the first most-probable step), got {self.mpes!r}")
        if self.nas_samples < 1 or self.nas_max_ratio < 0 or self.nas_anchor < 0:
            raise InputError(f"nas_samples must be >= 1, nas_max_ratio and nas_anchor >= 0; got {self.nas_samples}, "
                             f"{self.nas_max_ratio}, {self.nas_anchor}")

    @property
    def plan(self) -> PlanConfig:
        """The forward plan's settings (speed and memory; :mod:`lightning_edit.engine.forward_plan`).
        The others (``lr``, ``steps``, ``weight_decay``, ``clamp_norm_factor``, ``kl_factor``,
        ``early_stop_loss``, ``anchor``, ``mode``, ``mpes``, ``nas*``, ``warn_nll``) are the
        objective's. One flat object, so a config keeps its keys under ``model.residual``."""
        return PlanConfig(**{f.name: getattr(self, f.name) for f in fields(PlanConfig)})


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


def build_chunked_batch(tokenizer, items: Sequence[tuple], prefixes: Sequence[str] = ()) -> ResidualBatch:
    """Long-form requests: ``items[i] = (text, spans)`` with the full text (prompt + answer) and
    the character spans of its target chunks in order, or ``(text, spans, (input_ids, offsets))``
    with the text's tokenization already made (the chunker's: the bare row is not tokenized
    again). One row per request and context prefix (bare first); each chunk's anchor is the token
    before its first token, so chunk ``k`` is predicted from the prompt and the gold chunks before
    it. Chunks are numbered request by request; one residual vector per chunk, shared by the
    request's rows."""
    segments: list[Segment] = []
    row_chunk, anchor_chunk, order, request, bare = [], [], [], [], []
    all_prefixes = [""] + [p for p in prefixes if p]
    c0 = 0
    for i, (text, spans, *tokens) in enumerate(items):
        if not spans:
            raise ValueError(f"long-form request {i}: no target chunks")
        k = len(spans)
        for j, pre in enumerate(all_prefixes):
            if j == 0:
                bare.extend([len(segments)] * k)
            segments.append(Segment(pre + text, [(len(pre) + s, len(pre) + e) for s, e in spans], [None] * k,
                                    tokens=tokens[0] if tokens and j == 0 else None))
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


def optimize_residuals(
    adapter: ModelAdapter, batch: ResidualBatch, z_layer: int, cfg: ResidualConfig, on_step: OnStep | None = None,
    norm_anchor: float | None = None, lockstep: Lockstep | None = None,
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

    ``lockstep``: this process optimizes its own share of a batch through a model whose weights
    are sharded across processes (:class:`~lightning_edit.engine.forward_plan.Lockstep`; joint
    optimization only): the result is this share's, as alone, up to rounding.
    """
    device = next(adapter.model.parameters()).device
    with attention_kernels(cfg.plan, device):
        res = _optimize_residuals(adapter, batch, z_layer, cfg, device, on_step, lockstep)
    if cfg.nas and norm_anchor is not None and norm_anchor > 0:
        z, scale = norm_anchor_targets(res.z_init, res.v_init, res.z_target - res.z_init, float(norm_anchor), cfg.nas_max_ratio)
        res.z_target, res.nas_scale = z.float(), scale
    return res


def _optimize_residuals(adapter: ModelAdapter, batch: ResidualBatch, z_layer: int, cfg: ResidualConfig, device,
                        on_step: OnStep | None = None, lockstep: Lockstep | None = None) -> ResidualResult:
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
    if lockstep is not None and not joint:
        raise InputError("the z optimization of a batch shared between processes is joint only (residual.mode: joint)")

    def phase_progress(k: int, train: torch.Tensor):  # phase k's steps continue the count of the earlier phases
        if on_step is None:
            return None
        return lambda done, loss: on_step(k * cfg.steps + done, phases * cfg.steps, loss, train)

    if joint:
        train = torch.ones(n, dtype=torch.bool)
        delta, loss, nll, steps, top = _optimize_phase(adapter, batch, z_layer, cfg, z0, train, None, None, phase_progress(0, train),
                                                       lockstep)
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
    lockstep: Lockstep | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Adam on the deltas of the ``train`` chunks, with the ``frozen`` chunks' deltas ``fixed``
    (added at their anchors, no gradient) and every other chunk left out (no delta, no loss).
    Returns ``(delta, loss, nll, steps, most_probable)`` per chunk (meaningful for ``train``
    chunks; ``most_probable``: stopped by MPES, None without it).
    ``on_step(steps done, per-chunk loss)`` after each step's loss (progress only).
    ``lockstep``: every process runs as many forwards per step as the one with the most (the
    others repeat one of theirs with zero weight) and the steps go on while any chunk of any
    process is optimizing; a process's own chunks stop as they would alone."""
    device = z0.device
    n = batch.n_chunks
    z0_norm = z0.norm(dim=-1)
    delta = torch.zeros(n, z0.shape[-1], device=device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    plan = PhasePlan(adapter, batch, z_layer, cfg.plan, cfg.kl_factor > 0, train, frozen, fixed, z0.shape[-1], lockstep)
    spare = None  # under lockstep: a forward of this process's, repeated with zero weight
    kl_init: dict = {}  # "p": (KL rows, vocab), the step-0 distributions

    active = train.to(device).clone()
    steps = torch.zeros(n, dtype=torch.long, device=device)
    mpes_hits = torch.zeros(n, dtype=torch.long, device=device) if cfg.mpes > 0 else None
    nll_c = torch.zeros(n, device=device)
    kl_c = torch.zeros(n, device=device)
    loss_c = torch.zeros(n, device=device)
    for step in range(cfg.steps + 1):
        opt.zero_grad(set_to_none=True)
        row_active = plan.rows_running(active.cpu())  # the step's one device -> host synchronization
        wd = cfg.weight_decay * delta.norm(dim=-1) / z0_norm.pow(2)
        # the loss is a sum of per-row terms (+ one weight-decay term per chunk): forwards may
        # split a chunk's rows, their gradients and losses add up
        wd_pending = torch.where(active, wd, torch.zeros_like(wd)).sum()
        nll_step = torch.zeros(n, device=device)
        kl_step = torch.zeros(n, device=device)
        miss_step = torch.zeros(n, dtype=torch.long, device=device) if mpes_hits is not None else None
        units = plan.units(row_active)
        if lockstep is not None:
            units = list(units)
            spare = spare if spare is not None or not units else units[0]
            pad = lockstep.count(len(units)) - len(units)
            if pad and spare is None:  # every process holds a request, so step 0 has a forward
                raise RuntimeError("lockstep: this process has no forward of its own to repeat")
            units = units + [None] * pad
        for unit in units:
            if unit is None:
                _idle_step(plan, spare, delta)
                continue
            wd_pending = _unit_step(plan, unit, delta, cfg.kl_factor, step, kl_init, wd_pending, nll_step, kl_step, miss_step)
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
        if step == cfg.steps or not (bool(active.any()) if lockstep is None else lockstep.any(bool(active.any()))):
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


def _idle_step(plan: PhasePlan, unit: SimpleNamespace, delta: torch.Tensor) -> None:
    """A forward and backward that changes nothing: ``unit`` (one of this process's own) with the
    current vectors and a zero loss, so that a sharded model's blocks gather their weights as often
    as on the processes still running more forwards (gradients of zero)."""
    vecs = torch.where(unit.a_train, delta[unit.vec_chunk], plan.fixed[unit.vec_chunk])
    logits_at = plan.forward(unit, vecs)
    (logits_at(unit.tr, unit.tp - 1).float().sum() * 0.0).backward()


def _unit_step(plan: PhasePlan, unit: SimpleNamespace, delta: torch.Tensor, kl_factor: float, step: int, kl_init: dict,
               wd_pending, nll_step: torch.Tensor, kl_step: torch.Tensor, miss_step: torch.Tensor | None = None):
    """One forward + backward of one prepared unit of the plan; adds its per-chunk NLL and KL
    terms to ``nll_step`` / ``kl_step`` (and, for MPES, its per-chunk count of target tokens that
    are not the argmax of their logits to ``miss_step``); the weight-decay term rides on the
    first unit's loss."""
    n, device = plan.n, delta.device
    vecs = torch.where(unit.a_train, delta[unit.vec_chunk], plan.fixed[unit.vec_chunk])
    logits_at = plan.forward(unit, vecs)
    t_logp = logits_at(unit.tr, unit.tp - 1).float().log_softmax(-1)
    lp = t_logp.gather(-1, unit.t_label.unsqueeze(-1)).squeeze(-1)
    part_nll = torch.zeros(n, device=device).index_add(0, unit.t_chunk, -lp * unit.t_weight)
    if miss_step is not None:  # MPES: the logits this loss already has, no extra forward
        miss = (t_logp.detach().argmax(-1) != unit.t_label).long()
        miss_step.index_add_(0, unit.t_chunk, miss)
    part_kl = torch.zeros(n, device=device)
    if len(unit.kl_rows):
        kl_logp = logits_at(unit.kr, unit.kp).float().log_softmax(-1)
        slots = unit.kl_slots
        if "p" not in kl_init:
            kl_init["p"] = torch.zeros(len(plan.kl_rows_all), kl_logp.shape[-1], device=device)
        if step == 0:
            kl_init["p"][slots] = kl_logp.detach()
        kl = F.kl_div(kl_init["p"][slots], kl_logp, log_target=True, reduction="none").sum(-1)
        part_kl = part_kl.index_add(0, unit.kl_chunk, kl_factor * kl)
    loss = part_nll.sum() + part_kl.sum()
    if wd_pending is not None:
        loss = loss + wd_pending
        wd_pending = None
    loss.backward()
    nll_step += part_nll.detach()
    kl_step += part_kl.detach()
    return wd_pending
