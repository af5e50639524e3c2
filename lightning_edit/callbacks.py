"""The editing methods as Lightning callbacks: statistics and checkpoint glue around the
:class:`~lightning_edit.stream.edit_stream.EditStream`, which applies every batch (``EditModule.training_step``).

At fit start the callback computes (or loads) the preserved-key statistics on the *unedited*
model, builds the method's math object (MEMIT's moments, AlphaEdit's projectors) and gives it to
the stream; on resume it then checks the checkpoint (method, layers, base-model fingerprint) and
has the stream rebuild the saved edits from its ledger, so a resumed run continues exactly where
it stopped. The frozen LM itself is never checkpointed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from lightning_edit.checkpointing import full_model_fingerprint, save_edited_layers
from lightning_edit.engine.bars import show_progress
from lightning_edit.engine.block_update import (
    BlockUpdateMethod,
    check_float32_blocks,
    preservation_rows,
)
from lightning_edit.engine.closed_form import MAX_UPDATE
from lightning_edit.engine.stats import (
    StatsConfig,
    corpus_fingerprint,
    iter_corpus_texts,
    projectors,
    second_moments,
)
from lightning_edit.engine.update import AlphaEditMethod, LayerOwnership, MemitMethod
from lightning_edit.errors import CheckpointError, InputError
from lightning_edit.module import EditModule
from lightning_edit.strategies import data_shards

SolveDType = Literal["float32", "float64"]
_SOLVE = {"float32": torch.float32, "float64": torch.float64}


class ClosedFormUpdate(L.Callback):
    """Shared machinery of the editing methods, MEMIT, AlphaEdit and UnKE (statistics, state, checkpoints, export).

    Args:
        stats: where the preserved-knowledge key statistics come from and are cached.
        solve_dtype: precision of the ``d_k x d_k`` solve.
        export_path: where to write the edited weights (safetensors) at the end of ``fit``;
            default: ``edited.safetensors`` in the checkpoint directory.
        max_update: refuse a batch (nothing applied, the batch named) whose update of some edit
            layer has a relative size ``||Delta||_F / ||W||_F`` above this; 0 = no bound. The
            default is far above every update of the measured streams (docs/design.md).
    """

    method_name = "closed_form"

    def __init__(self, stats: StatsConfig = StatsConfig(), solve_dtype: SolveDType = "float64", export_path: str | None = None,
                 max_update: float = MAX_UPDATE):
        self.stats = stats if isinstance(stats, StatsConfig) else StatsConfig(**stats)
        if not max_update >= 0:  # also NaN
            raise InputError(f"max_update must be >= 0 (0 = no bound), got {max_update}")
        self.max_update = float(max_update)
        if solve_dtype not in _SOLVE:
            raise InputError(f"solve_dtype must be float32 or float64, got {solve_dtype!r}")
        self.solve_dtype = _SOLVE[solve_dtype]
        self.export_path = export_path
        self.method = None
        self.base_fingerprint: str | None = None
        self._stash: dict | None = None
        self._stash_path: str | None = None
        self._module: EditModule | None = None
        self._synced = False  # the model holds exactly the ledger's edits (restored, or applied live)
        self.corpus_hash: str | None = None

    def attach(self, module: EditModule) -> None:
        """The module whose stream this callback prepares and checkpoints (Lightning's ``setup``
        does it in a run; the notebook :class:`~lightning_edit.api.Editor` calls it)."""
        self._module = module

    # ---- method-specific -------------------------------------------------------------------
    needs_moments = True  # the key second moments C_0 of the edit layers (MEMIT, AlphaEdit)

    def build_method(self, module: EditModule, moments: dict[int, torch.Tensor], trainer=None):
        raise NotImplementedError

    # the settings that shape the edits (a resumed stream must keep them); evaluation and logging
    # options are not among them
    SHAPING: tuple[str, ...] = ()
    STATS_SHAPING = ("corpus", "corpus_name", "split", "text_field", "n_samples", "max_length", "dtype", "encoding")

    def settings(self, stream: bool = True) -> dict:
        """The method's and the statistics' settings that shape the edits, as JSON values; with
        ``stream`` also the stream's (z optimization, context prefixes, long-form chunking)."""
        out = {k: getattr(self, k) for k in self.SHAPING}
        out["solve_dtype"] = str(self.solve_dtype).removeprefix("torch.")
        out.update({f"stats.{k}": getattr(self.stats, k) for k in self.STATS_SHAPING})
        if self.corpus_hash is not None:  # known once the statistics are prepared (files built)
            out["stats.corpus_hash"] = self.corpus_hash
        if stream and self._module is not None:  # the z optimization's, the context prefixes', long-form chunking's
            out.update(self._module.stream.settings())
        return out

    # ---- setup -------------------------------------------------------------------------------
    def prepare(self, module: EditModule, trainer: L.Trainer | None = None) -> None:
        """Statistics and method objects from the unedited model, then re-apply saved edits."""
        if self.method is not None:
            return
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        shards, shard = data_shards(trainer)  # sharded weights: every process reads the whole corpus
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if shards > 1 else None
        own = layer_ownership(trainer, module.layers)  # sharded weights: each process sums its own layers
        self._check_stash(module)  # before the statistics: a wrong checkpoint fails fast
        moments = {} if not self.needs_moments else second_moments(module.adapter, module.tokenizer, module.layers, self.stats, reduce=reduce,
                                 shard=shard, num_shards=shards, is_writer=rank == 0, show_progress=show_progress(trainer),
                                 owner=None if own is None else own.owner, rank=rank,
                                 broadcast=None if own is None else (lambda obj, src: trainer.strategy.broadcast(obj, src=src)))
        if trainer is not None and world > 1:
            trainer.strategy.barrier("lightning_edit_stats")
        self.corpus_hash = corpus_fingerprint(self.stats)  # the content the statistics came from (checked on resume)
        module.ensure_prefixes()  # from the unedited model, unless restored from the checkpoint
        if module.residual_cfg.nas and trainer is not None:  # NAS's norm anchor: likewise (the Editor sets it at its first apply)
            dm = trainer.datamodule
            module.ensure_norm_anchor(getattr(dm, "requests", None), batch_size=getattr(dm, "batch_size", None) or 100,
                                      broadcast=(lambda x: trainer.strategy.broadcast(x, src=0)) if world > 1 else None)
        self.method = self.build_method(module, moments, trainer)
        module.stream.set_method(self.method, self.method_name)  # and the float32 masters of bf16/fp16 edit layers
        module.stream.max_update = self.max_update
        self._restore_edits(module, fit=True)
        module.ledger.meta["settings"] = self.settings()  # what shaped the edits: in checkpoints and exports (edit_ledger.json)

    def _check_stash(self, module: EditModule, fit: bool = True) -> None:
        """Refuse a checkpoint made with another method, other edit layers or another base model
        (fingerprint of its config and all its weights, taken before any edit is restored), or
        with other settings that shape the edits; the stream's own (z optimization, prefixes,
        chunking) only where new edits follow (``fit``): evaluation replays the ledger."""
        if self.base_fingerprint is None:
            self.base_fingerprint = full_model_fingerprint(module.lm)
        st = self._stash
        if st is None:
            return
        where = f"checkpoint {self._stash_path}" if self._stash_path else "the checkpoint"
        if st.get("method_name") != self.method_name:
            raise CheckpointError(f"{where} was written by method {st.get('method_name')!r}, this run uses {self.method_name!r}")
        saved_layers = [int(l) for l in st.get("layers", [])]
        if saved_layers != list(module.layers):
            raise CheckpointError(f"{where} edits layers {saved_layers}, this run edits {list(module.layers)}: "
                             f"resume with --model.layers={saved_layers}")
        if st.get("base_fingerprint") != self.base_fingerprint:
            raise CheckpointError(f"{where} was made on another base model (model fingerprint {st.get('base_fingerprint')} of "
                             f"{st.get('model_name', '?')!r}; this model {str(module.model_name)!r} has {self.base_fingerprint}): "
                             "its config or some weight differs; refusing to apply its edits")
        saved = st.get("settings")  # absent in checkpoints of earlier versions
        if isinstance(saved, dict):
            now = self.settings(stream=fit)
            changed = [k for k in sorted(set(saved) & set(now)) if saved[k] != now[k]]  # a checkpoint of an earlier version may lack some
            if changed:
                what = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in changed)
                raise CheckpointError(f"{where}: its edits were made with other settings ({what}); a resumed stream keeps the "
                                      "settings that shape its edits: resume with the checkpoint's values")

    def _restore_edits(self, module: EditModule, fit: bool = False) -> None:
        """Rebuild the edited weights (and AlphaEdit's ``K_p K_p^T``) from the restored ledger on
        the unedited model: the same additions in the same order as the live run."""
        if self._stash is None:
            ledger = module.ledger
            if ledger.position > 0 and not self._synced:
                # a restored ledger, but no state of this callback in the checkpoint: it was written
                # with another editor, whose edits this one would silently leave out
                made = sorted({r.method for r in ledger.records})
                where = f"checkpoint {self._stash_path}" if self._stash_path else "the checkpoint"
                raise CheckpointError(f"{where} holds {ledger.position} edit batches made with {', '.join(made)}, and no state of "
                                      f"this run's editor {type(self).__name__} ({self.method_name}): resume or validate it with the "
                                      "editor that wrote it (--editor=lightning_edit.callbacks.AlphaEdit or .MEMIT)")
            self._synced = True
            return
        self._check_stash(module, fit)
        st = self._stash
        ledger = module.ledger
        if "batches_applied" in st and int(st["batches_applied"]) != ledger.position:  # written by earlier versions
            raise CheckpointError(f"checkpoint {self._stash_path or ''}: its edit state says {st.get('batches_applied')} batches, "
                             f"its ledger holds {ledger.position}")
        module.stream.rebuild()  # the unedited weights + the ledger's batches; K_p K_p^T from their keys
        self._stash = None
        self._synced = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, EditModule):
            raise TypeError(f"{type(self).__name__} needs an EditModule, got {type(pl_module).__name__}")
        self.attach(pl_module)
        ckpt = trainer.checkpoint_callback
        if stage == "fit" and pl_module.ledger.directory is None and ckpt is not None and getattr(ckpt, "dirpath", None):
            pl_module.ledger.directory = Path(ckpt.dirpath) / "ledger"  # batch files appended beside the checkpoints
        bs = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if stage == "fit" and bs is not None and bs < trainer.world_size:
            raise InputError(f"batch_size {bs} is smaller than the number of processes {trainer.world_size}")

    def on_fit_start(self, trainer, pl_module: EditModule) -> None:
        # runs after the checkpoint (if any) is restored into self._stash
        self.prepare(pl_module, trainer)

    def on_validation_start(self, trainer, pl_module: EditModule) -> None:
        if trainer.state.fn != "fit":
            self._restore_edits(pl_module)

    def on_test_start(self, trainer, pl_module: EditModule) -> None:
        self._restore_edits(pl_module)

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # small: what the edits were made with; the edits themselves are the module's ledger (one
        # file per batch), the weights and K_p K_p^T are rebuilt from it on load
        if self._module is None:
            return {}
        m = self._module
        return {
            "method_name": self.method_name,
            "base_fingerprint": self.base_fingerprint,
            "model_name": str(m.model_name),
            "layers": list(m.layers),
            "settings": self.settings(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if state_dict.get("method_name") != self.method_name:
            raise CheckpointError(f"checkpoint {self._stash_path or ''} was written by method {state_dict.get('method_name')!r}, "
                             f"this run uses {self.method_name!r}")
        self._stash = state_dict

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._stash_path = str(trainer.ckpt_path) if trainer.ckpt_path else None

    def on_fit_end(self, trainer, pl_module: EditModule) -> None:
        path = self._default_export_path(trainer)  # on every rank: trainer.log_dir is a broadcast under DDP
        # on every rank: sharded weights are gathered (a collective); rank 0 writes
        self.export(pl_module, path, is_writer=trainer.is_global_zero)

    def _default_export_path(self, trainer) -> Path:
        if self.export_path:
            return Path(self.export_path)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            return Path(ckpt.dirpath) / "edited.safetensors"
        return Path(trainer.log_dir or trainer.default_root_dir) / "edited.safetensors"

    def export(self, module: EditModule, path: str | Path, is_writer: bool = True) -> Path:
        """The edit layers' weights as ``edited.safetensors`` (:func:`save_edited_layers`; with
        sharded weights every process calls, ``is_writer`` writes)."""
        return save_edited_layers(path, module.adapter, module.layers, self.method_name, module.model_name, module.num_edits,
                                  module.ledger.position, is_writer=is_writer, params=module.ledger.dense_names())



def layer_ownership(trainer, layers) -> LayerOwnership | None:
    """Under ``sharded_edit`` on several processes, which process keeps and solves which edit
    layer (:class:`~lightning_edit.engine.update.LayerOwnership`); None otherwise (every process
    solves every layer, as under DDP, and applies rank 0's factors)."""
    if trainer is None or trainer.world_size == 1 or data_shards(trainer)[0] != 1:
        return None
    return LayerOwnership(tuple(sorted(int(l) for l in layers)), trainer.world_size, trainer.global_rank)


class MEMIT(ClosedFormUpdate):
    """MEMIT (Meng et al. 2023): ``Delta = R K^T (lam C_0 + K K^T)^-1``.

    Args:
        lam: weight of the preserved-knowledge moment (``mom2_update_weight``; 15000 for GPT-J,
            20000 for GPT2-XL / Llama in the reference).
        stats: key statistics source and cache.
        solve_dtype: precision of the solve.
        export_path: see :class:`ClosedFormUpdate`.
        norm_lambda: ENCORE's norm constraint (Gupta et al. 2025): the weight of
            ``||Delta||_F^2``, the Frobenius norm of each batch's update (the change from the
            weights before the batch), added to MEMIT's objective to keep the edited matrices'
            norm from growing over a long stream: ``Delta = R K^T (lam C_0 + norm_lambda I +
            K K^T)^-1``. The reference's ``update_norm_lambda``: 20 for Llama-3-8B, 10 for
            GPT2-XL. 0 = off (plain MEMIT).
        max_update: refuse a batch (nothing applied, the batch named) whose update of some edit
            layer has a relative size ``||Delta||_F / ||W||_F`` above this; 0 = no bound.
        memory: weight of the earlier batches' edit keys in the solve: ``Delta = R K^T (lam C_0
            + memory K_p K_p^T + K K^T)^-1``, the sequential objective of the AlphaEdit paper
            without its projection. Each batch then leaves the outputs at the keys of the edits
            before it where they are, instead of overwriting them (the keys after each batch are
            kept, as AlphaEdit keeps them; rebuilt from the ledger on resume and undo). 1 weighs
            an earlier edit's key as much as a new one's. 0 = off (plain MEMIT).
    """

    method_name = "memit"
    SHAPING = ("lam", "norm_lambda", "memory")

    def __init__(self, lam: float = 15000.0, stats: StatsConfig = StatsConfig(), solve_dtype: SolveDType = "float64", export_path: str | None = None,
                 norm_lambda: float = 0.0, max_update: float = MAX_UPDATE, memory: float = 0.0):
        super().__init__(stats, solve_dtype, export_path, max_update)
        if norm_lambda < 0:
            raise InputError(f"norm_lambda must be >= 0 (0 = off), got {norm_lambda}")
        if not memory >= 0:  # (also refuses NaN)
            raise InputError(f"MEMIT memory must be >= 0 (the weight of earlier edits' keys; 0 = off), got {memory}")
        if not lam > 0:  # (also refuses NaN) lam C_0 is what keeps the solve definite and the preserved keys in place
            raise InputError(f"MEMIT lam must be > 0 (the weight of the preserved keys' second moment; the reference uses "
                             f"15000-20000), got {lam}")
        self.lam, self.norm_lambda, self.memory = lam, norm_lambda, memory

    def build_method(self, module, moments, trainer=None):
        own = layer_ownership(trainer, module.layers)
        return MemitMethod(lam=self.lam, moments=moments, solve_dtype=self.solve_dtype,
                           norm_lambda=self.norm_lambda, ownership=own, memory=self.memory)


class AlphaEdit(ClosedFormUpdate):
    """AlphaEdit (Fang et al. 2025): MEMIT's update projected onto the null space of preserved
    knowledge, with earlier edits' keys accumulated so sequential batches do not overwrite
    each other.

    Args:
        nullspace_threshold: eigenvalue threshold of the projector (0.02 absolute in the reference).
        threshold_mode: ``absolute`` (eigenvalue < threshold, the reference), ``relative``
            (eigenvalue < threshold x the largest eigenvalue) or ``energy`` (the smallest
            eigenvalues holding at most a ``threshold`` share of the keys' energy; bounds how much
            an update can move preserved outputs, and transfers across activation scales).
        l2: ridge term ``L2`` of the solve (10 in the reference).
        stats: key statistics source and cache.
        solve_dtype: precision of the solve.
        export_path: see :class:`ClosedFormUpdate`.
        solver: ``woodbury`` (default) keeps ``(P K_p K_p^T + l2 I)^-1`` per edit layer and updates
            it after each batch (``O(d_k^2 n)`` per batch instead of an ``O(d_k^3)`` solve; one more
            ``d_k x d_k`` matrix per layer in ``solve_dtype``: 1.6 GiB per Llama-3-8B layer in
            float64); ``direct`` solves the whole system every batch (the reference's way).
        norm_lambda: ENCORE's norm constraint (Gupta et al. 2025): the weight of the Frobenius
            norm of each batch's applied update ``||Delta P||_F^2``. AlphaEdit's ``l2`` already
            weighs that same norm, so this is exactly a ridge of ``l2 + norm_lambda``; kept as its
            own option so a run says which it meant. 0 = off.
        max_update: refuse a batch (nothing applied, the batch named) whose update of some edit
            layer has a relative size ``||Delta||_F / ||W||_F`` above this; 0 = no bound.
    """

    method_name = "alphaedit"
    SHAPING = ("threshold", "threshold_mode", "l2", "solver", "norm_lambda")

    def __init__(
        self,
        nullspace_threshold: float = 0.02,
        threshold_mode: Literal["absolute", "relative", "energy"] = "absolute",
        l2: float = 10.0,
        stats: StatsConfig = StatsConfig(),
        solve_dtype: SolveDType = "float64",
        export_path: str | None = None,
        solver: Literal["woodbury", "direct"] = "woodbury",
        norm_lambda: float = 0.0,
        max_update: float = MAX_UPDATE,
    ):
        super().__init__(stats, solve_dtype, export_path, max_update)
        if solver not in ("woodbury", "direct"):
            raise InputError(f"AlphaEdit solver must be 'woodbury' or 'direct', got {solver!r}")
        if norm_lambda < 0:
            raise InputError(f"norm_lambda must be >= 0 (0 = off), got {norm_lambda}")
        if not l2 > 0:  # (also refuses NaN) the ridge keeps P K_p K_p^T + K K^T P + l2 I definite
            raise InputError(f"AlphaEdit l2 must be > 0 (the ridge of the solve; the reference uses 10), got {l2}")
        self.threshold, self.threshold_mode, self.l2, self.solver = nullspace_threshold, threshold_mode, l2, solver
        self.norm_lambda = norm_lambda
        self.projector_info: dict[int, dict] = {}

    def build_method(self, module, moments, trainer=None):
        rank0 = trainer is None or trainer.is_global_zero
        own = layer_ownership(trainer, module.layers)
        projs, self.projector_info = projectors(module.adapter, moments, self.stats, self.threshold, self.threshold_mode,
                                                is_writer=rank0 if own is None else True,
                                                owned=None if own is None else own.owns,
                                                layers=None if own is None else own.layers)
        if own is not None:  # every process checks every layer: the owners send their projector's rank
            self.projector_info = {l: trainer.strategy.broadcast(self.projector_info.get(l), src=own.owner(l))
                                   for l in own.layers}
        for l, info in self.projector_info.items():
            if info["rank"] == 0:
                raise InputError(f"layer {l}: the null-space projector has rank 0 (threshold {self.threshold} {self.threshold_mode} keeps no direction); raise the threshold")
        device = module.device_
        return AlphaEditMethod(l2=self.l2, projectors={l: p.to(device) for l, p in projs.items()}, solve_dtype=self.solve_dtype,
                               solver=self.solver, norm_lambda=self.norm_lambda, ownership=own)




class UnKE(ClosedFormUpdate):
    """UnKE's block update (Deng et al. 2025), chunked as in the AnyEdit code (``unke_ARE``):
    the residual vectors are optimized as for MEMIT / AlphaEdit, then each edit block (attention
    and MLP, every parameter) takes ``steps`` AdamW steps so that its outputs on the edited texts
    carry its share of the residuals at the chunk anchors and stay as they were everywhere else,
    while its outputs on preservation texts (from ``stats.corpus``) stay as they were
    (:mod:`lightning_edit.engine.block_update`). No key statistics are needed. The reference edits
    one block (layer 7 of Llama-3-8B-Instruct): set ``--model.layers`` to one layer for that.

    The update is a dense change of every parameter of the edit blocks; the ledger records it
    (undo, resume and full exports work as for the other methods; a LoRA export is refused). The
    blocks train in float32, in one process (no DDP or sharding).

    Args:
        lr: AdamW learning rate (2e-4 in the reference).
        steps: AdamW steps per edit block and batch (50 in the reference).
        weight_decay: AdamW weight decay of the block's matrices (0.01 in the reference; none on
            1-D parameters).
        preserve_weight: weight of the preservation term (1 in the reference).
        n_preserve: preservation texts per batch, a seeded sample of the first
            ``stats.n_samples`` texts of ``stats.corpus``, each cut to ``stats.max_length``
            tokens (the reference samples 20 Alpaca answers). 0 = all of them.
        stats: the corpus of the preservation texts (only ``corpus``, ``corpus_name``,
            ``split``, ``text_field``, ``n_samples`` and ``max_length`` are used). Statements
            of known facts among them (``corpus:pydoc+facts@<model>``, as the SmolLM2 long-form
            configs) keep more of the model's facts.
        export_path: see :class:`ClosedFormUpdate`.
        max_update: refuse a batch whose change of some block has a relative size
            ``||Delta||_F / ||W||_F`` (over the block's parameters) above this; 0 = no bound.
        memory: weight of the earlier batches' edited texts: the block's outputs on them, as
            they were before this batch, are kept by a third MSE term, so later batches do not
            overwrite earlier answers (the texts are kept in the ledger; rebuilt on resume and
            undo). Not in the reference; 0 = off.
        n_memory: with ``memory``, how many of the earlier texts each batch keeps: a sample
            seeded by the run's seed and the batch's position in the stream, which bounds the
            cost of a long stream (0 = all of them; the cost then grows with the stream).
    """

    method_name = "unke"
    needs_moments = False
    SHAPING = ("lr", "steps", "weight_decay", "preserve_weight", "n_preserve", "memory", "n_memory")

    def __init__(self, lr: float = 2e-4, steps: int = 50, weight_decay: float = 0.01, preserve_weight: float = 1.0,
                 n_preserve: int = 20, stats: StatsConfig = StatsConfig(), export_path: str | None = None,
                 max_update: float = MAX_UPDATE, memory: float = 0.0, n_memory: int = 0):
        super().__init__(stats, "float32", export_path, max_update)
        self.lr, self.steps, self.weight_decay = float(lr), int(steps), float(weight_decay)
        self.preserve_weight, self.n_preserve, self.memory = float(preserve_weight), int(n_preserve), float(memory)
        self.n_memory = int(n_memory)
        BlockUpdateMethod(lr=self.lr, steps=self.steps, weight_decay=self.weight_decay,  # the settings' checks, now
                          preserve_weight=self.preserve_weight, n_preserve=self.n_preserve, memory=self.memory,
                          n_memory=self.n_memory)

    def build_method(self, module, moments, trainer=None):
        if trainer is not None and trainer.world_size > 1:
            raise InputError(f"the UnKE block update trains the edit blocks in one process; this run has {trainer.world_size} "
                             "processes (use one device, or MEMIT / AlphaEdit)")
        lf = module.stream.longform
        if lf.deviations > 0 or not lf.context_keys or lf.context_weight != 1.0:
            raise InputError("UnKE always keeps the block's outputs at every other position of the edited texts; "
                             "model.longform.deviations, context_keys=false and context_weight apply to MEMIT / AlphaEdit only")
        check_float32_blocks(module.adapter, module.layers)
        ids, mask = None, None
        if self.preserve_weight > 0:
            ids, mask = preservation_rows(module.tokenizer, iter_corpus_texts(self.stats), self.stats.n_samples, self.stats.max_length)
        return BlockUpdateMethod(lr=self.lr, steps=self.steps, weight_decay=self.weight_decay,
                                 preserve_weight=self.preserve_weight, preserve_ids=ids, preserve_mask=mask,
                                 n_preserve=self.n_preserve, seed=module.seed, memory=self.memory,
                                 n_memory=self.n_memory)
