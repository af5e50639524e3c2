"""The command line speaks clearly: deliberate errors are one line (a traceback only with
--verbose), bugs keep their traceback, ``--help`` lists the commands once, and ``fit --help``
shows the project's options first, each with a help text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import counterfact_records, make_model, make_tokenizer

from lightning_edit.cli import EditCLI, cli_kwargs, main, user_error_message
from lightning_edit.errors import (
    CheckpointError,
    EditError,
    InputError,
    MissingFileError,
    looks_like_local_path,
    require_local_path,
)

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
COMMANDS = ["fit", "validate", "test", "ledger", "undo", "export", "verify", "trace", "realfacts", "factworld"]


@pytest.fixture(scope="module")
def raw_model_dir(tmp_path_factory):
    """An untrained tiny GPT-2 and its tokenizer: errors need a model that loads, not one that knows facts."""
    d = tmp_path_factory.mktemp("raw_model")
    tok = make_tokenizer()
    make_model("gpt2", tok.vocab_size).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory, raw_model_dir):
    """A good and a bad dataset (record 3 lacks its subject) and a small corpus, in one folder."""
    d = tmp_path_factory.mktemp("cli_errors")
    recs = counterfact_records(6)
    (d / "good.json").write_text(json.dumps(recs))
    del recs[3]["requested_rewrite"]["subject"]
    (d / "bad.json").write_text(json.dumps(recs))
    (d / "corpus.jsonl").write_text("".join(json.dumps({"text": f"Sentence number {i} is here."}) + "\n" for i in range(40)))
    return d


def _fit_args(model_dir, d: Path, dataset: str, corpus: str = "corpus.jsonl", run: str = "run") -> list[str]:
    out = d / run
    return ["fit", f"--model.model={model_dir}", "--model.layers=[1,2]", "--model.context_prefixes=0",
            f"--data.dataset={dataset}", "--data.batch_size=3",
            f"--editor.stats.corpus={corpus}", "--editor.stats.corpus_name=null", "--editor.stats.n_samples=20",
            "--editor.stats.max_length=16", f"--editor.stats.cache_dir={out / 'stats'}", f"--checkpoint.dirpath={out / 'ckpt'}",
            f"--trainer.logger.init_args.save_dir={out / 'logs'}", "--trainer.enable_progress_bar=false"]


def _console(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    """The console script's code path (``main()`` without arguments) in a fresh interpreter."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                    HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore",
                    PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for k in ("LIGHTNING_EDIT_VERBOSE", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    full_env.update(env)
    return subprocess.run([sys.executable, "-m", "lightning_edit.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


# ---- one line for errors raised on purpose ---------------------------------------------------


def test_bad_record_is_one_line_and_status_1(raw_model_dir, work):
    proc = _console(_fit_args(raw_model_dir, work, "bad.json", run="bad"), work)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith("lightning-edit: error: ") and "record 3" in line and "subject" in line and "missing" in line
    assert not (work / "bad" / "ckpt").exists()


def test_missing_corpus_file_names_the_path_not_the_hub(raw_model_dir, work):
    proc = _console(_fit_args(raw_model_dir, work, "good.json", corpus="nope/corpus.jsonl"), work)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Hub" not in proc.stderr
    (line,) = _error_lines(proc.stderr)
    assert line.startswith("lightning-edit: error: ") and "'nope/corpus.jsonl'" in line and "no such file" in line


def test_verbose_anywhere_shows_the_traceback(raw_model_dir, work):
    args = _fit_args(raw_model_dir, work, "bad.json")
    proc = _console([*args[:3], "--verbose", *args[3:]], work)  # not LightningCLI's option: removed before it parses
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and "RequestError" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-1].startswith("lightning-edit: error: edit record 3")


def test_verbose_environment_variable_in_process(raw_model_dir, work, monkeypatch, capsys):
    """The console path run in this process (``main()`` reading ``sys.argv``): status 1 and one line;
    ``LIGHTNING_EDIT_VERBOSE=1`` adds the traceback; a missing model path is named."""
    monkeypatch.delenv("LIGHTNING_EDIT_VERBOSE", raising=False)
    args = _fit_args(raw_model_dir, work, str(work / "good.json"), corpus=str(work / "corpus.jsonl"))
    args = [a if not a.startswith("--model.model=") else f"--model.model={work / 'no_such_model'}" for a in args]
    monkeypatch.setattr(sys, "argv", ["lightning-edit", *args])
    assert main() == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and _error_lines(err) == [
        f"lightning-edit: error: model {str(work / 'no_such_model')!r}: no such file or directory (resolved to {work / 'no_such_model'})"]

    monkeypatch.setenv("LIGHTNING_EDIT_VERBOSE", "1")
    monkeypatch.setattr(sys, "argv", ["lightning-edit", *args])
    assert main() == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "MissingFileError" in err


def test_from_python_main_keeps_raising(raw_model_dir, work):
    """``main(args)`` (tests, notebooks) raises the exception; the existing ``except ValueError``
    callers still catch the project's errors."""
    with pytest.raises(ValueError, match=r"record 3.*subject") as e:
        main(_fit_args(raw_model_dir, work, str(work / "bad.json"), corpus=str(work / "corpus.jsonl")))
    assert isinstance(e.value, InputError) and isinstance(e.value, EditError)


def test_bugs_keep_their_traceback(raw_model_dir, work, monkeypatch):
    """An exception that is no EditError (a bug, a library failure) propagates from the console
    path too: Python prints its traceback and exits 1."""
    from lightning_edit.data import datamodule

    def broken_setup(self, stage=None):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(datamodule.EditDataModule, "setup", broken_setup)
    monkeypatch.setattr(sys, "argv", ["lightning-edit", *_fit_args(raw_model_dir, work, str(work / "good.json"))])
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main()
    assert user_error_message(ZeroDivisionError("x")) is None and user_error_message(KeyError("k")) is None


def test_tool_errors_are_one_line(work, monkeypatch, capsys):
    """The tool subcommands go through the same handler: an EditError (a missing checkpoint) and a
    tool's ``SystemExit("message")`` are printed as one error line, status 1."""
    monkeypatch.setattr(sys, "argv", ["lightning-edit", "ledger", "--ckpt_path", str(work / "missing.safetensors")])
    assert main() == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith("lightning-edit: error: ") and "missing.safetensors" in line

    import lightning_edit.cli

    def refuse(argv):
        raise SystemExit("cannot undo 3 batches: the checkpoint holds 1")

    monkeypatch.setattr(lightning_edit.cli, "undo_main", refuse)
    monkeypatch.setattr(sys, "argv", ["lightning-edit", "undo", "--batches", "3"])
    assert main() == 1
    assert _error_lines(capsys.readouterr().err) == ["lightning-edit: error: cannot undo 3 batches: the checkpoint holds 1"]
    with pytest.raises(SystemExit):  # from Python: raised as before
        main(["undo", "--batches", "3"])


def test_spawned_process_error_is_recognized():
    """``ddp_spawn`` hands the parent a ProcessRaisedException holding the worker's traceback as text."""
    from torch.multiprocessing.spawn import ProcessRaisedException

    tb = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
          '  File "x.py", line 1, in f\n    g()\n'
          "lightning_edit.data.requests.RequestError: edit record 3, field 'subject': missing\n")
    assert user_error_message(ProcessRaisedException(tb, 1, 123)) == "edit record 3, field 'subject': missing"
    bug = tb.replace("lightning_edit.data.requests.RequestError", "ZeroDivisionError")
    assert user_error_message(ProcessRaisedException(bug, 1, 123)) is None


def test_error_classes_keep_builtin_bases():
    from lightning_edit.checkpointing import CorruptFileError
    from lightning_edit.data.requests import RequestError
    from lightning_edit.engine.arch import ArchitectureError
    from lightning_edit.engine.closed_form import NonFiniteUpdateError
    from lightning_edit.engine.tokens import TokenizationError
    from lightning_edit.longform.chunking import ChatTemplateError

    for cls in (RequestError, ArchitectureError, TokenizationError, ChatTemplateError):
        assert issubclass(cls, InputError) and issubclass(cls, ValueError)
    assert issubclass(CorruptFileError, CheckpointError) and issubclass(CorruptFileError, ValueError)
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(NonFiniteUpdateError, (EditError, FloatingPointError))
    assert str(InputError("plain")) == "plain"


@pytest.mark.parametrize("name,local", [
    ("corpus.jsonl", True), ("data/corpus.parquet", True), ("./model", True), ("~/m", True), ("/abs/dir", True),
    ("a/b/c", True), ("model.gguf", True), ("wikitext", False), ("HuggingFaceTB/SmolLM2-135M", False),
    ("Qwen/Qwen2.5-0.5B", False), ("gpt2", False)])
def test_local_path_heuristic(name, local, tmp_path):
    assert looks_like_local_path(name) is local
    if local:
        with pytest.raises(MissingFileError, match="no such file"):
            require_local_path(str(tmp_path / "absent") if name.startswith("/") else name, "thing")
    else:
        require_local_path(name, "thing")  # a hub id: never checked here


def test_ddp_rank_error_exits_nonzero(raw_model_dir, work):
    """Under the popen DDP launcher (``ddp_frozen``: rank 1 re-runs the command line) an error raised
    on purpose on rank 1 alone still ends the command with a non-zero status and rank 1 says it in
    one line."""
    proc = _console([*_fit_args(raw_model_dir, work, "good.json", run="ddp"), "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp_frozen",
                     "--trainer.callbacks+=test_cli_errors.FailOnRank1"], work)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "lightning-edit: error: (process 1) refused on rank 1" in proc.stderr


class FailOnRank1(L.Callback):
    """Stand-in for a deliberate error raised on one process only (imported by the CLI)."""

    def on_train_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            raise InputError("refused on rank 1")


# ---- help ------------------------------------------------------------------------------------


def test_help_lists_every_command_once(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()]
    assert listed == COMMANDS
    assert "--trainer" not in out and "usage: lightning-edit" in out  # only the project's list, not LightningCLI's


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "fit" in captured.err and "lightning-edit: error: a command is required" in captured.err


def _option_lines(text: str) -> list[str]:
    return [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")]


def test_fit_help_shows_project_options_before_the_trainer(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n", 1)[0]
    assert len(usage.splitlines()) <= 3, usage  # not the ~110-line list of every option
    opts = _option_lines(out)
    first = {p: next(i for i, o in enumerate(opts) if o == p or o.startswith(p + "."))
             for p in ("--model", "--editor", "--data", "--report", "--checkpoint", "--ckpt_path", "--trainer")}
    assert first["--model"] < first["--editor"] < first["--data"] < first["--report"] < first["--checkpoint"] < first["--trainer"]
    assert first["--ckpt_path"] < first["--trainer"]


def _fit_parser():
    class _Parsed(Exception):
        pass

    class Capture(EditCLI):
        def parse_arguments(self, parser, args):
            raise _Parsed(self._subcommand_parsers["fit"])

    with pytest.raises(_Parsed) as e:
        Capture(**cli_kwargs(), args=["fit"])
    return e.value.args[0]


def _undocumented(parser, prefixes) -> list[str]:
    return [a.option_strings[0] for a in parser._actions
            if a.option_strings and a.option_strings[0].lstrip("-").startswith(prefixes) and not (a.help or "").strip()]


def test_every_project_option_has_help_text():
    """``--model.*``, ``--data.*``, ``--checkpoint.*`` of ``fit``, the options of each editor
    (``--editor.help AlphaEdit`` / ``MEMIT``) and of the nested long-form settings."""
    from jsonargparse import ArgumentParser

    from lightning_edit.callbacks import MEMIT, AlphaEdit
    from lightning_edit.longform.edit import LongFormConfig

    fit = _fit_parser()
    names = [a.option_strings[0] for a in fit._actions if a.option_strings]
    assert {"--model.model", "--model.residual.lr", "--data.dataset", "--checkpoint.dirpath", "--editor"} <= set(names)
    assert _undocumented(fit, ("model.", "editor", "data.", "checkpoint.")) == []
    for cls, prefix in ((AlphaEdit, "editor"), (MEMIT, "editor"), (LongFormConfig, "model.longform")):
        p = ArgumentParser()
        p.add_class_arguments(cls, prefix)
        assert len([a for a in p._actions if a.option_strings]) > 3
        assert _undocumented(p, (prefix + ".",)) == [], cls.__name__


@pytest.mark.parametrize("option", ["probes", "references"])
def test_missing_report_file_is_named_before_any_edit(raw_model_dir, work, option):
    """report.references is read at the end of the stream: a missing one still fails at the start."""
    out = work / f"report_{option}"
    args = [*_fit_args(raw_model_dir, work, str(work / "good.json"), corpus=str(work / "corpus.jsonl"), run=out.name),
            f"--report.{option}={work / 'missing.jsonl'}"]
    with pytest.raises(MissingFileError, match=f"report.{option}.*missing.jsonl"):
        main(args)
    assert not any(out.glob("ckpt/*.safetensors"))  # nothing written
