#!/usr/bin/env python
"""How far can one residual vector per chunk steer a model's long answers? A diagnostic for
long-form (AnyEdit) editing that needs no weight update.

For ``-n`` long-form records it prints the teacher-forced token accuracy and NLL of the target
answers (1) on the unedited model and (2) with each chunk's optimized residual vector added
directly at its anchor (``optimize_residuals``' result, no closed form involved), for each
``--windows`` chunk size. (2) is an upper bound for any MEMIT / AlphaEdit update of the same
chunks: when it stays far from 1.0, the chunk vectors cannot carry the text on this model and
no update built from them will; when it is near 1.0 but the edited model is not, the update is
the bottleneck. ``--update-layers 3,4,5,6,7 --update-lam 0.01,1`` also applies MEMIT's update
with identity second moments (ridge regression of the residuals on the keys, ``lam`` its
weight), with and without the zero-residual rows of the other positions, to a copy of the edit
layers and reports the edited model's accuracy (3).

    python benchmarks/longform_ceiling.py --model factworld:default/model \\
        --dataset factworld:default/longform_docs --layer 2 --windows 8,4,2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lightning_edit.engine.arch import ModelAdapter  # noqa: E402
from lightning_edit.engine.loading import load_pretrained  # noqa: E402
from lightning_edit.engine.residuals import ResidualConfig, optimize_residuals  # noqa: E402
from lightning_edit.engine.tokens import flatten_targets  # noqa: E402
from lightning_edit.longform import ChunkingConfig, load_longform  # noqa: E402
from lightning_edit.longform.edit import LongFormConfig, build_longform_batch  # noqa: E402
from lightning_edit.resources import resolve  # noqa: E402


@torch.no_grad()
def teacher_forced(model, batch, deltas: torch.Tensor | None = None, layer: int = 0) -> tuple[float, float]:
    """(token accuracy, mean NLL) of the batch's target tokens, optionally with ``deltas[c]``
    added to block ``layer``'s output at chunk ``c``'s anchors."""
    dev = next(model.parameters()).device
    ids, mask = batch.enc.input_ids.to(dev), batch.enc.attention_mask.to(dev)
    t_rows, t_pos, _ = flatten_targets(batch.enc)
    t_rows, t_pos = t_rows.to(dev), t_pos.to(dev)
    ctx = contextlib.nullcontext()
    if deltas is not None:
        rows, pos, chunk = batch.anchors()
        ctx = ModelAdapter(model).add_at_positions(layer, rows.to(dev), pos.to(dev), deltas[chunk.to(dev)])
    with ctx:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[t_rows, t_pos - 1].float()
    gold = ids[t_rows, t_pos]
    nll = -logits.log_softmax(-1).gather(-1, gold.unsqueeze(-1)).squeeze(-1)
    return float((logits.argmax(-1) == gold).float().mean()), float(nll.mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="factworld:default/model")
    p.add_argument("--dataset", default="factworld:default/longform_docs")
    p.add_argument("--format", default="auto")
    p.add_argument("-n", type=int, default=4, help="records (the first n after --offset)")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--chat-template", action="store_true", help="wrap the questions in the tokenizer's chat template")
    p.add_argument("--layer", type=int, default=2, help="the layer whose output the vectors change (the last edit layer)")
    p.add_argument("--windows", default="8,4,2", help="chunk sizes in tokens")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=4.0)
    p.add_argument("--clamp", type=float, default=4.0, help="clamp_norm_factor (the quickstart's 4; large = unconstrained)")
    p.add_argument("--weight-decay", type=float, default=0.5)
    p.add_argument("--update-layers", default="", help="edit layers for (3), e.g. 0,1,2 (empty: skip)")
    p.add_argument("--update-lam", default="0.01,1,100", help="ridge weights for (3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, tok = load_pretrained(a.model)
    model.eval()
    ad = ModelAdapter(model)
    path = resolve(a.dataset) if ":" in a.dataset and not Path(a.dataset).exists() else a.dataset
    reqs = load_longform(path, a.format)[a.offset : a.offset + a.n]
    out: dict = {"model": a.model, "dataset": a.dataset, "offset": a.offset, "records": len(reqs), "chat_template": a.chat_template, "layer": a.layer, "steps": a.steps, "lr": a.lr,
                 "clamp_norm_factor": a.clamp, "weight_decay": a.weight_decay, "windows": {}}
    for w in [int(x) for x in a.windows.split(",")]:
        batch, _ = build_longform_batch(tok, reqs, LongFormConfig(chunking=ChunkingConfig(window=w)), chat_template=a.chat_template)
        base = teacher_forced(model, batch)
        t0 = time.perf_counter()
        res = optimize_residuals(ad, batch, a.layer, ResidualConfig(lr=a.lr, steps=a.steps, weight_decay=a.weight_decay,
                                                                    clamp_norm_factor=a.clamp, kl_factor=0.0, early_stop_loss=0.01))
        dt = time.perf_counter() - t0
        ideal = teacher_forced(model, batch, res.z_target - res.z_init, a.layer)
        out["windows"][w] = {"chunks": batch.n_chunks, "unedited_accuracy": base[0], "unedited_nll": base[1],
                             "vectors_accuracy": ideal[0], "vectors_nll": ideal[1], "optimize_s": dt, "updates": {}}
        print(f"window {w:>3}: {batch.n_chunks} chunks; teacher-forced token accuracy unedited {base[0]:.3f} "
              f"(NLL {base[1]:.2f}) -> with the chunk vectors {ideal[0]:.3f} (NLL {ideal[1]:.2f}); "
              f"optimization {dt:.1f} s", flush=True)
        layers = [int(x) for x in a.update_layers.split(",") if x.strip()]
        if layers:
            from lightning_edit.engine.update import MemitMethod, apply_update

            saved = {l: ad.down_proj(l).weight.detach().clone() for l in layers}
            eye = {l: torch.eye(ad.dims(l)[1]) for l in layers}
            for lam in [float(x) for x in a.update_lam.split(",")]:
                for context in (True, False):
                    apply_update(ad, batch, res.z_target, layers, MemitMethod(lam=lam, moments=eye), context=context)
                    acc = teacher_forced(model, batch)
                    with torch.no_grad():
                        for l in layers:
                            ad.down_proj(l).weight.copy_(saved[l])
                    key = f"lam={lam:g},context={'on' if context else 'off'}"
                    out["windows"][w]["updates"][key] = {"accuracy": acc[0], "nll": acc[1]}
                    print(f"    update (ridge, layers {layers}, {key}): edited model {acc[0]:.3f} (NLL {acc[1]:.2f})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
