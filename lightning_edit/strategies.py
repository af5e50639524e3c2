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
=========================  ==============

so a config can say ``trainer.strategy: ddp_frozen``. :mod:`lightning_edit` and
:mod:`lightning_edit.cli` import it. The CLI also turns the stock aliases (``ddp``,
``ddp_spawn``, ...) and ``auto`` on several devices into these; a plain ``Trainer`` needs the
name (or a :class:`FrozenDDPStrategy` instance) itself.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

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

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        for name, start_method in FROZEN_DDP_ALIASES.items():
            if name in strategy_registry:
                continue
            strategy_registry.register(
                name,
                cls,
                description=f"DDP for a frozen model (no DistributedDataParallel wrapper), start_method '{start_method}'",
                start_method=start_method,
            )


def frozen_alias(strategy):
    """The frozen counterpart of a stock DDP alias (``"ddp"`` -> ``"ddp_frozen"``, ...);
    anything else is returned unchanged."""
    if isinstance(strategy, str):
        return STOCK_TO_FROZEN.get(strategy, strategy)
    return strategy


FrozenDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["FrozenDDPStrategy", "FROZEN_DDP_ALIASES", "STOCK_TO_FROZEN", "frozen_alias"]
