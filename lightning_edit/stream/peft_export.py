"""The edit ledger's updates as a PEFT LoRA adapter (``lightning-edit export --peft``).

Every applied batch changed each edit layer's down projection by ``U_i V_i`` (``U_i``
``(d_model, n_i)``, ``V_i`` ``(n_i, d_k)``, :mod:`lightning_edit.stream.ledger`). The sum over batches is
one low-rank product ``B A`` with ``B = [U_1 ... U_k]`` ``(d_model, r)`` and ``A = [V_1; ...; V_k]``
``(r, d_k)``, ``r`` = the rows of those batches: exactly a LoRA ``lora_B`` / ``lora_A`` pair of
that module (``out_features x r``, ``r x in_features``; GPT-2's ``Conv1D`` has the same shapes,
with ``fan_in_fan_out`` on).

Choices, and why:

* **One ``r`` for all modules, zero padding.** PEFT takes one ``r`` (or a ``rank_pattern``) and
  vLLM reads only the global ``r`` / ``lora_alpha`` for its scaling, ignoring patterns. A layer
  with fewer rows is padded with zero rows of ``A`` and zero columns of ``B``: the same product,
  valid for every consumer. ``lora_alpha = r`` makes the scaling exactly 1 (``use_rslora`` off).
* **float32 factors.** The ledger's factors are float32 and a bf16 / fp16 model keeps a float32
  master of its edit layers; the adapter holds that exact delta. Rounding the factors to bf16
  would add an error of ~4e-3 of the delta per factor on top of the merge's own rounding, and
  consumers cast anyway (PEFT keeps adapters of a half-precision base in float32 by default, vLLM
  casts to its ``lora_dtype``). The factors are small: ``r (d_model + d_k)`` floats per layer.
* **``--rank R``** truncates each layer's ``B A`` to its best rank-``R`` approximation (SVD of the
  small ``r x r`` core after QR of ``B`` and ``A^T``, in float64; the singular values are split as
  square roots over both factors) and reports the relative Frobenius error
  ``||BA - B'A'|| / ||BA||`` it leaves, for serving engines that cap the rank (vLLM's
  ``--max-lora-rank``: 1, 8, 16, 32, 64, 128, 256, 320 or 512, default 16).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lightning_edit.engine.files import atomic_save_file, check_export_target, finish_export_dir, new_export_dir
from lightning_edit.engine.loading import split_gguf
from lightning_edit.errors import InputError
from lightning_edit.resources import resolve
from lightning_edit.stream.ledger import DENSE_METHODS

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class PeftExportError(InputError):
    """The edits cannot be written as the requested PEFT adapter; the message says why."""


def select_records(ledger, batches: int | None = None) -> list:
    """The ledger's records to export: all, or the last ``batches``."""
    if ledger.position == 0:
        raise PeftExportError("nothing to export as a LoRA adapter: the ledger holds no applied batch")
    if batches is None:
        return list(ledger.records)
    if not 1 <= int(batches) <= ledger.position:
        raise PeftExportError(f"--batches {batches}: choose 1..{ledger.position} (the ledger holds {ledger.position} batches)")
    return list(ledger.records[ledger.position - int(batches):])


def ledger_factors(ledger, layers: Sequence[int], records: Sequence) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (B, A)}`` with ``B A`` = the sum of ``records``' updates of that layer:
    ``B = [U_1 ... U_k]`` ``(d_model, r)``, ``A = [V_1; ...; V_k]`` ``(r, d_k)`` (float32, CPU).
    Each batch file is read (and verified) once."""
    us: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    vs: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    for rec in records:
        if rec.method in DENSE_METHODS:
            raise PeftExportError(f"edit ledger batch {rec.index} is a {rec.method} block update (a dense change of every "
                                  "parameter of the edit blocks), which a LoRA adapter cannot hold: export the full model "
                                  "(`lightning-edit export` without --peft)")
        t = ledger.tensors(rec)
        for l in layers:
            if f"u.{l}" not in t or f"v.{l}" not in t:
                raise PeftExportError(f"edit ledger batch {rec.index} holds no factors of layer {l} (it edits "
                                      f"{sorted({int(k.split('.')[1]) for k in t if k.startswith('u.')})})")
            us[l].append(t[f"u.{l}"].float().cpu())
            vs[l].append(t[f"v.{l}"].float().cpu())
    return {l: (torch.cat(us[l], dim=1), torch.cat(vs[l], dim=0)) for l in layers}


def truncate_rank(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` approximation ``B' A'`` of ``B A`` (Eckart-Young) and its relative
    Frobenius error. ``B A = Q_b (R_b R_a^T) Q_a^T`` (QR of ``B`` and ``A^T``); the small core's SVD
    gives the singular values and vectors of ``B A`` without forming the ``d_model x d_k`` matrix.
    The kept singular values are split as square roots over ``B'`` and ``A'``. Float64 inside,
    float32 out; ``rank`` at or above the numerical size of the core keeps every direction."""
    if rank < 1:
        raise PeftExportError(f"--rank must be >= 1, got {rank}")
    qb, rb = torch.linalg.qr(b.double())
    qa, ra = torch.linalg.qr(a.double().T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(int(rank), s.numel())
    root = s[:k].sqrt()
    b2 = (qb @ uc[:, :k]) * root
    a2 = root[:, None] * (vch[:k] @ qa.T)
    total = float((s * s).sum())
    err = math.sqrt(float((s[k:] * s[k:]).sum()) / total) if total > 0 else 0.0
    return b2.float().contiguous(), a2.float().contiguous(), err


def lora_module(adapter, layer: int) -> tuple[str, bool]:
    """``(module name, fan_in_fan_out)`` of a layer's down projection as PEFT targets it, or a
    :class:`PeftExportError` when a LoRA cannot be attached to it."""
    name = adapter.spec.mlp_down_template.format(layer)
    module = adapter.down_proj(layer)
    if isinstance(module, nn.Linear):
        return name, False
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layout: weight (d_in, d_out), y = x W + b
        return name, True
    raise PeftExportError(f"cannot express the edit of {name!r} as a PEFT LoRA: it is a {type(module).__name__}, "
                          "and the export supports nn.Linear and transformers' Conv1D down projections")


def vllm_rank(r: int) -> int | None:
    """The smallest vLLM ``--max-lora-rank`` that serves rank ``r`` (None above vLLM's maximum)."""
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= r), None)


def export_lora(adapter, ledger, directory: str | os.PathLike, layers: Sequence[int] | None = None, batches: int | None = None,
                rank: int | None = None, base_model: str | None = None, extra: dict | None = None,
                overwrite: bool = False) -> tuple[Path, dict]:
    """Write the ledger's edits (all batches or the last ``batches``) as a PEFT LoRA adapter
    directory: ``adapter_config.json``, ``adapter_model.safetensors`` (standard PEFT key names
    ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, float32) and
    ``edit_ledger.json`` (the ledger summary plus a ``lora`` section: batches, ``r``, per layer
    module, rank and, with ``rank``, the relative error of the truncation).

    ``adapter`` gives module names and types (a :class:`~lightning_edit.engine.arch.ModelAdapter` of the
    model, whose weights are not read: a model on the ``meta`` device will do). Written into a
    temporary sibling and renamed, like the full export; a non-empty ``directory`` is refused
    unless ``overwrite``. Returns ``(directory, lora section)``.
    Raises :class:`PeftExportError` (one message naming the problem) when PEFT cannot express it."""
    check_export_target(directory, overwrite)  # before any work
    layers = sorted(int(l) for l in (layers if layers is not None else ledger.meta["layers"]))
    if rank is not None and int(rank) < 1:
        raise PeftExportError(f"--rank must be >= 1, got {rank}")
    records = select_records(ledger, batches)
    modules = {l: lora_module(adapter, l) for l in layers}
    if len({f for _, f in modules.values()}) > 1:
        raise PeftExportError("cannot write one PEFT LoRA for these edit layers: some down projections are Conv1D and "
                              "some nn.Linear, and PEFT's fan_in_fan_out is one setting for the whole adapter")
    factors = ledger_factors(ledger, layers, records)
    info: dict[int, dict] = {}
    for l, (b, a) in factors.items():
        d_out, d_in = adapter.dims(l)
        if tuple(b.shape) != (d_out, b.shape[1]) or tuple(a.shape) != (b.shape[1], d_in):
            raise PeftExportError(f"layer {l}: ledger factors {tuple(b.shape)} x {tuple(a.shape)} do not fit {modules[l][0]!r} "
                                  f"({d_out} x {d_in}, d_model x d_k): the checkpoint belongs to another model")
        info[l] = {"module": modules[l][0], "rank": int(b.shape[1])}
        if rank is not None:
            b, a, err = truncate_rank(b, a, int(rank))
            factors[l] = (b, a)
            info[l].update(exported_rank=int(b.shape[1]), relative_error=err)
    r = max(int(b.shape[1]) for b, _ in factors.values())
    if r == 0:
        raise PeftExportError("nothing to export as a LoRA adapter: the selected batches hold no update rows")
    tensors = {}
    for l, (b, a) in factors.items():
        pad = r - b.shape[1]  # zero rows of A / columns of B: the same product at the common rank
        name = modules[l][0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,  # scaling = lora_alpha / r = 1 exactly
        "use_rslora": False,
        "target_modules": [modules[l][0] for l in layers],
        "fan_in_fan_out": next(iter(modules.values()))[1],
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
        "inference_mode": True,
    }
    first = records[0].index
    lora = {"batches": [first, records[-1].index], "num_edits": sum(rec.num_requests for rec in records), "r": r,
            "dtype": "float32", "truncated_to": None if rank is None else int(rank),
            "layers": {str(l): v for l, v in info.items()}, "vllm_max_lora_rank": vllm_rank(r)}
    summary = {**ledger.summary(), **(extra or {}), "lora": lora}  # the stream it was cut from, and which part

    tmp = new_export_dir(directory, overwrite)
    try:
        atomic_save_file(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        (tmp / "edit_ledger.json").write_text(json.dumps(summary, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_export_dir(tmp, directory), lora


def structure_model(meta: dict):
    """The ledger's model built from its config on the ``meta`` device (module names, types and
    shapes, no weights read): all the adapter export needs, at no memory cost for a large model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    trust = bool(meta.get("trust_remote_code"))
    name, gguf = split_gguf(resolve(meta["model"]), None)
    cfg = AutoConfig.from_pretrained(name, trust_remote_code=trust, **({"gguf_file": gguf} if gguf else {}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust)
    return model, name


def describe_export(out: Path, lora: dict, model_name) -> str:
    """What ``lightning-edit export --peft`` prints: the adapter, its rank, per-layer truncation
    errors and the vLLM setting that serves it."""
    b0, b1 = lora["batches"]
    lines = [f"wrote a PEFT LoRA adapter of {lora['num_edits']} edits (batches {b0}..{b1}) of {model_name} to {out}: "
             f"r={lora['r']}, lora_alpha={lora['r']} (scaling 1), float32"]
    for l, v in lora["layers"].items():
        if "relative_error" in v:
            lines.append(f"  layer {l} ({v['module']}): rank {v['rank']} -> {v['exported_rank']}, "
                         f"relative error {v['relative_error']:.3g}")
        else:
            lines.append(f"  layer {l} ({v['module']}): rank {v['rank']}")
    vr = lora["vllm_max_lora_rank"]
    lines.append(f"  vLLM: --enable-lora --max-lora-rank {vr}" if vr is not None else
                 f"  vLLM serves LoRA ranks up to {VLLM_MAX_LORA_RANKS[-1]}: export with --rank {VLLM_MAX_LORA_RANKS[-1]} or less to serve it there")
    return "\n".join(lines)
