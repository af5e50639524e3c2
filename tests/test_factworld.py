"""The factworld: determinism, dataset shapes and invariants, and the tiny model's recall."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lightning_edit.factworld.build import PRESETS, FactworldPaths, build_dir_name, ensure_factworld
from lightning_edit.factworld.pretrain import pack_texts, recall
from lightning_edit.factworld.tokenizer import train_tokenizer
from lightning_edit.factworld.world import RELATION_BY_ID, RELATIONS, WorldConfig, build_world, read_jsonl

SMALL = WorldConfig(n_subjects=120, n_edits=12, n_general=50)


@pytest.fixture(scope="module")
def world():
    return build_world(0, SMALL)


@pytest.fixture(scope="module")
def default_world():
    return build_world(0, PRESETS["default"].world)


# ---- the world ------------------------------------------------------------------------------


def test_relations_are_well_formed():
    objects = [o for r in RELATIONS for o in r.objects]
    assert len(objects) == len(set(objects)), "object strings must be unique across relations"
    assert 6 <= len(RELATIONS) <= 10
    for r in RELATIONS:
        assert 15 <= len(r.objects) <= 40
        templates = r.train_templates + r.heldout_templates
        assert len(templates) == len(set(templates)) and 5 <= len(templates) <= 6
        assert len(r.heldout_templates) == 2
        assert all(t.count("{}") == 1 and not t.endswith(" ") for t in templates)
        assert r.train_templates[-1].endswith("?") and r.heldout_templates[-1].endswith("?")


def test_deterministic_for_a_seed(tmp_path):
    a, b, c = build_world(0, SMALL), build_world(0, SMALL), build_world(1, SMALL)
    assert a.subjects == b.subjects and a.facts == b.facts and a.edits == b.edits
    assert a.corpus() == b.corpus() and a.counterfact() == b.counterfact() and a.zsre() == b.zsre()
    assert a.documents() == b.documents() and a.references() == b.references()
    assert a.subjects != c.subjects and a.counterfact() != c.counterfact()
    # the written files too, byte for byte
    pa, pb = a.write(tmp_path / "a"), b.write(tmp_path / "b")
    for key in pa:
        assert pa[key].read_bytes() == pb[key].read_bytes(), key


def test_subjects_unique_and_multi_token(world):
    assert len(set(world.subjects)) == len(world.subjects) == SMALL.n_subjects
    tok = train_tokenizer(world.corpus(), vocab_size=1024)
    lengths = [len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in world.subjects]
    assert min(lengths) >= 2


def test_default_proportions(default_world):
    stats = default_world.stats()
    assert stats["n_facts"] >= 10_000
    assert stats["n_edits"] >= 1000
    assert stats["edit_fraction"] <= 0.10
    # at most one edit per subject (hence per subject-relation)
    assert len({e.subject for e in default_world.edits}) == len(default_world.edits)
    # a full neighbourhood for every case at this size
    assert all(len(r["neighborhood_prompts"]) == 10 for r in default_world.counterfact())


def test_corpus_holds_train_templates_only(world):
    corpus = set(world.corpus())
    text = "\n".join(corpus)
    for s in world.subjects[:20]:
        for r in RELATIONS:
            o = world.facts[(s, r.relation_id)]
            for t in r.train_templates:
                assert f"{t.replace('{}', s)} {o}." in corpus
            for t in r.heldout_templates:
                assert t.replace("{}", s) not in text, f"held-out prompt leaked into the corpus: {t}"


def test_documents_state_every_fact(world):
    docs = world.documents()
    assert len(docs) == len(world.subjects)
    for d in docs[:20]:
        assert d["text"].count(".") >= len(RELATIONS)
        for rid, o in d["facts"].items():
            assert world.facts[(d["subject"], rid)] == o and o in d["text"]


# ---- edit datasets --------------------------------------------------------------------------


def test_counterfact_shape_and_invariants(world):
    records = world.counterfact()
    assert len(records) == SMALL.n_edits
    for rec in records:
        rw = rec["requested_rewrite"]
        assert set(rec) == {"case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
                            "attribute_prompts", "generation_prompts"}
        assert set(rw) == {"prompt", "subject", "relation_id", "target_new", "target_true"}
        assert rw["prompt"].count("{}") == 1 and set(rw["target_new"]) == {"str", "id"} == set(rw["target_true"])
        r = RELATION_BY_ID[rw["relation_id"]]
        s, new, true = rw["subject"], rw["target_new"]["str"], rw["target_true"]["str"]
        # counterfactual from the same relation, different from the truth
        assert new != true and new in r.objects and world.facts[(s, r.relation_id)] == true
        assert rw["prompt"] in r.train_templates
        # paraphrases: the held-out templates
        assert rec["paraphrase_prompts"] == [t.replace("{}", s) for t in r.heldout_templates]
        # neighbours: other subjects, same relation, same true object, training templates, unedited
        assert 1 <= len(rec["neighborhood_prompts"]) <= SMALL.n_neighbours
        for p in rec["neighborhood_prompts"]:
            other = _subject_of(world, p, r.train_templates)
            assert other != s and world.facts[(other, r.relation_id)] == true
            assert not world.is_edited(other, r.relation_id)
        for p in rec["attribute_prompts"]:
            assert world.facts[(_subject_of(world, p, r.train_templates), r.relation_id)] == new
        assert all(s in p for p in rec["generation_prompts"])
    assert len({(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in records}) == len(records)


def _subject_of(world, prompt: str, templates) -> str:
    """The subject that ``prompt`` renders on one of ``templates`` (fails if none)."""
    subjects = set(world.subjects)
    for t in templates:
        pre, post = t.split("{}")
        name = prompt[len(pre) : len(prompt) - len(post)]
        if prompt.startswith(pre) and prompt.endswith(post) and name in subjects:
            return name
    raise AssertionError(f"{prompt!r} is not a subject on a training template")


def test_zsre_shape(world):
    records = world.zsre()
    cf = world.counterfact()
    assert len(records) == len(cf)
    for z, c in zip(records, cf):
        assert set(z) == {"subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond"}
        rw = c["requested_rewrite"]
        assert z["subject"] == rw["subject"] and z["subject"] in z["src"] and z["subject"] in z["rephrase"]
        assert z["answers"] == [rw["target_new"]["str"]] == [z["alt"]] and z["pred"] == rw["target_true"]["str"]
        assert z["src"].endswith("?") and z["rephrase"].endswith("?") and z["src"] != z["rephrase"]
        assert z["subject"] not in z["loc"]
        assert z["cond"] == f"{z['pred']} >> {z['alt']} || {z['src']}"
        r = RELATION_BY_ID[rw["relation_id"]]
        assert z["rephrase"] == r.heldout_templates[-1].replace("{}", z["subject"])


def test_fact_prompts_and_references(world):
    facts = world.fact_prompts()
    per_fact = sum(len(r.train_templates) + len(r.heldout_templates) for r in RELATIONS)
    assert len(facts) == len(world.subjects) * per_fact
    assert Counter(f["split"] for f in facts).keys() == {"train", "heldout"}
    edited = {(f["subject"], f["relation_id"]) for f in facts if f["edit_case_id"] is not None}
    assert edited == {(e.subject, e.relation_id) for e in world.edits}
    refs = world.references()
    assert set(refs) == {o for r in RELATIONS for o in r.objects}
    assert all(o in " ".join(texts) for o, texts in refs.items())


def test_exports_load_through_the_project_loaders(world, tmp_path):
    formats = pytest.importorskip("lightning_edit.data.formats")
    paths = world.write(tmp_path)
    cf = json.loads(paths["counterfact"].read_text())
    zs = json.loads(paths["zsre"].read_text())
    for records, fmt in ((cf, "counterfact"), (zs, "zsre")):
        requests = formats.records_to_requests(records, fmt)
        assert len(requests) == len(records)
        for req in requests:
            req.validate()
    req = formats.records_to_requests(cf, "counterfact")[0]
    assert req.subject == cf[0]["requested_rewrite"]["subject"]
    assert req.target_new.strip() == cf[0]["requested_rewrite"]["target_new"]["str"]


# ---- tokenizer and packing ------------------------------------------------------------------


def test_tokenizer_prepends_eot_and_offsets_skip_it(world):
    tok = train_tokenizer(world.corpus(), vocab_size=1024)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    enc = tok("A lute", return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id and enc["offset_mapping"][0] == (0, 0)
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "A lute"


def test_pack_texts_keeps_texts_whole():
    import random

    texts = [[0, 1, 2], [0, 3], [0, 4, 5, 6, 7], [0, 8]]
    ids, labels = pack_texts(texts, block_size=6, pad_id=0, rng=random.Random(0))
    assert ids.shape[1] == 6
    real = [t for row, lab in zip(ids.tolist(), labels.tolist()) for t, l in zip(row, lab) if l != -100]
    assert sorted(real) == sorted(t for x in texts for t in x)
    # every text sits inside one block, in order
    rows = [r for r in labels.tolist()]
    for x in texts:
        assert any(any(r[i : i + len(x)] == x for i in range(6)) for r in rows)


# ---- the tiny build -------------------------------------------------------------------------


def test_tiny_build_reaches_recall_and_is_cached(tmp_path):
    root = tmp_path / "fw"
    paths = ensure_factworld(str(root), seed=0, preset="tiny", progress_bar=False)
    assert isinstance(paths, FactworldPaths) and paths.root.name == build_dir_name(0, "tiny", PRESETS["tiny"])
    manifest = paths.read_manifest()
    assert manifest["recall"]["train"] >= PRESETS["tiny"].min_recall, manifest["recall"]
    assert (paths.model_dir / "model.safetensors").exists() and (paths.model_dir / "tokenizer.json").exists()
    for p in (paths.corpus, paths.counterfact, paths.zsre, paths.facts, paths.references, paths.documents):
        assert p.exists()
    # nothing half-built left behind; a second call reuses the build
    assert [p.name for p in root.iterdir()] == [paths.root.name]
    mtime = paths.manifest.stat().st_mtime_ns
    assert ensure_factworld(str(root), seed=0, preset="tiny").manifest.stat().st_mtime_ns == mtime

    # the saved model and tokenizer load with plain transformers and know their facts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(paths.model_dir))
    tok = AutoTokenizer.from_pretrained(str(paths.model_dir))
    facts = [f for f in read_jsonl(paths.facts) if f["split"] == "train"][:200]
    assert recall(model, tok, facts) >= PRESETS["tiny"].min_recall - 0.05


def test_half_built_directory_is_rebuilt(tmp_path, monkeypatch):
    """A directory without a matching manifest is not mistaken for a finished build."""
    import lightning_edit.factworld.build as build

    final = FactworldPaths.at(tmp_path / build_dir_name(0, "tiny", PRESETS["tiny"]))
    final.root.mkdir(parents=True)
    (final.root / "corpus.jsonl").write_text("partial")
    calls = []

    def fake_pretrain(texts, tokenizer, model_spec, train_spec, out_dir, **kw):
        calls.append(out_dir)
        raise RuntimeError("stop here")

    monkeypatch.setattr(build, "pretrain", fake_pretrain)
    with pytest.raises(RuntimeError, match="stop here"):
        build.ensure_factworld(str(tmp_path), seed=0, preset="tiny", progress_bar=False)
    assert calls, "the partial directory must trigger a build"
    # the failed build left no temporary directory and did not touch the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.root.name]
    assert (final.root / "corpus.jsonl").read_text() == "partial"
