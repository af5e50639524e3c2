"""The edit ledger (issue 9): exact undo, history, export, checkpoints that append O(batch) bytes."""

import copy
import json

import pytest
import torch
from conftest import FAST_RESIDUAL, cli_args, counterfact_records, counterfactual_requests

from lightning_edit import Editor
from lightning_edit.checkpointing import load_nested
from lightning_edit.cli import main


def _editor(model, tokenizer, corpus_file, tmp_path, method="alphaedit", **kw2):
    kw = {"l2": 1.0, "nullspace_threshold": 0.05, "threshold_mode": "energy"} if method == "alphaedit" else {"lam": 1.0}
    if method == "memit_memory":  # MEMIT keeping the earlier edits' keys (K_p K_p^T, as AlphaEdit)
        method, kw = "memit", {"lam": 1.0, "memory": 1.0}
    return Editor(model, tokenizer, layers=[1, 2], method=method, method_kwargs=kw, residual={**FAST_RESIDUAL, "steps": 8}, **kw2,
                  context_prefixes=0, stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 300,
                                             "max_length": 64, "cache_dir": str(tmp_path / "stats")})


def _weights(ed):
    return {l: ed.module.adapter.weight_as_linear(l).detach().clone() for l in ed.module.layers}


@pytest.mark.parametrize("method,dtype", [("alphaedit", torch.float32), ("alphaedit", torch.bfloat16), ("memit_memory", torch.float32)],
                         ids=["fp32", "bf16", "memit-memory"])
def test_undo_equals_a_run_that_stopped_earlier(trained_gpt2, tokenizer, corpus_file, tmp_path, method, dtype):
    reqs = counterfactual_requests(10)
    batches = [reqs[0:2], reqs[2:4], reqs[4:6], reqs[6:8]]
    # a: batches in files (ledger_dir), b: in memory
    a = _editor(copy.deepcopy(trained_gpt2).to(dtype), tokenizer, corpus_file, tmp_path, method, ledger_dir=tmp_path / "ledger")
    b = _editor(copy.deepcopy(trained_gpt2).to(dtype), tokenizer, corpus_file, tmp_path, method)
    for batch in batches:
        a.apply(batch)
    for batch in batches[:2]:
        b.apply(batch)
    assert a.ledger.position == 4 and a.num_edits == 8
    removed = a.undo(2)
    assert len(list((tmp_path / "ledger").iterdir())) == 4 and all(r.tensors is None for r in a.ledger.records)
    assert [r["batch"] for r in removed] == [2, 3] and removed[0]["request_ids"] == [r.case_id for r in batches[2]]
    assert a.ledger.position == 2 and a.num_edits == 4 and [h["request_ids"] for h in a.history()] == [h["request_ids"] for h in b.history()]
    wa, wb = _weights(a), _weights(b)
    for l in wa:
        assert wa[l].dtype == dtype and torch.equal(wa[l], wb[l]), l  # bit-identical
    for l in (1, 2):
        assert torch.equal(a.callback.method.prev_kkt[l], b.callback.method.prev_kkt[l])  # K_p K_p^T without the undone keys
        assert a.callback.method.prev_kkt[l].abs().sum() > 0
        if dtype != torch.float32:
            assert torch.equal(a.stream.master[l], b.stream.master[l])
    # the next batch gives the same update on both
    a.apply(reqs[8:10])
    b.apply(reqs[8:10])
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[l], wb[l]) for l in wa)
    assert a.evaluate() == b.evaluate()
    # undoing everything gives back the unedited model
    a.undo(a.ledger.position)
    ref = copy.deepcopy(trained_gpt2).to(dtype)
    for l in (1, 2):
        assert torch.equal(a.model.transformer.h[l].mlp.c_proj.weight, ref.transformer.h[l].mlp.c_proj.weight)
    with pytest.raises(ValueError, match="cannot undo 1 batches: 0 are applied"):
        a.undo(1)


def test_export_round_trip_through_from_pretrained(trained_gpt2, tokenizer, corpus_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ed = _editor(copy.deepcopy(trained_gpt2), tokenizer, corpus_file, tmp_path, method="memit")
    ed.apply(counterfactual_requests(4))
    out = ed.export(tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    mine = dict(ed.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, mine[name]), name
    summary = json.loads((out / "edit_ledger.json").read_text())
    assert summary["batches"] == 1 and summary["num_edits"] == 4 and summary["layers"] == [1, 2]
    assert tok("Toko Yasuda speaks")["input_ids"] == tokenizer("Toko Yasuda speaks")["input_ids"]


def test_checkpoint_bytes_per_batch_do_not_grow_with_the_stream(tiny_model_dir, corpus_file, tmp_path):
    """Each batch appends one file of its own size (keys and factors), the same for batch 0 and
    batch 5; the checkpoint itself stays far below one d_k x d_k matrix."""
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(counterfact_records(24)))
    main(["fit", *cli_args(tiny_model_dir, p, corpus_file, tmp_path, batch_size=4, extra=["--model.residual.steps=5"])])
    files = sorted((tmp_path / "ckpt" / "ledger").iterdir())
    assert len(files) == 6
    sizes = [f.stat().st_size for f in files]
    d_k, d_model, n, layers = 256, 64, 4, 2  # the tiny model: width 64, MLP 4x
    payload = layers * 4 * n * (2 * d_k + d_model)  # keys (n, d_k) + V (n, d_k) + U (d_model, n), float32
    for s in sizes:
        assert payload <= s <= payload + 4096, (s, payload)  # + header and hashes
    ckpt = (tmp_path / "ckpt" / "last.safetensors").stat().st_size
    assert ckpt < d_k * d_k * 4, ckpt  # not even one K_p K_p^T matrix


def test_cli_undo_ledger_and_export(tiny_model_dir, corpus_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lightning_edit.checkpointing import read_edits

    p = tmp_path / "cf.json"
    p.write_text(json.dumps(counterfact_records(12)))
    # reference: a run that stops after 2 of the 3 batches
    short = tmp_path / "short"
    main(["fit", *cli_args(tiny_model_dir, p, corpus_file, short, extra=["--trainer.max_steps=2"])])
    full = tmp_path / "full"
    full_args = cli_args(tiny_model_dir, p, corpus_file, full)
    main(["fit", *full_args])
    ckpt = full / "ckpt" / "last.safetensors"

    assert main(["ledger", "--ckpt_path", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "alphaedit" in out and "12 edits in 3 batches" in out
    assert main(["ledger", "--ckpt_path", str(ckpt), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_edits"] == 12 and [h["num_requests"] for h in summary["history"]] == [4, 4, 4]
    assert summary["history"][0]["request_ids"] == [str(r["case_id"]) for r in counterfact_records(12)[:4]]

    undone = tmp_path / "undone.safetensors"
    assert main(["undo", "--ckpt_path", str(ckpt), "--batches", "1", "--out", str(undone)]) == 0
    state = load_nested(undone)
    assert len(state["edit_module"]["ledger"]["records"]) == 2 and state["global_step"] == 2
    assert load_nested(ckpt)["global_step"] == 3  # --out leaves the original alone
    # its loop counters and stream position are those of a checkpoint written after batch 2
    ref = load_nested(short / "ckpt" / "last.safetensors")
    assert state["loops"] == ref["loops"] and state["global_step"] == ref["global_step"]

    # exporting the undone checkpoint gives the short run's weights, bit for bit
    exp = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(undone), "--out", str(exp)]) == 0
    model = AutoModelForCausalLM.from_pretrained(exp)
    w_short, _ = read_edits(short / "ckpt" / "edited.safetensors")
    params = dict(model.named_parameters())
    for k, v in w_short.items():
        assert torch.equal(params[k], v), k
    assert json.loads((exp / "edit_ledger.json").read_text())["num_edits"] == 8

    # fit continues from the undone checkpoint to the same end as the uninterrupted run
    cont = main(["fit", *full_args, f"--ckpt_path={undone}", f"--checkpoint.dirpath={tmp_path / 'cont'}"])
    assert cont.model.num_edits == 12
    w_full, _ = read_edits(full / "ckpt" / "edited.safetensors")
    w_cont, _ = read_edits(tmp_path / "cont" / "edited.safetensors")
    for k in w_full:
        assert torch.equal(w_cont[k], w_full[k]), k
    # in place (atomic rewrite)
    assert main(["undo", "--ckpt_path", str(ckpt), "--batches", "3"]) == 0
    assert load_nested(ckpt)["edit_module"]["ledger"]["records"] == []
    with pytest.raises(SystemExit, match="cannot undo 1 batches: the checkpoint holds 0"):
        main(["undo", "--ckpt_path", str(ckpt), "--batches", "1"])


def test_describe_request_one_line_per_fact_and_long_form_request():
    from lightning_edit.data.requests import EditRequest
    from lightning_edit.ledger_cli import _cell, describe_batch
    from lightning_edit.longform.records import LongFormRequest
    from lightning_edit.stream.ledger import describe_request

    fact = EditRequest(case_id="7", prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new=" English",
                       target_true=" French")
    assert describe_request(fact) == "Danielle Darrieux: French -> English"
    assert describe_request(EditRequest(case_id="8", prompt="{} speaks", subject="Oma Greti", target_new="German")) == "Oma Greti: ? -> German"
    long = LongFormRequest(case_id="q1", question="What did\nTeodor Plum   build?", answer="He built a bridge over the river " * 5)
    d = describe_request(long)
    assert d.startswith('"What did Teodor Plum build?" -> "He built a bridge over the river He built') and d.endswith('..."')
    assert len(d) < 140 and "\n" not in d
    row = {"request_ids": ["7", "8", "9", "10"], "descriptions": ["a: x -> y", "b: ? -> z", "c: u -> v", "d: s -> t"]}
    assert describe_batch(row, 2) == "7: a: x -> y; 8: b: ? -> z; ... and 2 more"
    assert describe_batch(row, 4) == "7: a: x -> y; 8: b: ? -> z; 9: c: u -> v; 10: d: s -> t"
    assert describe_batch({"request_ids": ["7"], "descriptions": []}) == "(not recorded)"  # an older ledger
    assert _cell("C|C++ -> Rust") == "C\\|C++ -> Rust"  # a '|' cannot split the markdown row


def test_cli_ledger_shows_what_each_batch_changed_and_reads_older_ledgers(tiny_model_dir, corpus_file, tmp_path, capsys):
    from lightning_edit.checkpointing import read_checkpoint, write_checkpoint
    from lightning_edit.stream.ledger import BatchRecord, describe_request

    p = tmp_path / "cf.json"
    p.write_text(json.dumps(counterfact_records(10)))
    main(["fit", *cli_args(tiny_model_dir, p, corpus_file, tmp_path, extra=["--model.residual.steps=5", "--model.context_prefixes=0"])])
    ckpt = tmp_path / "ckpt" / "last.safetensors"
    reqs = counterfactual_requests(10)
    want = [f"{r.case_id}: {r.subject}: {r.target_true} -> {r.target_new}" for r in reqs]
    capsys.readouterr()
    assert main(["ledger", "--ckpt_path", str(ckpt)]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("| ")]
    assert "| changes |" in rows[0] and len(rows) == 4  # header + 3 batches (4, 4, 2 requests)
    assert f"| {'; '.join(want[0:3])}; ... and 1 more |" in rows[1]
    assert f"| {'; '.join(want[4:7])}; ... and 1 more |" in rows[2]
    assert f"| {'; '.join(want[8:10])} |" in rows[3]
    assert main(["ledger", "--ckpt_path", str(ckpt), "--show", "4"]) == 0
    assert f"| {'; '.join(want[0:4])} |" in capsys.readouterr().out
    assert main(["ledger", "--ckpt_path", str(ckpt), "--show", "0"]) == 0
    assert "changes" not in capsys.readouterr().out
    assert main(["ledger", "--ckpt_path", str(ckpt), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [h["descriptions"] for h in summary["history"]] == [[describe_request(r) for r in reqs[i:i + 4]] for i in (0, 4, 8)]
    # each batch file carries them too (a batch file explains itself)
    from safetensors import safe_open

    with safe_open(str(sorted((tmp_path / "ckpt" / "ledger").iterdir())[0]), "pt") as f:
        assert json.loads(f.metadata()["descriptions"]) == summary["history"][0]["descriptions"]

    # a ledger written before descriptions existed: listed with its ids, digests still checked
    state = read_checkpoint(ckpt)
    for rec in state["edit_module"]["ledger"]["records"]:
        m = json.loads(rec["meta"])
        del m["descriptions"]
        rec["meta"] = json.dumps(m)
    old = tmp_path / "old.safetensors"
    write_checkpoint(state, old)
    assert main(["ledger", "--ckpt_path", str(old)]) == 0
    rows = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| ")]
    assert "| 0, 1, 2, 3 | (not recorded) |" in rows[1] and "| 8, 9 | (not recorded) |" in rows[3]
    assert main(["ledger", "--ckpt_path", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["history"][0]["descriptions"] == []
    # ... and resumes (its weights rebuilt from the verified batch files)
    cont = main(["fit", *cli_args(tiny_model_dir, p, corpus_file, tmp_path, extra=["--model.residual.steps=5", "--model.context_prefixes=0"]),
                 f"--ckpt_path={old}", f"--checkpoint.dirpath={tmp_path / 'cont'}"])
    assert cont.model.num_edits == 10
    # a record whose descriptions do not match its requests is refused, naming the batch
    m = json.loads(state["edit_module"]["ledger"]["records"][1]["meta"])
    m["descriptions"] = ["x"]
    state["edit_module"]["ledger"]["records"][1]["meta"] = json.dumps(m)
    write_checkpoint(state, old)
    with pytest.raises(ValueError, match="edit ledger batch 1: 1 request descriptions for 4 requests"):
        main(["ledger", "--ckpt_path", str(old)])
    with pytest.raises(ValueError, match="2 request descriptions for 1 requests"):
        BatchRecord(index=0, request_ids=["a"], method="memit", hparams={}, descriptions=["x", "y"])
