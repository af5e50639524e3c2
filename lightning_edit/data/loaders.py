"""Records to requests, fact and long-form alike: the one registry of record formats.

:data:`FORMATS` names every format ``--data.format`` accepts and the kind of request it gives;
:func:`requests_from_records` reads a list of records in one of them (or ``auto``) and returns
validated requests (:class:`~lightning_edit.data.requests.EditRequest` or
:class:`~lightning_edit.longform.records.LongFormRequest`), numbered from ``start_index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_edit.data.formats import FORMATS as FACT_FORMATS
from lightning_edit.data.formats import iter_requests
from lightning_edit.data.requests import Request
from lightning_edit.errors import InputError
from lightning_edit.longform.records import LONGFORM_FORMATS, detect_longform_format, iter_longform_requests

FORMATS: dict[str, str] = {
    **{f: "fact" for f in FACT_FORMATS},  # CounterFact nested / flat, ZsRE (MQuAKE / AKEW chains as facts)
    **{f: "longform" for f in LONGFORM_FORMATS},  # UnKEBench, AKEW's long answers, EditEverything, generic
    "longform": "longform",  # any long-form format, detected per record
}
"""Format name -> kind of request (``fact`` / ``longform``); ``auto`` detects per record."""

_FACT_KEYS = {"requested_rewrite", "target_new", "src", "answers"}


def requests_from_records(records: Sequence[Any], fmt: str = "auto", start_index: int = 0,
                          indices: Sequence[int] | None = None) -> list[Request]:
    """Validated requests from ``records`` in format ``fmt`` (a name of :data:`FORMATS` or
    ``auto``). ``auto`` reads records with an ``answer`` and no fact fields (UnKEBench,
    EditEverything, generic ``{prompt|question, answer}``) as long-form, everything else (MQuAKE /
    AKEW included) as facts. A bad record raises a :class:`~lightning_edit.data.requests.RequestError`
    naming it, before anything is edited. ``indices`` (optional): each record's dataset position
    when they are not consecutive."""
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown record format {fmt!r}; expected 'auto' or one of {sorted(FORMATS)}")
    if FORMATS.get(fmt) == "longform":
        return list(iter_longform_requests(records, "auto" if fmt == "longform" else fmt, start_index=start_index, indices=indices))
    first = records[0] if records else None
    if fmt == "auto" and isinstance(first, dict) and "answer" in first and not _FACT_KEYS & set(first):
        try:
            detect_longform_format(first, indices[0] if indices else start_index)
        except ValueError:
            pass
        else:
            return list(iter_longform_requests(records, "auto", start_index=start_index, indices=indices))
    return list(iter_requests(records, fmt, start_index=start_index, indices=indices))
