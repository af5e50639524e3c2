"""``lightning-edit``: LightningCLI for editing runs, plus a few tool subcommands.

    lightning-edit fit -c configs/quickstart.yaml           # stream edits, log, checkpoint, export (SmolLM2, real facts)
    lightning-edit fit -c configs/factworld.yaml            # the same on the offline fact-world toy
    lightning-edit validate -c configs/quickstart.yaml      # evaluate the unedited model
    lightning-edit validate -c ... --ckpt_path checkpoints/quickstart/last.safetensors
    lightning-edit fit -c ... --ckpt_path last              # resume an interrupted stream
    lightning-edit ledger --ckpt_path PATH                  # what the checkpoint's model carries
    lightning-edit undo --ckpt_path PATH --batches N        # take the last N batches back
    lightning-edit export --ckpt_path PATH --out DIR        # save_pretrained directory of the edited model
    lightning-edit trace --model PATH --dataset FILE        # causal tracing: where are facts stored?
    lightning-edit factworld --root checkpoints/factworld   # build the offline fact-world model
    lightning-edit realfacts --model smollm2:135m-instruct --out DIR   # real facts the model knows
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from lightning_edit.builtin.factworld.build import main as fw_main
from lightning_edit.builtin.realfacts import main as rf_main
from lightning_edit.callbacks import ClosedFormUpdate
from lightning_edit.data.datamodule import EditDataModule
from lightning_edit.errors import EditError
from lightning_edit.ledger_cli import export_main, ledger_main, undo_main, verify_main
from lightning_edit.module import EditModule
from lightning_edit.progress import drop_disabled_progress_bar
from lightning_edit.report import EditReport
from lightning_edit.strategies import FROZEN_DDP_ALIASES, SHARDED_ALIASES, frozen_alias  # importing registers trainer.strategy: ddp_frozen, ...
from lightning_edit.trace.cli import main as trace_main


class EditCheckpoint(ModelCheckpoint):
    """Resumable checkpoints of the edit stream.

    After every ``every_n_train_steps`` edit batches ``last.safetensors`` holds the edited
    weights and the edit state (written atomically), never the frozen model.

    Args:
        dirpath: directory of the checkpoints (and of ``edited.safetensors`` at the end of fit).
        every_n_train_steps: checkpoint every this many edit batches.
    """

    FILE_EXTENSION = ".safetensors"

    def __init__(self, dirpath: str = "checkpoints/edit", every_n_train_steps: int = 1):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps)


TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "inference_mode": False,  # residuals are optimized with autograd, also inside validate/test
    "use_distributed_sampler": False,  # every process sees the whole batch and shards it itself
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "log_every_n_steps": 1,
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "logs", "name": "edit", "default_hp_metric": False},
    },
    "plugins": [{"class_path": "lightning_edit.checkpointing.SafetensorsCheckpointIO"}],
}
# the default of trainer.callbacks: the edit stream's progress bar ("edit batches 3/10, edits=30",
# stderr) instead of Lightning's (a "callbacks" key of TRAINER_DEFAULTS would be appended uninstantiated)
DEFAULT_CALLBACKS = [{"class_path": "lightning_edit.progress.EditProgressBar"}]


# ``fit --help`` shows the project's groups in this order (by the first option of a group), then
# the subcommand's own arguments (``--ckpt_path``), then the Trainer's.
_HELP_ORDER = ("--model", "--editor", "--data", "--report", "--checkpoint", "", "--trainer")
_EDITOR_TITLE = "The editor: AlphaEdit (default), MEMIT or UnKE (`--editor.help AlphaEdit` lists its options)"
_SUBCOMMAND_USAGE = ("%(prog)s [-h] [-c CONFIG] [--print_config[=flags]] [--ckpt_path CKPT_PATH] "
                     "[--model.* ...] [--editor.* ...] [--data.* ...] [--report.* ...] [--checkpoint.* ...] "
                     "[--trainer.* ...]")


def _help_rank(group) -> int:
    """Position of an argument group in ``--help`` (see ``_HELP_ORDER``); the untitled groups
    (``-h``, ``-c``, ``--print_config``, ``--seed_everything``) stay first."""
    names = [a.option_strings[0] for a in group._group_actions if a.option_strings]
    if not names or names[0] in ("-h", "--help"):
        return -1
    first = names[0]
    for rank, prefix in enumerate(_HELP_ORDER):
        if prefix and (first == prefix or first.startswith(prefix + ".")):
            return rank
    return _HELP_ORDER.index("")


class EditCLI(LightningCLI):
    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        # A short usage line (the default lists all ~120 options) and the project's groups before
        # the Trainer's. Groups only order the help: parsing and ``--print_config`` are unchanged.
        kwargs.setdefault("usage", _SUBCOMMAND_USAGE)
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser._action_groups.sort(key=_help_rank)  # stable: groups of one rank keep their order
        for group in parser._action_groups:
            if any(a.option_strings[:1] == ["--editor"] for a in group._group_actions):
                group.title = _EDITOR_TITLE
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ClosedFormUpdate, "editor", subclass_mode=True, required=False)
        parser.set_defaults({"editor": {"class_path": "lightning_edit.callbacks.AlphaEdit"}})
        parser.add_lightning_class_args(EditCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EditReport, "report")
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS})

    def before_instantiate_classes(self) -> None:
        # under sharded_edit the LM is built on the meta device and each process reads only its
        # share of the weights (model.init_on_meta), where its files allow it and the user did not say
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        model, trainer = cfg.get("model"), cfg.get("trainer")
        if model is None or trainer is None or model.get("init_on_meta") is not None:
            return
        strategy = frozen_alias(trainer.get("strategy", "auto"))
        if isinstance(strategy, str) and strategy in SHARDED_ALIASES:
            model["init_on_meta"] = "auto"

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # Stock DDP refuses the frozen LM: its aliases ("ddp", "ddp_spawn", ...) become the frozen
        # ones, and when "auto" picked stock DDP (several devices) the trainer is rebuilt with it.
        from lightning.pytorch.strategies import DDPStrategy

        def build(strategy):
            cfg = drop_disabled_progress_bar({**config, "strategy": strategy})  # enable_progress_bar=false: no EditProgressBar
            if isinstance(cfg.get("callbacks"), list):
                cfg["callbacks"] = list(cfg["callbacks"])  # the parent extends this list in place
            return super(EditCLI, self)._instantiate_trainer(cfg, list(callbacks))

        if config.get("logger") is False and config.get("default_root_dir") is None:
            # no logger: config.yaml and the summaries go beside the run's checkpoints, not into the cwd
            dirpath = (self._get(self.config, "checkpoint") or {}).get("dirpath") or "checkpoints/edit"
            config = {**config, "default_root_dir": str(Path(dirpath) / (self.subcommand or "run"))}
        trainer = build(frozen_alias(config.get("strategy", "auto")))
        if isinstance(config.get("strategy", "auto"), str) and type(trainer.strategy) is DDPStrategy:
            start = getattr(trainer.strategy, "_start_method", "popen")
            trainer = build(next(n for n, m in FROZEN_DDP_ALIASES.items() if m == start))
        return trainer

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        cmds = dict(LightningCLI.subcommands())
        cmds.pop("predict", None)
        return cmds


def _tool_commands() -> dict[str, tuple[Callable[[list[str]], object], str]]:
    def trace(argv):
        return trace_main(argv)

    def factworld(argv):
        return fw_main(argv)

    def ledger(argv):
        return ledger_main(argv)

    def undo(argv):
        return undo_main(argv)

    def export(argv):
        return export_main(argv)

    def realfacts(argv):
        return rf_main(argv)

    def verify(argv):
        return verify_main(argv)

    return {
        "ledger": (ledger, "list the edit batches a checkpoint carries (--ckpt_path)"),
        "undo": (undo, "take the last N batches back from a checkpoint (--ckpt_path, --batches N [--out])"),
        "export": (export, "write a checkpoint's edited model as a save_pretrained directory (--ckpt_path, --out)"),
        "verify": (verify, "check an export directory against its manifest, or a checkpoint and its ledger files (PATH)"),
        "trace": (trace, "causal tracing of where a model stores facts (table + heat-map)"),
        "realfacts": (realfacts, "CounterFact-format edits of real facts the model knows (offline knowledge packages)"),
        "factworld": (factworld, "build (or reuse) the offline fact-world model and datasets"),
    }


VERBOSE_ENV = "LIGHTNING_EDIT_VERBOSE"
"""Set to 1 (or pass ``--verbose``) for the full traceback of the errors lightning-edit raises on
purpose; the console script otherwise prints them as one line."""

_CORE_COMMANDS = (
    ("fit", "stream edit batches and apply them (from a YAML: -c configs/...)"),
    ("validate", "evaluate the (edited or unedited) model on the dataset"),
    ("test", "same as validate, on the test loop"),
)


def _command_list(tools) -> str:
    lines = ["usage: lightning-edit [--verbose] COMMAND [options]", "",
             "Knowledge editing of causal LMs (MEMIT, AlphaEdit).", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, text in (*_CORE_COMMANDS, *((k, v[1]) for k, v in tools.items()))]
    lines += ["", "`lightning-edit COMMAND --help` shows a command's options.",
              f"--verbose (anywhere) or {VERBOSE_ENV}=1: full tracebacks of errors."]
    return "\n".join(lines)


def main(args: list[str] | None = None) -> EditCLI | object:
    """Entry point of the ``lightning-edit`` console script.

    Called with ``args`` (tests, notebooks) it returns the CLI object (or the tool's result), and
    errors propagate as exceptions (``SystemExit`` for ``--help`` and usage errors, as argparse).
    Called as the console script (``args=None``) it returns an exit status for ``sys.exit``:
    0 on success (a returned object would make ``sys.exit`` report failure); an error that
    lightning-edit raises on purpose (:class:`lightning_edit.errors.EditError`) is printed as one
    line on stderr, ``lightning-edit: error: <message>``, with exit status 1, and its traceback
    only with ``--verbose`` (anywhere on the command line) or ``LIGHTNING_EDIT_VERBOSE=1``.
    Other exceptions (bugs) keep their traceback.
    """
    if args is None:
        return _console()
    return _run(list(args), from_argv=False)


def _console() -> int:
    argv = sys.argv[1:]
    if "--verbose" in argv:
        # LightningCLI / the tools must not see it, and the popen DDP launcher re-runs sys.argv:
        # the other processes learn it from the environment
        argv = [a for a in argv if a != "--verbose"]
        sys.argv[1:] = argv
        os.environ[VERBOSE_ENV] = "1"
    verbose = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    try:
        result = _run(argv, from_argv=True)
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # --help (0), usage errors (2), sys.exit(n)
            raise
        message = exc.code  # a tool's ``raise SystemExit("message")``
    except BaseException as exc:
        message = user_error_message(exc)
        if message is None:  # a bug, or a library's own failure: the whole traceback
            raise
        if verbose:
            traceback.print_exc()
    else:
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    rank = getattr(rank_zero_only, "rank", 0) or 0  # set by the DDP strategy (popen: from LOCAL_RANK)
    where = f"(process {rank}) " if rank else ""
    print(f"lightning-edit: error: {where}{message}", file=sys.stderr, flush=True)
    return 1


def user_error_message(exc: BaseException) -> str | None:
    """The message of an error lightning-edit raised on purpose, or ``None`` for any other
    exception. Sees through a ``ddp_spawn`` worker's :class:`~torch.multiprocessing.ProcessRaisedException`
    (which carries the worker's traceback as text) when the worker raised an ``EditError``."""
    if isinstance(exc, EditError):
        return str(exc)
    spawn_error = getattr(sys.modules.get("torch.multiprocessing.spawn"), "ProcessRaisedException", None)
    if spawn_error is not None and isinstance(exc, spawn_error):
        return _edit_error_in_traceback(str(exc))
    return None


def _edit_error_in_traceback(text: str) -> str | None:
    """``"<message>"`` when the last exception line of a formatted traceback names an
    ``EditError`` subclass of this package (``lightning_edit.x.SomeError: <message>``)."""
    found = None
    for m in re.finditer(r"^(lightning_edit(?:\.\w+)*)\.(\w+): (.*)$", text, re.MULTILINE):
        found = m
    if found is None or text[found.end():].strip():
        return None
    try:
        cls = getattr(importlib.import_module(found.group(1)), found.group(2), None)
    except ImportError:
        return None
    return found.group(3) if isinstance(cls, type) and issubclass(cls, EditError) else None


def _run(argv: list[str], from_argv: bool) -> EditCLI | object:
    tools = _tool_commands()
    if argv and argv[0] in tools:
        return tools[argv[0]][0](argv[1:])
    if not argv:  # as argparse does when the required command is missing: usage error, status 2
        print(_command_list(tools), file=sys.stderr)
        print(f"lightning-edit: error: a command is required ({', '.join(n for n, _ in _CORE_COMMANDS)}, "
              f"{', '.join(tools)})", file=sys.stderr)
        raise SystemExit(2)
    if argv[0] in ("-h", "--help"):
        print(_command_list(tools))
        raise SystemExit(0)
    return EditCLI(**cli_kwargs(), args=None if from_argv else argv)  # None: LightningCLI reads sys.argv itself


def cli_kwargs() -> dict:
    """The arguments ``main`` builds :class:`EditCLI` with, except ``args`` (for tests and tools
    that build the same parser, e.g. ``EditCLI(**cli_kwargs(), args=[...], run=False)``)."""
    return dict(model_class=EditModule, datamodule_class=EditDataModule, trainer_defaults=TRAINER_DEFAULTS,
                auto_configure_optimizers=False, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    sys.exit(main())
