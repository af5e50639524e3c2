"""lightning-edit: knowledge editing of Hugging Face causal LMs (MEMIT, AlphaEdit, AnyEdit)."""

from lightning_edit import (
    builtin,  # noqa: F401  (registers factworld:, smollm2:, realfacts:, corpus:)
    strategies,  # noqa: F401  (registers trainer.strategy: ddp_frozen, ddp_frozen_spawn, ...)
)
from lightning_edit.api import Editor, load_edited
from lightning_edit.data.requests import EditRequest
from lightning_edit.version import __version__

__all__ = ["Editor", "EditRequest", "load_edited", "__version__"]
