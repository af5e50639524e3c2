"""TensorBoard layout of an edit run: two step axes, each in its own event file.

``<log_dir>/`` (Lightning's logger)
    one point per edit batch at the global step (= edit batches done): ``z/*`` (the residual
    optimization), the update's norms, ``edits_applied``.
``<log_dir>/edits/`` (a second logger, the run ``version_N/edits`` in TensorBoard)
    everything against the number of edits applied: the edit metrics (``edit/*``, ``zsre/*``,
    ``longform/*``) and retention of the mid-stream and final evaluations, the report's text
    (summary table, before / after generations), ``summary.png``, and the run's settings as
    hparams with the final metrics (``final/*``).

Each file's steps only grow (the edit count never decreases), so TensorBoard never sees a step
go back. Only global rank 0 writes. Loggers other than TensorBoard get the edit-axis metrics
as before (``log_metrics(..., step=num_edits)``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

EDIT_AXIS = "edits"
_ATTR = "_lightning_edit_axis"  # the edit-axis logger, kept on the trainer's TensorBoard logger


def edit_axis_loggers(trainer) -> list[Logger]:
    """Where curves against the number of edits go: for each of the trainer's loggers, a
    TensorBoard logger writing to ``<its log_dir>/edits`` (created once), or the logger itself
    when it is not a TensorBoard logger. Call on global rank 0 only."""
    out: list[Logger] = []
    for lg in getattr(trainer, "loggers", None) or []:
        if isinstance(lg, TensorBoardLogger):
            sub = getattr(lg, _ATTR, None)
            if sub is None:
                sub = TensorBoardLogger(save_dir=lg.log_dir, name="", version=EDIT_AXIS, default_hp_metric=False)
                setattr(lg, _ATTR, sub)
            out.append(sub)
        else:
            out.append(lg)
    return out


def _writers(trainer) -> list:
    return [lg.experiment for lg in edit_axis_loggers(trainer) if isinstance(lg, TensorBoardLogger)]


def log_edit_axis(trainer, metrics: dict[str, float], num_edits: int) -> None:
    """Scalars at step ``num_edits``."""
    for lg in edit_axis_loggers(trainer):
        lg.log_metrics(metrics, step=num_edits)


def add_text(trainer, tag: str, text: str, num_edits: int) -> None:
    """Markdown text (tables render) at step ``num_edits``."""
    for w in _writers(trainer):
        w.add_text(tag, text, global_step=num_edits)


def add_image_file(trainer, tag: str, path: str | Path, num_edits: int) -> None:
    """An image file (e.g. ``summary.png``) at step ``num_edits``."""
    writers = _writers(trainer)
    if not writers:
        return
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    for w in writers:
        w.add_image(tag, pixels, global_step=num_edits, dataformats="HWC")


def log_hparams(trainer, params: dict[str, Any], metrics: dict[str, float], num_edits: int) -> None:
    """The run's settings as TensorBoard hparams with ``metrics`` (written at step ``num_edits``,
    so the edit axis stays in order)."""
    for lg in edit_axis_loggers(trainer):
        if isinstance(lg, TensorBoardLogger):
            lg.log_hyperparams(params, metrics, step=num_edits)


def close_edit_axis(trainer) -> None:
    """Flush and close the edit-axis loggers (a later run gets new ones)."""
    for lg in getattr(trainer, "loggers", None) or []:
        sub = getattr(lg, _ATTR, None)
        if sub is not None:
            sub.finalize("success")
            delattr(lg, _ATTR)


def flatten_settings(config: Any, prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested settings as ``{"model.residual.lr": 0.5, ...}`` of scalars and strings: dicts
    are flattened with dotted keys (``init_args`` levels dropped: ``editor.l2``, beside
    ``editor.class_path``), ``None`` becomes ``"None"``, lists and other values their JSON
    (or ``str``)."""
    out: dict[str, int | float | str | bool] = {}
    if hasattr(config, "as_dict"):  # a jsonargparse Namespace
        config = config.as_dict()
    if not isinstance(config, dict):
        return {prefix.rstrip("."): _scalar(config)} if prefix else {}
    for k, v in config.items():
        key = prefix if k == "init_args" else f"{prefix}{k}."
        if hasattr(v, "as_dict"):
            v = v.as_dict()
        if isinstance(v, dict) and v:
            out.update(flatten_settings(v, key))
        else:
            out[key.rstrip(".")] = _scalar(v)
    return out


def _scalar(v: Any) -> int | float | str | bool:
    if isinstance(v, (bool, int, float, str)):
        return v
    if v is None:
        return "None"
    try:
        return json.dumps(v, default=str)
    except (TypeError, ValueError):
        return str(v)


def run_settings(trainer, module) -> dict[str, int | float | str | bool]:
    """The run's settings, flat: the CLI's whole configuration where the run came from
    ``lightning-edit`` (its ``SaveConfigCallback``), else the module's and the editor's."""
    from lightning.pytorch.cli import SaveConfigCallback

    for cb in getattr(trainer, "callbacks", []):
        if isinstance(cb, SaveConfigCallback) and getattr(cb, "config", None) is not None:
            return flatten_settings(cb.config)

    settings: dict[str, Any] = {"model": {"model": str(getattr(module, "model_name", "")), "layers": list(getattr(module, "layers", []))}}
    if dataclasses.is_dataclass(getattr(module, "residual_cfg", None)):
        settings["model"]["residual"] = dataclasses.asdict(module.residual_cfg)
    for cb in getattr(trainer, "callbacks", []):
        if getattr(cb, "method_name", None) and getattr(cb, "method", None) is not None:
            hp = cb.method.hparams() if hasattr(cb.method, "hparams") else {}
            settings["editor"] = {"method": cb.method_name, **hp}
    dm = getattr(trainer, "datamodule", None)
    if dm is not None and getattr(dm, "batch_size", None) is not None:
        settings["data"] = {"batch_size": dm.batch_size}
    return flatten_settings(settings)
