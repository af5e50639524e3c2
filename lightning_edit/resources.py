"""Built-in resources addressed by name in configs: ``factworld:<preset>/<item>``.

``factworld:default/model`` builds the offline fact-world model on first use (cached under
``checkpoints/factworld``) and returns its directory; ``/counterfact``, ``/zsre``, ``/corpus``,
``/facts``, ``/references``, ``/documents``, ``/heldout`` (held-out text for perplexity) return
the matching files. ``smollm2:135m-instruct`` installs the real SmolLM2-135M-Instruct model
on first use (:mod:`lightning_edit.hfmodels`) and returns its Hugging Face directory.
``realfacts:<model>/counterfact`` (``/counterfact_all``, ``/probes``, ``/known``, ``/facts``) are real-world facts
that model knows (:mod:`lightning_edit.realfacts`); ``corpus:<kind>...`` statistics corpora
without Wikipedia (:mod:`lightning_edit.corpora`). Any other string is returned unchanged (a hub id or a local path).
"""

from __future__ import annotations

import os

from .errors import InputError

PREFIX = "factworld:"
ITEMS = ("model", "counterfact", "zsre", "corpus", "facts", "references", "documents", "heldout", "longform", "longform_docs")


def resolve(spec: str, root: str | None = None) -> str:
    if isinstance(spec, str) and spec.startswith("corpus:"):
        from .corpora import resolve as resolve_corpus

        return resolve_corpus(spec, root)
    if isinstance(spec, str) and spec.startswith("realfacts:"):
        from .realfacts import resolve as resolve_facts

        return resolve_facts(spec, root)
    if isinstance(spec, str) and spec.startswith("smollm2:"):
        from .hfmodels import resolve as resolve_model

        return resolve_model(spec, root)
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        return spec
    rest = spec[len(PREFIX):]
    preset, _, item = rest.partition("/")
    seed = 0
    if "@" in preset:
        preset, s = preset.split("@", 1)
        seed = int(s)
    item = item or "model"
    if item not in ITEMS:
        raise InputError(f"{spec!r}: unknown factworld item {item!r}; choose from {ITEMS}")
    from .factworld.build import ensure_factworld

    paths = ensure_factworld(root or os.environ.get("LIGHTNING_EDIT_FACTWORLD", "checkpoints/factworld"), seed=seed, preset=preset or "default")
    if item in ("longform", "longform_docs"):  # long-form requests (AnyEdit), written next to the build on first use
        from .factworld.longform import ensure_longform

        return str(ensure_longform(paths.root, seed, preset or "default", "documents" if item == "longform_docs" else "biography"))
    return str(paths.model_dir if item == "model" else getattr(paths, item))
