"""Edit requests in memory, whatever file format they came from.

Every fact loader (CounterFact nested / flat, ZsRE, MQuAKE / AKEW, factworld) turns its records
into :class:`EditRequest`; the long-form loaders (UnKEBench, AKEW's long answers,
EditEverything) into :class:`~lightning_edit.longform.records.LongFormRequest`. Both follow the
:class:`Request` protocol, which is all the stream, the ledger and the loader read of a request
besides its own kind's fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol, runtime_checkable

from lightning_edit.errors import InputError

Family = Literal["counterfact", "zsre"]
Kind = Literal["fact", "longform"]


class RequestError(InputError):
    """A record that cannot be edited; the message names the record and the field."""

    def __init__(self, record: int | str, field_name: str, problem: str):
        self.record = record
        self.field = field_name
        super().__init__(f"edit record {record!r}, field {field_name!r}: {problem}")


@runtime_checkable
class Request(Protocol):
    """What every kind of edit request provides.

    Attributes:
        kind: ``"fact"`` (one target after a prompt, one residual vector) or ``"longform"`` (an
            answer of many tokens, one residual vector per chunk). A batch holds one kind.
        case_id: the request's unique name in its stream.
        record_index: its record's position in the dataset (-1: not from a dataset).
    """

    kind: ClassVar[str]
    case_id: str
    record_index: int

    def validate(self) -> "Request":
        """The request itself, or a :class:`RequestError` naming the record and the field."""
        ...

    def describe(self) -> str:
        """One short line saying what the request changes (ledgers, logs)."""
        ...

    def fingerprint(self) -> tuple[str, ...]:
        """The fields that identify the request in a stream (a resumed stream must hold the same)."""
        ...


def request_kind(requests: Sequence[Request]) -> Kind | None:
    """The kind of a batch's requests (None for an empty batch); a batch that mixes kinds is an
    :class:`~lightning_edit.errors.InputError`."""
    kinds = {r.kind for r in requests}
    if len(kinds) > 1:
        raise InputError("a batch mixes long-form and single-fact requests; edit them in separate streams")
    return next(iter(kinds), None)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def control_character(text: str) -> str | None:
    """A description of the first control character in ``text`` (NUL, BEL, an ANSI escape ...;
    tab, newline and carriage return are text), or None when it has none."""
    m = _CONTROL.search(text)
    return None if m is None else f"control character {m.group()!r} at position {m.start()}"


def describe_value(value) -> str:
    """``repr(value)`` cut to 80 characters (error messages quote a record's value with it)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def case_id_text(value, record: int | str, field_name: str = "case_id") -> str:
    """A record's id as a string: a non-empty string or an integer (an integral float, which Arrow
    makes of an int column, counts as one). Booleans, NaN, infinities, fractions, lists and
    objects are a :class:`RequestError` naming the record and ``field_name``."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise RequestError(record, field_name, f"expected a non-empty string or an integer, got {describe_value(value)}")
    if isinstance(value, str) and (bad := control_character(value)):
        raise RequestError(record, field_name, bad)
    return str(value)


def short(text, limit: int) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters with "..."."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: max(limit - 3, 1)].rstrip() + "..."


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    ``prompt`` is a template with exactly one ``{}`` where the subject goes
    (``"The mother tongue of {} is"``). Targets are stored as given; use
    :func:`target_text` to join a target onto a rendered prompt.

    ``locality`` holds ``(prompt, true_answer)`` pairs about *other* subjects that the
    edit must not change (CounterFact neighbourhood prompts, ZsRE ``loc``/``loc_ans``).
    ``family`` picks the metric family: ``counterfact`` compares target likelihoods,
    ``zsre`` measures teacher-forced token accuracy.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()
    family: Family = "counterfact"
    record_index: int = -1
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    kind: ClassVar[str] = "fact"

    def describe(self) -> str:
        """``Danielle Darrieux: French -> English`` (``?`` when the old target is unknown)."""
        old = short(self.target_true, 40) if self.target_true is not None and str(self.target_true).strip() else "?"
        return f"{short(self.subject, 60)}: {old} -> {short(self.target_new, 40)}"

    def fingerprint(self) -> tuple[str, ...]:
        return (self.case_id, self.prompt, self.subject, self.target_new)

    @property
    def rendered_prompt(self) -> str:
        """The prompt with the subject written in."""
        return self.prompt.replace("{}", self.subject, 1)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span ``[start, end)`` of the subject inside :attr:`rendered_prompt`."""
        start = self.prompt.index("{}")
        return start, start + len(self.subject)

    def validate(self) -> "EditRequest":
        """Raise :class:`RequestError` naming the record and field if this cannot be edited."""
        rec = self.record_index if self.record_index >= 0 else self.case_id
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise RequestError(rec, "prompt", "empty prompt")
        n = self.prompt.count("{}")
        if n != 1:
            raise RequestError(rec, "prompt", f"needs exactly one '{{}}' placeholder for the subject, found {n}: {self.prompt!r}")
        if not isinstance(self.subject, str) or not self.subject.strip():
            raise RequestError(rec, "subject", "empty subject")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise RequestError(rec, "target_new", "empty target")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            raise RequestError(rec, "target_true", "empty target")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise RequestError(rec, "target_new", f"equals target_true ({self.target_true!r}): nothing to edit")
        for i, p in enumerate(self.paraphrase_prompts):
            if not isinstance(p, str) or not p.strip():
                raise RequestError(rec, f"paraphrase_prompts[{i}]", "empty prompt")
        for i, pair in enumerate(self.locality):
            if len(pair) != 2 or not all(isinstance(s, str) and s.strip() for s in pair):
                raise RequestError(rec, f"locality[{i}]", f"needs a non-empty (prompt, answer) pair, got {pair!r}")
        if self.family not in ("counterfact", "zsre"):
            raise RequestError(rec, "family", f"unknown metric family {self.family!r}")
        texts = [("case_id", self.case_id), ("prompt", self.prompt), ("subject", self.subject), ("target_new", self.target_new),
                 ("target_true", self.target_true or "")]
        texts += [(f"paraphrase_prompts[{i}]", p) for i, p in enumerate(self.paraphrase_prompts)]
        texts += [(f"locality[{i}]", " ".join(pair)) for i, pair in enumerate(self.locality)]
        texts += [(f"generation_prompts[{i}]", g) for i, g in enumerate(self.generation_prompts)]
        for name, text in texts:
            if not isinstance(text, str):
                raise RequestError(rec, name, f"expected a string, got {type(text).__name__}")
            if bad := control_character(text):
                raise RequestError(rec, name, bad)
        return self


def target_text(prompt: str, target: str) -> str:
    """The target as it follows ``prompt`` in running text: a space is inserted between a
    prompt that does not end in whitespace and a target that does not start with it
    (``"... is" + " English"``), as the reference implementations do."""
    if prompt and not prompt[-1].isspace() and target and not target[0].isspace():
        return " " + target
    return target
