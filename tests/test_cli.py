"""The CLI end to end: configs parse, fit runs and exports, resume is exact, bad input fails early."""

import glob
import re
import json
import shlex
from pathlib import Path

import pytest
import torch
from conftest import cli_args, counterfact_records

from lightning_edit.checkpointing import load_nested, read_edits
from lightning_edit.cli import main

ALL_CONFIGS = sorted(glob.glob(str(Path(__file__).parent.parent / "configs" / "*.yaml")))
# run configs of the editing CLI: fit / validate / test (the factworld build config, run by
# `lightning-edit factworld --config`, is checked in test_factworld.py)
CONFIGS = [c for c in ALL_CONFIGS if Path(c).read_text().split("\n", 1)[0].split()[1:3] in (
    ["lightning-edit", "fit"], ["lightning-edit", "validate"], ["lightning-edit", "test"])]


def test_configs_found():
    assert len(CONFIGS) >= 3 and all(Path(c).read_text().startswith("# ") for c in ALL_CONFIGS)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda p: Path(p).name)
def test_every_shipped_config_parses(cfg, capsys):
    text = Path(cfg).read_text()
    assert text.startswith("# lightning-edit "), "each config opens with the command that runs it"
    first = shlex.split(text.splitlines()[0][2:])  # the documented command, placeholders included
    assert first[:3] == ["lightning-edit", first[1], "-c"] and Path(first[3]).name == Path(cfg).name
    with pytest.raises(SystemExit) as e:
        main([first[1], "-c", cfg, *first[4:], "--print_config"])
    assert e.value.code == 0
    assert "model:" in capsys.readouterr().out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:  # as argparse: --help exits 0, no command is a usage error (2)
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and "trace" in out and "factworld" in out
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "factworld" in capsys.readouterr().err


@pytest.fixture()
def dataset(tmp_path):
    p = tmp_path / "cf.json"
    p.write_text(json.dumps(counterfact_records(12)))
    return p


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir))
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def test_fit_end_to_end_then_validate(tiny_model_dir, dataset, corpus_file, tmp_path):
    args = cli_args(tiny_model_dir, dataset, corpus_file, tmp_path, extra=["--model.eval_every=1"])
    cli = main(["fit", *args])
    module = cli.model
    assert module.num_edits == 12
    assert module.last_eval["edit/efficacy"] >= 0.75
    # only the edited tensors (+ state) are exported / checkpointed, in safetensors
    weights, meta = read_edits(tmp_path / "ckpt" / "edited.safetensors")
    assert sorted(weights) == ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]
    assert meta["method"] == "alphaedit" and meta["num_edits"] == "12"
    ckpt = load_nested(tmp_path / "ckpt" / "last.safetensors")
    assert ckpt["state_dict"] == {}
    state = ckpt["callbacks"]["AlphaEdit"]
    assert state["method_name"] == "alphaedit" and "weights" not in state and "batches_applied" not in state  # the edits live in the ledger
    ledger = ckpt["edit_module"]["ledger"]
    names = sorted(p.name for p in (tmp_path / "ckpt" / "ledger").iterdir())
    assert len(ledger["records"]) == 3 and [n[:12] for n in names] == [f"batch_{i:06d}" for i in range(3)]
    assert all(re.fullmatch(r"batch_\d{6}-[0-9a-f]{16}\.safetensors", n) for n in names)  # named by content
    assert ckpt["global_step"] == 3  # one (mock) optimizer step per edit batch
    # curves against the number of edits applied (their own event file: the run's edits/ directory)
    logs = _scalars(Path(glob.glob(str(tmp_path / "logs" / "edit" / "version_*"))[0]) / "edits")
    steps = [s for s, _ in logs["edit/efficacy"]]
    assert steps[:3] == [4, 8, 12]
    for tag in ("edit/generalization", "edit/specificity"):
        assert tag in logs or tag == "edit/generalization"  # the toy records have no paraphrases
    # validate the edited checkpoint: same numbers as at the end of fit
    vcli = main(["validate", *args, f"--ckpt_path={tmp_path}/ckpt/last.safetensors"])
    assert vcli.model.last_eval["edit/efficacy"] == pytest.approx(module.last_eval["edit/efficacy"])
    # and the unedited model does not know the new targets
    vcli0 = main(["validate", *args])
    assert vcli0.model.last_eval["edit/efficacy"] <= 0.1


def test_resume_after_kill_is_exact(tiny_model_dir, dataset, corpus_file, tmp_path):
    full = tmp_path / "full"
    main(["fit", *cli_args(tiny_model_dir, dataset, corpus_file, full)])
    w_full, _ = read_edits(full / "ckpt" / "edited.safetensors")

    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, dataset, corpus_file, run)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", *args, "--trainer.callbacks+=conftest.CrashAfterBatch", "--trainer.callbacks.batch=1"])
    assert not (run / "ckpt" / "edited.safetensors").exists()
    state = load_nested(run / "ckpt" / "last.safetensors")["edit_module"]
    assert len(state["ledger"]["records"]) in (1, 2)  # killed after batch index 1: before or after its checkpoint
    cli = main(["fit", *args, f"--ckpt_path={run}/ckpt/last.safetensors"])
    assert cli.model.num_edits == 12
    w_res, _ = read_edits(run / "ckpt" / "edited.safetensors")
    for k in w_full:
        assert torch.equal(w_res[k], w_full[k]), k  # bit-identical: the same additions in the same order


def test_bad_record_fails_before_any_change(tiny_model_dir, corpus_file, tmp_path):
    recs = counterfact_records(6)
    del recs[4]["requested_rewrite"]["subject"]
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(recs))
    with pytest.raises(Exception, match=r"record 4.*subject"):
        main(["fit", *cli_args(tiny_model_dir, p, corpus_file, tmp_path)])
    assert not (tmp_path / "ckpt").exists()


def test_wrong_module_name_is_clear(tiny_model_dir, dataset, corpus_file, tmp_path):
    with pytest.raises(Exception, match="transformer.h.0.mlp.nope"):
        main(["fit", *cli_args(tiny_model_dir, dataset, corpus_file, tmp_path,
                               extra=["--model.mlp_down_template=transformer.h.{}.mlp.nope"])])


def test_your_model_config_needs_only_the_model_and_the_data(tiny_model_dir, dataset, tmp_path, capsys):
    """configs/your_model.yaml: -c plus the model and the data is all it takes (the overrides
    below only shrink the run and keep its files in tmp_path); offline statistics, auto layers."""
    cfg = str(Path(__file__).parent.parent / "configs" / "your_model.yaml")
    small = ["--model.context_prefixes=1", "--model.residual.steps=3", "--data.batch_size=6",
             "--editor.stats.n_samples=200", "--editor.stats.max_length=64", f"--editor.stats.cache_dir={tmp_path}/stats",
             f"--checkpoint.dirpath={tmp_path}/ckpt", f"--trainer.logger.init_args.save_dir={tmp_path}/logs",
             "--trainer.enable_progress_bar=false"]
    cli = main(["fit", "-c", cfg, f"--model.model={tiny_model_dir}", f"--data.dataset={dataset}", *small])
    assert cli.model.num_edits == 12 and cli.model.layers == [0]  # 4 blocks: auto picks one, the first
    assert (tmp_path / "ckpt" / "edited.safetensors").is_file()
    with pytest.raises(SystemExit) as e:  # without the model: a usage error naming the key
        main(["fit", "-c", cfg, f"--data.dataset={dataset}", *small])
    assert e.value.code != 0 and "model.model" in capsys.readouterr().err
