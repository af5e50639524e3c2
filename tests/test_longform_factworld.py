"""Factworld long-form requests: deterministic, counterfactual, new text, 100-250 tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lightning_edit.builtin.factworld.build import PRESETS, FactworldPaths
from lightning_edit.builtin.factworld.longform import (
    LONGFORM_FILE,
    LONGFORM_SPECS,
    LongformSpec,
    ensure_longform,
    longform_records,
    write_longform,
)
from lightning_edit.builtin.factworld.world import RELATION_BY_ID, build_world
from lightning_edit.longform.chunking import ChunkingConfig, check_fits, chunk_answer, prompt_and_answer
from lightning_edit.longform.records import load_longform

SHIPPED = Path(__file__).parents[1] / "lightning_edit" / "builtin" / "factworld" / "pretrained" / "default-seed0" / "model"


@pytest.fixture(scope="module")
def default_world():
    return build_world(0, PRESETS["default"].world)


@pytest.fixture(scope="module")
def records(default_world):
    return longform_records(default_world)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(SHIPPED))


def test_deterministic_and_at_least_100(default_world, records, tmp_path):
    assert len(records) >= 100
    assert longform_records(default_world) == records
    a = write_longform(default_world, tmp_path / "a.json")
    b = write_longform(build_world(0, PRESETS["default"].world), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    # another seed, another world and other texts
    other = longform_records(build_world(1, PRESETS["tiny"].world), LONGFORM_SPECS["tiny"])
    mine = longform_records(build_world(0, PRESETS["tiny"].world), LONGFORM_SPECS["tiny"])
    assert [r["answer"] for r in other] != [r["answer"] for r in mine]


def test_questions_people_and_counterfactual_attributes(default_world, records):
    subjects = [r["subject"] for r in records]
    assert len(set(subjects)) == len(subjects)
    # people without a CounterFact edit come first
    unedited = [s for s in default_world.subjects if not any(default_world.is_edited(s, rid) for rid in RELATION_BY_ID)]
    assert all(s in set(unedited) for s in subjects[: min(len(unedited), len(subjects))])
    for r in records:
        s = r["subject"]
        assert r["question"] == f"Tell me about {s}."
        assert s in r["para_question"] and r["para_question"] != r["question"]
        for rid, true in r["true_facts"].items():
            assert default_world.facts[(s, rid)] == true
            new = r["new_facts"][rid]
            assert new != true and new in RELATION_BY_ID[rid].objects
        assert r["answer"].startswith(f"{s} is a {r['new_facts']['profession']} from {r['new_facts']['birth_country']}.")
        assert len(r["sub_question"]) == len(r["sub_answer"]) >= 3
        for q, a in zip(r["sub_question"], r["sub_answer"]):
            assert s in q and q.endswith("?") and a in r["answer"]
        # the true objects never appear (outside a new object's name, e.g. "goat" in "goat cheese")
        text = r["answer"]
        for new in r["new_facts"].values():
            text = text.replace(new, " ")
        for true in r["true_facts"].values():
            assert not re.search(rf"\b{re.escape(true)}\b", text), (true, r["answer"])


def test_answers_are_new_text(default_world, records):
    corpus = default_world.corpus()
    sentences = set()
    for text in corpus:
        sentences.update(x.strip() for x in re.split(r"(?<=[.?!])\s+", text))
    for r in records:
        for sentence in re.split(r"(?<=[.?!])\s+", r["answer"]):
            assert sentence not in sentences, sentence
    assert len({r["answer"] for r in records}) == len(records)


def test_answer_lengths_in_factworld_tokens(records, tok):
    max_positions = 256  # the shipped model's n_positions
    for r in records:
        n = len(tok(" " + r["answer"], add_special_tokens=False)["input_ids"])
        assert 100 <= n <= 250, (n, r["id"])
    for req in load_longform_records(records):
        ch = chunk_answer(tok, *prompt_and_answer(tok, req.question, req.answer), ChunkingConfig(window=40))
        assert 100 <= len(ch.answer_tokens) - 1 <= 250
        assert ch.input_ids[-1] == tok.eos_token_id
        check_fits(tok, req, max_positions)


def load_longform_records(records, tmp=None):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "lf.json"
        p.write_text(json.dumps(records))
        return load_longform(str(p))


def test_file_loads_through_the_longform_loader(default_world, records, tmp_path):
    path = write_longform(default_world, tmp_path / LONGFORM_FILE)
    requests = load_longform(str(path))
    assert len(requests) == len(records)
    assert all(r.source_format == "unkebench" for r in requests)
    r0, raw0 = requests[0], records[0]
    assert (r0.case_id, r0.question, r0.answer, r0.paraphrase_question) == (raw0["id"], raw0["question"], raw0["answer"], raw0["para_question"])
    assert r0.subject == raw0["subject"] and r0.sub_answers == tuple(raw0["sub_answer"])
    assert r0.extra["new_facts"] == raw0["new_facts"]


def test_spec_controls_count_and_length(default_world):
    short = longform_records(default_world, LongformSpec(n_requests=5, min_words=20, max_words=30))
    assert len(short) == 5 and all(len(r["answer"].split()) <= 30 for r in short)
    with pytest.raises(ValueError):
        longform_records(default_world, LongformSpec(min_words=50, max_words=10))


def test_ensure_longform_and_resource_name(tmp_path, monkeypatch):
    """``factworld:<preset>/longform`` resolves to longform.json next to the build, written once
    from the build's world (here: the tiny preset's world, from its manifest)."""
    from lightning_edit import resources
    from lightning_edit.builtin.factworld import resource
    from lightning_edit.builtin.factworld.build import _config_record

    root = tmp_path / "tiny-seed0"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"config": _config_record(0, "tiny", PRESETS["tiny"])}))
    monkeypatch.setattr(resource, "ensure_factworld", lambda *a, **k: FactworldPaths.at(root))
    path = resources.resolve("factworld:tiny/longform")
    assert Path(path) == root / LONGFORM_FILE
    expected = longform_records(build_world(0, PRESETS["tiny"].world), LONGFORM_SPECS["tiny"])
    assert json.loads(Path(path).read_text()) == expected
    mtime = Path(path).stat().st_mtime_ns
    assert ensure_longform(root, 0, "tiny") == Path(path) and Path(path).stat().st_mtime_ns == mtime
    assert "longform" in resource.ITEMS
    requests = load_longform("factworld:tiny/longform")
    assert len(requests) == len(expected)


def test_documents_style_states_the_new_facts_in_the_corpus_own_sentences(default_world):
    """``style="documents"`` (``factworld:<preset>/longform_docs``): the answer is the corpus's
    opening line and both document sentences of every relation, each with the new object."""
    import dataclasses

    from lightning_edit.builtin.factworld.world import RELATION_BY_ID

    recs = longform_records(default_world, dataclasses.replace(LONGFORM_SPECS["default"], style="documents"))
    assert len(recs) >= 100
    for r in recs[:20]:
        s, new = r["subject"], r["new_facts"]
        expected = {t.format(s=s, o=new[rid]) for rid, rel in RELATION_BY_ID.items() for t in rel.doc_templates}
        expected.add(f"{s} is a {new['profession']} from {new['birth_country']}.")
        sentences = {x.strip() + "." for x in r["answer"].split(".") if x.strip()}
        assert sentences == expected
        assert all(new[rid] != r["true_facts"][rid] for rid in new)
    with pytest.raises(ValueError):
        longform_records(default_world, dataclasses.replace(LONGFORM_SPECS["default"], style="poem"))
