"""Progress a person can read: one tqdm bar (on stderr) per long step of an edit run.

* :class:`EditProgressBar`: Lightning's bar, as the edit stream: ``edit batches 3/10 [..., edits=30]``
  (no ``Epoch 0/0``, no ``v_num``); the CLI's default.
* :func:`~lightning_edit.engine.bars.progress_bar` and
  :class:`~lightning_edit.engine.bars.ResidualProgress` (in the engine, no Lightning): the bars of
  the steps inside a batch or before the stream, with a total and an ETA.

Bars are shown where :func:`show_progress` says so: a trainer whose progress bar is on
(``--trainer.enable_progress_bar=false`` turns them all off) and only on global rank 0.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

from lightning_edit.engine.bars import ResidualProgress, progress_bar, show_progress  # noqa: F401  (also this module's names)


def drop_disabled_progress_bar(config: dict) -> dict:
    """The trainer's ``config`` without progress-bar callbacks when ``enable_progress_bar`` is
    false (Lightning refuses a progress-bar callback together with the flag off; the CLI's
    default callbacks hold :class:`EditProgressBar`)."""
    if config.get("enable_progress_bar", True) is False and isinstance(config.get("callbacks"), list):
        config = {**config, "callbacks": [c for c in config["callbacks"] if not isinstance(c, ProgressBar)]}
    return config


class EditProgressBar(TQDMProgressBar):
    """Lightning's progress bar as the edit stream: ``edit batches 3/10 [00:12<00:28, edits=30]``;
    no epoch, no ``v_num``; every bar on stderr. Disabled on processes other than global rank 0
    and with ``--trainer.enable_progress_bar=false``.

    Args:
        refresh_rate: redraw every this many batches.
        leave: a new bar per epoch, each left on screen (the stream has one epoch).
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = False):
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    def _tqdm(self, desc: str, position: int, leave: bool) -> Tqdm:
        return Tqdm(desc=desc, position=position, disable=self.is_disabled, leave=leave, dynamic_ncols=True, file=sys.stderr,
                    smoothing=0, bar_format=self.BAR_FORMAT)

    def init_sanity_tqdm(self) -> Tqdm:
        return self._tqdm(self.sanity_check_description, 2 * self.process_position, False)

    def init_train_tqdm(self) -> Tqdm:
        return self._tqdm("edit batches", 2 * self.process_position, True)

    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"
        return self._tqdm("evaluation requests", 2 * self.process_position + has_main_bar, not has_main_bar)

    def init_test_tqdm(self) -> Tqdm:
        return self._tqdm("test requests", 2 * self.process_position, True)

    # Lightning's hooks without its descriptions ("Epoch 0", "Validation DataLoader 0"): the
    # bars keep the ones they were created with
    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=convert_inf(self.total_train_batches))
        self.train_progress_bar.initial = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            self.val_progress_bar.reset(total=convert_inf(self.total_val_batches_current_dataloader))
            self.val_progress_bar.initial = 0

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.has_dataloader_changed(dataloader_idx):
            self.test_progress_bar.reset(total=convert_inf(self.total_test_batches_current_dataloader))
            self.test_progress_bar.initial = 0

    def get_metrics(self, trainer, pl_module) -> dict:
        """``edits``: requests applied (the bar is drawn after ``training_step`` applied the
        batch); ``z_loss``: the last batch's final mean residual
        loss; then any metric logged with ``prog_bar=True``; no ``v_num``."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        items.pop("edits_applied", None)  # shown as the integer ``edits``
        out: dict = {}
        if hasattr(pl_module, "num_edits"):
            out["edits"] = pl_module.num_edits
        z_loss = getattr(pl_module, "last_z_loss", None)
        if z_loss is not None:
            out["z_loss"] = f"{z_loss:.3f}"
        return {**out, **items}
