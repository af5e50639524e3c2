"""Raw benchmark records -> validated :class:`EditRequest` s.

Three record shapes are read:

``counterfact``
    MEMIT's nested CounterFact: ``case_id``, ``requested_rewrite{prompt (with "{}"), subject,
    target_new{str}, target_true{str}}``, ``paraphrase_prompts[]``, ``neighborhood_prompts[]``,
    ``generation_prompts[]``. ``requested_rewrite`` may also be a *list* of rewrites (the MQuAKE /
    AKEW shape): each rewrite becomes its own request with case_id ``"{case_id}:{j}"``.
``counterfact_flat``
    EasyEdit's flat CounterFact: ``case_id, prompt`` (subject written out), ``subject, target_new,
    ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``; some files carry lists
    in the target / prompt fields.
``zsre``
    MEND's ZsRE eval split: ``subject, src, pred, rephrase, alt, answers[], loc, loc_ans, cond``.

Every problem raises :class:`RequestError` naming the record (its position in the dataset) and the
field as it is spelled in the *raw* record (``requested_rewrite.subject``, ``answers``, ...), so a
user can find it in the file. Fields that are not mapped onto an :class:`EditRequest` attribute are
kept in ``EditRequest.extra`` (e.g. AKEW's long-form ``fact_new_uns``, ZsRE's ``pred`` / ``alt``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from lightning_edit.data.requests import EditRequest, RequestError, case_id_text, describe_value
from lightning_edit.errors import InputError

FORMATS: tuple[str, ...] = ("counterfact", "counterfact_flat", "zsre")
"""The record formats :func:`records_to_requests` reads (plus ``"auto"``: detect per record)."""

_KNOWN_SHAPES = (
    "counterfact (case_id, requested_rewrite{prompt, subject, target_new{str}, target_true{str}}, "
    "paraphrase_prompts, neighborhood_prompts, generation_prompts); "
    "counterfact_flat (case_id, prompt, subject, target_new, ground_truth, rephrase_prompt, "
    "locality_prompt, locality_ground_truth); "
    "zsre (subject, src, answers, rephrase, loc, loc_ans, pred, alt)"
)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def detect_format(record: Any, record_index: int = 0) -> str:
    """The format of one raw record, judged from its keys.

    Args:
        record: one raw record (a JSON object).
        record_index: its position in the dataset, for the error message.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        RequestError: (field ``record``) if the record is not an object or matches no known shape;
            the message lists the keys seen and the known formats.
    """
    if not isinstance(record, Mapping):
        raise RequestError(record_index, "record", f"expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact"
    if {"src", "answers"} <= keys:
        return "zsre"
    if {"prompt", "subject", "target_new"} <= keys:
        return "counterfact_flat"
    raise RequestError(
        record_index,
        "record",
        f"unknown record shape; keys seen: {sorted(map(str, keys))}. Known formats: {_KNOWN_SHAPES}",
    )


def iter_requests(records: Iterable[Any], fmt: str = "auto", start_index: int = 0,
                  indices: Sequence[int] | None = None) -> Iterator[EditRequest]:
    """Convert and validate records one at a time (lazy form of :func:`records_to_requests`).

    Useful to take a slice of a large file without validating records past it. A record with a
    list of rewrites (AKEW / MQuAKE) yields several requests, all with the same ``record_index``.

    Args:
        records: raw records (JSON objects), in dataset order.
        fmt: ``"auto"`` (detect per record) or one of :data:`FORMATS`.
        indices: each record's dataset position, for records that are not consecutive (a
            selection); overrides ``start_index``.
        start_index: dataset position of the first record; ``record_index`` and error messages
            count from here.

    Yields:
        Validated :class:`EditRequest` s with ``record_index`` set and ``case_id`` a ``str``.

    Raises:
        ValueError: unknown ``fmt``.
        RequestError: the first record that cannot be edited, or a ``case_id`` seen before.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(f"unknown record format {fmt!r}; expected 'auto' or one of {list(FORMATS)}")
    # case_id keys per-case metrics and the resume fingerprint, so two records must not share one.
    seen: dict[str, int] = {}
    for offset, record in enumerate(records):
        index = indices[offset] if indices is not None else start_index + offset
        if not isinstance(record, Mapping):
            raise RequestError(index, "record", f"expected a JSON object, got {type(record).__name__}")
        record_fmt = detect_format(record, index) if fmt == "auto" else fmt
        for request in _CONVERTERS[record_fmt](record, index):
            first = seen.setdefault(request.case_id, index)
            if first != index:
                problem = f"duplicate case_id {request.case_id!r} (already used by record {first})"
                raise RequestError(index, "case_id", problem)
            yield request


def records_to_requests(records: Iterable[Any], fmt: str = "auto", start_index: int = 0) -> list[EditRequest]:
    """Normalize raw records to validated :class:`EditRequest` s.

    All records are converted and validated before anything is returned, so a bad record stops a
    run before any weight changes.

    Args:
        records: raw records (JSON objects), in dataset order.
        fmt: ``"auto"`` (detect per record from its keys) or one of :data:`FORMATS`.
        start_index: dataset position of the first record (``record_index`` counts from here).

    Returns:
        One request per record (per rewrite for records with a list of rewrites), in order.

    Raises:
        ValueError: unknown ``fmt``.
        RequestError: naming the record index and the raw field at fault.
    """
    return list(iter_requests(records, fmt, start_index))


# --------------------------------------------------------------------------------------------
# Field helpers: each raises RequestError(record, raw field name, problem)
# --------------------------------------------------------------------------------------------


def _require(record: Mapping, key: str, index: int, field_name: str | None = None) -> Any:
    """``record[key]``; a missing key and an explicit ``null`` are both "missing" (Arrow-backed
    loaders write ``null`` for keys a record did not have)."""
    value = record.get(key)
    if value is None:
        raise RequestError(index, field_name or key, "missing")
    return value


def _text(value: Any, index: int, field_name: str) -> str:
    """A non-empty string."""
    if not isinstance(value, str):
        raise RequestError(index, field_name, f"expected a string, got {type(value).__name__} {describe_value(value)}")
    if not value.strip():
        raise RequestError(index, field_name, "empty string")
    return value


def _first_text(value: Any, index: int, field_name: str) -> str:
    """A string, or the first element of a non-empty list of strings (EasyEdit list-valued targets;
    ZsRE ``answers``); the rest of such a list are aliases."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise RequestError(index, field_name, "empty list")
        return _text(value[0], index, f"{field_name}[0]")
    return _text(value, index, field_name)


def _texts(value: Any, index: int, field_name: str) -> tuple[str, ...]:
    """A string or a list of strings as a tuple; missing (``None``) is empty."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (_text(value, index, field_name),)
    if not isinstance(value, (list, tuple)):
        raise RequestError(index, field_name, f"expected a string or a list of strings, got {type(value).__name__}")
    return tuple(_text(v, index, f"{field_name}[{i}]") for i, v in enumerate(value))


def _case_id(record: Mapping, index: int) -> str:
    """``case_id`` as a string; records without one (ZsRE) are named by their dataset position."""
    value = record.get("case_id")
    return str(index) if value is None else case_id_text(value, index)


def _template_from_text(text: str, subject: str, index: int, text_field: str, subject_field: str) -> str:
    """Turn a prompt with the subject written out into a template: the subject's *first*
    occurrence becomes ``{}`` (a later repeat of the subject stays literal text). A prompt that is
    already a template (exactly one ``{}``) is kept."""
    if subject in text:
        return text.replace(subject, "{}", 1)
    if text.count("{}") == 1:
        return text
    raise RequestError(index, subject_field, f"subject {subject!r} does not occur in {text_field} {text!r}")


def _validated(request: EditRequest, raw_names: Mapping[str, str]) -> EditRequest:
    """Run :meth:`EditRequest.validate`, renaming the fields in its errors to the raw record's
    (``target_new`` -> ``requested_rewrite.target_new.str``; ``locality[3]`` -> ``neighborhood_prompts[3]``)."""
    try:
        return request.validate()
    except RequestError as err:
        base, bracket, rest = err.field.partition("[")
        if base not in raw_names:
            raise
        prefix = f"edit record {err.record!r}, field {err.field!r}: "
        problem = str(err)[len(prefix):] if str(err).startswith(prefix) else str(err)
        raise RequestError(err.record, raw_names[base] + bracket + rest, problem) from None


# --------------------------------------------------------------------------------------------
# Converters: (record, dataset index) -> requests
# --------------------------------------------------------------------------------------------


def _target_str(value: Any, index: int, field_name: str) -> tuple[str, dict[str, Any]]:
    """A nested CounterFact target ``{"str": ..., "id": ...}`` (a bare string is accepted too).

    Returns:
        The target text and the target's other keys (``id``), to keep in ``extra``.
    """
    if isinstance(value, Mapping):
        text = _text(_require(value, "str", index, f"{field_name}.str"), index, f"{field_name}.str")
        return text, {k: v for k, v in value.items() if k != "str"}
    return _text(value, index, field_name), {}


def _neighbourhood(value: Any, answer: str, index: int, field_name: str) -> tuple[tuple[str, str], ...]:
    """``neighborhood_prompts`` as ``(prompt, true answer)`` pairs. MEMIT's files hold plain prompts
    whose answer is the rewrite's ``target_true`` (the neighbours share the relation and the true
    object); ``{"prompt", "target"}`` objects carry their own answer."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise RequestError(index, field_name, f"expected a list, got {type(value).__name__}")
    pairs = []
    for i, item in enumerate(value):
        name = f"{field_name}[{i}]"
        if isinstance(item, Mapping):
            prompt = _text(_require(item, "prompt", index, f"{name}.prompt"), index, f"{name}.prompt")
            target = _text(_require(item, "target", index, f"{name}.target"), index, f"{name}.target")
            pairs.append((prompt, target))
        else:
            pairs.append((_text(item, index, name), answer))
    return tuple(pairs)


def _rewrite_to_request(
    rewrite: Mapping,
    record: Mapping,
    index: int,
    case_id: str,
    path: str,
    record_level: bool,
    extra: dict[str, Any],
) -> EditRequest:
    """One nested-CounterFact rewrite -> a request.

    Args:
        rewrite: the ``requested_rewrite`` object (or one element of the list).
        record: the whole record (for paraphrase / neighbourhood / generation prompts).
        index: dataset position of the record.
        case_id: the request's case_id.
        path: the rewrite's field name in the record (``requested_rewrite`` or
            ``requested_rewrite[j]``) for errors.
        record_level: read the record-level prompt lists (only when the record has one rewrite:
            with several it is not known which rewrite they test, so they stay in ``extra``).
        extra: record-level fields to keep; the rewrite's unused keys are added.
    """
    if not isinstance(rewrite, Mapping):
        raise RequestError(index, path, f"expected an object, got {type(rewrite).__name__}")
    subject = _text(_require(rewrite, "subject", index, f"{path}.subject"), index, f"{path}.subject")
    prompt = _text(_require(rewrite, "prompt", index, f"{path}.prompt"), index, f"{path}.prompt")
    placeholders = prompt.count("{}")
    if placeholders == 0:
        if subject in prompt:
            raise RequestError(
                index,
                f"{path}.prompt",
                f"{prompt!r} has the subject written out instead of the '{{}}' placeholder; nested CounterFact "
                "prompts are templates ('{} is a citizen of'). For prompts with the subject written out use "
                "format 'counterfact_flat'",
            )
        raise RequestError(index, f"{path}.prompt", f"no '{{}}' placeholder for the subject in {prompt!r}")
    if placeholders > 1:
        problem = f"needs exactly one '{{}}' placeholder, found {placeholders} in {prompt!r}"
        raise RequestError(index, f"{path}.prompt", problem)
    new_field, true_field = f"{path}.target_new", f"{path}.target_true"
    target_new, new_rest = _target_str(_require(rewrite, "target_new", index, new_field), index, new_field)
    target_true, true_rest = _target_str(_require(rewrite, "target_true", index, true_field), index, true_field)

    extra = dict(extra)
    extra.update({k: v for k, v in rewrite.items() if k not in ("prompt", "subject", "target_new", "target_true")})
    extra.update({f"target_new_{k}": v for k, v in new_rest.items()})
    extra.update({f"target_true_{k}": v for k, v in true_rest.items()})

    paraphrases: tuple[str, ...] = ()
    locality: tuple[tuple[str, str], ...] = ()
    generations: tuple[str, ...] = ()
    if record_level:
        paraphrases = _texts(record.get("paraphrase_prompts"), index, "paraphrase_prompts")
        locality = _neighbourhood(record.get("neighborhood_prompts"), target_true, index, "neighborhood_prompts")
        generations = _texts(record.get("generation_prompts"), index, "generation_prompts")

    request = EditRequest(
        case_id=case_id,
        prompt=prompt,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=paraphrases,
        locality=locality,
        generation_prompts=generations,
        family="counterfact",
        record_index=index,
        extra=extra,
    )
    return _validated(
        request,
        {
            "prompt": f"{path}.prompt",
            "subject": f"{path}.subject",
            "target_new": f"{path}.target_new.str",
            "target_true": f"{path}.target_true.str",
            "paraphrase_prompts": "paraphrase_prompts",
            "locality": "neighborhood_prompts",
            "generation_prompts": "generation_prompts",
        },
    )


def _from_counterfact(record: Mapping, index: int) -> list[EditRequest]:
    """Nested CounterFact (one rewrite object) or MQuAKE / AKEW (a list of rewrites)."""
    case_id = _case_id(record, index)
    rewrites = _require(record, "requested_rewrite", index)
    if isinstance(rewrites, Mapping):
        consumed = {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "generation_prompts"}
        extra = {k: v for k, v in record.items() if k not in consumed}
        return [_rewrite_to_request(rewrites, record, index, case_id, "requested_rewrite", True, extra)]
    if not isinstance(rewrites, (list, tuple)):
        problem = f"expected an object or a list of objects, got {type(rewrites).__name__}"
        raise RequestError(index, "requested_rewrite", problem)
    if not rewrites:
        raise RequestError(index, "requested_rewrite", "empty list of rewrites")
    # Record-level fields (MQuAKE's multi-hop questions, answers, ...) belong to the whole chain of
    # rewrites; every request carries them, next to its own rewrite's long-form fields.
    record_extra = {k: v for k, v in record.items() if k not in ("case_id", "requested_rewrite")}
    requests = []
    for j, rewrite in enumerate(rewrites):
        extra = {**record_extra, "record_case_id": case_id, "rewrite_index": j}
        path = f"requested_rewrite[{j}]"
        requests.append(_rewrite_to_request(rewrite, record, index, f"{case_id}:{j}", path, False, extra))
    return requests


def _locality_pairs(
    prompts: Any, answers: Any, index: int, prompt_field: str, answer_field: str
) -> tuple[tuple[str, str], ...]:
    """EasyEdit locality fields as ``(prompt, answer)`` pairs.

    A single prompt takes a string answer or a list (first = the answer, the rest aliases); a list
    of prompts takes a list of answers of the same length (each a string or an alias list).
    """
    if prompts is None:
        if answers is not None:
            raise RequestError(index, prompt_field, f"missing, but {answer_field} is given")
        return ()
    if answers is None:
        raise RequestError(index, answer_field, f"missing, but {prompt_field} is given")
    if isinstance(prompts, str):
        return ((_text(prompts, index, prompt_field), _first_text(answers, index, answer_field)),)
    prompt_list = _texts(prompts, index, prompt_field)
    if not isinstance(answers, (list, tuple)) or len(answers) != len(prompt_list):
        n = len(answers) if isinstance(answers, (list, tuple)) else "a single"
        raise RequestError(index, answer_field, f"has {n} answers for {len(prompt_list)} prompts in {prompt_field}")
    return tuple(
        (p, _first_text(a, index, f"{answer_field}[{i}]")) for i, (p, a) in enumerate(zip(prompt_list, answers))
    )


def _pairs(value: Any, index: int, field_name: str) -> tuple[tuple[str, str], ...]:
    """``[[prompt, answer], ...]`` (the Python API's ``locality``)."""
    if not isinstance(value, (list, tuple)):
        raise RequestError(index, field_name, f"expected a list of [prompt, answer] pairs, got {describe_value(value)}")
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RequestError(index, f"{field_name}[{i}]", f"expected a [prompt, answer] pair, got {describe_value(pair)}")
        out.append((_text(pair[0], index, f"{field_name}[{i}]"), _text(pair[1], index, f"{field_name}[{i}]")))
    return tuple(out)


def _from_counterfact_flat(record: Mapping, index: int) -> list[EditRequest]:
    """EasyEdit's flat CounterFact record."""
    case_id = _case_id(record, index)
    subject = _text(_require(record, "subject", index), index, "subject")
    prompt = _text(_require(record, "prompt", index), index, "prompt")
    template = _template_from_text(prompt, subject, index, "prompt", "subject")
    target_new = _first_text(_require(record, "target_new", index), index, "target_new")
    # the Python API's spelling (target_true, paraphrase_prompts, locality pairs) is read too
    truth_field = "ground_truth" if "ground_truth" in record or "target_true" not in record else "target_true"
    target_true = _first_text(_require(record, truth_field, index), index, truth_field)
    para_field = "rephrase_prompt" if "rephrase_prompt" in record or "paraphrase_prompts" not in record else "paraphrase_prompts"
    paraphrases = _texts(record.get(para_field), index, para_field)
    loc_prompt, loc_answer = record.get("locality_prompt"), record.get("locality_ground_truth")
    locality = _locality_pairs(loc_prompt, loc_answer, index, "locality_prompt", "locality_ground_truth")
    if loc_prompt is None and record.get("locality") is not None:
        locality = _pairs(record["locality"], index, "locality")
    consumed = {"case_id", "prompt", "subject", "target_new", "ground_truth", "rephrase_prompt",
                "locality_prompt", "locality_ground_truth", "target_true", "paraphrase_prompts", "locality"}
    request = EditRequest(
        case_id=case_id,
        prompt=template,
        subject=subject,
        target_new=target_new,
        target_true=target_true,
        paraphrase_prompts=paraphrases,
        locality=locality,
        family="counterfact",
        record_index=index,
        extra={k: v for k, v in record.items() if k not in consumed},
    )
    names = {"prompt": "prompt", "subject": "subject", "target_new": "target_new", "target_true": truth_field,
             "paraphrase_prompts": para_field, "locality": "locality_prompt" if loc_prompt is not None else "locality"}
    return [_validated(request, names)]


def _from_zsre(record: Mapping, index: int) -> list[EditRequest]:
    """MEND's ZsRE eval record. As in the reference loaders the prompt is ``src`` with the subject
    replaced by ``{}``, the target ``answers[0]``; there is no true answer to compare against
    (``target_true=None``), the metric is token accuracy (family ``zsre``)."""
    case_id = _case_id(record, index)
    subject = _text(_require(record, "subject", index), index, "subject")
    src = _text(_require(record, "src", index), index, "src")
    template = _template_from_text(src, subject, index, "src", "subject")
    target_new = _first_text(_require(record, "answers", index), index, "answers")
    paraphrases = _texts(record.get("rephrase"), index, "rephrase")
    locality = _locality_pairs(record.get("loc"), record.get("loc_ans"), index, "loc", "loc_ans")
    consumed = {"case_id", "subject", "src", "answers", "rephrase", "loc", "loc_ans"}
    request = EditRequest(
        case_id=case_id,
        prompt=template,
        subject=subject,
        target_new=target_new,
        target_true=None,
        paraphrase_prompts=paraphrases,
        locality=locality,
        family="zsre",
        record_index=index,
        extra={k: v for k, v in record.items() if k not in consumed},
    )
    names = {"prompt": "src", "subject": "subject", "target_new": "answers", "paraphrase_prompts": "rephrase",
             "locality": "loc"}
    return [_validated(request, names)]


_CONVERTERS = {
    "counterfact": _from_counterfact,
    "counterfact_flat": _from_counterfact_flat,
    "zsre": _from_zsre,
}
