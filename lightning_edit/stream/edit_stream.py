"""The edit stream: the one place a batch of edit requests becomes a weight update (no Lightning).

:class:`EditStream` holds everything an edit stream is: the model adapter and tokenizer, the
edit layers, the method's math object (:class:`~lightning_edit.engine.update.MemitMethod` /
:class:`~lightning_edit.engine.update.AlphaEditMethod`), the float32 masters of low-precision edit
layers, the context prefixes, NAS's norm anchor, and the :class:`~lightning_edit.stream.ledger.EditLedger`
(the record of every applied batch). :meth:`EditStream.apply` runs one batch top to bottom:

    requests -> residual vectors z (Adam on the target log-likelihood)
             -> per edit layer: keys, residual share, closed-form solve, in-place add
             -> ledger record (factors U, V and keys per layer) -> method state (K_p K_p^T)

The LightningModule's ``training_step``, the notebook :class:`~lightning_edit.api.Editor`, the
report's single-anchor baseline and the benchmarks all call the same :meth:`EditStream.apply`.
The position, the number of edits and the history come from the ledger alone.

Under DDP every process calls :meth:`apply` with the whole batch and its own share of it
(``local``); a :class:`Collective` says how rows are gathered and whose factors every process
applies. Under sharded weights every process calls it with the whole batch; the z optimization
then runs on a contiguous share per process in lockstep (``Collective.lockstep``) and the
vectors are gathered, the rest runs on the whole batch everywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lightning_edit.data.requests import EditRequest
from lightning_edit.engine import sharding
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.bars import ResidualProgress
from lightning_edit.engine.block_update import apply_block_update, block_parameters
from lightning_edit.engine.closed_form import MAX_UPDATE, NonFiniteUpdateError, OversizedUpdateError
from lightning_edit.engine.deviations import make_deviations
from lightning_edit.engine.forward_plan import Lockstep
from lightning_edit.engine.prefixes import generate_prefixes
from lightning_edit.engine.residuals import (
    ResidualConfig,
    ResidualResult,
    UnconvergedEditWarning,
    build_residual_batch,
    optimize_residuals,
    trimmed_mean_norm,
    unconverged_requests,
)
from lightning_edit.engine.update import apply_update, master_copies
from lightning_edit.errors import CheckpointError, InputError
from lightning_edit.longform.edit import LongFormConfig, build_longform_batch, is_longform
from lightning_edit.stream.ledger import BatchRecord, EditLedger, describe_request


def _same(t):
    return t


@dataclass(frozen=True)
class Collective:
    """How one batch is combined across processes. The default is a single process.

    Attributes:
        gather: concatenates every process's rows ``(n_i, d)`` rank by rank, identical on all.
        broadcast: replaces an object by rank 0's (every process applies rank 0's factors);
            under ``sharded_edit`` it takes ``src=`` (an edit layer's owner sends its factors).
        is_writer: this process writes the ledger's batch files (rank 0).
        lockstep: sharded weights: the processes split the z optimization of a batch (each a
            contiguous share of its requests, in lockstep through the sharded model);
            ``z_share = (processes, this one)`` and ``z_gather`` (every process's rows, rank by
            rank) combine the shares. None: every process optimizes what it is given.
    """

    gather: Callable[[torch.Tensor], torch.Tensor] = _same
    broadcast: Callable | None = None
    is_writer: bool = True
    lockstep: Lockstep | None = None
    z_share: tuple[int, int] = (1, 0)
    z_gather: Callable[[torch.Tensor], torch.Tensor] = _same


SINGLE_PROCESS = Collective()


class EditStream:
    """The state of one edit stream and its :meth:`apply` (see the module docstring).

    Args:
        adapter: the model (wrapped by :class:`~lightning_edit.engine.arch.ModelAdapter`).
        tokenizer: its fast tokenizer.
        layers: the edit layers, ascending; ``z`` is defined at the last.
        residual: the z optimization's settings.
        longform: long-form (AnyEdit) settings, used for long-form requests.
        ledger: the stream's record (a new in-memory one by default).
        n_prefixes, prefix_length, seed: MEMIT's generated context prefixes.
        max_rows: rows per forward in the update (0 = the whole batch).
        chat_template, system_prompt: how long-form questions are rendered.
    """

    def __init__(self, adapter: ModelAdapter, tokenizer, layers: Sequence[int], residual: ResidualConfig,
                 longform: LongFormConfig | None = None, ledger: EditLedger | None = None, n_prefixes: int = 0,
                 prefix_length: int = 10, seed: int = 0, max_rows: int = 0, chat_template: bool = False,
                 system_prompt: str | None = None):
        self.adapter, self.tokenizer = adapter, tokenizer
        self.layers = sorted(int(l) for l in layers)
        self.residual, self.longform = residual, longform or LongFormConfig()
        self.ledger = ledger if ledger is not None else EditLedger()
        self.n_prefixes, self.prefix_length, self.seed = n_prefixes, prefix_length, seed
        self.max_rows, self.chat_template, self.system_prompt = max_rows, chat_template, system_prompt
        self.method = None  # the update's math object, set by set_method once statistics exist
        self.max_update = MAX_UPDATE  # bound on each layer's relative update (0: none); the editor sets its own
        self.method_name: str | None = None
        self.master: dict[int, torch.Tensor] = {}
        self.prefixes: list[str] | None = None
        self.norm_anchor: float | None = float(residual.nas_anchor) if residual.nas and residual.nas_anchor > 0 else None
        self.requests: list = []  # the applied requests, in stream order (their ids are the ledger's)
        self.base: dict[int, torch.Tensor] | None = None  # unedited edit-layer weights (CPU), for undo
        self.base_params: dict[str, torch.Tensor] | None = None  # unedited block parameters (CPU) of a block-update method
        self.last_residuals: ResidualResult | None = None  # this process's z of the last batch (logging)
        self.last_z_loss: float | None = None

    # ---- reading --------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Batches applied."""
        return self.ledger.position

    @property
    def num_edits(self) -> int:
        """Requests applied."""
        return self.ledger.num_edits

    def history(self) -> list[dict]:
        """One row per applied batch (:meth:`EditLedger.history`)."""
        return self.ledger.history()

    @property
    def device(self) -> torch.device:
        return next(self.adapter.model.parameters()).device

    # ---- set-up -----------------------------------------------------------------------------
    # the z settings that shape the edits (a resumed stream keeps them); speed knobs (packing, row
    # limits, attention kernels) and evaluation options are not among them
    RESIDUAL_SHAPING = ("lr", "steps", "weight_decay", "clamp_norm_factor", "kl_factor", "early_stop_loss", "anchor", "mode",
                        "mpes", "nas", "nas_samples", "nas_max_ratio")  # (NAS's anchor itself is restored from the checkpoint)

    def settings(self) -> dict:
        """The stream's settings that shape its edits (z optimization, context prefixes, long-form
        chunking and rendering), as JSON values keyed ``residual.lr``, ``context_prefixes``,
        ``longform.chunking.window`` ..."""
        out = {f"residual.{k}": getattr(self.residual, k) for k in self.RESIDUAL_SHAPING}
        out.update({"context_prefixes": self.n_prefixes, "context_length": self.prefix_length})
        lf = self.longform
        out.update({f"longform.chunking.{k}": v for k, v in dataclasses.asdict(lf.chunking).items()})
        out.update({"longform.single_anchor": lf.single_anchor, "longform.context_keys": lf.context_keys,
                    "longform.context_weight": lf.context_weight, "longform.deviations": lf.deviations,
                    "longform.context_prefixes": lf.context_prefixes, "chat_template": self.chat_template,
                    "system_prompt": self.system_prompt})
        return json.loads(json.dumps(out, default=str))  # plain JSON values, as a checkpoint gives them back

    def set_method(self, method, name: str) -> None:
        """The update's math object (built from statistics of the unedited model) and its name
        in the ledger; the float32 masters of bf16 / fp16 edit layers are taken now."""
        self.method, self.method_name = method, name
        if not self.master:
            self.master = master_copies(self.adapter, self.layers)

    def keep_base(self) -> None:
        """Keep a CPU copy of the edit layers' current (unedited) weights, so :meth:`undo` can
        rebuild exactly. Call before the first batch."""
        if self.base is None:  # sharded weights: each process keeps its slices where they are
            self.base = {l: (w.detach().clone() if sharding.is_sharded(w) else w.detach().cpu().clone())
                         for l in self.layers for w in [self.adapter.weight_as_linear(l)]}

    def _keep_param_base(self) -> None:
        """With :meth:`keep_base` on, a block-update method's stream also keeps the unedited
        parameters of the edit blocks (taken before its first batch changes them)."""
        if self.base is not None and self.base_params is None:
            if self.position > 0:
                raise RuntimeError("the unedited block parameters must be kept before the first batch")
            self.base_params = {n: p.detach().cpu().clone() for l in self.layers
                                for n, p in block_parameters(self.adapter, l).items()}

    def ensure_prefixes(self) -> list[str]:
        """MEMIT's context prefixes, generated once from the model as it is now (unedited)."""
        if self.prefixes is None:
            self.prefixes = generate_prefixes(self.adapter.model, self.tokenizer, self.n_prefixes, self.prefix_length, self.seed)
        return self.prefixes

    def ensure_norm_anchor(self, requests: Sequence[EditRequest] | None, batch_size: int = 100, broadcast=None,
                           progress: bool = False) -> float | None:
        """NAS's norm anchor (``residual.nas``): the mean ``||v*||`` (top 5% dropped) of a seeded
        sample of ``residual.nas_samples`` of ``requests``, optimized in batches of ``batch_size``
        with this stream's residual settings on the model as it is now, which must be unedited
        (a resumed stream takes the anchor from its checkpoint; ``residual.nas_anchor`` sets it).
        ``broadcast`` (DDP): every process takes rank 0's value. None without ``residual.nas``."""
        cfg = self.residual
        if not cfg.nas or self.norm_anchor is not None:
            return self.norm_anchor
        if self.position > 0:
            raise CheckpointError("residual.nas: the norm anchor must come from the unedited model, but edits are applied "
                                  "and no anchor was saved with them; set residual.nas_anchor")
        if not requests:
            raise InputError("residual.nas: no requests to calibrate the norm anchor on; set residual.nas_anchor")
        if is_longform(requests):
            raise InputError("residual.nas rescales single-fact targets; it does not apply to long-form requests")
        reqs = list(requests)
        if len(reqs) > cfg.nas_samples:
            gen = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(reqs), generator=gen)[: cfg.nas_samples].sort().values.tolist()
            reqs = [reqs[i] for i in keep]
        norms = []
        step = max(1, batch_size)
        for i in range(0, len(reqs), step):
            part = reqs[i : i + step]
            rb = build_residual_batch(self.tokenizer, part, self.ensure_prefixes(), cfg.anchor, kl=cfg.kl_factor > 0)
            with ResidualProgress(f"NAS norm anchor: z ({i + len(part)}/{len(reqs)} requests)", cfg.steps, enabled=progress) as bar:
                res = optimize_residuals(self.adapter, rb, self.layers[-1], cfg, on_step=bar)
            norms.append(res.v_star_norm.detach().cpu())
        anchor = trimmed_mean_norm(torch.cat(norms))
        if broadcast is not None:
            anchor = float(broadcast(anchor))
        self.norm_anchor = anchor
        return anchor

    # ---- one batch --------------------------------------------------------------------------
    def residual_batch(self, requests: Sequence):
        """The encoded rows of ``requests``: one chunk per fact, or per chunk of each long-form
        answer (:class:`~lightning_edit.engine.residuals.ResidualBatch`)."""
        if is_longform(requests):
            cfg = self.longform
            rb, _ = build_longform_batch(self.tokenizer, requests, cfg, self.ensure_prefixes() if cfg.context_prefixes else (),
                                         chat_template=self.chat_template, system=self.system_prompt)
            return rb
        return build_residual_batch(self.tokenizer, requests, self.ensure_prefixes(), self.residual.anchor, kl=self.residual.kl_factor > 0)

    def residuals(self, requests: Sequence, label: str | None = None, progress: bool = False, lockstep: Lockstep | None = None):
        """Encode and optimize the residual vectors of ``requests`` (one padded batch): one per
        fact, or one per chunk of each long-form answer. A progress bar counts the optimization's
        steps; requests whose target loss stays above ``residual.warn_nll`` are named in an
        :class:`~lightning_edit.engine.residuals.UnconvergedEditWarning`. ``lockstep``: this is
        one process's share of a batch through sharded weights (see :class:`Collective`).
        Returns ``(batch, result)``."""
        nas = self.residual.nas
        if nas and is_longform(requests):
            raise InputError("residual.nas rescales single-fact targets; it does not apply to long-form requests")
        if nas and self.norm_anchor is None:
            raise InputError("residual.nas: the norm anchor is not set (ensure_norm_anchor runs at fit start on the unedited "
                             "model; or set residual.nas_anchor)")
        rb = self.residual_batch(requests)
        with ResidualProgress(f"{label or 'edit batch'}: z ({len(requests)} requests)", self.residual.steps, enabled=progress) as bar:
            res = optimize_residuals(self.adapter, rb, self.layers[-1], self.residual, on_step=bar,
                                     norm_anchor=self.norm_anchor if nas else None, lockstep=lockstep)
        self.last_z_loss = bar.mean_loss  # read once at the bar's end (None without a bar)
        self.warn_unconverged(requests, rb, res, label)
        return rb, res

    def _shared_residuals(self, requests: list, collective: Collective, label: str | None, progress: bool):
        """Under sharded weights: this process's contiguous share of the batch's z optimization,
        in lockstep with the others, then every share's vectors gathered in the batch's order.
        Returns ``(whole batch, this share's result, every chunk's z)``, or None where the batch
        is not split (one process, fewer requests than processes, or autoregressive long-form
        chunks, whose phases differ from process to process)."""
        world, rank = collective.z_share
        if collective.lockstep is None or world < 2 or len(requests) < world:
            return None
        rb = self.residual_batch(requests)
        if self.residual.mode != "joint" and int(rb.chunk_order.max()) > 0:
            return None
        size, extra = divmod(len(requests), world)
        start = rank * size + min(rank, extra)
        share = requests[start : start + size + (1 if rank < extra else 0)]
        _, res = self.residuals(share, label, progress, lockstep=collective.lockstep)
        z = collective.z_gather(res.z_target)
        if z.shape[0] != rb.n_chunks:
            raise RuntimeError(f"the processes' shares of the batch hold {z.shape[0]} vectors, the batch {rb.n_chunks}")
        return rb, res, z

    def warn_unconverged(self, requests: Sequence, rb, res, label: str | None = None, shown: int = 5) -> None:
        """One :class:`~lightning_edit.engine.residuals.UnconvergedEditWarning` naming the requests (the
        first ``shown`` of them) whose target NLL stayed above ``residual.warn_nll``."""
        bad = unconverged_requests(res, rb, self.residual.warn_nll)
        if not bad:
            return
        names = []
        for i, nll in bad[:shown]:
            r = requests[i]
            about = getattr(r, "subject", None) or getattr(r, "question", None) or r.rendered_prompt
            about = about if len(about) <= 40 else about[:37] + "..."
            names.append(f"case {r.case_id} ({about!r}: NLL {nll:.2f})")
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        warnings.warn(f"{label or 'edit batch'}: {len(bad)} of {len(requests)} requests kept a target NLL above "
                      f"residual.warn_nll={self.residual.warn_nll:g} after the z optimization, their edits may not take: "
                      f"{', '.join(names)}{more}. More residual.steps, a larger residual.lr or residual.clamp_norm_factor may help.",
                      UnconvergedEditWarning, stacklevel=3)

    def apply(self, requests: Sequence, local: Sequence | None = None, index: int | None = None, label: str | None = None,
              collective: Collective = SINGLE_PROCESS, progress: bool = False) -> BatchRecord:
        """Apply one batch: z of this process's ``local`` share (default: all of ``requests``),
        then every edit layer's closed-form update in ascending order, then the ledger's record
        of the whole batch and the method's state. All or nothing: if anything fails, the edit
        layers, the masters, the ledger and the method are as before. ``index`` (optional) is the
        batch's position in the stream, checked against the ledger's."""
        if self.method is None:
            raise RuntimeError("the edit stream has no method yet (statistics not prepared)")
        if index is not None and index != self.position:
            raise RuntimeError(f"batch {index} arrived but {self.position} batches are applied: the stream is out of order")
        requests = list(requests)
        local = requests if local is None else list(local)
        rb = res = z_target = None
        dense = getattr(self.method, "dense", False)
        shared = None if dense or len(local) != len(requests) else self._shared_residuals(requests, collective, label, progress)
        if shared is not None:  # sharded weights: each process optimized its share
            rb, res, z_target = shared
        elif local:  # a process without requests in this batch still joins every gather
            rb, res = self.residuals(local, label, progress)
            z_target = res.z_target
        # every process decides alike (the whole batch), so all of them run the same collectives
        longform = bool(requests) and is_longform(requests)
        context = longform and self.longform.context_keys
        slips = longform and self.longform.deviations > 0
        dev = make_deviations(self.adapter, rb, self.longform.deviations, seed=self.seed + self.position) if slips and rb is not None else None
        applied: list[BatchRecord] = []

        def record(tensors: dict, info: dict) -> None:
            rec = BatchRecord(index=self.position, request_ids=[r.case_id for r in requests], method=self.method_name,
                              hparams=self.method.hparams() if hasattr(self.method, "hparams") else {},
                              info={k: float(v) for k, v in info.items()}, tensors=tensors,
                              descriptions=[describe_request(r) for r in requests])
            applied.append(self.ledger.append(rec, write=collective.is_writer))

        try:
            if dense:  # UnKE's block update: one process, all rows
                if collective.broadcast is not None or len(local) != len(requests):
                    raise InputError("the UnKE block update trains the edit blocks in one process; run it without DDP or sharding")
                self._keep_param_base()
                apply_block_update(self.adapter, rb, z_target, self.layers, self.method, position=self.position,
                                   max_update=self.max_update, record={}, on_record=record, progress=progress,
                                   label=label or "edit batch")
            else:
                apply_update(self.adapter, rb, z_target, self.layers, self.method,
                             gather=collective.gather, max_rows=self.max_rows, master=self.master, record={}, context=context,
                             broadcast=collective.broadcast, on_record=record, max_update=self.max_update,
                             context_weight=self.longform.context_weight, deviations=dev, deviation_rows=slips)
        except (NonFiniteUpdateError, OversizedUpdateError) as err:  # name the batch; nothing was applied
            ids = ", ".join(str(r.case_id) for r in requests[:3]) + (" ..." if len(requests) > 3 else "")
            raise type(err)(f"edit batch {self.position} ({len(requests)} requests: {ids}) not applied: {err}") from None
        self.requests.extend(requests)
        self.last_residuals = res
        return applied[0]

    def replica(self, adapter: ModelAdapter, longform: LongFormConfig | None = None) -> "EditStream":
        """A new, empty stream over another copy of the base model (``adapter``) with this one's
        settings and method, the method's running state reset (AlphaEdit: a fresh ``K_p K_p^T``);
        ``longform`` replaces the long-form settings (e.g. ``single_anchor=True`` for the
        single-anchor baseline). Nothing is shared that an edit of either stream changes."""
        if self.method is None:
            raise RuntimeError("the edit stream has no method yet (statistics not prepared)")
        other = EditStream(adapter, self.tokenizer, self.layers, self.residual, longform or self.longform, n_prefixes=self.n_prefixes,
                           prefix_length=self.prefix_length, seed=self.seed, max_rows=self.max_rows,
                           chat_template=self.chat_template, system_prompt=self.system_prompt)
        method = copy.copy(self.method)  # shares the statistics (moments, projectors)
        if hasattr(method, "reset"):
            method.reset()  # AlphaEdit: fresh K_p K_p^T and inverse (new dicts: the original's stay)
        other.set_method(method, self.method_name)
        other.prefixes, other.norm_anchor = self.prefixes, self.norm_anchor
        return other

    def apply_all(self, requests: Sequence, batch_size: int, label: str | None = None, progress: bool = False) -> list[BatchRecord]:
        """Apply ``requests`` in batches of ``batch_size``, in order (a whole stream in one call)."""
        return [self.apply(requests[i : i + batch_size], label=label, progress=progress) for i in range(0, len(requests), batch_size)]

    # ---- rebuilding and undo -------------------------------------------------------------------
    def rebuild(self, base: dict[int, torch.Tensor] | None = None, param_base: dict[str, torch.Tensor] | None = None) -> None:
        """Weights := ``base`` (default: the model's current, unedited weights) + the ledger's
        batches, in stream order; the method's ``K_p K_p^T`` from the ledger's keys.
        ``param_base``: the unedited values of the parameters that block updates change
        (default: the model's current ones)."""
        ad = self.adapter
        if base is None:
            base = {l: ad.weight_as_linear(l).detach().clone() for l in self.layers}
        if not self.master:
            self.master = master_copies(ad, self.layers)
        self.ledger.replay(ad, self.layers, base, self.master, param_base)
        if self.method is not None and hasattr(self.method, "reset_rows"):  # UnKE: the earlier batches' texts
            self.method.reset_rows(self.ledger.rows_per_batch())
        elif self.method is not None and hasattr(self.method, "reset"):
            self.method.reset(self.ledger.keys_per_batch(self.layers, device=self.device))

    def undo(self, n: int = 1) -> list[dict]:
        """Take the last ``n`` batches back: weights rebuilt from the kept unedited weights
        (:meth:`keep_base`) plus the other batches (bit-identical to never having applied the
        undone ones), ``K_p K_p^T`` without their keys, ledger and applied requests rewound.
        Returns the removed batches' history rows."""
        if not 0 <= n <= self.position:
            raise InputError(f"cannot undo {n} batches: {self.position} are applied")
        if n == 0:
            return []
        if self.base is None:
            raise RuntimeError("undo needs the unedited weights: call keep_base() before the first batch")
        rows = self.history()[self.position - n:]
        self.ledger.truncate(self.position - n)
        pb = None
        if self.base_params is not None:
            params = dict(self.adapter.model.named_parameters())
            pb = {n: t.to(params[n].device) for n, t in self.base_params.items()}
        self.rebuild({l: t.to(self.adapter.weight_as_linear(l).device) for l, t in self.base.items()}, pb)
        del self.requests[self.num_edits:]
        return rows

    # ---- persistence ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint keeps of the stream (the model's weights are rebuilt from the ledger)."""
        state = {"prefixes": self.prefixes, "ledger": self.ledger.state_dict()}
        if self.norm_anchor is not None:
            state["norm_anchor"] = self.norm_anchor
        return state

    def load_state_dict(self, state: dict) -> None:
        self.prefixes = state.get("prefixes")
        if state.get("norm_anchor") is not None and self.residual.nas and not self.residual.nas_anchor:
            self.norm_anchor = float(state["norm_anchor"])  # the stream's anchor, not one of the edited model
        if "ledger" not in state:
            raise CheckpointError("the checkpoint holds no edit ledger (written by an older lightning-edit); it cannot be resumed")
        self.ledger.load_state_dict(state["ledger"])
