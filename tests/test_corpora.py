"""Statistics corpora without Wikipedia: sources, exclusion of edited subjects, provenance."""

import json

import pytest

from lightning_edit.builtin.corpora import build_corpus, drop_mentions, generated_texts, pydoc_texts
from lightning_edit.resources import resolve


def test_drop_mentions_is_whole_word():
    texts = [{"text": "Paris is big."}, {"text": "Parisian food."}, {"text": "Rome and Paris."}, {"text": "Nothing."}]
    kept, dropped = drop_mentions(texts, ["Paris"])
    assert [t["text"] for t in kept] == ["Parisian food.", "Nothing."] and dropped == 2


def test_pydoc_corpus_excludes_edited_subjects_and_records_its_source(tmp_path):
    edits = tmp_path / "edits.json"
    # "Python" and "Unicode" occur in the language reference: texts naming them must go
    edits.write_text(json.dumps([{"case_id": 0, "prompt": "{} was created by", "subject": "Python", "target_new": "Bob", "ground_truth": "Guido"},
                                 {"case_id": 1, "prompt": "{} is a", "subject": "Unicode", "target_new": "x", "ground_truth": "y"}]))
    path = build_corpus("pydoc", tmp_path / "c", exclude=str(edits))
    rows = [json.loads(line) for line in open(path)]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["settings"]["kind"] == "pydoc" and manifest["settings"]["exclude"] == str(edits)
    assert manifest["dropped_mentioning_edited_subjects"] > 0 and manifest["texts"] == len(rows)
    assert len(rows) + manifest["dropped_mentioning_edited_subjects"] == len(pydoc_texts())
    assert not any("Python" in r["text"].split() or "Unicode" in r["text"] for r in rows)
    assert all(r["source"].startswith("pydoc:") for r in rows)
    again = resolve(f"corpus:pydoc?exclude={edits}", root=str(tmp_path / "r"))
    assert open(again).read() == open(path).read()  # deterministic, independent of the directory


def test_generated_corpus_is_seeded(trained_gpt2, tokenizer):
    a = generated_texts(trained_gpt2, tokenizer, n_texts=5, max_new_tokens=8, batch_size=3, seed=1)
    b = generated_texts(trained_gpt2, tokenizer, n_texts=5, max_new_tokens=8, batch_size=3, seed=1)
    c = generated_texts(trained_gpt2, tokenizer, n_texts=5, max_new_tokens=8, batch_size=3, seed=2)
    assert a == b and a != c and len(a) == 5
    assert all(t["text"].startswith(t["source"].split(":", 1)[1]) for t in a)


def test_unknown_corpus_kind_and_option(tmp_path):
    with pytest.raises(ValueError, match="unknown statistics corpus kind"):
        resolve("corpus:wiki", root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown corpus option"):
        resolve("corpus:pydoc?foo=1", root=str(tmp_path))


def test_facts_corpus_states_true_facts_never_about_probes_and_combines_with_pydoc(tmp_path):
    """corpus:facts@<model>: statements of the real-facts set's candidate facts in the relations'
    phrasings, never about a probe's subject; edited subjects dropped; kinds combine with '+'."""
    from lightning_edit.builtin.corpora import fact_texts
    from lightning_edit.builtin.realfacts import RELATIONS
    from lightning_edit.builtin.realfacts import resolve as rf_resolve

    model = "smollm2:135m-instruct"
    texts = fact_texts(model)
    assert texts == fact_texts(model) and len(texts) > 500  # deterministic
    probes = [json.loads(line) for line in open(rf_resolve(f"realfacts:{model}/probes"))]
    held = {p["subject"] for p in probes}
    known = json.load(open(rf_resolve(f"realfacts:{model}/known")))["facts_detail"]
    statements = {t.replace("{}", d["subject"], 1) + " " + d["object"] + "."
                  for d in known if d["subject"] not in held for t in RELATIONS[d["relation_id"]].templates}
    from lightning_edit.builtin.corpora import drop_mentions

    assert drop_mentions(texts, sorted(held))[1] == 0  # no text names a probe's subject, even as an object
    for t in texts[:40]:  # each text is six of the true statements, joined by spaces
        found = [st for st in statements if st in t["text"]]
        assert len(found) >= 6 and sum(len(st) + 1 for st in found) >= len(t["text"]) + 1, t["text"]

    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps([{"case_id": 0, "prompt": "{} is in", "subject": "Paris", "target_new": "x", "ground_truth": "y"}]))
    path = build_corpus("pydoc+facts", tmp_path / "c", model_name=model, exclude=str(edits))
    rows = [json.loads(line) for line in open(path)]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    facts_kept = fact_texts(model, exclude=["Paris"])  # statement by statement: the rest of a group stays
    assert sum(t["text"].count(".") for t in facts_kept) >= sum(t["text"].count(".") for t in texts) - 10
    assert manifest["texts_per_kind"] == {"pydoc": len(pydoc_texts()), "facts": len(facts_kept)}
    assert manifest["texts"] == len(rows) == len(facts_kept) + len(pydoc_texts()) - manifest["dropped_mentioning_edited_subjects"]
    assert {r["source"].split(":", 1)[0] for r in rows} == {"pydoc", "facts"}
    assert not any("Paris" in r["text"].replace(".", " ").split() for r in rows)
    with pytest.raises(ValueError, match="names a kind twice"):
        build_corpus("pydoc+pydoc", tmp_path / "d")
    with pytest.raises(ValueError, match="needs the model"):
        build_corpus("facts", tmp_path / "e")


def test_docstrings_corpus_is_held_out_from_pydoc(tmp_path):
    path = resolve("corpus:docstrings?n=30", root=str(tmp_path))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 30 and all(r["source"].startswith("stdlib:") for r in rows)
    pydoc = {r["text"] for r in pydoc_texts()}
    assert not pydoc & {r["text"] for r in rows}
