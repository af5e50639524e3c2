"""Long-form edit requests (AnyEdit) and the loaders of the long-form benchmarks.

A long-form request is a question and a free-form answer (a paragraph, a derivation, code, a
poem) that the edited model should produce when asked the question. Four record shapes are read
(the benchmarks' formats):

``unkebench``
    UnKEBench: ``id, question, para_question, answer, sub_question[], sub_answer[]``.
``akew``
    AKEW (MQuAKE-CF / CounterFact records whose rewrites carry ``fact_new_uns``). Each rewrite
    becomes one request: the **question is the rewrite's own ``question``** (``"What is the
    country of citizenship of Ellie Kemper?"``), as the AnyEdit reference does for AKEW; a rewrite
    without one falls back to ``prompt_full`` and then to the cloze ``prompt`` with the subject
    written in. The answer is ``fact_new_uns`` (the long text stating the new fact). The
    rewrite's ``unsfact_triplets_GPT`` (``{subject, prompt, target}``) give sub-questions (the cloze
    with the subject written in) and sub-answers. A record with a single rewrite and
    ``paraphrase_prompts`` (AKEW's CounterFact part) gets ``paraphrase_prompts[0]`` as the
    paraphrase question. MQuAKE's multi-hop ``questions`` with ``new_answer`` (and
    ``new_answer_alias``) are kept for evaluation on the record's **last** rewrite only: they are
    answerable once the whole chain of rewrites is applied, and keeping them once avoids counting
    them once per rewrite. Request ``case_id`` is ``"{case_id}:{j}"`` for rewrite ``j``.
``editeverything``
    EditEverything: ``id, question, answer, category``.
``generic``
    A JSON / JSONL record ``{prompt | question, answer}``, optionally with ``id`` / ``case_id``,
    ``para_question`` / ``paraphrase`` / ``paraphrase_question``, ``category``,
    ``sub_question[]`` / ``sub_answer[]``.

List fields may be real lists or Python / JSON literals stored as strings (``"['a', 'b']"``, as
CSV exports and some re-saved files hold them); strings are parsed with :func:`ast.literal_eval`
(never ``eval``). Every problem raises :class:`~lightning_edit.data.requests.RequestError` naming the
record (its position in the dataset) and the field as the raw record spells it, at load time,
before any weight changes. Fields not mapped onto :class:`LongFormRequest` stay in ``extra``.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lightning_edit.data.requests import RequestError, case_id_text, control_character, describe_value, short
from lightning_edit.data.sources import load_records
from lightning_edit.errors import InputError
from lightning_edit.resources import resolve

__all__ = [
    "LONGFORM_FORMATS",
    "LongFormRequest",
    "detect_longform_format",
    "is_longform_record",
    "iter_longform_requests",
    "longform_records_to_requests",
    "load_longform",
]

LONGFORM_FORMATS: tuple[str, ...] = ("unkebench", "akew", "editeverything", "generic")
"""The long-form record formats (plus ``"auto"``: detect per record)."""

_KNOWN_SHAPES = (
    "unkebench (question, para_question, answer, sub_question[], sub_answer[]); "
    "akew (case_id, requested_rewrite[{question, subject, prompt, fact_new_uns, unsfact_triplets_GPT}], "
    "questions, new_answer); editeverything (id, question, answer, category); "
    "generic ({prompt | question, answer})"
)


@dataclass(frozen=True)
class LongFormRequest:
    """One long-form knowledge edit: the model should answer ``question`` with ``answer``.

    Attributes:
        case_id: unique name of the request in its dataset (a string).
        question: the question as asked (plain text; a chat template is applied later, see
            :func:`lightning_edit.longform.chunking.render_question`).
        answer: the target answer, without any end-of-sequence token.
        paraphrase_question: a rephrased question for generalization, if the record has one.
        sub_questions / sub_answers: short questions about details of the answer and their
            answers (UnKEBench; AKEW's triplets), same length.
        multihop_questions: questions whose answer follows from the edit chained with other
            facts (MQuAKE); answered by ``multihop_answer`` (or one of
            ``multihop_answer_aliases``). Evaluation only.
        category: EditEverything's category (``math``, ``code``, ``poetry``, ...).
        subject: the entity the answer is about, where the record names one (AKEW, factworld).
        source_format: which loader read it (one of :data:`LONGFORM_FORMATS`).
        record_index: position of the record in its dataset (-1 if not from a dataset).
        extra: the record's other fields.
        raw_fields: attribute name -> the field's name in the raw record (for error messages).
    """

    case_id: str
    question: str
    answer: str
    paraphrase_question: str | None = None
    sub_questions: tuple[str, ...] = ()
    sub_answers: tuple[str, ...] = ()
    multihop_questions: tuple[str, ...] = ()
    multihop_answer: str | None = None
    multihop_answer_aliases: tuple[str, ...] = ()
    category: str | None = None
    subject: str | None = None
    source_format: str = "generic"
    record_index: int = -1
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    raw_fields: dict = field(default_factory=dict, compare=False, hash=False)

    kind: ClassVar[str] = "longform"

    def describe(self) -> str:
        """``"<question>" -> "<start of the answer>"``."""
        return f'"{short(self.question, 80)}" -> "{short(self.answer, 48)}"'

    def fingerprint(self) -> tuple[str, ...]:
        return (self.case_id, self.question, self.answer)

    @property
    def record(self) -> int | str:
        """How errors name this request: its dataset position, else its case_id."""
        return self.record_index if self.record_index >= 0 else self.case_id

    def raw_field(self, name: str) -> str:
        """The raw record's name for attribute ``name`` (``answer`` ->
        ``requested_rewrite[0].fact_new_uns`` for AKEW); indexed names (``sub_questions[2]``)
        keep their index."""
        base, bracket, rest = name.partition("[")
        return self.raw_fields.get(base, base) + bracket + rest

    def error(self, name: str, problem: str) -> RequestError:
        """A :class:`RequestError` naming this record and the raw field of attribute ``name``."""
        return RequestError(self.record, self.raw_field(name), problem)

    def validate(self) -> "LongFormRequest":
        """Raise :class:`RequestError` (record and raw field named) if this cannot be edited:
        empty question or answer, empty paraphrase, sub-questions and sub-answers of different
        lengths or empty, multi-hop questions without an answer."""
        if not isinstance(self.case_id, str) or not self.case_id.strip():
            raise self.error("case_id", f"expected a non-empty string, got {self.case_id!r}")
        for name in ("question", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise self.error(name, f"expected a string, got {type(value).__name__}")
            if not value.strip():
                raise self.error(name, f"empty {name}")
        if self.paraphrase_question is not None and (
            not isinstance(self.paraphrase_question, str) or not self.paraphrase_question.strip()
        ):
            raise self.error("paraphrase_question", "empty paraphrase question (leave it out instead)")
        if len(self.sub_questions) != len(self.sub_answers):
            raise self.error(
                "sub_answers",
                f"{len(self.sub_answers)} sub-answers for {len(self.sub_questions)} sub-questions "
                f"({self.raw_field('sub_questions')})",
            )
        for name in ("sub_questions", "sub_answers", "multihop_questions", "multihop_answer_aliases"):
            for i, value in enumerate(getattr(self, name)):
                if not isinstance(value, str) or not value.strip():
                    raise self.error(f"{name}[{i}]", f"expected a non-empty string, got {value!r}")
        texts = [("case_id", self.case_id), ("question", self.question), ("answer", self.answer),
                 ("paraphrase_question", self.paraphrase_question or ""), ("multihop_answer", self.multihop_answer or ""),
                 ("subject", self.subject or ""), ("category", self.category or "")]
        for name in ("sub_questions", "sub_answers", "multihop_questions", "multihop_answer_aliases"):
            texts += [(f"{name}[{i}]", v) for i, v in enumerate(getattr(self, name))]
        for name, text in texts:
            if isinstance(text, str) and (bad := control_character(text)):
                raise self.error(name, bad)
        if self.multihop_questions and (not isinstance(self.multihop_answer, str) or not self.multihop_answer.strip()):
            raise self.error("multihop_answer", "multi-hop questions are given but no answer")
        if self.source_format not in LONGFORM_FORMATS:
            raise self.error("source_format", f"unknown long-form format {self.source_format!r}")
        return self


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def _has_long_rewrite(record: Mapping) -> bool:
    rewrites = record.get("requested_rewrite")
    if isinstance(rewrites, str):
        try:
            rewrites = _literal(rewrites)
        except ValueError:
            return False
    if isinstance(rewrites, Mapping):
        rewrites = [rewrites]
    return isinstance(rewrites, (list, tuple)) and any(isinstance(r, Mapping) and "fact_new_uns" in r for r in rewrites)


def detect_longform_format(record: Any, record_index: int = 0) -> str:
    """The long-form format of one raw record, judged from its keys.

    Returns:
        One of :data:`LONGFORM_FORMATS`.

    Raises:
        RequestError: (field ``record``) not an object, or no known long-form shape (the
            message lists the keys seen and the known shapes).
    """
    if not isinstance(record, Mapping):
        raise RequestError(record_index, "record", f"expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "requested_rewrite" in keys:
        if _has_long_rewrite(record):
            return "akew"
        raise RequestError(
            record_index,
            "requested_rewrite",
            "no rewrite has 'fact_new_uns' (a long-form answer): this is a fact-editing CounterFact / MQuAKE record; "
            "read it with lightning_edit.data.formats instead",
        )
    if "answer" in keys and "question" in keys and keys & {"para_question", "sub_question", "sub_answer"}:
        return "unkebench"
    if {"question", "answer", "category"} <= keys:
        return "editeverything"
    if "answer" in keys and keys & {"question", "prompt"}:
        return "generic"
    raise RequestError(
        record_index,
        "record",
        f"unknown long-form record shape; keys seen: {sorted(map(str, keys))}. Known formats: {_KNOWN_SHAPES}",
    )


def is_longform_record(record: Any) -> bool:
    """Whether ``record`` has one of the long-form shapes (no error raised)."""
    try:
        detect_longform_format(record)
    except RequestError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def iter_longform_requests(records: Iterable[Any], fmt: str = "auto", start_index: int = 0,
                           indices: Sequence[int] | None = None) -> Iterator[LongFormRequest]:
    """Convert and validate raw records one at a time.

    Args:
        records: raw records (JSON objects), in dataset order.
        fmt: ``"auto"`` (detect per record) or one of :data:`LONGFORM_FORMATS`.
        indices: each record's dataset position, for records that are not consecutive (a
            selection); overrides ``start_index``.
        start_index: dataset position of the first record (``record_index`` counts from here).

    Yields:
        Validated :class:`LongFormRequest` s (several per AKEW record with several rewrites).

    Raises:
        ValueError: unknown ``fmt``.
        RequestError: the first record that cannot be edited, or a ``case_id`` used twice.
    """
    if fmt != "auto" and fmt not in LONGFORM_FORMATS:
        raise InputError(f"unknown long-form format {fmt!r}; expected 'auto' or one of {list(LONGFORM_FORMATS)}")
    seen: dict[str, int] = {}
    for offset, record in enumerate(records):
        index = indices[offset] if indices is not None else start_index + offset
        if not isinstance(record, Mapping):
            raise RequestError(index, "record", f"expected a JSON object, got {type(record).__name__}")
        record_fmt = detect_longform_format(record, index) if fmt == "auto" else fmt
        for request in _CONVERTERS[record_fmt](record, index):
            first = seen.setdefault(request.case_id, index)
            if first != index:
                raise RequestError(index, "case_id", f"duplicate case_id {request.case_id!r} (already used by record {first})")
            yield request


def longform_records_to_requests(records: Iterable[Any], fmt: str = "auto", start_index: int = 0) -> list[LongFormRequest]:
    """All records converted and validated before anything is returned (see
    :func:`iter_longform_requests`), so a bad record stops a run before any weight changes."""
    return list(iter_longform_requests(records, fmt, start_index))


def load_longform(
    path: str,
    fmt: str = "auto",
    split: str = "train",
    data_files: Any = None,
    name: str | None = None,
    field: str | None = None,
    cache_dir: str | None = None,
    limit: int | None = None,
) -> list[LongFormRequest]:
    """Read long-form requests from a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file or
    directory, or a Hugging Face hub dataset (through ``datasets``; see
    :func:`lightning_edit.data.sources.load_records` for ``path`` and the other arguments).
    ``factworld:<preset>/longform`` names are resolved first.

    Args:
        limit: read only the first ``limit`` records (``None``: all); only those are validated.

    Returns:
        The validated requests, in file order.
    """
    records = load_records(resolve(path), split=split, data_files=data_files, name=name, field=field, cache_dir=cache_dir)
    if limit is not None:
        records = records[: max(0, int(limit))]
    return longform_records_to_requests(records, fmt)


# --------------------------------------------------------------------------------------------
# Field helpers: each raises RequestError(record, raw field name, problem)
# --------------------------------------------------------------------------------------------


def _literal(text: str) -> Any:
    """A Python / JSON literal stored as a string (``"['a', 'b']"``), parsed safely."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        pass
    try:  # JSON spellings that are not Python literals (true / false / null)
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"not a Python or JSON literal: {describe_value(text)}") from err


def _maybe_literal(value: Any, index: int, field_name: str, kinds: tuple[type, ...], strict: bool = True) -> Any:
    """``value``, or, when it is a string that looks like a list / object literal (starts with
    ``[`` or ``{``), its parsed value (which must be one of ``kinds``). A string that looks like one
    but does not parse is an error when ``strict`` (list fields), else kept as text."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            parsed = _literal(value)
        except ValueError as err:
            if not strict:
                return value
            raise RequestError(index, field_name, f"a string that looks like a list but does not parse: {err}") from None
        if not strict and not isinstance(parsed, kinds):
            return value
        if not isinstance(parsed, kinds):
            raise RequestError(index, field_name, f"parsed to a {type(parsed).__name__}, expected {'/'.join(k.__name__ for k in kinds)}")
        return parsed
    return value


def _missing(value: Any) -> bool:
    return value is None


def _text(value: Any, index: int, field_name: str) -> str:
    if _missing(value):
        raise RequestError(index, field_name, "missing")
    if not isinstance(value, str):
        raise RequestError(index, field_name, f"expected a string, got {type(value).__name__} {describe_value(value)}")
    if not value.strip():
        raise RequestError(index, field_name, "empty string")
    return value


def _optional_text(value: Any, index: int, field_name: str) -> str | None:
    """``None`` when absent; a list (several paraphrases) gives its first element."""
    if _missing(value):
        return None
    value = _maybe_literal(value, index, field_name, (list, tuple), strict=False)
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        return _text(value[0], index, f"{field_name}[0]")
    return _text(value, index, field_name)


def _text_list(value: Any, index: int, field_name: str) -> tuple[str, ...]:
    """A list of strings (or its string literal); one plain string is a list of one; absent is
    empty."""
    if _missing(value):
        return ()
    value = _maybe_literal(value, index, field_name, (list, tuple))
    if isinstance(value, str):
        return (_text(value, index, field_name),)
    if not isinstance(value, (list, tuple)):
        raise RequestError(index, field_name, f"expected a list of strings, got {type(value).__name__} {describe_value(value)}")
    return tuple(_text(v, index, f"{field_name}[{i}]") for i, v in enumerate(value))


def _case_id(record: Mapping, index: int, keys: tuple[str, ...] = ("case_id", "id")) -> tuple[str, str | None]:
    """The record's id as a string (and the key it came from); the dataset position when it has none."""
    for key in keys:
        value = record.get(key)
        if value is None:
            continue
        return case_id_text(value, index, key), key
    return str(index), None


def _validated(request: LongFormRequest) -> LongFormRequest:
    return request.validate()


# --------------------------------------------------------------------------------------------
# Converters: (record, dataset index) -> requests
# --------------------------------------------------------------------------------------------


def _from_unkebench(record: Mapping, index: int) -> list[LongFormRequest]:
    case_id, id_key = _case_id(record, index)
    question = _text(record.get("question"), index, "question")
    answer = _text(record.get("answer"), index, "answer")
    para = _optional_text(record.get("para_question"), index, "para_question")
    subs_q = _text_list(record.get("sub_question"), index, "sub_question")
    subs_a = _text_list(record.get("sub_answer"), index, "sub_answer")
    consumed = {"question", "answer", "para_question", "sub_question", "sub_answer", id_key}
    return [
        _validated(
            LongFormRequest(
                case_id=case_id, question=question, answer=answer, paraphrase_question=para,
                sub_questions=subs_q, sub_answers=subs_a, category=_optional_text(record.get("category"), index, "category"),
                subject=_optional_text(record.get("subject"), index, "subject"),
                source_format="unkebench", record_index=index,
                extra={k: v for k, v in record.items() if k not in consumed | {"category", "subject"}},
                raw_fields={"case_id": id_key or "id", "paraphrase_question": "para_question",
                            "sub_questions": "sub_question", "sub_answers": "sub_answer"},
            )
        )
    ]


def _from_editeverything(record: Mapping, index: int) -> list[LongFormRequest]:
    case_id, id_key = _case_id(record, index)
    question = _text(record.get("question"), index, "question")
    answer = _text(record.get("answer"), index, "answer")
    category = _text(record.get("category"), index, "category")
    consumed = {"question", "answer", "category", id_key}
    return [
        _validated(
            LongFormRequest(
                case_id=case_id, question=question, answer=answer, category=category,
                source_format="editeverything", record_index=index,
                extra={k: v for k, v in record.items() if k not in consumed},
                raw_fields={"case_id": id_key or "id"},
            )
        )
    ]


_PARAPHRASE_KEYS = ("para_question", "paraphrase_question", "paraphrase", "rephrase")


def _from_generic(record: Mapping, index: int) -> list[LongFormRequest]:
    case_id, id_key = _case_id(record, index)
    if record.get("question") is not None and record.get("prompt") is not None:
        raise RequestError(index, "prompt", "both 'prompt' and 'question' are given: keep one of them")
    qkey = "question" if record.get("question") is not None else "prompt"
    question = _text(record.get(qkey), index, qkey)
    answer = _text(record.get("answer"), index, "answer")
    pkey = next((k for k in _PARAPHRASE_KEYS if record.get(k) is not None), None)
    para = _optional_text(record.get(pkey), index, pkey) if pkey else None
    subs_q = _text_list(record.get("sub_question"), index, "sub_question")
    subs_a = _text_list(record.get("sub_answer"), index, "sub_answer")
    category = _optional_text(record.get("category"), index, "category")
    subject = _optional_text(record.get("subject"), index, "subject")
    consumed = {qkey, "answer", pkey, "sub_question", "sub_answer", "category", "subject", id_key}
    return [
        _validated(
            LongFormRequest(
                case_id=case_id, question=question, answer=answer, paraphrase_question=para,
                sub_questions=subs_q, sub_answers=subs_a, category=category, subject=subject,
                source_format="generic", record_index=index,
                extra={k: v for k, v in record.items() if k not in consumed},
                raw_fields={"case_id": id_key or "case_id", "question": qkey, "paraphrase_question": pkey or "para_question",
                            "sub_questions": "sub_question", "sub_answers": "sub_answer"},
            )
        )
    ]


def _triplets(value: Any, index: int, path: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """AKEW's ``unsfact_triplets_GPT`` -> (cloze questions with the subject written in, targets)."""
    if _missing(value):
        return (), ()
    value = _maybe_literal(value, index, path, (list, tuple))
    if not isinstance(value, (list, tuple)):
        raise RequestError(index, path, f"expected a list of {{subject, prompt, target}} objects, got {type(value).__name__}")
    questions, answers = [], []
    for i, t in enumerate(value):
        name = f"{path}[{i}]"
        t = _maybe_literal(t, index, name, (dict,))
        if not isinstance(t, Mapping):
            raise RequestError(index, name, f"expected an object, got {type(t).__name__}")
        prompt = _text(t.get("prompt"), index, f"{name}.prompt")
        subject = _text(t.get("subject"), index, f"{name}.subject")
        target = t.get("target")
        if isinstance(target, Mapping):  # {"str": ...} like CounterFact targets
            target = target.get("str")
        target = _text(target, index, f"{name}.target")
        questions.append(prompt.replace("{}", subject, 1) if "{}" in prompt else prompt)
        answers.append(target)
    return tuple(questions), tuple(answers)


def _from_akew(record: Mapping, index: int) -> list[LongFormRequest]:
    case_id, id_key = _case_id(record, index)
    rewrites = _maybe_literal(record.get("requested_rewrite"), index, "requested_rewrite", (list, tuple, dict))
    if _missing(rewrites):
        raise RequestError(index, "requested_rewrite", "missing")
    single = isinstance(rewrites, Mapping)
    if single:
        rewrites = [rewrites]
    if not isinstance(rewrites, (list, tuple)):
        raise RequestError(index, "requested_rewrite", f"expected an object or a list of objects, got {type(rewrites).__name__}")
    if not rewrites:
        raise RequestError(index, "requested_rewrite", "empty list of rewrites")

    mh_questions = _text_list(record.get("questions"), index, "questions")
    mh_answer = _optional_text(record.get("new_answer"), index, "new_answer")
    mh_aliases = _text_list(record.get("new_answer_alias"), index, "new_answer_alias")
    para = None
    if len(rewrites) == 1 and record.get("paraphrase_prompts") is not None:
        para = _optional_text(record.get("paraphrase_prompts"), index, "paraphrase_prompts")
    consumed = {id_key, "requested_rewrite", "questions", "new_answer", "new_answer_alias"}
    record_extra = {k: v for k, v in record.items() if k not in consumed}

    requests = []
    for j, rewrite in enumerate(rewrites):
        path = "requested_rewrite" if single else f"requested_rewrite[{j}]"
        rewrite = _maybe_literal(rewrite, index, path, (dict,))
        if not isinstance(rewrite, Mapping):
            raise RequestError(index, path, f"expected an object, got {type(rewrite).__name__}")
        answer = _text(rewrite.get("fact_new_uns"), index, f"{path}.fact_new_uns")
        subject = _optional_text(rewrite.get("subject"), index, f"{path}.subject")
        if rewrite.get("question") is not None:
            qkey, question = "question", _text(rewrite.get("question"), index, f"{path}.question")
        elif rewrite.get("prompt_full") is not None:
            qkey, question = "prompt_full", _text(rewrite.get("prompt_full"), index, f"{path}.prompt_full")
        else:
            qkey = "prompt"
            prompt = _text(rewrite.get("prompt"), index, f"{path}.prompt")
            if "{}" in prompt:
                if subject is None:
                    raise RequestError(index, f"{path}.subject", "missing (needed to fill the '{}' of the prompt)")
                prompt = prompt.replace("{}", subject, 1)
            question = prompt
        sub_q, sub_a = _triplets(rewrite.get("unsfact_triplets_GPT"), index, f"{path}.unsfact_triplets_GPT")
        last = j == len(rewrites) - 1
        extra = {**record_extra, "record_case_id": case_id, "rewrite_index": j,
                 **{k: v for k, v in rewrite.items() if k not in ("fact_new_uns", "question", "unsfact_triplets_GPT")}}
        if not last:
            extra["multihop_on_rewrite"] = len(rewrites) - 1
        requests.append(
            _validated(
                LongFormRequest(
                    case_id=case_id if single else f"{case_id}:{j}",
                    question=question,
                    answer=answer,
                    paraphrase_question=para,
                    sub_questions=sub_q,
                    sub_answers=sub_a,
                    multihop_questions=mh_questions if last else (),
                    multihop_answer=mh_answer if last and mh_questions else None,
                    multihop_answer_aliases=mh_aliases if last and mh_questions else (),
                    subject=subject,
                    source_format="akew",
                    record_index=index,
                    extra=extra,
                    raw_fields={"case_id": id_key or "case_id", "question": f"{path}.{qkey}", "answer": f"{path}.fact_new_uns",
                                "paraphrase_question": "paraphrase_prompts",
                                "sub_questions": f"{path}.unsfact_triplets_GPT", "sub_answers": f"{path}.unsfact_triplets_GPT",
                                "multihop_questions": "questions", "multihop_answer": "new_answer",
                                "multihop_answer_aliases": "new_answer_alias", "subject": f"{path}.subject"},
                )
            )
        )
    return requests


_CONVERTERS = {
    "unkebench": _from_unkebench,
    "akew": _from_akew,
    "editeverything": _from_editeverything,
    "generic": _from_generic,
}
