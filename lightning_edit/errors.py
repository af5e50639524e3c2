"""The errors lightning-edit raises on purpose, for a user to act on.

Every deliberate, user-facing error of the package (a bad record in the data, a bad setting, a
missing file, a refused or corrupt checkpoint) is an :class:`EditError`: its message alone says
what is wrong and where (the record, the field, the file, the setting), so the ``lightning-edit``
console script prints it as one line, ``lightning-edit: error: <message>``, and exits with
status 1, without a traceback (``--verbose`` or ``LIGHTNING_EDIT_VERBOSE=1`` shows it). Any other
exception is a bug (or a library's own failure) and keeps its full traceback.

Each class also derives from the built-in exception that the raise site used before
(:class:`ValueError`, :class:`FileNotFoundError`, ...), so ``except ValueError`` callers and
tests written against the built-in types keep working.

==========================  =========================  ==================================================
class                       also a                     raised for
==========================  =========================  ==================================================
:class:`InputError`         ``ValueError``             a bad record, data file or setting
:class:`CheckpointError`    ``ValueError``             a checkpoint / ledger / export that is refused
                                                       (another model, method, layers or stream) or
                                                       corrupt
:class:`MissingFileError`   ``FileNotFoundError``      a file or directory named by the user that does
                                                       not exist
:class:`DependencyError`    ``ImportError``            an optional package that a setting needs
:class:`DownloadError`      ``RuntimeError``           a fetched file that failed or did not verify
==========================  =========================  ==================================================

Subclasses defined next to their raise sites: :class:`~lightning_edit.data.requests.RequestError`,
:class:`~lightning_edit.engine.tokens.TokenizationError`, :class:`~lightning_edit.engine.arch.ArchitectureError`,
:class:`~lightning_edit.longform.chunking.ChatTemplateError` (input errors),
:class:`~lightning_edit.checkpointing.CorruptFileError` (a checkpoint error) and
:class:`~lightning_edit.engine.closed_form.NonFiniteUpdateError` (also a ``FloatingPointError``).
"""

from __future__ import annotations

import os
import re

__all__ = [
    "EditError",
    "InputError",
    "CheckpointError",
    "MissingFileError",
    "DependencyError",
    "DownloadError",
    "looks_like_local_path",
    "require_local_path",
]


class EditError(Exception):
    """Base class of the errors lightning-edit raises on purpose; the message is the whole story
    (no traceback is needed to act on it)."""

    def __str__(self) -> str:
        # the plain message also where a built-in base formats differently (KeyError quotes it)
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class InputError(EditError, ValueError):
    """A record, data file or setting that cannot be used; the message names it."""


class CheckpointError(EditError, ValueError):
    """A checkpoint, edit ledger or exported file that is refused (made on another base model,
    with another method, layers or edit stream) or is corrupt; the message names the file."""


class MissingFileError(EditError, FileNotFoundError):
    """A file or directory named by the user (a dataset, a corpus, a model, a checkpoint) that
    does not exist; the message names the path."""


class DependencyError(EditError, ImportError):
    """An optional package that a setting needs is not installed; the message says what to install."""


class DownloadError(EditError, RuntimeError):
    """A file that lightning-edit fetches could not be fetched or does not match its checksum."""


# A file name with one of these extensions is a local file, never a hub id.
_FILE_SUFFIX = re.compile(r"\.(json|jsonl|txt|parquet|csv|tsv|arrow|gguf|safetensors|bin|pt|yaml|yml)$", re.IGNORECASE)


def looks_like_local_path(name: str) -> bool:
    """Whether ``name`` (a hub id or a local path) can only mean a local path: it starts with
    ``.``, ``~`` or ``/``, holds a backslash or two or more ``/`` (a hub id is ``owner/name``),
    or ends in a file extension such as ``.json`` / ``.jsonl`` / ``.txt`` / ``.parquet`` /
    ``.csv`` / ``.gguf``. ``owner/name`` alone is ambiguous and counts as a hub id."""
    if not isinstance(name, str) or not name:
        return False
    return (name.startswith((".", "~", "/")) or "\\" in name or name.count("/") >= 2
            or os.sep != "/" and os.sep in name or bool(_FILE_SUFFIX.search(name)))


def require_local_path(name: str, what: str) -> None:
    """Raise :class:`MissingFileError` naming ``name`` if it looks like a local path (see
    :func:`looks_like_local_path`) but nothing exists there; a hub id passes unchecked. Call it
    before handing ``name`` to transformers / datasets, which would report a missing local file
    as a failed hub download ("Couldn't reach 'corpus.jsonl' on the Hub")."""
    if looks_like_local_path(name) and not os.path.exists(os.path.expanduser(name)):
        raise MissingFileError(f"{what} {name!r}: no such file or directory (resolved to {os.path.abspath(os.path.expanduser(name))})")
