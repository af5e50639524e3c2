"""Memory per GPU of an AlphaEdit run under ``sharded_edit`` (computed, not measured).

    python tools/memory_plan.py                 # Llama-3-8B and Llama-3-70B on 1, 2, 4, 8 GPUs
    python tools/memory_plan.py --layers 5 --slots 1540 --batch-slots 3080 --gpu-gb 80

What each process holds (GiB), from the shapes and the code's dtypes:

* ``weights``: bf16; the decoder blocks split over the processes, the embeddings, final norm and
  LM head whole on every process (``lightning_edit.engine.sharding.shard_blocks``);
* ``masters``: float32 copies of the edit layers' down projections (bf16 models), sharded like
  the weights;
* ``alphaedit``: per edit layer the null-space projector and ``K_p K_p^T`` (float32) and the
  Woodbury inverse (float64), each ``d_k x d_k``, kept by the layer's owner only (edit layers
  are dealt out to the processes: ``ceil(layers / GPUs)`` per process);
* ``stats``: while the statistics are computed, one float64 ``d_k x d_k`` running sum per owned
  edit layer (every process runs the same forwards, each sums only its own layers; the peak is
  ``max(stats, alphaedit)``, not the sum);
* ``activations``: the z optimization's forward and backward, scaled from the one measurement
  there is: 26.9 GB above the weights for forwards of <= 1,600 token slots on Llama-3-8B (edit
  layers from 4; one H200, 2026-11-26, docs/performance.md), in proportion to the token slots per
  forward and to ``blocks above the first edit layer x (4 d_model + 2 d_ff)``. The processes
  split a batch's z optimization (each optimizes a contiguous share of the requests), so one
  process's forwards hold at most ``batch slots / GPUs`` token slots.
"""

from __future__ import annotations

import argparse

GIB = 1024**3

MODELS = {
    # name: (layers, d_model, d_ff, vocab, kv_dim)
    "Llama-3-8B": (32, 4096, 14336, 128256, 1024),
    "Llama-3-70B": (80, 8192, 28672, 128256, 1024),
}


#: the measured anchor: GB above the weights, token slots per forward, Llama-3-8B, first edit layer 4
ANCHOR_GB, ANCHOR_SLOTS = 43.0 - 16.1, 1600
ANCHOR_WIDTH = (32 - 4) * (4 * 4096 + 2 * 14336)


def plan(name: str, gpus: int, edit_layers: int, slots: int, first_edit: int, batch_slots: int | None = None) -> dict[str, float]:
    n_layers, d, f, vocab, kv = MODELS[name]
    if batch_slots:  # this process's share of the batch, in forwards of at most ``slots``
        slots = min(slots, -(-batch_slots // gpus))
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # q, o, k, v, gate/up/down, two norms
    rest = 2 * vocab * d + d  # embeddings, LM head (untied), final norm
    weights = (n_layers * block / gpus + rest) * 2
    masters = edit_layers * d * f * 4 / gpus
    square = f * f
    alphaedit = -(-edit_layers // gpus) * (4 + 4 + 8) * square
    stats = -(-edit_layers // gpus) * 8 * square
    width = (n_layers - first_edit) * (4 * d + 2 * f)
    activations = ANCHOR_GB * 1e9 * (slots / ANCHOR_SLOTS) * (width / ANCHOR_WIDTH) + block * 2
    peak = weights + masters + max(stats, alphaedit) + activations
    return {"weights": weights / GIB, "masters": masters / GIB, "alphaedit": alphaedit / GIB, "stats": stats / GIB,
            "activations": activations / GIB, "peak": peak / GIB, "slots": slots}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=5, help="edit layers (the papers: 5)")
    ap.add_argument("--slots", type=int, default=1540, help="token slots per z-optimization forward (100 CounterFact "
                    "edits with the default max_tokens_per_forward 2048: two forwards of ~1,540)")
    ap.add_argument("--batch-slots", type=int, default=3080, help="token slots of a whole batch's z optimization, "
                    "split between the processes (100 CounterFact edits: ~3,080); 0 = every process runs the whole batch")
    ap.add_argument("--first-edit", type=int, default=4, help="the lowest edit layer")
    ap.add_argument("--gpu-gb", type=float, default=80.0, help="memory of one GPU (GB, 10^9 bytes)")
    a = ap.parse_args(argv)
    cap = a.gpu_gb * 1e9 / GIB
    share = f", a batch of {a.batch_slots} split between the GPUs" if a.batch_slots else ", the whole batch on every GPU"
    print(f"AlphaEdit, {a.layers} edit layers, z forwards of at most {a.slots} token slots{share}, bf16 weights; GiB per GPU "
          f"(a GPU of {a.gpu_gb:g} GB holds {cap:.1f} GiB)\n")
    print("| model | GPUs | weights | f32 masters | AlphaEdit state | statistics | slots per forward | activations | peak | fits |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name in MODELS:
        for gpus in (1, 2, 4, 8):
            p = plan(name, gpus, a.layers, a.slots, a.first_edit, a.batch_slots)
            fits = "yes" if p["peak"] <= 0.9 * cap else ("tight" if p["peak"] <= cap else "no")
            print(f"| {name} | {gpus} | {p['weights']:.1f} | {p['masters']:.2f} | {p['alphaedit']:.1f} | {p['stats']:.1f} | "
                  f"{p['slots']} | {p['activations']:.1f} | {p['peak']:.1f} | {fits} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
