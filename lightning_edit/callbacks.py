"""The editing methods as Lightning callbacks: after each batch's residuals are optimized
(``EditModule.training_step``), compute and apply the closed-form update layer by layer.

The callback owns the edit state that goes into checkpoints: the edited weights, AlphaEdit's
accumulated ``K_p K_p^T``, and how many batches are applied. The frozen LM itself is never
checkpointed. On resume, the statistics are taken from the *unedited* base model first, then
the saved edits are put back, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch

from .checkpointing import config_fingerprint, full_model_fingerprint, save_edits
from .errors import CheckpointError, InputError
from .module import EditModule
from .progress import show_progress
from .stats import StatsConfig, projectors, second_moments
from .update import AlphaEditMethod, MemitMethod, apply_update, master_copies

SolveDType = Literal["float32", "float64"]
_SOLVE = {"float32": torch.float32, "float64": torch.float64}


class ClosedFormUpdate(L.Callback):
    """Shared machinery of MEMIT and AlphaEdit (statistics, state, checkpoints, export).

    Args:
        stats: where the preserved-knowledge key statistics come from and are cached.
        solve_dtype: precision of the ``d_k x d_k`` solve.
        export_path: where to write the edited weights (safetensors) at the end of ``fit``;
            default: ``edited.safetensors`` in the checkpoint directory.
    """

    method_name = "closed_form"

    def __init__(self, stats: StatsConfig = StatsConfig(), solve_dtype: SolveDType = "float64", export_path: str | None = None):
        self.stats = stats if isinstance(stats, StatsConfig) else StatsConfig(**stats)
        if solve_dtype not in _SOLVE:
            raise InputError(f"solve_dtype must be float32 or float64, got {solve_dtype!r}")
        self.solve_dtype = _SOLVE[solve_dtype]
        self.export_path = export_path
        self.method = None
        self.master: dict[int, torch.Tensor] = {}
        self.base_fingerprint: str | None = None
        self._stash: dict | None = None
        self.last_info: dict[str, float] = {}

    # ---- method-specific -------------------------------------------------------------------
    def build_method(self, module: EditModule, moments: dict[int, torch.Tensor], trainer=None):
        raise NotImplementedError

    # ---- setup -------------------------------------------------------------------------------
    def prepare(self, module: EditModule, trainer: L.Trainer | None = None) -> None:
        """Statistics and method objects from the unedited model, then re-apply saved edits."""
        if self.method is not None:
            return
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        self._check_stash(module)  # before the statistics: a wrong checkpoint fails fast
        moments = second_moments(module.adapter, module.tokenizer, module.layers, self.stats, reduce=reduce,
                                 shard=rank, num_shards=world, is_writer=rank == 0, show_progress=show_progress(trainer))
        if trainer is not None and world > 1:
            trainer.strategy.barrier("lightning_edit_stats")
        module.ensure_prefixes()  # from the unedited model, unless restored from the checkpoint
        if module.residual_cfg.nas and trainer is not None:  # NAS's norm anchor: likewise (the Editor sets it at its first apply)
            dm = trainer.datamodule
            module.ensure_norm_anchor(getattr(dm, "requests", None), batch_size=getattr(dm, "batch_size", None) or 100,
                                      broadcast=(lambda x: trainer.strategy.broadcast(x, src=0)) if world > 1 else None)
        self.master = master_copies(module.adapter, module.layers)  # float32 masters of bf16/fp16 edit layers
        self.method = self.build_method(module, moments, trainer)
        self._restore_edits(module)

    def _check_stash(self, module: EditModule) -> None:
        """Refuse a checkpoint made with another method, other edit layers or another base model
        (fingerprint of its config and all its weights, taken before any edit is restored)."""
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

    def _restore_edits(self, module: EditModule) -> None:
        """Rebuild the edited weights (and AlphaEdit's ``K_p K_p^T``) from the restored ledger on
        the unedited model: the same additions in the same order as the live run."""
        if self._stash is None:
            return
        self._check_stash(module)
        st = self._stash
        ledger = module.ledger
        if int(st.get("batches_applied", ledger.position)) != ledger.position:
            raise CheckpointError(f"checkpoint {self._stash_path or ''}: its edit state says {st.get('batches_applied')} batches, "
                             f"its ledger holds {ledger.position}")
        self.rebuild(module)
        self._stash = None

    def rebuild(self, module: EditModule, base: dict[int, torch.Tensor] | None = None) -> None:
        """Weights := ``base`` (default: the model's current, unedited weights) + the ledger's
        batches; ``K_p K_p^T`` from the ledger's keys."""
        ad = module.adapter
        if base is None:
            base = {l: ad.weight_as_linear(l).detach().clone() for l in module.layers}
        if not self.master:
            self.master = master_copies(ad, module.layers)
        module.ledger.replay(ad, module.layers, base, self.master)
        if self.method is not None and hasattr(self.method, "reset"):
            self.method.reset(module.ledger.keys_per_batch(module.layers, device=module.device_))

    @property
    def batches_applied(self) -> int:
        """Batches applied (the ledger's position)."""
        return self._module.ledger.position if self._module is not None else 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, EditModule):
            raise TypeError(f"{type(self).__name__} needs an EditModule, got {type(pl_module).__name__}")
        self._module = pl_module
        ckpt = trainer.checkpoint_callback
        if stage == "fit" and pl_module.ledger.directory is None and ckpt is not None and getattr(ckpt, "dirpath", None):
            pl_module.ledger.directory = Path(ckpt.dirpath) / "ledger"  # batch files appended beside the checkpoints
        bs = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        if stage == "fit" and bs is not None and bs < trainer.world_size:
            raise InputError(f"batch_size {bs} is smaller than the number of processes {trainer.world_size}")

    def on_fit_start(self, trainer, pl_module: EditModule) -> None:
        # runs after the checkpoint (if any) is restored into self._stash
        self.prepare(pl_module, trainer)

    def on_train_start(self, trainer, pl_module: EditModule) -> None:
        # the stream loader exists (and has its restored position) only from here on
        loader = trainer.train_dataloader
        if loader is not None and hasattr(loader, "applied") and loader.applied != self.batches_applied:
            raise CheckpointError(f"edit stream position ({loader.applied} batches) disagrees with the edit state ({self.batches_applied} batches applied)")

    def on_validation_start(self, trainer, pl_module: EditModule) -> None:
        if trainer.state.fn != "fit":
            self._restore_edits(pl_module)

    def on_test_start(self, trainer, pl_module: EditModule) -> None:
        self._restore_edits(pl_module)

    # ---- the update --------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module: EditModule, outputs, batch, batch_idx: int) -> None:
        edit_batch, rb, res = pl_module._pending
        if edit_batch.index != self.batches_applied:
            raise RuntimeError(f"batch {edit_batch.index} arrived but {self.batches_applied} batches are applied: the stream is out of order")
        tensors: dict = {}
        world = trainer.world_size
        info = apply_update(
            # rb / res are None on a process with no request of this batch (it still joins the gathers)
            pl_module.adapter, rb, None if res is None else res.z_target, pl_module.layers, self.method,
            gather=lambda t: pl_module.gather_rows(t, len(edit_batch.requests)), max_rows=pl_module.max_rows,
            master=self.master, record=tensors, context=pl_module.update_context,
            # every process applies rank 0's update: processes can never drift apart
            broadcast=(lambda obj: trainer.strategy.broadcast(obj, src=0)) if world > 1 else None,
            on_record=lambda t, inf: pl_module.ledger.append(
                self.batch_record(edit_batch.index, [r.case_id for r in edit_batch.requests], inf, t, requests=edit_batch.requests),
                write=trainer.is_global_zero),
        )
        pl_module._pending = None
        loader = trainer.train_dataloader
        if hasattr(loader, "applied"):
            loader.applied = self.batches_applied
        self.last_info = info
        pl_module.log_dict(info, on_step=True, batch_size=len(edit_batch.requests))
        pl_module.log("edits_applied", float(pl_module.num_edits), on_step=True, prog_bar=True, batch_size=1)
        pl_module.record_applied(edit_batch)  # history + mid-stream evaluation, before this batch's checkpoint

    def batch_record(self, index: int, request_ids: list[str], info: dict, tensors: dict, requests=None):
        """The ledger's record of an applied batch; ``requests`` (the batch's requests, in the
        order of ``request_ids``) give each request's one-line description."""
        from .ledger import BatchRecord, describe_request

        hp = self.method.hparams() if self.method is not None and hasattr(self.method, "hparams") else {}
        return BatchRecord(index=index, request_ids=list(request_ids), method=self.method_name, hparams=hp,
                           info={k: float(v) for k, v in info.items()}, tensors=tensors,
                           descriptions=[describe_request(r) for r in requests] if requests is not None else [])

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # small: the edits themselves are in the module's ledger (one file per batch), the
        # weights and K_p K_p^T are rebuilt from it on load
        if self._module is None:
            return {}
        m = self._module
        return {
            "method_name": self.method_name,
            "base_fingerprint": self.base_fingerprint,
            "model_name": str(m.model_name),
            "layers": list(m.layers),
            "batches_applied": self.batches_applied,
            "num_edits": m.num_edits,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if state_dict.get("method_name") != self.method_name:
            raise CheckpointError(f"checkpoint {self._stash_path or ''} was written by method {state_dict.get('method_name')!r}, "
                             f"this run uses {self.method_name!r}")
        self._stash = state_dict

    _stash_path: str | None = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._stash_path = str(trainer.ckpt_path) if trainer.ckpt_path else None

    _module: EditModule | None = None

    def on_fit_end(self, trainer, pl_module: EditModule) -> None:
        path = self._default_export_path(trainer)  # on every rank: trainer.log_dir is a broadcast under DDP
        if trainer.is_global_zero:
            self.export(pl_module, path)

    def _default_export_path(self, trainer) -> Path:
        if self.export_path:
            return Path(self.export_path)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            return Path(ckpt.dirpath) / "edited.safetensors"
        return Path(trainer.log_dir or trainer.default_root_dir) / "edited.safetensors"

    def export(self, module: EditModule, path: str | Path) -> Path:
        weights = {module.adapter.weight_name(l): module.adapter.down_proj(l).weight for l in module.layers}
        meta = {"method": self.method_name, "base_model": str(module.model_name), "num_edits": module.num_edits,
                "layers": module.layers, "config_fingerprint": config_fingerprint(module.lm)}
        return save_edits(path, weights, meta)



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
    """

    method_name = "memit"

    def __init__(self, lam: float = 15000.0, stats: StatsConfig = StatsConfig(), solve_dtype: SolveDType = "float64", export_path: str | None = None,
                 norm_lambda: float = 0.0):
        super().__init__(stats, solve_dtype, export_path)
        if norm_lambda < 0:
            raise InputError(f"norm_lambda must be >= 0 (0 = off), got {norm_lambda}")
        self.lam, self.norm_lambda = lam, norm_lambda

    def build_method(self, module, moments, trainer=None):
        return MemitMethod(lam=self.lam, moments=moments, solve_dtype=self.solve_dtype, norm_lambda=self.norm_lambda)


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
    """

    method_name = "alphaedit"

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
    ):
        super().__init__(stats, solve_dtype, export_path)
        if solver not in ("woodbury", "direct"):
            raise InputError(f"AlphaEdit solver must be 'woodbury' or 'direct', got {solver!r}")
        if norm_lambda < 0:
            raise InputError(f"norm_lambda must be >= 0 (0 = off), got {norm_lambda}")
        self.threshold, self.threshold_mode, self.l2, self.solver = nullspace_threshold, threshold_mode, l2, solver
        self.norm_lambda = norm_lambda
        self.projector_info: dict[int, dict] = {}

    def build_method(self, module, moments, trainer=None):
        rank0 = trainer is None or trainer.is_global_zero
        projs, self.projector_info = projectors(module.adapter, moments, self.stats, self.threshold, self.threshold_mode, is_writer=rank0)
        for l, info in self.projector_info.items():
            if info["rank"] == 0:
                raise InputError(f"layer {l}: the null-space projector has rank 0 (threshold {self.threshold} {self.threshold_mode} keeps no direction); raise the threshold")
        device = module.device_
        return AlphaEditMethod(l2=self.l2, projectors={l: p.to(device) for l, p in projs.items()}, solve_dtype=self.solve_dtype,
                               solver=self.solver, norm_lambda=self.norm_lambda)


