"""Progress bars of the long steps inside an edit run (tqdm on stderr, no Lightning).

* :func:`progress_bar`: the bars of the steps inside a batch or before the stream (key
  statistics, each batch's residual optimization, evaluation), with a total and an ETA.
* :class:`ResidualProgress`: the ``on_step`` callback of
  :func:`lightning_edit.engine.residuals.optimize_residuals`: one tick per Adam step, the mean loss
  in the postfix, read from the device at most once per :attr:`ResidualProgress.read_every_s`
  (never a synchronization per step) and once at the end.
* :func:`show_progress`: whether this process draws bars (a trainer whose progress bar is on, on
  global rank 0; without a trainer, the Python API's default).
"""

from __future__ import annotations

import sys
import time

import torch
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
