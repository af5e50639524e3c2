"""Defects found with real benchmark records and by killing, corrupting and sharing state
(issue 9): each test here failed before its fix."""

import copy
import json
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import cli_args, counterfact_records, make_model

from lightning_edit.checkpointing import CorruptFileError, load_nested, read_checkpoint, save_nested, write_checkpoint
from lightning_edit.cli import main
from lightning_edit.data.requests import RequestError
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.stats import StatsCache, StatsConfig, corpus_fingerprint, projectors, second_moments
from lightning_edit.errors import InputError

FLAT = Path(__file__).parent / "fixtures" / "counterfact_flat_sample.json"


class SleepAfterBatch(L.Callback):
    """Spends ``seconds`` after edit batch ``batch`` (stands for slow work before a crash)."""

    def __init__(self, batch: int = 0, seconds: float = 1.0):
        self.batch, self.seconds = batch, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
        if b.index == self.batch:
            time.sleep(self.seconds)


@pytest.fixture()
def dataset(tmp_path):
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(counterfact_records(12)))
    return p


# ---- real benchmark records ---------------------------------------------------------------


def test_console_script_exits_zero_and_validate_prints_its_table(tiny_model_dir, dataset, corpus_file, tmp_path, monkeypatch, capsys):
    import tomllib

    entry = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]["lightning-edit"]
    mod, fn = entry.split(":")
    console = getattr(__import__(mod, fromlist=[fn]), fn)
    args = cli_args(tiny_model_dir, dataset, corpus_file, tmp_path, extra=["--trainer.logger=false"])
    monkeypatch.setattr(sys, "argv", ["lightning-edit", "validate", *args])
    monkeypatch.chdir(tmp_path)
    status = console()
    assert status == 0  # what sys.exit(console()) turns into the process's exit status
    out = capsys.readouterr().out
    assert "edit/efficacy" in out and "edit/specificity" in out, out  # the metrics table, without any logger
    # and in Python, trainer.validate returns the numbers
    cli = main(["validate", *args])
    res = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    assert set(res[0]) >= {"edit/efficacy", "edit/specificity"}


def _editor(trained_gpt2, tokenizer, tmp_path, **kw):
    from lightning_edit import Editor

    return Editor(copy.deepcopy(trained_gpt2), tokenizer, layers=[1, 2], method="memit", method_kwargs={"lam": 1.0},
                  stats={"corpus": "unused", "corpus_name": None, "cache_dir": str(tmp_path / "s")}, context_prefixes=0, **kw)


def test_api_reads_easyedit_flat_records_whole(trained_gpt2, tokenizer, tmp_path):
    from lightning_edit.api import _as_requests
    from lightning_edit.data.formats import records_to_requests

    recs = json.loads(FLAT.read_text())[:3]
    assert _as_requests(recs) == records_to_requests(recs)  # the same loader as the CLI
    reqs = _as_requests(recs)
    assert all(r.target_true and r.paraphrase_prompts and r.locality for r in reqs)
    ed = _editor(trained_gpt2, tokenizer, tmp_path)
    m = ed.evaluate(recs)
    assert {"edit/efficacy", "edit/generalization", "edit/specificity"} <= set(m), m


@pytest.mark.parametrize("mutate, field", [
    (lambda rs: rs.append(dict(rs[0])), "case_id"),                                 # duplicate id
    (lambda rs: rs[1].update(subject=42), "subject"),                              # not a string
    (lambda rs: rs[1].update(target_new=rs[1]["ground_truth"]), "target_new"),     # nothing to edit
    (lambda rs: rs[1].update(locality_ground_truth=None), "locality_ground_truth"),  # null answer
])
def test_api_validates_like_the_loader(trained_gpt2, tokenizer, tmp_path, mutate, field):
    recs = copy.deepcopy(json.loads(FLAT.read_text())[:3])
    mutate(recs)
    ed = _editor(trained_gpt2, tokenizer, tmp_path)
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    with pytest.raises(RequestError) as err:
        ed.apply(recs)
    assert err.value.field == field, str(err.value)
    with pytest.raises(RequestError):
        ed.evaluate(recs)
    assert all(torch.equal(v, before[k]) for k, v in ed.model.state_dict().items())


def test_too_long_text_is_refused_for_the_whole_stream_before_the_first_batch(tiny_model_dir, corpus_file, tmp_path):
    recs = counterfact_records(12)
    recs[10]["paraphrase_prompts"] = ["word " * 400 + recs[10]["requested_rewrite"]["subject"] + " is"]  # > 128 positions
    p = tmp_path / "long.json"
    p.write_text(json.dumps(recs))
    with pytest.raises(RequestError, match=r"record 10.*paraphrase_prompts\[0\].*128 positions"):
        main(["fit", *cli_args(tiny_model_dir, p, corpus_file, tmp_path)])
    assert not (tmp_path / "ckpt").exists()  # nothing was applied or checkpointed


def test_too_long_text_is_refused_by_the_api(trained_gpt2, tokenizer, tmp_path):
    ed = _editor(trained_gpt2, tokenizer, tmp_path)
    rec = {"prompt": "{} speaks " + "very " * 300, "subject": "Toko Yasuda", "target_new": "German", "target_true": "French"}
    with pytest.raises(RequestError, match="record 0.*prompt.*positions"):
        ed.apply([rec])


# ---- corrupted and shared state -------------------------------------------------------------


def _garble(path: Path, n: int = 64, at: float = 0.5) -> None:
    """Overwrite ``n`` bytes inside the tensor data of a safetensors file."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    pos = header + int((len(raw) - header - n) * at)
    raw[pos:pos + n] = bytes((b + 97) % 256 for b in raw[pos:pos + n])
    path.write_bytes(bytes(raw))


def test_corrupted_checkpoint_is_refused_by_path(tmp_path):
    ckpt = {"callbacks": {"AlphaEdit": {"weights": {"w": torch.randn(64, 64)}, "n": 3}}, "global_step": 3}
    p = tmp_path / "last.safetensors"
    save_nested(ckpt, p)
    assert torch.equal(load_nested(p)["callbacks"]["AlphaEdit"]["weights"]["w"], ckpt["callbacks"]["AlphaEdit"]["weights"]["w"])
    _garble(p)
    with pytest.raises(CorruptFileError, match=f"{p}.*content hash"):
        load_nested(p)
    p.write_bytes(p.read_bytes()[:40])  # truncated
    with pytest.raises(CorruptFileError, match=f"{p}.*unreadable"):
        load_nested(p)


def _stats_cfg(corpus, tmp_path, **kw):
    return StatsConfig(**{**dict(corpus=str(corpus), corpus_name=None, n_samples=200, max_length=32, batch_size=4,
                                 cache_dir=str(tmp_path / "stats"), save_every=0), **kw})


@pytest.mark.parametrize("damage", ["garble", "truncate"])
def test_bad_statistics_cache_is_reported_by_path_and_recomputed(tokenizer, corpus_file, tmp_path, damage):
    ad = ModelAdapter(make_model("gpt2", len(tokenizer), n_layer=2, width=32))
    cfg = _stats_cfg(corpus_file, tmp_path)
    good = second_moments(ad, tokenizer, [0], cfg, show_progress=False)
    projs, _ = projectors(ad, good, cfg, 0.02, "relative")
    for kind in ("moment", "projector"):
        (entry,) = (tmp_path / "stats").glob(f"*.{kind}.*.safetensors")
        if damage == "garble":
            _garble(entry)
        else:
            entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
        with pytest.warns(UserWarning, match=str(entry)):
            if kind == "moment":
                again = second_moments(ad, tokenizer, [0], cfg, show_progress=False)
                assert torch.equal(again[0], good[0])
            else:
                again, _ = projectors(ad, good, cfg, 0.02, "relative")
                assert torch.equal(again[0], projs[0])
        # recomputed and rewritten: the next run reads it silently
        assert StatsCache(cfg).load(StatsCache(cfg).key(ad, 0), kind=kind, extra="" if kind == "moment" else "relative:0.02") is not None


def test_failed_partial_save_warns_and_continues(tokenizer, corpus_file, tmp_path, monkeypatch):
    ad = ModelAdapter(make_model("gpt2", len(tokenizer), n_layer=2, width=32))
    cfg = _stats_cfg(corpus_file, tmp_path, save_every=1)
    real = StatsCache.save

    def disk_full(self, key, tensors, kind="moment", extra="", meta=None):
        if kind == "partial":
            raise OSError(28, "No space left on device")
        return real(self, key, tensors, kind, extra, meta)

    monkeypatch.setattr(StatsCache, "save", disk_full)
    with pytest.warns(UserWarning, match="partial statistics.*No space left"):
        got = second_moments(ad, tokenizer, [0], cfg, show_progress=False)
    monkeypatch.setattr(StatsCache, "save", real)
    ref = second_moments(ad, tokenizer, [0], _stats_cfg(corpus_file, tmp_path / "ref"), show_progress=False)
    assert torch.equal(got[0], ref[0])


def test_glob_corpus_hashes_every_matched_file(tokenizer, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(2):
        (d / f"part{i}.jsonl").write_text("".join(json.dumps({"text": f"text {i} {j}"}) + "\n" for j in range(5)))
    cfg = StatsConfig(corpus=str(d / "part*.jsonl"), corpus_name=None, n_samples=100, cache_dir=str(tmp_path / "s"))
    fp = corpus_fingerprint(cfg)
    (d / "part1.jsonl").write_text(json.dumps({"text": "changed"}) + "\n")
    assert corpus_fingerprint(cfg) != fp  # a file behind the pattern changed
    fp2 = corpus_fingerprint(cfg)
    (d / "part2.jsonl").write_text(json.dumps({"text": "new shard"}) + "\n")
    assert corpus_fingerprint(cfg) != fp2  # the pattern matches one more file
    from lightning_edit.engine.stats import iter_corpus_texts

    assert sorted(iter_corpus_texts(cfg)) == sorted([f"text 0 {j}" for j in range(5)] + ["changed", "new shard"])


def test_checkpoint_names_its_model_and_layers_and_refuses_a_mismatch(tiny_model_dir, dataset, corpus_file, tmp_path):
    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, dataset, corpus_file, run, extra=["--trainer.max_steps=1"])
    main(["fit", *args])
    ckpt = run / "ckpt" / "last.safetensors"
    state = load_nested(ckpt)["callbacks"]["AlphaEdit"]
    assert state["layers"] == [1, 2] and state["method_name"] == "alphaedit" and state["base_fingerprint"]
    # other edit layers: refused, naming both
    with pytest.raises(ValueError, match=r"edits layers \[1, 2\], this run edits \[2\]"):
        main(["fit", *[a for a in args if not a.startswith("--model.layers")], "--model.layers=[2]", f"--ckpt_path={ckpt}"])
    with pytest.raises(ValueError, match=r"edits layers \[1, 2\]"):
        main(["validate", *[a for a in args if not a.startswith("--model.layers")], "--model.layers=[2]", f"--ckpt_path={ckpt}"])
    # a model that differs only above the edit layers: refused, naming the fingerprint
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    m = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        m.transformer.h[3].mlp.c_fc.weight.mul_(1.01)
    m.save_pretrained(other)
    other_args = [a if not a.startswith("--model.model=") else f"--model.model={other}" for a in args]
    with pytest.raises(ValueError, match=r"another base model \(model fingerprint"):
        main(["fit", *other_args, "--trainer.max_steps=2", f"--ckpt_path={ckpt}"])
    with pytest.raises(ValueError, match="another base model"):
        main(["validate", *other_args, f"--ckpt_path={ckpt}"])
    # the checkpoint's edits (its ledger batch file) damaged: refused, naming the file
    from lightning_edit.checkpointing import atomic_save_file, read_verified

    (batch,) = (run / "ckpt" / "ledger").glob("batch_000000-*.safetensors")
    tensors, meta = read_verified(batch)
    tensors["u.1"][0, 0] = float("inf")  # hashes intact, value not finite
    atomic_save_file(tensors, batch, {k: v for k, v in meta.items() if k != "lightning_edit.sha256"})
    with pytest.raises(CorruptFileError, match=f"{batch}.*non-finite"):
        main(["fit", *args, "--trainer.max_steps=2", f"--ckpt_path={ckpt}"])
    tensors["u.1"][0, 0] = 0.5
    atomic_save_file(tensors, batch, {k: v for k, v in meta.items() if k != "lightning_edit.sha256"})
    with pytest.raises(CorruptFileError, match=f"{batch}.*digest its checkpoint recorded"):  # another file than the checkpoint's
        main(["validate", *args, f"--ckpt_path={ckpt}"])
    _garble(batch)
    with pytest.raises(CorruptFileError, match=f"{batch}.*content hash"):
        main(["validate", *args, f"--ckpt_path={ckpt}"])


def test_resume_keeps_curves_and_wall_time_of_the_whole_stream(tiny_model_dir, dataset, corpus_file, tmp_path):
    full = tmp_path / "full"
    main(["fit", *cli_args(tiny_model_dir, dataset, corpus_file, full, extra=["--model.eval_every=1"])])
    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, dataset, corpus_file, run, extra=["--model.eval_every=1"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", *args, "--trainer.callbacks+=test_defects.SleepAfterBatch", "--trainer.callbacks.seconds=4",
              "--trainer.callbacks+=conftest.CrashAfterBatch", "--trainer.callbacks.batch=1"])
    resumed = main(["fit", *args, f"--ckpt_path={run}/ckpt/last.safetensors"])
    s_full = json.loads(next((full / "logs").rglob("summary.json")).read_text())
    s_res = json.loads(sorted((run / "logs").rglob("summary.json"))[-1].read_text())
    # every point of the curve (after batches 1, 2, 3) measured on all edits so far
    assert [r["num_edits"] for r in s_res["curve"]] == [r["num_edits"] for r in s_full["curve"]] == [4, 8, 12]
    for a, b in zip(s_res["curve"], s_full["curve"]):
        for k in ("efficacy", "margin"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a, b)
    # the 4 s spent before the crash count
    assert s_res["wall_time_s"] >= 4.0
    assert resumed.model.num_edits == 12


def test_resume_or_validate_with_another_editor_is_refused(tiny_model_dir, corpus_file, tmp_path):
    """A checkpoint's edits made with AlphaEdit are never silently dropped by a run that names
    another editor: fit --ckpt_path and validate --ckpt_path with MEMIT are refused, naming the
    method that made the edits, before any batch is applied."""
    from conftest import cli_args, counterfact_records

    from lightning_edit.cli import main
    from lightning_edit.errors import CheckpointError

    data = tmp_path / "cf.json"
    data.write_text(json.dumps(counterfact_records(8)))
    run = tmp_path / "run"
    main(["fit", *cli_args(tiny_model_dir, data, corpus_file, run, extra=["--trainer.max_steps=1"])])
    ckpt = f"--ckpt_path={run}/ckpt/last.safetensors"
    other = cli_args(tiny_model_dir, data, corpus_file, tmp_path / "memit", method="memit")
    for command in ("fit", "validate"):
        with pytest.raises(CheckpointError, match="1 edit batches made with alphaedit"):
            main([command, *other, ckpt])
    assert not (tmp_path / "memit" / "ckpt" / "ledger").exists()  # nothing applied


@pytest.mark.parametrize("method,kwargs,field", [("memit", {"lam": 0.0}, "lam"), ("memit", {"lam": -5.0}, "lam"),
                                                 ("alphaedit", {"l2": -10.0}, "l2"), ("alphaedit", {"l2": 0.0}, "l2"),
                                                 ("alphaedit", {"l2": float("nan")}, "l2")])
def test_solver_settings_that_make_the_solve_singular_are_refused_up_front(method, kwargs, field):
    """MEMIT lam <= 0 and AlphaEdit l2 <= 0 (or NaN) leave the system singular or indefinite:
    refused when the editor is built, before any statistics or edit, naming the setting."""
    from lightning_edit.callbacks import MEMIT, AlphaEdit
    from lightning_edit.errors import InputError

    with pytest.raises(InputError, match=rf"{field} must be > 0"):
        {"memit": MEMIT, "alphaedit": AlphaEdit}[method](**kwargs)


def test_export_never_replaces_a_directory_unless_asked(trained_gpt2, tokenizer, corpus_file, tmp_path):
    """An export into an existing, non-empty directory is refused (its files stay); with
    overwrite it is replaced, and only once the new export is complete (no stray temporary
    directories left beside it)."""
    from lightning_edit import Editor
    from lightning_edit.errors import InputError

    ed = Editor(copy.deepcopy(trained_gpt2), tokenizer, layers=[1, 2], method="memit", method_kwargs={"lam": 1.0},
                context_prefixes=0, stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 600,
                                           "max_length": 64, "cache_dir": str(tmp_path / "stats")})
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for peft in (False, True):
        with pytest.raises(InputError, match="exists and is not an empty directory"):
            ed.export(out, peft=peft)
        assert (out / "notes.txt").read_text() == "keep me"
    ed.export(out, overwrite=True)
    assert (out / "edit_ledger.json").is_file() and not (out / "notes.txt").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary sibling left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ed.export(empty) == empty and (empty / "config.json").is_file()  # an empty directory is fine


def test_export_never_runs_code_because_a_checkpoint_says_so(tiny_model_dir, corpus_file, tmp_path):
    """A checkpoint's record that its model needs trust_remote_code is only a hint: export refuses
    unless the user passes --trust_remote_code, and refuses a non-empty --out before loading anything."""
    run = tmp_path / "run"
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(counterfact_records(4)))
    main(["fit", *cli_args(tiny_model_dir, data, corpus_file, run, extra=["--trainer.max_steps=1"])])
    ckpt = read_checkpoint(run / "ckpt" / "last.safetensors")
    meta = json.loads(ckpt["edit_module"]["ledger"]["meta"])
    meta["trust_remote_code"] = True
    ckpt["edit_module"]["ledger"]["meta"] = json.dumps(meta)
    crafted = tmp_path / "crafted.safetensors"
    write_checkpoint(ckpt, crafted)
    for extra in ([], ["--peft"]):
        with pytest.raises(SystemExit, match="pass --trust_remote_code"):
            main(["export", "--ckpt_path", str(crafted), "--out", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(InputError, match="exists and is not an empty directory"):
        main(["export", "--ckpt_path", str(run / "ckpt" / "last.safetensors"), "--out", str(busy)])
    assert main(["export", "--ckpt_path", str(run / "ckpt" / "last.safetensors"), "--out", str(busy), "--overwrite"]) == 0
    assert (busy / "edit_ledger.json").is_file() and not (busy / "x").exists()


def test_resume_with_a_setting_that_shapes_the_edits_changed_is_refused(tiny_model_dir, corpus_file, tmp_path):
    """A resumed stream keeps the settings its edits were made with: a changed l2, threshold or
    statistics corpus size is refused before any batch, naming the setting and both values; an
    evaluation option may change."""
    from lightning_edit.errors import CheckpointError

    data = tmp_path / "cf.json"
    data.write_text(json.dumps(counterfact_records(12)))
    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, data, corpus_file, run, extra=["--trainer.max_steps=1"])
    main(["fit", *args])
    ckpt = f"--ckpt_path={run}/ckpt/last.safetensors"
    for change, named in (("--editor.l2=2", "l2: 1.0 in the checkpoint, 2.0 now"),
                          ("--editor.nullspace_threshold=0.05", "threshold: 0.02 in the checkpoint, 0.05 now"),
                          ("--editor.stats.n_samples=300", "stats.n_samples: 600 in the checkpoint, 300 now")):
        with pytest.raises(CheckpointError, match=named):
            main(["fit", *args, change, "--trainer.max_steps=2", ckpt])
    assert len(list((run / "ckpt" / "ledger").iterdir())) == 1  # nothing applied
    cli = main(["fit", *args, "--model.eval_batch_size=8", "--trainer.max_steps=2", ckpt])  # not a shaping setting
    assert cli.model.num_edits == 8


# ---- fuzzed records --------------------------------------------------------------------------


@pytest.mark.parametrize("mutate, field", [
    (lambda r: r.update(case_id=float("nan")), "case_id"),
    (lambda r: r.update(case_id=float("inf")), "case_id"),
    (lambda r: r.update(case_id=True), "case_id"),
    (lambda r: r.update(case_id=1.5), "case_id"),
    (lambda r: r.update(case_id="a\x1b[31m"), "case_id"),
    (lambda r: r["requested_rewrite"].update(subject="Toko\x00Yasuda"), "requested_rewrite.subject"),
    (lambda r: r["requested_rewrite"].update(subject="Toko\x07Yasuda"), "requested_rewrite.subject"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str="\x1b[2JGerman"), "requested_rewrite.target_new.str"),
    (lambda r: r.update(paraphrase_prompts=["ok", "bad\x7f"]), "paraphrase_prompts[1]"),
])
def test_fuzzed_records_are_refused_naming_the_field(mutate, field):
    """Non-finite, boolean or fractional ids and control characters (NUL, BEL, ANSI escapes, DEL)
    in any text are refused by the loader, naming the record and the raw field; tab and newline
    stay text."""
    from lightning_edit.data.formats import records_to_requests

    recs = counterfact_records(3)
    mutate(recs[1])
    with pytest.raises(RequestError) as err:
        records_to_requests(recs)
    assert (err.value.record, err.value.field) == (1, field), str(err.value)
    ok = counterfact_records(3)
    ok[1]["requested_rewrite"]["subject"] = "Toko\tYasuda"
    ok[1]["case_id"] = 7.0  # an int column Arrow widened
    assert records_to_requests(ok)[1].case_id == "7"


def test_fuzzed_longform_records_are_refused_naming_the_field():
    from lightning_edit.longform.records import longform_records_to_requests as load_longform_records

    recs = [{"id": 3, "question": "What is it?", "answer": "line one\nline two\tindented"},
            {"id": float("nan"), "question": "Q?", "answer": "A."}]
    with pytest.raises(RequestError, match="record 1, field 'id'"):
        load_longform_records(recs)
    recs[1] = {"id": 4, "question": "Q?", "answer": "a \x1b[31mred\x1b[0m answer"}
    with pytest.raises(RequestError, match=r"record 1, field 'answer'.*control character '\\x1b' at position 2"):
        load_longform_records(recs)
    assert load_longform_records(recs[:1])[0].answer.count("\n") == 1


def test_api_refuses_control_characters_before_any_weight_changes(trained_gpt2, tokenizer, tmp_path):
    ed = _editor(trained_gpt2, tokenizer, tmp_path)
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    rec = {"prompt": "{} speaks", "subject": "Toko Yasuda", "target_new": "German\x00", "target_true": "French"}
    with pytest.raises(RequestError, match="target_new.*control character"):
        ed.apply([rec])
    assert all(torch.equal(v, before[k]) for k, v in ed.model.state_dict().items())


def test_a_csv_file_that_is_not_utf8_is_refused_by_name(tmp_path):
    from lightning_edit.data.sources import load_records

    p = tmp_path / "latin1.csv"
    p.write_bytes(b"prompt,subject,target_new\n{} speaks,T\xf6ko,German\n")
    with pytest.raises(InputError, match=r"latin1\.csv': not UTF-8 text"):
        load_records(str(p))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_file_that_is_not_utf8_is_refused_by_name_and_line(tmp_path, suffix):
    from lightning_edit.data.sources import load_records

    rec = json.dumps(counterfact_records(1)[0]).encode()
    bad = rec[:-1] + b', "note": "T\xf6ko"}'  # Latin-1
    raw = (b"[" + rec + b",\n" + bad + b"]") if suffix == ".json" else (rec + b"\n" + bad + b"\n")
    p = tmp_path / f"latin1{suffix}"
    p.write_bytes(raw)
    with pytest.raises(InputError, match=rf"latin1\{suffix}' line 2: not UTF-8 text \(byte b'\\xf6'"):
        load_records(str(p))
    p.write_bytes(b"\xef\xbb\xbf" + raw.replace(b"T\xf6ko", "Töko".encode()))  # UTF-8 with a byte-order mark reads
    assert len(load_records(str(p))) == 2


@pytest.mark.parametrize("field", ["subject", "target_new"])
def test_an_over_long_field_is_named(trained_gpt2, tokenizer, tmp_path, field):
    ed = _editor(trained_gpt2, tokenizer, tmp_path)
    rec = {"prompt": "{} speaks", "subject": "Toko Yasuda", "target_new": "German", "target_true": "French"}
    rec[field] = "very " * 300 + rec[field]
    with pytest.raises(RequestError, match=rf"record 0, field '{field}': the edit text \(prompt, subject and target\) is \d+ tokens.*longest part this field"):
        ed.apply([rec])


def test_no_logger_writes_beside_the_checkpoints_not_into_the_cwd(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(counterfact_records(4)))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    main(["fit", *cli_args(tiny_model_dir, data, corpus_file, tmp_path, extra=["--trainer.logger=false"])])
    assert list(cwd.iterdir()) == []
    assert {"config.yaml", "summary.json"} <= {p.name for p in (tmp_path / "ckpt" / "fit").iterdir()}


# ---- a checkpoint is a verifiable, self-contained record ------------------------------------


def _fit(tiny_model_dir, corpus_file, root, n=12, extra=()):
    data = root.parent / f"{root.name}_cf.json"
    data.write_text(json.dumps(counterfact_records(n)))
    args = cli_args(tiny_model_dir, data, corpus_file, root, extra=list(extra))
    main(["fit", *args])
    return args, root / "ckpt" / "last.safetensors"


def _flip_digit_in_header(path: Path, key: bytes) -> None:
    import re

    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    m = re.search(rb"(" + key + rb"[^0-9]{1,12})([0-9])", bytes(raw[8:8 + n]))
    assert m, key
    pos = 8 + m.start(2)
    raw[pos] = ord("7") if raw[pos] != ord("7") else ord("2")
    path.write_bytes(bytes(raw))


def test_a_flipped_digit_in_the_checkpoints_json_state_is_refused(tiny_model_dir, corpus_file, tmp_path, capsys):
    args, ckpt = _fit(tiny_model_dir, corpus_file, tmp_path / "run", extra=["--trainer.max_steps=2"])
    assert main(["verify", str(ckpt)]) == 0
    _flip_digit_in_header(ckpt, b"global_step")
    with pytest.raises(CorruptFileError, match="its metadata .* does not match its stored hash"):
        main(["ledger", "--ckpt_path", str(ckpt)])
    with pytest.raises(CorruptFileError, match="does not match its stored hash"):
        main(["fit", *args, f"--ckpt_path={ckpt}"])
    capsys.readouterr()
    assert main(["verify", str(ckpt)]) == 1
    assert "does not match its stored hash" in capsys.readouterr().out


def test_a_copied_run_directory_reads_its_own_ledger_files(tiny_model_dir, corpus_file, tmp_path):
    args, _ = _fit(tiny_model_dir, corpus_file, tmp_path / "run", extra=["--trainer.max_steps=2"])
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    shutil.rmtree(tmp_path / "run")  # nothing of the original is left to read
    ckpt = tmp_path / "copy" / "ckpt" / "last.safetensors"
    assert main(["ledger", "--ckpt_path", str(ckpt)]) == 0
    state = load_nested(ckpt)["edit_module"]["ledger"]
    assert state["directory"] == "ledger" and state["directory_relative"]  # relative to the checkpoint
    assert all(not Path(json.loads(r["meta"])["file"]).is_absolute() for r in state["records"])
    keep = [a for a in args if not a.startswith(("--checkpoint.dirpath", "--trainer.max_steps"))]
    cont = main(["fit", *keep, f"--checkpoint.dirpath={tmp_path / 'copy' / 'ckpt'}", f"--ckpt_path={ckpt}"])
    assert cont.model.num_edits == 12


def test_a_stream_resumed_elsewhere_is_self_contained(tiny_model_dir, corpus_file, tmp_path):
    args, ckpt = _fit(tiny_model_dir, corpus_file, tmp_path / "a", extra=["--trainer.max_steps=1"])
    main(["fit", *args, f"--ckpt_path={ckpt}", f"--checkpoint.dirpath={tmp_path / 'b'}", "--trainer.max_steps=2"])
    shutil.rmtree(tmp_path / "a")
    assert main(["verify", str(tmp_path / "b" / "last.safetensors")]) == 0  # batch 0 was brought into b's ledger


def test_a_backup_survives_undo_and_another_continuation(tiny_model_dir, corpus_file, tmp_path):
    """Undo never rewrites history in place: a continuation after an undo writes new batch files,
    so a backup of the earlier checkpoint still verifies and exports its own edits; undo also
    rewrites edited.safetensors beside the checkpoint, so it always matches an export."""
    from lightning_edit.checkpointing import read_edits

    args, ckpt = _fit(tiny_model_dir, corpus_file, tmp_path / "run")
    backup = tmp_path / "run" / "ckpt" / "backup.safetensors"
    shutil.copyfile(ckpt, backup)
    before = (tmp_path / "run" / "ckpt" / "edited.safetensors").read_bytes()
    assert main(["undo", "--ckpt_path", str(ckpt), "--batches", "1", "--out", str(tmp_path / "run" / "ckpt" / "u.safetensors")]) == 0
    assert (tmp_path / "run" / "ckpt" / "edited.safetensors").read_bytes() == before  # --out: the original stays whole
    assert main(["undo", "--ckpt_path", str(ckpt), "--batches", "1"]) == 0
    edited, _ = read_edits(tmp_path / "run" / "ckpt" / "edited.safetensors")
    exp = tmp_path / "exp"
    assert main(["export", "--ckpt_path", str(ckpt), "--out", str(exp)]) == 0
    from transformers import AutoModelForCausalLM

    params = dict(AutoModelForCausalLM.from_pretrained(exp).named_parameters())
    assert all(torch.equal(params[k], v) for k, v in edited.items())
    # another batch 2 at the same stream position (other requests, or the same ones computed anew)
    from lightning_edit.checkpointing import read_checkpoint
    from lightning_edit.stream.ledger import BatchRecord, EditLedger

    ledger = EditLedger()
    ledger.load_state_dict(read_checkpoint(ckpt)["edit_module"]["ledger"])
    tensors = {k: v + 1e-3 for k, v in ledger.tensors(ledger.records[1]).items()}
    ledger.append(BatchRecord(index=2, request_ids=["x"], method="alphaedit", hparams={}, tensors=tensors))
    assert len(list((tmp_path / "run" / "ckpt" / "ledger").iterdir())) == 4  # a new file beside the undone batch's
    assert main(["verify", str(backup)]) == 0
    assert main(["verify", str(tmp_path / "run" / "ckpt" / "edited.safetensors")]) == 0
    assert main(["export", "--ckpt_path", str(backup), "--out", str(tmp_path / "exp_backup")]) == 0
    carried = json.loads((tmp_path / "exp_backup" / "edit_ledger.json").read_text())
    assert carried["settings"]["l2"] == 1.0 and carried["settings"]["residual.lr"] == 0.5  # what shaped the edits
    ids = carried["history"][2]["request_ids"]
    assert ids == [str(r["case_id"]) for r in counterfact_records(12)[8:12]]


def test_export_carries_a_manifest_that_verify_checks(tiny_model_dir, corpus_file, tmp_path, capsys):
    _, ckpt = _fit(tiny_model_dir, corpus_file, tmp_path / "run", extra=["--trainer.max_steps=1"])
    for extra in ([], ["--peft"]):
        out = tmp_path / f"exp{len(extra)}"
        assert main(["export", "--ckpt_path", str(ckpt), "--out", str(out), *extra]) == 0
        assert main(["verify", str(out)]) == 0
        target = next(p for p in sorted(out.iterdir()) if p.suffix == ".safetensors")
        raw = bytearray(target.read_bytes())
        raw[-1] ^= 1
        target.write_bytes(bytes(raw))
        (out / "extra.txt").write_text("x")
        capsys.readouterr()
        assert main(["verify", str(out)]) == 1
        said = capsys.readouterr().out
        assert f"{target.name}: changed" in said and "extra.txt: not in the manifest" in said


def test_an_absurd_update_is_refused_before_it_is_applied(trained_gpt2, tokenizer, corpus_file, tmp_path):
    """An update whose relative size exceeds the editor's bound (or holds NaN) is refused with
    the batch named; the weights and the ledger stay as they were."""
    from lightning_edit import Editor
    from lightning_edit.engine.closed_form import NonFiniteUpdateError, OversizedUpdateError, check_update

    ed = Editor(copy.deepcopy(trained_gpt2), tokenizer, layers=[1, 2], method="memit", method_kwargs={"lam": 1.0, "max_update": 1e-4},
                context_prefixes=0, stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 600, "max_length": 64,
                                           "cache_dir": str(tmp_path / "s")})
    before = {k: v.clone() for k, v in ed.model.state_dict().items()}
    recs = counterfact_records(3)
    with pytest.raises(OversizedUpdateError, match=r"edit batch 0 \(3 requests: 0, 1, 2\) not applied: layer 1: .* above the bound 0.0001"):
        ed.apply(recs)
    assert all(torch.equal(v, before[k]) for k, v in ed.model.state_dict().items())
    assert ed.module.ledger.position == 0
    w = torch.ones(4, 4)
    with pytest.raises(NonFiniteUpdateError, match="layer 3"):
        check_update(torch.full((4, 4), float("nan")), w, 3, 0.0)
    assert check_update(torch.ones(4, 4), w, 3, 0.0) == pytest.approx(1.0)
    from lightning_edit.callbacks import AlphaEdit

    with pytest.raises(InputError, match="max_update must be >= 0"):
        AlphaEdit(max_update=-1)


def test_resume_with_other_z_settings_is_refused(tiny_model_dir, corpus_file, tmp_path):
    from lightning_edit.errors import CheckpointError

    args, ckpt = _fit(tiny_model_dir, corpus_file, tmp_path / "run", extra=["--trainer.max_steps=1"])
    for change, named in (("--model.residual.lr=0.1", "residual.lr: 0.5 in the checkpoint, 0.1 now"),
                          ("--model.residual.steps=3", "residual.steps: .* in the checkpoint, 3 now"),
                          ("--model.context_prefixes=0", "context_prefixes: 2 in the checkpoint, 0 now")):
        with pytest.raises(CheckpointError, match=named):
            main(["fit", *args, change, f"--ckpt_path={ckpt}"])
    # evaluation replays the ledger: the z settings do not matter there
    main(["validate", *args, "--model.residual.lr=0.1", f"--ckpt_path={ckpt}"])


def test_resume_on_a_changed_statistics_corpus_is_refused(tiny_model_dir, corpus_file, tmp_path):
    """The checkpoint records the content hash of the corpus its statistics came from: the same
    path with other texts is refused on resume, naming stats.corpus_hash."""
    from lightning_edit.errors import CheckpointError

    corpus = tmp_path / "corpus.jsonl"
    shutil.copyfile(corpus_file, corpus)
    args, ckpt = _fit(tiny_model_dir, corpus, tmp_path / "run", extra=["--trainer.max_steps=1"])
    with corpus.open("a") as f:
        f.write(json.dumps({"text": "one more sentence about nothing in particular."}) + "\n")
    with pytest.raises(CheckpointError, match=r"stats.corpus_hash: '\w+' in the checkpoint, '\w+' now"):
        main(["fit", *args, f"--ckpt_path={ckpt}"])


def test_a_moved_run_directory_of_an_earlier_version_still_loads(tiny_model_dir, corpus_file, tmp_path):
    """Checkpoints written before the ledger directory was relative hold absolute paths: a run
    directory moved since is read from the ledger beside the checkpoint."""
    from lightning_edit.checkpointing import save_nested

    _, ckpt = _fit(tiny_model_dir, corpus_file, tmp_path / "run", extra=["--trainer.max_steps=2"])
    state = load_nested(ckpt)
    ledger = state["edit_module"]["ledger"]
    ledger.pop("directory_relative")
    ledger["directory"] = str(tmp_path / "run" / "ckpt" / "ledger")  # as earlier versions wrote them
    for rec in ledger["records"]:
        m = json.loads(rec["meta"])
        m["file"] = str(tmp_path / "run" / "ckpt" / "ledger" / m["file"])
        rec["meta"] = json.dumps(m)
    save_nested(state, ckpt)
    shutil.move(tmp_path / "run", tmp_path / "moved")
    assert main(["verify", str(tmp_path / "moved" / "ckpt" / "last.safetensors")]) == 0


def test_stream_study_records_what_an_unfinished_run_measured(tiny_model_dir, corpus_file, tmp_path):
    """``stream_study.py --partial`` reads the mid-stream evaluations of a variant's last
    checkpoint (a run stopped before its end) into the results JSON, marked unfinished."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import stream_study

    root = tmp_path / "study"
    _fit(tiny_model_dir, corpus_file, tmp_path / "run", extra=["--model.eval_every=1", "--trainer.max_steps=2",
                                                               f"--checkpoint.dirpath={root / 'paper1000' / 'ckpt' / 'alphaedit'}"])
    out = tmp_path / "partial.json"
    assert stream_study.main(["paper1000", "--only", "alphaedit", "--root", str(root), "--out", str(out), "--partial"]) == 0
    r = json.loads(out.read_text())["variants"]["alphaedit"]
    assert r["partial"] and r["summary"]["edits_applied"] == 8
    assert [p["num_edits"] for p in r["summary"]["curve"]] == [4, 8] and 0 <= r["summary"]["efficacy"] <= 1
