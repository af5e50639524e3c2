"""lightning-edit: knowledge editing of Hugging Face causal LMs (MEMIT, AlphaEdit, AnyEdit)."""

__version__ = "0.1.0"
