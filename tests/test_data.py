"""The data layer: raw records -> EditRequest, file / hub sources, the resumable edit stream."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_edit.data.datamodule import EditBatch, EditDataModule, EditStreamLoader
from lightning_edit.data.formats import detect_format, records_to_requests
from lightning_edit.data.requests import EditRequest, RequestError
from lightning_edit.data.sources import load_records
from lightning_edit.errors import InputError

FIXTURES = Path(__file__).parent / "fixtures"
AKEW = FIXTURES / "akew_sample.json"
FLAT = FIXTURES / "counterfact_flat_sample.json"
ZSRE = FIXTURES / "zsre_sample.json"


def raw(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


def memit_record(case_id: int = 0, **overrides) -> dict:
    """A record in MEMIT's nested CounterFact shape (the upstream file is not in the fixtures)."""
    record = {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux speaks", "Danielle Darrieux's mother tongue is"],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
        "attribute_prompts": ["J.R.R. Tolkien is a native speaker of"],
        "generation_prompts": ["Danielle Darrieux's mother tongue is"],
    }
    record.update(overrides)
    return record


# ------------------------------------------------------------------------------------------------
# Fixtures through load_records + records_to_requests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.name)
def test_every_fixture_round_trips_and_converts(path: Path):
    records = load_records(str(path))
    assert records == raw(path)
    requests = records_to_requests(records)
    assert requests and all(isinstance(r, EditRequest) for r in requests)
    assert all(isinstance(r.case_id, str) and r.record_index >= 0 for r in requests)
    assert len({r.case_id for r in requests}) == len(requests)


def test_akew_list_rewrites_become_one_request_each():
    records = raw(AKEW)
    requests = records_to_requests(load_records(str(AKEW)))
    assert len(requests) == sum(len(r["requested_rewrite"]) for r in records)
    first, rewrite = requests[0], records[0]["requested_rewrite"][0]
    assert first.case_id == f"{records[0]['case_id']}:0"
    assert first.prompt == rewrite["prompt"] == "{} is a citizen of"
    assert first.subject == rewrite["subject"] == "Ellie Kemper"
    assert first.target_new == rewrite["target_new"]["str"] == "Croatia"
    assert first.target_true == rewrite["target_true"]["str"]
    assert first.family == "counterfact" and first.record_index == 0
    assert first.extra["fact_new_uns"] == rewrite["fact_new_uns"]
    assert first.extra["target_new_id"] == rewrite["target_new"]["id"]
    assert first.extra["new_answer"] == records[0]["new_answer"]  # record-level multi-hop fields kept
    # record 1 holds two rewrites: two requests, same record_index, case ids "<id>:0", "<id>:1"
    two = [r for r in requests if r.record_index == 1]
    assert [r.case_id for r in two] == [f"{records[1]['case_id']}:0", f"{records[1]['case_id']}:1"]
    assert [r.subject for r in two] == [w["subject"] for w in records[1]["requested_rewrite"]]


def test_counterfact_flat_record_zero():
    rec = raw(FLAT)[0]
    req = records_to_requests(load_records(str(FLAT)))[0]
    assert req.case_id == str(rec["case_id"])
    assert req.prompt == rec["prompt"].replace(rec["subject"], "{}", 1) == "The mother tongue of {} is"
    assert req.rendered_prompt == rec["prompt"]
    assert (req.subject, req.target_new, req.target_true) == (rec["subject"], rec["target_new"], rec["ground_truth"])
    assert req.paraphrase_prompts == (rec["rephrase_prompt"],)
    assert req.locality == ((rec["locality_prompt"], rec["locality_ground_truth"]),)
    assert req.family == "counterfact" and req.record_index == 0


def test_zsre_record_zero():
    rec = raw(ZSRE)[0]
    req = records_to_requests(load_records(str(ZSRE)))[0]
    assert req.case_id == "0" and req.record_index == 0 and req.family == "zsre"
    assert req.prompt == rec["src"].replace(rec["subject"], "{}") == "What university did {} attend?"
    assert req.subject == rec["subject"]
    assert req.target_new == rec["answers"][0] and req.target_true is None
    assert req.paraphrase_prompts == (rec["rephrase"],)
    assert req.locality == ((rec["loc"], rec["loc_ans"]),)
    assert req.extra["pred"] == rec["pred"] and req.extra["alt"] == rec["alt"]


def test_memit_nested_counterfact():
    rec = memit_record(7)
    (req,) = records_to_requests([rec], start_index=3)
    assert req.case_id == "7" and req.record_index == 3
    assert req.prompt == "The mother tongue of {} is" and req.target_new == "English" and req.target_true == "French"
    assert req.paraphrase_prompts == tuple(rec["paraphrase_prompts"])
    # neighbourhood prompts share the relation and the true object: their answer is target_true
    assert req.locality == tuple((p, "French") for p in rec["neighborhood_prompts"])
    assert req.generation_prompts == tuple(rec["generation_prompts"])
    assert req.extra["attribute_prompts"] == rec["attribute_prompts"]
    assert req.extra["relation_id"] == "P103" and req.extra["pararel_idx"] == 2796


def test_flat_list_valued_fields():
    rec = {
        "case_id": "x",
        "prompt": "Paris is the capital of",
        "subject": "Paris",
        "target_new": ["Italy", "Italia"],
        "ground_truth": ["France"],
        "rephrase_prompt": ["The city of Paris is the capital of", "Paris serves as capital of"],
        "locality_prompt": ["Berlin is the capital of", "Rome is the capital of"],
        "locality_ground_truth": [["Germany", "Deutschland"], "Italy"],
    }
    (req,) = records_to_requests([rec], fmt="counterfact_flat")
    assert (req.target_new, req.target_true) == ("Italy", "France")
    assert req.paraphrase_prompts == tuple(rec["rephrase_prompt"])
    assert req.locality == (("Berlin is the capital of", "Germany"), ("Rome is the capital of", "Italy"))


def test_auto_detects_each_record():
    records = [raw(FLAT)[0], raw(ZSRE)[0], memit_record(99)]
    assert [detect_format(r) for r in records] == ["counterfact_flat", "zsre", "counterfact"]
    assert [r.family for r in records_to_requests(records)] == ["counterfact", "zsre", "counterfact"]


def test_unknown_shape_lists_keys_and_formats():
    with pytest.raises(RequestError) as err:
        records_to_requests([raw(FLAT)[0], {"id": 1, "question": "q", "answer": "a"}], start_index=5)
    assert err.value.record == 6 and err.value.field == "record"
    assert "['answer', 'id', 'question']" in str(err.value) and "zsre" in str(err.value)
    with pytest.raises(ValueError, match="unknown record format"):
        records_to_requests([], fmt="memit")


def _flat(**overrides) -> dict:
    """Flat CounterFact record 0 with fields replaced; a value of ``...`` removes the field."""
    rec = dict(raw(FLAT)[0])
    rec.update(overrides)
    return {k: v for k, v in rec.items() if v is not ...}


@pytest.mark.parametrize(
    ("bad", "fmt", "field", "words"),
    [
        (memit_record(requested_rewrite={"prompt": "{} is", "target_new": {"str": "A"}, "target_true": {"str": "B"}}),
         "auto", "requested_rewrite.subject", "missing"),
        (memit_record(requested_rewrite={"prompt": "Danielle Darrieux speaks", "subject": "Danielle Darrieux",
                                         "target_new": {"str": "A"}, "target_true": {"str": "B"}}),
         "counterfact", "requested_rewrite.prompt", "written out"),
        (memit_record(requested_rewrite={"prompt": "The language is", "subject": "Danielle Darrieux",
                                         "target_new": {"str": "A"}, "target_true": {"str": "B"}}),
         "auto", "requested_rewrite.prompt", "placeholder"),
        (memit_record(requested_rewrite={"prompt": "{} is", "subject": "S", "target_new": {"str": " "},
                                         "target_true": {"str": "B"}}),
         "auto", "requested_rewrite.target_new.str", "empty"),
        ({"case_id": 3, "requested_rewrite": [
            {"prompt": "{} is", "subject": "S", "target_new": {"str": "A"}, "target_true": {"str": "B"}},
            {"prompt": "{} is", "subject": "T", "target_new": {"str": ""}, "target_true": {"str": "B"}}]},
         "auto", "requested_rewrite[1].target_new.str", "empty"),
        (_flat(subject="Somebody Else"), "auto", "subject", "does not occur"),
        (_flat(target_new=""), "auto", "target_new", "empty"),
        (_flat(ground_truth=...), "counterfact_flat", "ground_truth", "missing"),
        (_flat(target_new="French"), "auto", "target_new", "nothing to edit"),
        (_flat(locality_ground_truth=...), "auto", "locality_ground_truth", "missing"),
        (dict(raw(ZSRE)[0], answers=[]), "auto", "answers", "empty"),
        (dict(raw(ZSRE)[0], subject="Nobody"), "zsre", "subject", "does not occur"),
        (dict(raw(ZSRE)[0], rephrase=["ok", ""]), "auto", "rephrase[1]", "empty"),
        ({k: v for k, v in raw(ZSRE)[0].items() if k != "src"}, "zsre", "src", "missing"),
    ],
)
def test_errors_name_record_index_and_field(bad, fmt, field, words):
    """Each broken record (dataset position 11) is reported with its index and raw field name."""
    with pytest.raises(RequestError) as err:
        records_to_requests([bad], fmt=fmt, start_index=11)
    assert err.value.record == 11, str(err.value)
    assert err.value.field == field, str(err.value)
    assert words in str(err.value)


def test_all_records_validated_before_returning():
    records = raw(FLAT)
    records[-1] = dict(records[-1], subject="not in the prompt")
    with pytest.raises(RequestError) as err:
        records_to_requests(records)
    assert err.value.record == len(records) - 1


def test_duplicate_case_id_is_an_error():
    with pytest.raises(RequestError) as err:
        records_to_requests([raw(FLAT)[0], raw(FLAT)[0]])
    assert (err.value.record, err.value.field) == (1, "case_id") and "record 0" in str(err.value)


# ------------------------------------------------------------------------------------------------
# load_records: local files, Arrow round trips, hub ids
# ------------------------------------------------------------------------------------------------

# Records of one file with different keys and nested shapes: Arrow's schema unification writes
# None for every key a record lacks; load_records must give them back as written.
HETEROGENEOUS = [
    memit_record(0),
    {k: v for k, v in memit_record(1).items() if k not in ("generation_prompts", "attribute_prompts")},
    {"case_id": 2, "requested_rewrite": [
        {"prompt": "{} plays", "subject": "A", "target_new": {"str": "x"}, "target_true": {"str": "y"},
         "fact_new_uns": "long text"},
        {"prompt": "{} sings", "subject": "B", "target_new": {"str": "u", "id": "Q1"}, "target_true": {"str": "v"}}]},
]


def test_json_and_jsonl_round_trip_heterogeneous(tmp_path: Path):
    (tmp_path / "cf.json").write_text(json.dumps(HETEROGENEOUS))
    (tmp_path / "cf.jsonl").write_text("\n".join(json.dumps(r) for r in HETEROGENEOUS) + "\n\n")
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 1, "data": HETEROGENEOUS}))
    assert load_records(str(tmp_path / "cf.json")) == HETEROGENEOUS
    assert load_records(str(tmp_path / "cf.jsonl")) == HETEROGENEOUS
    assert load_records(str(tmp_path / "wrapped.json"), field="data") == HETEROGENEOUS
    assert load_records("json", data_files=str(tmp_path / "cf.jsonl")) == HETEROGENEOUS
    with pytest.raises(ValueError, match="field=<key>.*'data'"):
        load_records(str(tmp_path / "wrapped.json"))
    assert [r.case_id for r in records_to_requests(load_records(str(tmp_path / "cf.jsonl")))] == ["0", "1", "2:0", "2:1"]


def test_parquet_round_trip_drops_arrow_filled_nulls(tmp_path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # one Arrow type per column (a rewrite object in one record and a list in another cannot
    # share a column), but keys missing at the top level and inside nested structs
    third = memit_record(2)
    third["requested_rewrite"] = {k: v for k, v in third["requested_rewrite"].items() if k != "relation_id"}
    third["requested_rewrite"]["target_new"] = {"str": "Italian"}
    records = [HETEROGENEOUS[0], HETEROGENEOUS[1], third]
    table = pa.Table.from_pylist(records)
    # the file itself holds None for every missing key: the reason for the clean-up
    assert table.to_pylist()[1]["generation_prompts"] is None
    assert table.to_pylist()[2]["requested_rewrite"]["target_new"]["id"] is None
    pq.write_table(table, tmp_path / "cf.parquet")
    loaded = load_records(str(tmp_path / "cf.parquet"), cache_dir=str(tmp_path / "cache"))
    assert loaded == records
    assert records_to_requests(loaded) == records_to_requests(records)


def test_csv_flat_counterfact(tmp_path: Path):
    import csv

    rows = raw(FLAT)[:4]
    with (tmp_path / "flat.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    records = load_records(str(tmp_path / "flat.csv"), cache_dir=str(tmp_path / "cache"))
    assert records_to_requests(records) == records_to_requests(rows)


def test_directory_splits_and_missing_paths(tmp_path: Path):
    (tmp_path / "train.json").write_text(json.dumps(raw(FLAT)[:3]))
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in raw(FLAT)[3:5]))
    (tmp_path / "README.md").write_text("not data")
    assert load_records(str(tmp_path)) == raw(FLAT)[:3]
    assert load_records(str(tmp_path), split="test") == raw(FLAT)[3:5]
    assert load_records(str(tmp_path), data_files="test.jsonl") == raw(FLAT)[3:5]
    with pytest.raises(ValueError, match="no 'validation' files"):
        load_records(str(tmp_path), split="validation")
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "nope.json"))


def test_hub_id_fails_clearly_offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # force offline mode so the test does not wait on network retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="not a local file or directory.*hub"):
        load_records("nobody-here/no-such-edit-dataset")


# ------------------------------------------------------------------------------------------------
# The edit stream
# ------------------------------------------------------------------------------------------------


def test_datamodule_limit_offset_and_batch_order():
    dm = EditDataModule(dataset=str(FLAT), batch_size=3, limit=7, offset=2, eval_batch_size=4)
    dm.setup("fit")
    flat = raw(FLAT)
    assert [r.case_id for r in dm.requests] == [str(r["case_id"]) for r in flat[2:9]]
    assert [r.record_index for r in dm.requests] == list(range(2, 9))
    batches = list(dm.train_dataloader())
    assert [b.index for b in batches] == [0, 1, 2] and [len(b) for b in batches] == [3, 3, 1]
    assert [r for b in batches for r in b.requests] == dm.requests
    assert dm.train_dataloader() is dm.train_dataloader()  # position survives repeated calls
    evals = list(dm.val_dataloader())
    assert all(isinstance(b, EditBatch) for b in evals)
    assert [b.index for b in evals] == [0, 1] and [len(b) for b in evals] == [4, 3]
    assert [r for b in dm.test_dataloader() for r in b.requests] == dm.requests


def test_datamodule_offset_and_limit_count_records_not_rewrites():
    # a multi-rewrite record (MQuAKE / AKEW chain) is kept whole, never cut in half
    recs = raw(AKEW)
    assert len(recs[1]["requested_rewrite"]) == 2
    dm = EditDataModule(dataset=str(AKEW), offset=1, limit=2)
    dm.setup()
    want = [f"{recs[i]['case_id']}:{j}" for i in (1, 2) for j in range(len(recs[i]["requested_rewrite"]))]
    assert [r.case_id for r in dm.requests] == want
    assert [r.record_index for r in dm.requests] == [1, 1, 2]
    dm = EditDataModule(dataset=str(AKEW), limit=2)
    dm.setup()
    assert len(dm.requests) == 3  # records 0 (one rewrite) and 1 (two)


def test_datamodule_errors():
    with pytest.raises(ValueError, match="batch_size"):
        EditDataModule(dataset=str(FLAT), batch_size=0)
    dm = EditDataModule(dataset=str(FLAT), offset=100)
    with pytest.raises(ValueError, match="no edit requests.*holds 12 records"):
        dm.setup()


def test_datamodule_init_is_cli_ready():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(EditDataModule, "data")
    cfg = parser.parse_args(["--data.dataset", str(ZSRE), "--data.batch_size", "5", "--data.data_files", "[a.json, b.json]"])
    assert cfg.data.batch_size == 5 and cfg.data.format == "auto" and cfg.data.data_files == ["a.json", "b.json"]


def _requests(n: int) -> list[EditRequest]:
    return [EditRequest(case_id=str(i), prompt="{} is", subject=f"s{i}", target_new="t") for i in range(n)]


def test_stream_loader_resumes_at_applied():
    loader = EditStreamLoader(_requests(12), batch_size=5)
    assert len(loader) == 3 and loader.applied == 0
    loader.applied = 2
    state = loader.state_dict()
    assert {k: state[k] for k in ("applied", "num_requests", "batch_size")} == {"applied": 2, "num_requests": 12, "batch_size": 5}

    resumed = EditStreamLoader(_requests(12), batch_size=5)
    resumed.load_state_dict(state)
    batches = list(resumed)
    assert [b.index for b in batches] == [2] and [r.case_id for r in batches[0].requests] == ["10", "11"]
    assert len(resumed) == 3  # the whole stream: Lightning restores its own batch counter

    with pytest.raises(ValueError, match="batch_size 5, this one 4"):
        EditStreamLoader(_requests(12), batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="12 requests, this one 11"):
        EditStreamLoader(_requests(11), batch_size=5).load_state_dict(state)
    other = _requests(13)[1:]  # same size and batch size, other facts
    with pytest.raises(ValueError, match="fingerprint"):
        EditStreamLoader(other, batch_size=5).load_state_dict(state)
    with pytest.raises(ValueError, match="applied"):
        resumed.applied = 4


def test_edit_batch_survives_lightning_device_transfer():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    batch = EditBatch(0, _requests(2))
    assert move_data_to_device(batch, torch.device("cpu")) is batch


class _Recorder(L.LightningModule):
    """Stands in for an editor: records which batches it sees; can crash at one batch."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.crash_at = crash_at
        self.seen: list[int] = []

    def training_step(self, batch: EditBatch, batch_idx: int):
        if batch.index == self.crash_at:
            raise RuntimeError("simulated crash")
        self.seen.append(batch.index)
        return (self.w - 1).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Commit(L.Callback):
    """What the editing callback does after writing a batch's update."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.datamodule.train_dataloader().applied = batch.index + 1


def test_lightning_resume_continues_after_last_committed_batch(tmp_path: Path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def trainer() -> L.Trainer:
        # ModelCheckpoint is run after the other callbacks, so the step-2 checkpoint sees applied=2
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
        return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[_Commit(), checkpoint], default_root_dir=tmp_path)

    # FLAT has 12 requests: 4 batches of 3; the first run dies while editing batch 2
    first = _Recorder(crash_at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer().fit(first, datamodule=EditDataModule(dataset=str(FLAT), batch_size=3))
    assert first.seen == [0, 1]

    second, dm = _Recorder(), EditDataModule(dataset=str(FLAT), batch_size=3)
    trainer().fit(second, datamodule=dm, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    assert second.seen == [2, 3]  # neither re-applies 0, 1 nor skips 2
    assert dm.train_dataloader().applied == 4


def test_the_held_out_split_is_fixed_disjoint_and_covers_every_record():
    """Settings are chosen on the tuning part and reported on the held-out part: the parts never
    overlap, cover every record, depend only on positions, and records already used to choose
    settings (tuned) stay out of the held-out part."""
    from lightning_edit.data.datamodule import subset_positions

    tuned = list(range(12))  # the UnKEBench sample's records the shipped long-form settings were chosen on
    tune = subset_positions(200, "tune", 4, tuned)
    held = subset_positions(200, "heldout", 4, tuned)
    assert not set(tune) & set(held) and sorted(tune + held) == list(range(200))
    assert set(tuned) <= set(tune) and {12, 16, 196} <= set(tune) and len(held) == 141
    assert subset_positions(200, "heldout", 4, tuned) == held  # fixed
    assert subset_positions(110, "heldout")[:4] == [1, 2, 3, 5] and len(subset_positions(70, "heldout")) >= 20
    with pytest.raises(InputError, match="tune_every must be >= 2"):
        subset_positions(10, "heldout", 1)


def test_datamodule_reads_the_held_out_part_with_its_dataset_positions():
    from lightning_edit.data.datamodule import EditDataModule

    path = Path(__file__).parent / "fixtures" / "longform" / "unkebench_v2.json"
    dm = EditDataModule(str(path), subset="heldout", tuned=list(range(12)), offset=2, limit=3, batch_size=2)
    dm.setup()
    assert [r.record_index for r in dm.requests] == [15, 17, 18]  # held-out positions 13, 14, 15, 17, 18, ... from the third on
    # locality questions: the same part, never the stream's records (after its window, then before it)
    assert [r.record_index for r in dm.outside_requests(4)] == [19, 21, 22, 23]
    assert [r.record_index for r in dm.outside_requests(200)][-2:] == [13, 14] and dm.outside_requests(0) == []
    with pytest.raises(InputError, match="subset must be"):
        EditDataModule(str(path), subset="test")
