"""Progress a person can read: one tqdm bar (on stderr) per long step of an edit run.

* :class:`EditProgressBar`: Lightning's bar, as the edit stream: ``edit batches 3/10 [..., edits=30]``
  (no ``Epoch 0/0``, no ``v_num``); the CLI's default.
* :func:`progress_bar`: the bars of the steps inside a batch or before the stream (key
  statistics, each batch's residual optimization, evaluation), with a total and an ETA.
* :class:`ResidualProgress`: the ``on_step`` callback of
  :func:`lightning_edit.engine.residuals.optimize_residuals`: one tick per Adam step, the mean loss
  in the postfix, read from the device at most once per :attr:`ResidualProgress.read_every_s`
  (never a synchronization per step) and once at the end.

Bars are shown where :func:`show_progress` says so: a trainer whose progress bar is on
(``--trainer.enable_progress_bar=false`` turns them all off) and only on global rank 0.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from tqdm.auto import tqdm


def show_progress(trainer=None, default: bool = True) -> bool:
    """Whether this process draws progress bars: with a trainer, when its progress bar is on
    and this is global rank 0; without one (the Python API), ``default``."""
    if trainer is None:
        return default
    return getattr(trainer, "progress_bar_callback", None) is not None and bool(getattr(trainer, "is_global_zero", True))


def progress_bar(desc: str, total: int | None, unit: str, enabled: bool = True, leave: bool = False, **kw) -> tqdm:
    """A tqdm bar on stderr (a disabled one costs nothing per update)."""
    return tqdm(desc=desc, total=total, unit=unit, disable=not enabled, leave=leave, file=sys.stderr, dynamic_ncols=True, **kw)


class ResidualProgress:
    """``on_step(done, total, loss, chunks)`` for :func:`~lightning_edit.engine.residuals.optimize_residuals`:
    the bar counts Adam steps (``done`` of ``total``); the postfix is the mean of ``loss`` (a
    per-chunk device tensor) over ``chunks`` (the chunks optimized in the current phase). The
    loss is read when :attr:`read_every_s` seconds have passed since the last read (a GPU
    synchronization then, never once per step) and at :meth:`close`.
    """

    read_every_s = 1.0

    def __init__(self, desc: str, total: int | None = None, enabled: bool = True):
        self.bar = progress_bar(desc, total, "step", enabled)
        self.enabled = enabled
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._read_at = time.monotonic()
        self.mean_loss: float | None = None

    def __call__(self, done: int, total: int, loss: torch.Tensor, chunks: torch.Tensor) -> None:
        if not self.enabled:
            return
        if self.bar.total != total:
            self.bar.total = total
        self._last = (loss, chunks)
        if done > self.bar.n:
            now = time.monotonic()
            if now - self._read_at >= self.read_every_s:
                self._read_at = now
                self.bar.set_postfix(loss=f"{self._read():.3f}", refresh=False)
            self.bar.update(done - self.bar.n)

    def _read(self) -> float:
        loss, chunks = self._last
        chunks = chunks.to(loss.device)
        self.mean_loss = float(loss[chunks].mean()) if bool(chunks.any()) else float("nan")
        return self.mean_loss

    def close(self) -> None:
        """Show the final mean loss and close the bar."""
        if self.enabled and self._last is not None:
            self.bar.set_postfix(loss=f"{self._read():.3f}", refresh=False)
        self.bar.close()

    def __enter__(self) -> "ResidualProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
