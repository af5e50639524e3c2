"""Long-form requests and their loaders, on every record of the shipped benchmark samples."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lightning_edit.data.requests import RequestError
from lightning_edit.longform.records import (
    LongFormRequest,
    detect_longform_format,
    is_longform_record,
    load_longform,
    longform_records_to_requests,
)

FIXTURES = Path(__file__).parent / "fixtures" / "longform"
UNKE = FIXTURES / "unkebench_v2.json"
EDITEV = FIXTURES / "editeverything.json"
AKEW = FIXTURES / "akew_mquake_cf.json"
SAMPLES = {"unkebench": UNKE, "editeverything": EDITEV, "akew": AKEW}


def raw(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_every_sample_record_loads(fmt):
    path = SAMPLES[fmt]
    records = raw(path)
    requests = load_longform(str(path))
    n_expected = sum(len(r["requested_rewrite"]) for r in records) if fmt == "akew" else len(records)
    assert len(requests) == n_expected
    assert all(isinstance(r, LongFormRequest) and r.source_format == fmt for r in requests)
    assert len({r.case_id for r in requests}) == len(requests)
    # the explicit format reads the same
    assert load_longform(str(path), fmt=fmt) == requests
    for r in requests:
        assert r.question.strip() and r.answer.strip()
        assert records[r.record_index] is not None


def test_unkebench_fields():
    records = raw(UNKE)
    requests = load_longform(str(UNKE))
    for rec, req in zip(records, requests):
        assert req.case_id == str(rec["id"])
        assert req.question == rec["question"] and req.answer == rec["answer"]
        assert req.paraphrase_question == rec["para_question"]
        assert req.sub_questions == tuple(rec["sub_question"]) and req.sub_answers == tuple(rec["sub_answer"])
        assert req.multihop_questions == ()


def test_editeverything_fields():
    records = raw(EDITEV)
    requests = load_longform(str(EDITEV))
    assert {r.category for r in requests} == {r["category"] for r in records}
    for rec, req in zip(records, requests):
        assert (req.case_id, req.question, req.answer, req.category) == (str(rec["id"]), rec["question"], rec["answer"], rec["category"])
        assert req.paraphrase_question is None


def test_akew_question_answer_and_multihop():
    records = raw(AKEW)
    requests = load_longform(str(AKEW))
    by_record: dict[int, list[LongFormRequest]] = {}
    for r in requests:
        by_record.setdefault(r.record_index, []).append(r)
    for i, rec in enumerate(records):
        reqs = by_record[i]
        assert len(reqs) == len(rec["requested_rewrite"])
        for j, (rw, req) in enumerate(zip(rec["requested_rewrite"], reqs)):
            assert req.case_id == f"{rec['case_id']}:{j}"
            assert req.question == rw["question"]
            assert req.answer == rw["fact_new_uns"]
            assert req.subject == rw["subject"]
            assert len(req.sub_questions) == len(rw["unsfact_triplets_GPT"]) == len(req.sub_answers)
            t0 = rw["unsfact_triplets_GPT"][0]
            assert req.sub_questions[0] == t0["prompt"].replace("{}", t0["subject"]) and req.sub_answers[0] == t0["target"]
        # multi-hop questions once per record, on its last rewrite
        assert reqs[-1].multihop_questions == tuple(rec["questions"])
        assert reqs[-1].multihop_answer == rec["new_answer"]
        assert all(r.multihop_questions == () and r.multihop_answer is None for r in reqs[:-1])


def test_generic_jsonl_prompt_or_question(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "Write a haiku about rain.", "answer": "Soft rain on the roof"},
            {"question": "What is 2+2?", "answer": "It is four.", "id": "x7", "paraphrase": "Two plus two?"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    requests = load_longform(str(path))
    assert [r.source_format for r in requests] == ["generic", "generic"]
    assert requests[0].question == "Write a haiku about rain." and requests[0].case_id == "0"
    assert requests[1].case_id == "x7" and requests[1].paraphrase_question == "Two plus two?"


def test_detection():
    assert detect_longform_format(raw(UNKE)[0]) == "unkebench"
    assert detect_longform_format(raw(EDITEV)[0]) == "editeverything"
    assert detect_longform_format(raw(AKEW)[0]) == "akew"
    assert detect_longform_format({"prompt": "p", "answer": "a"}) == "generic"
    assert not is_longform_record({"subject": "x", "src": "y", "answers": ["z"]})
    # a fact-editing CounterFact record without long-form text is not long-form
    rec = copy.deepcopy(raw(AKEW)[0])
    for rw in rec["requested_rewrite"]:
        del rw["fact_new_uns"]
    with pytest.raises(RequestError) as err:
        detect_longform_format(rec, 4)
    assert err.value.record == 4 and err.value.field == "requested_rewrite"
    with pytest.raises(RequestError) as err:
        detect_longform_format({"foo": 1}, 9)
    assert err.value.field == "record" and "foo" in str(err.value)


def test_python_literal_list_fields_are_parsed():
    rec = dict(raw(UNKE)[3])
    rec["sub_question"] = repr(list(rec["sub_question"]))
    rec["sub_answer"] = json.dumps(rec["sub_answer"])
    (req,) = longform_records_to_requests([rec])
    assert req.sub_questions == tuple(raw(UNKE)[3]["sub_question"])
    assert req.sub_answers == tuple(raw(UNKE)[3]["sub_answer"])
    akew = copy.deepcopy(raw(AKEW)[0])
    akew["questions"] = str(akew["questions"])
    akew["requested_rewrite"][0]["unsfact_triplets_GPT"] = str(akew["requested_rewrite"][0]["unsfact_triplets_GPT"])
    reqs = longform_records_to_requests([akew])
    assert reqs[-1].multihop_questions == tuple(raw(AKEW)[0]["questions"])
    assert len(reqs[0].sub_questions) == len(raw(AKEW)[0]["requested_rewrite"][0]["unsfact_triplets_GPT"])
    # never eval: an expression is an error naming the field, not executed
    rec["sub_question"] = "[__import__('os').getcwd()]"
    with pytest.raises(RequestError) as err:
        longform_records_to_requests([rec], start_index=5)
    assert (err.value.record, err.value.field) == (5, "sub_question")


@pytest.mark.parametrize(
    "path,mutate,index,field",
    [
        (UNKE, lambda r: r.update(answer="   "), 2, "answer"),
        (UNKE, lambda r: r.update(question=""), 2, "question"),
        (UNKE, lambda r: r.pop("question"), 2, "record"),  # no longer any known shape
        (UNKE, lambda r: r.update(para_question=" "), 2, "para_question"),
        (UNKE, lambda r: r.update(sub_answer=r["sub_answer"][:-1]), 2, "sub_answer"),
        (UNKE, lambda r: r["sub_question"].__setitem__(1, ""), 2, "sub_question[1]"),
        (EDITEV, lambda r: r.update(answer=""), 2, "answer"),
        (EDITEV, lambda r: r.update(answer=7), 2, "answer"),
        (AKEW, lambda r: r["requested_rewrite"][0].update(fact_new_uns=""), 2, "requested_rewrite[0].fact_new_uns"),
        (AKEW, lambda r: r["requested_rewrite"][0].update(question="  "), 2, "requested_rewrite[0].question"),
        (AKEW, lambda r: r.update(requested_rewrite=[]), 2, "requested_rewrite"),
        (AKEW, lambda r: r["requested_rewrite"][0]["unsfact_triplets_GPT"][0].update(target=""), 2,
         "requested_rewrite[0].unsfact_triplets_GPT[0].target"),
        (AKEW, lambda r: r.update(new_answer=None), 2, "new_answer"),
    ],
)
def test_errors_name_record_and_field(path, mutate, index, field):
    records = copy.deepcopy(raw(path)[:5])
    mutate(records[index])
    with pytest.raises(RequestError) as err:
        longform_records_to_requests(records)
    assert err.value.record == index
    assert err.value.field == field, str(err.value)
    assert f"record {index}" in str(err.value) and field in str(err.value)


def test_duplicate_case_id_and_bad_format():
    records = raw(EDITEV)[:3]
    records[2] = dict(records[2], id=records[0]["id"])
    with pytest.raises(RequestError) as err:
        longform_records_to_requests(records)
    assert (err.value.record, err.value.field) == (2, "case_id")
    with pytest.raises(ValueError, match="unknown long-form format"):
        longform_records_to_requests(records, fmt="nope")


def test_validate_direct_construction():
    ok = LongFormRequest(case_id="a", question="Q?", answer="A.")
    assert ok.validate() is ok and ok.record == "a"
    with pytest.raises(RequestError) as err:
        LongFormRequest(case_id="a", question="Q?", answer="", record_index=3).validate()
    assert (err.value.record, err.value.field) == (3, "answer")
    with pytest.raises(RequestError) as err:
        LongFormRequest(case_id="b", question="Q?", answer="A", multihop_questions=("who?",)).validate()
    assert err.value.field == "multihop_answer"
    # raw field names carry through
    r = LongFormRequest(case_id="c", question="Q", answer="A", raw_fields={"answer": "requested_rewrite[0].fact_new_uns"})
    assert r.error("answer", "too long").field == "requested_rewrite[0].fact_new_uns"


def test_csv_through_datasets_with_literal_list_columns(tmp_path):
    """CSV cannot hold lists: UnKEBench's list columns come as Python literals and are parsed."""
    import csv

    records = raw(UNKE)[:4]
    path = tmp_path / "unke.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        for r in records:
            w.writerow({**r, "sub_question": str(r["sub_question"]), "sub_answer": str(r["sub_answer"])})
    requests = load_longform(str(path), cache_dir=str(tmp_path / "cache"))
    assert [r.source_format for r in requests] == ["unkebench"] * 4
    for rec, req in zip(records, requests):
        assert req.answer == rec["answer"] and req.sub_questions == tuple(rec["sub_question"])
        assert req.sub_answers == tuple(rec["sub_answer"]) and req.case_id == str(rec["id"])


def test_requests_hash_and_pickle():
    """Requests cross process boundaries (DDP spawn pickles them): they serialize, and a copy
    rebuilt through the same reduce protocol pickle uses (``copy.deepcopy``) equals the original;
    no bytes are unpickled here."""
    import copy
    import pickle

    reqs = load_longform(str(AKEW))[:5]
    assert len({hash(r) for r in reqs}) == 5
    assert len(pickle.dumps(reqs)) > 0
    back = copy.deepcopy(reqs)
    assert back == reqs and back[0].extra == reqs[0].extra and back[0].raw_fields == reqs[0].raw_fields
    assert back[0] is not reqs[0]
