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

import sys
from collections.abc import Callable

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from .strategies import FROZEN_DDP_ALIASES, frozen_alias  # importing registers trainer.strategy: ddp_frozen, ...
from .callbacks import ClosedFormUpdate
from .data.datamodule import EditDataModule
from .module import EditModule
from .progress import drop_disabled_progress_bar
from .report import EditReport


class EditCheckpoint(ModelCheckpoint):
    """A resumable checkpoint after every edit batch: ``last.safetensors`` holds the edited
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


class EditCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ClosedFormUpdate, "editor", subclass_mode=True, required=False)
        parser.set_defaults({"editor": {"class_path": "lightning_edit.callbacks.AlphaEdit"}})
        parser.add_lightning_class_args(EditCheckpoint, "checkpoint")
        parser.add_lightning_class_args(EditReport, "report")
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS})

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # Stock DDP refuses the frozen LM: its aliases ("ddp", "ddp_spawn", ...) become the frozen
        # ones, and when "auto" picked stock DDP (several devices) the trainer is rebuilt with it.
        from lightning.pytorch.strategies import DDPStrategy

        def build(strategy):
            cfg = drop_disabled_progress_bar({**config, "strategy": strategy})  # enable_progress_bar=false: no EditProgressBar
            if isinstance(cfg.get("callbacks"), list):
                cfg["callbacks"] = list(cfg["callbacks"])  # the parent extends this list in place
            return super(EditCLI, self)._instantiate_trainer(cfg, list(callbacks))

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
        from .trace import main as trace_main

        return trace_main(argv)

    def factworld(argv):
        from .factworld.build import main as fw_main

        return fw_main(argv)

    def ledger(argv):
        from .ledger import ledger_main

        return ledger_main(argv)

    def undo(argv):
        from .ledger import undo_main

        return undo_main(argv)

    def export(argv):
        from .ledger import export_main

        return export_main(argv)

    def realfacts(argv):
        from .realfacts import main as rf_main

        return rf_main(argv)

    return {
        "ledger": (ledger, "list the edit batches a checkpoint carries (--ckpt_path)"),
        "undo": (undo, "take the last N batches back from a checkpoint (--ckpt_path, --batches N [--out])"),
        "export": (export, "write a checkpoint's edited model as a save_pretrained directory (--ckpt_path, --out)"),
        "trace": (trace, "causal tracing of where a model stores facts (table + heat-map)"),
        "realfacts": (realfacts, "CounterFact-format edits of real facts the model knows (offline knowledge packages)"),
        "factworld": (factworld, "build (or reuse) the offline fact-world model and datasets"),
    }


def main(args: list[str] | None = None) -> EditCLI | object:
    """Entry point of the ``lightning-edit`` console script.

    Called with ``args`` (tests, notebooks) it returns the CLI object (or the tool's result).
    Called as the console script (``args=None``) it returns an exit status for ``sys.exit``:
    0 on success (a returned object would make ``sys.exit`` report failure).
    """
    if args is None:
        result = _run(list(sys.argv[1:]), from_argv=True)
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    return _run(list(args), from_argv=False)


def _run(argv: list[str], from_argv: bool) -> EditCLI | object:
    tools = _tool_commands()
    if argv and argv[0] in tools:
        return tools[argv[0]][0](argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print("lightning-edit: knowledge editing of causal LMs (MEMIT, AlphaEdit)\n\ncommands:")
        for name, text in (("fit", "stream edit batches and apply them (from a YAML: -c configs/...)"),
                           ("validate", "evaluate the (edited or unedited) model on the dataset"),
                           ("test", "same as validate, on the test loop"),
                           *((k, v[1]) for k, v in tools.items())):
            print(f"  {name:<10} {text}")
        print("\n`lightning-edit COMMAND --help` shows a command's options.\n")
        if not argv:
            return None
    return EditCLI(
        EditModule,
        EditDataModule,
        trainer_defaults=TRAINER_DEFAULTS,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=None if from_argv else argv,  # None: LightningCLI reads sys.argv itself
    )


if __name__ == "__main__":
    sys.exit(main())
