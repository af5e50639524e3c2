"""lightning-edit: knowledge editing of Hugging Face causal LMs (MEMIT, AlphaEdit)."""

__version__ = "0.1.0"

from . import strategies  # noqa: E402,F401  (registers trainer.strategy: ddp_frozen, ddp_frozen_spawn, ...)
from .api import Editor, load_edited  # noqa: E402
from .data.requests import EditRequest  # noqa: E402

__all__ = ["Editor", "EditRequest", "load_edited", "__version__"]
