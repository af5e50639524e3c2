"""lightning-edit: knowledge editing of Hugging Face causal LMs (MEMIT, AlphaEdit, AnyEdit)."""

__version__ = "0.1.0"

# registers the "ddp_frozen*" strategies (DDP without the wrapper, for the frozen model)
from . import strategies as _strategies  # noqa: E402,F401
