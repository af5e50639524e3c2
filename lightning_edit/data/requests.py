"""The one in-memory shape of an edit request, whatever file format it came from.

Every loader (CounterFact nested / flat, ZsRE, factworld) turns its records into
:class:`EditRequest`; everything downstream (residual optimization, the closed-form
update, evaluation) reads only this type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lightning_edit.errors import InputError

Family = Literal["counterfact", "zsre"]


class RequestError(InputError):
    """A record that cannot be edited; the message names the record and the field."""

    def __init__(self, record: int | str, field_name: str, problem: str):
        self.record = record
        self.field = field_name
        super().__init__(f"edit record {record!r}, field {field_name!r}: {problem}")


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
        return self


def target_text(prompt: str, target: str) -> str:
    """The target as it follows ``prompt`` in running text: a space is inserted between a
    prompt that does not end in whitespace and a target that does not start with it
    (``"... is" + " English"``), as the reference implementations do."""
    if prompt and not prompt[-1].isspace() and target and not target[0].isspace():
        return " " + target
    return target
