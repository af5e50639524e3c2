"""Resources addressed by name in configs and on the command line: a registry of name prefixes.

A built-in fills it from below when it is imported (:mod:`lightning_edit.builtin` imports them
all, and the package imports :mod:`lightning_edit.builtin`):

* ``factworld:<preset>/<item>``: the offline fact world's model and files
  (:mod:`lightning_edit.builtin.factworld.resource`);
* ``smollm2:135m-instruct``: the real SmolLM2-135M-Instruct, installed on first use
  (:mod:`lightning_edit.builtin.hfmodels`);
* ``realfacts:<model>/counterfact`` (``/counterfact_all``, ``/probes``, ``/known``, ``/facts``):
  real-world facts that model knows (:mod:`lightning_edit.builtin.realfacts`);
* ``corpus:<kind>...``: statistics corpora without Wikipedia (:mod:`lightning_edit.builtin.corpora`).

Any other string is returned unchanged (a hub id or a local path). This module imports nothing
of the package but its errors, so every layer can resolve names.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_edit.errors import InputError

Resolver = Callable[[str, "str | None"], str]
_RESOLVERS: dict[str, Resolver] = {}


def register(prefix: str, resolver: Resolver) -> None:
    """Resolve names starting with ``prefix`` (e.g. ``"corpus:"``) with ``resolver(spec, root)``."""
    if not prefix.endswith(":"):
        raise InputError(f"a resource prefix ends with ':', got {prefix!r}")
    _RESOLVERS[prefix] = resolver


def prefixes() -> list[str]:
    """The registered name prefixes."""
    return sorted(_RESOLVERS)


def resolve(spec: str, root: str | None = None) -> str:
    """The path (or hub id) a resource name stands for; ``root`` overrides where a built-in
    resource is built or cached. A string without a registered prefix is returned unchanged."""
    if isinstance(spec, str):
        for prefix, resolver in _RESOLVERS.items():
            if spec.startswith(prefix):
                return resolver(spec, root)
    return spec
