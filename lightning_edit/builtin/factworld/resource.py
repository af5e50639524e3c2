"""``factworld:<preset>[@seed]/<item>``: the offline fact world's model and files by name.

``factworld:default/model`` builds the fact-world model on first use (cached under
``checkpoints/factworld``, or ``$LIGHTNING_EDIT_FACTWORLD``) and returns its directory;
``/counterfact``, ``/zsre``, ``/corpus``, ``/facts``, ``/references``, ``/documents``,
``/heldout`` (held-out text for perplexity) return the matching files, ``/longform`` and
``/longform_docs`` long-form requests written next to the build on first use.
"""

from __future__ import annotations

import os

from lightning_edit.builtin.factworld.build import ensure_factworld
from lightning_edit.builtin.factworld.longform import ensure_longform
from lightning_edit.errors import InputError

PREFIX = "factworld:"
ITEMS = ("model", "counterfact", "zsre", "corpus", "facts", "references", "documents", "heldout", "longform", "longform_docs")


def resolve(spec: str, root: str | None = None) -> str:
    rest = spec[len(PREFIX):]
    preset, _, item = rest.partition("/")
    seed = 0
    if "@" in preset:
        preset, s = preset.split("@", 1)
        seed = int(s)
    item = item or "model"
    if item not in ITEMS:
        raise InputError(f"{spec!r}: unknown factworld item {item!r}; choose from {ITEMS}")
    paths = ensure_factworld(root or os.environ.get("LIGHTNING_EDIT_FACTWORLD", "checkpoints/factworld"), seed=seed, preset=preset or "default")
    if item in ("longform", "longform_docs"):  # long-form requests (AnyEdit), written next to the build on first use
        return str(ensure_longform(paths.root, seed, preset or "default", "documents" if item == "longform_docs" else "biography"))
    return str(paths.model_dir if item == "model" else getattr(paths, item))
