"""DDP for a frozen model: process groups, collectives and launchers, without the wrapper.

Editing never back-propagates into the LM's parameters (they all have ``requires_grad=False``;
the residual vectors are fresh tensors optimized inside ``training_step``), so there are no
gradients for :class:`~torch.nn.parallel.DistributedDataParallel` to all-reduce, and stock
``ddp`` / ``ddp_spawn`` refuse to wrap such a module ("DistributedDataParallel is not needed
when a module doesn't have any parameter that requires a gradient"). :class:`FrozenDDPStrategy`
keeps everything else of :class:`~lightning.pytorch.strategies.DDPStrategy` (``reduce``,
``all_gather``, ``broadcast``, ``barrier``, rank-0 checkpoint writes, the popen / spawn / fork
launchers) and only skips the wrapping.

Importing this module registers, in Lightning's ``StrategyRegistry``:

=========================  ==============
name                       start method
=========================  ==============
``ddp_frozen``             popen (re-runs the command line once per extra process)
``ddp_frozen_spawn``       spawn
``ddp_frozen_fork``        fork
``ddp_frozen_notebook``    fork
``sharded_edit``           popen (:class:`ShardedEditStrategy`: the weights sharded with FSDP2)
``sharded_edit_spawn``     spawn
=========================  ==============

so a config can say ``trainer.strategy: ddp_frozen``. :mod:`lightning_edit` and
:mod:`lightning_edit.cli` import it. The CLI also turns the stock aliases (``ddp``,
``ddp_spawn``, ..., ``fsdp``) and ``auto`` on several devices into these; a plain ``Trainer``
needs the name (or a strategy instance) itself.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn

from lightning_edit.engine.sharding import load_weights, model_is_sharded, shard_blocks

log = logging.getLogger(__name__)

#: registered name -> start method
FROZEN_DDP_ALIASES = {
    "ddp_frozen": "popen",
    "ddp_frozen_spawn": "spawn",
    "ddp_frozen_fork": "fork",
    "ddp_frozen_notebook": "fork",
}

#: stock DDP alias -> its frozen counterpart (see :func:`frozen_alias`)
STOCK_TO_FROZEN = {
    "ddp": "ddp_frozen",
    "ddp_spawn": "ddp_frozen_spawn",
    "ddp_fork": "ddp_frozen_fork",
    "ddp_notebook": "ddp_frozen_notebook",
    "fsdp": "sharded_edit",  # Lightning's FSDP wraps trainable modules and needs a GPU
}


class FrozenDDPStrategy(DDPStrategy):
    """:class:`DDPStrategy` that does not wrap the module in ``DistributedDataParallel``.

    Every process holds a full copy of the (frozen) model and must keep it identical to the
    others by applying identical updates (the editing callbacks gather the per-process rows
    and compute the same closed form everywhere). Accepts every ``DDPStrategy`` argument.
    """

    strategy_name = "ddp_frozen"

    def configure_ddp(self) -> None:
        assert isinstance(self.model, pl.LightningModule)
        log.debug(f"{self.__class__.__name__}: frozen model, not wrapping in DistributedDataParallel")
        # nothing to wrap: ``self.model`` stays the LightningModule, so Lightning calls its
        # ``training_step`` directly and no gradient hooks are registered

    #: registered name -> start method; what the registry says of them
    aliases = FROZEN_DDP_ALIASES
    description = "DDP for a frozen model (no DistributedDataParallel wrapper)"

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        for name, start_method in cls.aliases.items():
            if name in strategy_registry:
                continue
            strategy_registry.register(name, cls, description=f"{cls.description}, start_method '{start_method}'",
                                       start_method=start_method)


def frozen_alias(strategy):
    """The frozen counterpart of a stock DDP alias (``"ddp"`` -> ``"ddp_frozen"``, ...);
    anything else is returned unchanged."""
    if isinstance(strategy, str):
        return STOCK_TO_FROZEN.get(strategy, strategy)
    return strategy


#: registered name -> start method
SHARDED_ALIASES = {
    "sharded_edit": "popen",
    "sharded_edit_spawn": "spawn",
}


class ShardedEditStrategy(FrozenDDPStrategy):
    """Edit a model whose weights are sharded across processes (torch's FSDP2).

    Every decoder block of the frozen LM is wrapped by :func:`torch.distributed.fsdp.fully_shard`
    over a 1-D device mesh of all processes as it moves to its device: each process keeps
    ``1/world`` of every block weight, and a block's full weights exist only while the block runs;
    the embeddings, final norm and LM head stay whole (:func:`~lightning_edit.engine.sharding.shard_blocks`).
    Runs on GPUs (NCCL) and on CPU (gloo), which Lightning's stock ``fsdp`` strategy refuses.

    The weights are sharded; of the work, only the z optimization is split: each process
    optimizes a contiguous share of the batch's requests, in lockstep (FSDP's collectives need
    the same forwards and backwards in the same order everywhere:
    :class:`~lightning_edit.engine.forward_plan.Lockstep`); the keys, the statistics and the
    evaluation run whole on every process (:func:`data_shards` is ``(1, 0)``).
    Each edit layer has an owner process that keeps its statistics and solver state and solves
    it (:class:`~lightning_edit.engine.update.LayerOwnership`); every process adds its slice of
    the owner's update to its slice of the weight. So it buys memory first; a model that fits
    one device edits faster under ``ddp_frozen`` (no weights gathered for every block).
    Checkpoints, the ledger and exports are written by rank 0 from gathered tensors.
    """

    strategy_name = "sharded_edit"
    aliases = SHARDED_ALIASES
    description = "the frozen LM's weights sharded with FSDP2 (CPU or GPU)"
    #: every process runs every request (see :func:`data_shards`)
    shards_weights = True

    def setup(self, trainer: "pl.Trainer") -> None:
        # DDPStrategy.setup without its module-state sync for validate / test (a broadcast of every
        # parameter, which DTensor slices refuse; every process loaded the same checked model)
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def model_to_device(self) -> None:
        # the LM reaches its device block by block while it is sharded (each process receives
        # only its slices), never whole
        self.shard_model()

    def shard_model(self) -> None:
        """Wrap the LightningModule's LM with FSDP2 on this process's device (once; a second fit
        keeps the sharding)."""
        from torch.distributed.device_mesh import init_device_mesh

        module = self.lightning_module
        lm, adapter = getattr(module, "lm", None), getattr(module, "adapter", None)
        if lm is None or adapter is None:
            raise TypeError(f"{self.strategy_name}: the LightningModule must be an EditModule (an `lm` and its `adapter`), "
                            f"got {type(module).__name__}")
        if model_is_sharded(lm):
            return
        mesh = init_device_mesh(self.root_device.type, (self.world_size,))
        files = getattr(module, "weight_files", None)  # init_on_meta: the weights are read after sharding
        shard_blocks(lm, [adapter.layer(i) for i in range(adapter.n_layers)], mesh, None if files else self.root_device)
        if files:
            load_weights(lm, files, self.root_device)
            module.weight_files = None
        log.debug(f"{self.strategy_name}: {adapter.n_layers} decoder blocks sharded over {self.world_size} processes"
                  + (" and read from their files" if files else ""))

    def teardown(self) -> None:
        # as the parent's, but the sharded LM stays on its device: FSDP2 modules cannot be moved
        # with Module.cpu() (their DTensor parameters fail in _apply); the process group stays for
        # the next trainer call in the same process
        assert self.cluster_environment is not None and self.accelerator is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()



def data_shards(trainer) -> tuple[int, int]:
    """``(number of shards, this process's shard)`` a batch, the statistics corpus and an
    evaluation are split into: the processes under DDP, ``(1, 0)`` alone or when the weights are
    sharded (every process runs everything)."""
    if trainer is None or getattr(trainer.strategy, "shards_weights", False):
        return 1, 0
    return trainer.world_size, trainer.global_rank


FrozenDDPStrategy.register_strategies(StrategyRegistry)
ShardedEditStrategy.register_strategies(StrategyRegistry)

__all__ = ["FrozenDDPStrategy", "ShardedEditStrategy", "FROZEN_DDP_ALIASES", "SHARDED_ALIASES", "STOCK_TO_FROZEN",
           "frozen_alias", "data_shards"]
