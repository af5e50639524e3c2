"""Wall-clock time per phase of an edit, synchronized with the accelerator so GPU work is
charged to the phase that launched it. Off (``None``) everywhere by default."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class PhaseTimer:
    """Accumulates seconds per named phase: ``with timer("solve"): ...``.

    Args:
        device: the device whose queued work must finish before a phase's clock stops.
    """

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else None
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - t0


def phase(timer: PhaseTimer | None, name: str):
    """``timer(name)``, or a no-op context when there is no timer."""
    return timer(name) if timer is not None else contextlib.nullcontext()
