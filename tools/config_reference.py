"""Write docs/configuration.md: every config key of ``lightning-edit fit``, its default and its
meaning, generated from the classes' signatures and docstrings (the same sources LightningCLI
reads), so the reference cannot drift from the code.

    python tools/config_reference.py            # rewrite docs/configuration.md
    python tools/config_reference.py --check    # exit 1 if docs/configuration.md is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
from pathlib import Path

import docstring_parser

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "configuration.md"


def _doc_params(cls) -> dict[str, str]:
    """Google-style ``Args:`` of the class and of its ``__init__``, one line each."""
    out: dict[str, str] = {}
    for obj in (cls, getattr(cls, "__init__", None)):
        doc = inspect.getdoc(obj) if obj is not None else None
        if not doc:
            continue
        for p in docstring_parser.parse(doc).params:
            text = " ".join((p.description or "").split())
            text = re.sub(r":(?:class|mod|func|meth|attr):`~?([^`]+)`", r"`\1`", text)
            text = re.sub(r"``([^`]+)``", r"`\1`", text)
            for name in re.split(r"\s*,\s*", p.arg_name):
                out.setdefault(name, text)
    return out


def _nested(annotation) -> type | None:
    """The dataclass a parameter holds (``X``, ``X | None``), if any."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if dataclasses.is_dataclass(arg) and isinstance(arg, type):
            return arg
    return None


def _params(cls) -> list[tuple[str, object, object]]:
    """``(name, annotation, default)`` in signature order (dataclass fields for dataclasses)."""
    hints = {}
    try:
        import typing

        hints = typing.get_type_hints(cls.__init__ if not dataclasses.is_dataclass(cls) else cls)
    except Exception:  # noqa: BLE001 - forward references that do not resolve: fall back to the raw annotations
        pass
    if dataclasses.is_dataclass(cls):
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = inspect.Parameter.empty
            out.append((f.name, hints.get(f.name, f.type), default))
        return out
    sig = inspect.signature(cls.__init__)
    return [(n, hints.get(n, p.annotation), p.default) for n, p in sig.parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _fmt_default(value) -> str:
    if value is inspect.Parameter.empty:
        return "**required**"
    if dataclasses.is_dataclass(value):
        return "(below)"
    if isinstance(value, str):
        return f"`{value}`" if value else "`''`"
    return f"`{value!r}`".replace("|", "\\|")


def _rows(prefix: str, cls, seen: set) -> list[tuple[str, str, str]]:
    docs = _doc_params(cls)
    rows, nested = [], []
    for name, annotation, default in _params(cls):
        sub = _nested(annotation)
        key = f"{prefix}.{name}"
        rows.append((key, "(below)" if sub is not None and (default is None or dataclasses.is_dataclass(default))
                     and default is not inspect.Parameter.empty else _fmt_default(default), docs.get(name, "")))
        if sub is not None and sub not in seen:
            nested.append((key, sub))
    for key, sub in nested:
        rows += _rows(key, sub, seen | {sub})
    return rows


def _table(rows) -> list[str]:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in rows:
        cell = doc.replace("|", "\\|")
        lines.append(f"| `{key}` | {default} | {cell} |")
    return lines


def render() -> str:
    from lightning_edit.callbacks import MEMIT, AlphaEdit, UnKE
    from lightning_edit.cli import TRAINER_DEFAULTS, EditCheckpoint
    from lightning_edit.data.datamodule import EditDataModule
    from lightning_edit.module import EditModule
    from lightning_edit.report import EditReport

    lines = [
        "# Configuration reference",
        "",
        "Every key a `lightning-edit fit` / `validate` config (YAML) or command line accepts, with its",
        "default and meaning. Generated from the code by `python tools/config_reference.py` (a test",
        "checks it is current); `lightning-edit fit --help` prints the same. Nested keys are written",
        "with dots in YAML nesting or on the command line (`--model.residual.steps=25`).",
        "",
        "Contents: [model](#model) · [editor](#editor) · [data](#data) · [report](#report) ·",
        "[checkpoint](#checkpoint) · [trainer](#trainer)",
        "",
        "## model",
        "",
        "The model to edit and how the residual vectors are optimized (`lightning_edit.module.EditModule`).",
        "",
        *_table(_rows("model", EditModule, {EditModule})),
        "",
        "## editor",
        "",
        "The update, chosen by `class_path`: `lightning_edit.callbacks.AlphaEdit` (default),",
        "`lightning_edit.callbacks.MEMIT` or `lightning_edit.callbacks.UnKE` (a block update trained by",
        "AdamW). Its keys sit under `editor.init_args` in YAML; on the command line `--editor.KEY` works too.",
        "",
        "### AlphaEdit",
        "",
        *_table(_rows("editor", AlphaEdit, {AlphaEdit})),
        "",
        "### MEMIT",
        "",
        *_table([r for r in _rows("editor", MEMIT, {MEMIT}) if not r[0].startswith("editor.stats.")]),
        "",
        "(`editor.stats.*` as for AlphaEdit.)",
        "",
        "### UnKE",
        "",
        *_table([r for r in _rows("editor", UnKE, {UnKE}) if not r[0].startswith("editor.stats.")]),
        "",
        "(`editor.stats.*` as for AlphaEdit; only the corpus keys, `n_samples` and `max_length` are used: they give the",
        "preservation texts.)",
        "",
        "## data",
        "",
        "The stream of edit requests (`lightning_edit.data.datamodule.EditDataModule`).",
        "",
        *_table(_rows("data", EditDataModule, {EditDataModule})),
        "",
        "## report",
        "",
        "The end-of-stream report: retention, perplexity, fluency, before/after examples",
        "(`lightning_edit.report.EditReport`).",
        "",
        *_table(_rows("report", EditReport, {EditReport})),
        "",
        "## checkpoint",
        "",
        "Resumable checkpoints after every batch (`lightning_edit.cli.EditCheckpoint`).",
        "",
        *_table(_rows("checkpoint", EditCheckpoint, {EditCheckpoint})),
        "",
        "## trainer",
        "",
        "Every option of Lightning's `Trainer` (`lightning-edit fit --help`). These defaults differ from",
        "Lightning's:",
        "",
        "| key | default |",
        "|---|---|",
        *(f"| `trainer.{k}` | `{v!r}` |".replace("|`", "| `") for k, v in TRAINER_DEFAULTS.items()),
        "",
        "Multi-GPU: `--trainer.strategy=ddp_frozen --trainer.devices=N` (DDP for a frozen model); a model larger "
        "than one GPU: `--trainer.strategy=sharded_edit --trainer.devices=N` (its weights sharded with FSDP2).",
        "`seed_everything` (top level) seeds the run.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is not current")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python tools/config_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
