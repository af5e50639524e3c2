"""The factworld: determinism, dataset shapes and invariants, and the tiny model's recall."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from lightning_edit.builtin.factworld.build import PRESETS, FactworldPaths, build_dir_name, ensure_factworld
from lightning_edit.builtin.factworld.pretrain import (
    CorpusDataModule,
    ModelSpec,
    TrainSpec,
    bucket_batches,
    pretrain_model,
    recall,
    subject_label_mask,
)
from lightning_edit.builtin.factworld.tokenizer import train_tokenizer
from lightning_edit.builtin.factworld.world import RELATION_BY_ID, RELATIONS, WorldConfig, build_world, read_jsonl

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
        assert len(templates) == len(set(templates))
        assert len(r.train_templates) >= 4 and len(r.heldout_templates) == 2
        assert all(t.count("{}") == 1 and not t.endswith(" ") for t in templates)
        assert r.train_templates[-1].endswith("?") and r.heldout_templates[-1].endswith("?")
        assert not r.train_templates[0].endswith("?") and not r.heldout_templates[0].endswith("?")


def test_no_template_is_a_prefix_of_another():
    """'{} was born in' next to '{} was born in the country of' made the model answer 'the'
    half the time: after a prompt, the next word must be the object."""
    prompts = [(r.relation_id, t.replace("{}", "Xa Yb")) for r in RELATIONS
               for t in r.train_templates + r.heldout_templates + tuple(d.replace("{s}", "{}").split(" {o}")[0] for d in r.doc_templates)]
    for rid, a in prompts:
        for rid_b, b in prompts:
            assert not b.startswith(a + " "), f"{a!r} ({rid}) is a prefix of {b!r} ({rid_b})"


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


def test_heldout_text_is_fresh_and_about_unedited_subjects(world):
    held = world.heldout_texts()
    corpus = set(world.corpus())
    edited = {c["requested_rewrite"]["subject"] for c in world.counterfact()}
    assert held and all(h["text"] not in corpus for h in held)
    assert not edited & {h["subject"] for h in held}
    assert len(held) == len(set(world.subjects) - edited)
    assert held == world.heldout_texts()


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


# ---- tokenizer and data ---------------------------------------------------------------------


def test_tokenizer_prepends_eot_and_offsets_skip_it(world):
    tok = train_tokenizer(world.corpus(), vocab_size=1024)
    assert tok.bos_token_id == tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    enc = tok("A lute", return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id and tuple(enc["offset_mapping"][0]) == (0, 0)
    assert tok.decode(enc["input_ids"], skip_special_tokens=True) == "A lute"


def test_corpus_records_name_their_subject(world):
    records = world.corpus_records()
    assert [r["text"] for r in records] == world.corpus()
    for r in records[:500]:
        if r["subject"] is None:
            assert not any(s in r["text"] for s in world.subjects[:50])
        else:
            assert r["subject"] in r["text"]


def test_subject_tokens_get_no_loss(world):
    tok = train_tokenizer(world.corpus(), vocab_size=1024)
    s = world.subjects[0]
    text = f"Which city does {s} live in? Korrin."
    dm = CorpusDataModule(tok, records=[{"text": text, "subject": s}, {"text": "The lute is old.", "subject": None}])
    dm.setup()
    ids, labels = dm._tokens[0], dm._labels[0]
    kept = tok.decode([t for t, lab in zip(ids, labels) if lab != -100], skip_special_tokens=True)
    assert kept == "Which city does live in? Korrin."
    assert dm._labels[1] == dm._tokens[1]
    # offsets-based helper on its own
    assert subject_label_mask([(0, 3), (3, 9), (9, 12)], "Bob Dylans sings", "Bob Dylans")[:2] == [True, True]


def test_bucket_batches_keep_texts_whole_one_per_row():
    texts = [[0, 1, 2], [0, 3], [0, 4, 5, 6, 7], [0, 8], [0, 9, 9]]
    labels = [[0, -100, 2], [0, 3], [0, 4, 5, 6, 7], [0, 8], [0, 9, 9]]
    batches = bucket_batches(texts, tokens_per_batch=8, pad_id=0, rng=random.Random(0), label_lists=labels)
    seen = []
    for ids, lab in batches:
        assert ids.shape == lab.shape
        assert ids.numel() <= 8 or ids.shape[0] == 1  # the token budget
        for r in range(ids.shape[0]):
            # each row is one whole text from position 0, then right padding with label -100
            n = next(i for i, t in enumerate(texts) if ids[r, : len(t)].tolist() == t and not ids[r, len(t) :].any())
            seen.append(n)
            assert lab[r, : len(texts[n])].tolist() == labels[n]
            assert (lab[r, len(texts[n]) :] == -100).all()
    assert sorted(seen) == list(range(len(texts)))


def test_pretraining_is_deterministic(world, tmp_path):
    tok = train_tokenizer(world.corpus(), vocab_size=1024)
    spec = ModelSpec(n_layer=1, d_model=32, n_head=2, max_positions=128)
    train = TrainSpec(max_steps=5, tokens_per_batch=512, warmup_steps=2)
    records = world.corpus_records()[:300]
    runs = [pretrain_model(records, tok, spec, train, tmp_path / f"m{i}", seed=3, progress_bar=False) for i in range(2)]
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / f"m{i}" / "model.safetensors")) for i in range(2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0]["steps"] == 5 and runs[0]["final_loss"] == runs[1]["final_loss"]


def test_recall_needs_every_object_token():
    """A model that predicts only the first object token right does not count as knowing."""

    class FirstTokenOnly(torch.nn.Module):
        def __init__(self, vocab, first_ids):
            super().__init__()
            self.vocab, self.first_ids = vocab, first_ids
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            B, T = input_ids.shape
            logits = torch.zeros(B, T, self.vocab)
            logits[:, :, self.first_ids] = 1.0  # always the first object token
            return type("Out", (), {"logits": logits})()

    tok = train_tokenizer(["The favourite food of Ab is lentil soup.", "The favourite food of Ab is plum cake."] * 20, vocab_size=300)
    first = tok(" lentil", add_special_tokens=False)["input_ids"][0]
    model = FirstTokenOnly(len(tok), first)
    facts = [{"prompt": "The favourite food of Ab is", "object": "lentil soup"}]
    if len(tok(" lentil soup", add_special_tokens=False)["input_ids"]) > 1:
        assert recall(model, tok, facts) == 0.0
    single = [{"prompt": "The favourite food of Ab is", "object": tok.decode([first]).strip()}]
    assert recall(model, tok, single) == 1.0


# ---- builds ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("factworld")
    return root, ensure_factworld(str(root), seed=0, preset="tiny", use_shipped=False, progress_bar=False)


def test_tiny_build_reaches_recall_and_is_cached(tiny_build):
    root, paths = tiny_build
    assert isinstance(paths, FactworldPaths) and paths.root.name == build_dir_name(0, "tiny", PRESETS["tiny"])
    manifest = paths.read_manifest()
    assert manifest["source"] == "built"
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
    assert tok.model_max_length == model.config.n_positions  # the model's context, not 1024
    facts = [f for f in read_jsonl(paths.facts) if f["split"] == "train"]
    assert recall(model, tok, facts) == pytest.approx(manifest["recall"]["train"])


def test_shipped_model_is_installed_without_training(tiny_build, tmp_path, monkeypatch):
    import lightning_edit.builtin.factworld.build as build

    _, paths = tiny_build
    shipped_root = tmp_path / "shipped"
    monkeypatch.setattr(build, "SHIPPED_ROOT", shipped_root)
    shipped = build.ship(paths, shipped_root)
    assert (shipped / "model" / "model.safetensors").stat().st_size < 0.6 * (paths.model_dir / "model.safetensors").stat().st_size

    def no_training(*a, **k):
        raise AssertionError("a shipped model must not be retrained")

    monkeypatch.setattr(build, "pretrain_model", no_training)
    installed = build.ensure_factworld(str(tmp_path / "fresh"), seed=0, preset="tiny", progress_bar=False)
    manifest = installed.read_manifest()
    assert manifest["source"] == "shipped"
    assert manifest["recall"]["train"] >= PRESETS["tiny"].min_recall - 0.02
    assert installed.counterfact.read_bytes() == paths.counterfact.read_bytes()
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(str(installed.model_dir / "model.safetensors")).values())
    tok_cfg = json.loads((installed.model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == json.loads((installed.model_dir / "config.json").read_text())["n_positions"]


def test_shipped_tokenizer_declares_the_models_context():
    import lightning_edit.builtin.factworld.build as build

    for model_dir in sorted(Path(build.SHIPPED_ROOT).glob("*/model")):
        tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
        cfg = json.loads((model_dir / "config.json").read_text())
        n_pos = cfg.get("n_positions") or cfg["max_position_embeddings"]
        assert tok_cfg["model_max_length"] == n_pos, model_dir


def test_the_shipped_default_model_matches_the_world_code(tmp_path, monkeypatch):
    """The quickstart's model ships in the package. If the world code changes, the regenerated
    corpus no longer matches the one the model learned and a fresh clone would silently spend
    an hour retraining: this fails first (re-ship with ``--ship_model true``)."""
    import lightning_edit.builtin.factworld.build as build

    def no_training(*a, **k):
        raise AssertionError("the shipped default model no longer matches the world: retrain and re-ship it")

    monkeypatch.setattr(build, "pretrain_model", no_training)
    installed = build.ensure_factworld(str(tmp_path), seed=0, preset="default", progress_bar=False)
    manifest = installed.read_manifest()
    assert manifest["source"] == "shipped"
    assert manifest["recall"]["train"] >= PRESETS["default"].min_recall
    assert manifest["world"]["n_facts"] >= 10 * manifest["world"]["n_edits"] >= 10_000 - 1


def test_half_built_directory_is_rebuilt(tmp_path, monkeypatch):
    """A directory without a matching manifest is not mistaken for a finished build."""
    import lightning_edit.builtin.factworld.build as build

    final = FactworldPaths.at(tmp_path / build_dir_name(0, "tiny", PRESETS["tiny"]))
    final.root.mkdir(parents=True)
    (final.root / "corpus.jsonl").write_text("partial")
    calls = []

    def fake_pretrain(records, tokenizer, model_spec, train_spec, out_dir, **kw):
        calls.append(out_dir)
        raise RuntimeError("stop here")

    monkeypatch.setattr(build, "pretrain_model", fake_pretrain)
    with pytest.raises(RuntimeError, match="stop here"):
        build.ensure_factworld(str(tmp_path), seed=0, preset="tiny", use_shipped=False, progress_bar=False)
    assert calls, "the partial directory must trigger a build"
    # the failed build left no temporary directory and did not touch the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == [final.root.name]
    assert (final.root / "corpus.jsonl").read_text() == "partial"


def test_cli_parses_the_shipped_config():
    from pathlib import Path

    from jsonargparse import CLI

    from lightning_edit.builtin.factworld.build import build_factworld

    cfg = Path(__file__).resolve().parents[1] / "configs" / "factworld_pretrain.yaml"
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)

    fake.__signature__ = __import__("inspect").signature(build_factworld)
    CLI(fake, args=["--config", str(cfg)], as_positional=False)
    assert seen["preset"] == "default" and seen["root"] == "checkpoints/factworld"
