"""Measure statistics corpora for AlphaEdit on one model: how much of the keys of facts the model
knows (and that are never edited) falls into the "null space" that a corpus's second moment
leaves free for updates. Lower leakage = the preserved facts are better protected.

    python tools/measure_corpora.py --model smollm2:135m-instruct --layers 3,4,5,6,7 \\
        --corpora corpus:pydoc corpus:generated@smollm2:135m-instruct corpus:samples?samples=../shared/data \\
        --probes realfacts:smollm2:135m-instruct/probes --n_samples 400 --threshold 0.02

Prints a markdown table (tokens, seconds, directions kept, leakage per layer)."""

from __future__ import annotations

import argparse
import json
import time

import torch


@torch.no_grad()
def probe_keys(adapter, tok, probes, layers):
    """Keys (down-projection inputs) at the subject's last token of each probe prompt."""
    from lightning_edit.engine.tokens import Segment, encode_segments

    out = {l: [] for l in layers}
    for p in probes:
        prompt, subj = p["prompt"], p["subject"]
        start = prompt.index(subj)
        enc = encode_segments(tok, [Segment(prompt, anchors=[start + len(subj) - 1])])
        pos = int(enc.anchor_pos[0][0])
        with adapter.trace(key_layers=layers, stop_after=max(layers)) as rec:
            adapter.forward(enc.input_ids, enc.attention_mask)
        for l in layers:
            out[l].append(rec["keys"][l][0, pos].double())
    return {l: torch.stack(v) for l, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2:135m-instruct")
    ap.add_argument("--layers", default="3,4,5,6,7")
    ap.add_argument("--corpora", nargs="+", required=True)
    ap.add_argument("--probes", default="realfacts:smollm2:135m-instruct/probes")
    ap.add_argument("--n_samples", type=int, default=400)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=0.02)
    ap.add_argument("--mode", default="energy")
    ap.add_argument("--cache_dir", default="checkpoints/stats")
    args = ap.parse_args()
    from lightning_edit.engine.arch import ModelAdapter
    from lightning_edit.engine.closed_form import null_space_projector
    from lightning_edit.engine.loading import load_pretrained
    from lightning_edit.engine.stats import StatsConfig, second_moments
    from lightning_edit.resources import resolve

    layers = [int(x) for x in args.layers.split(",")]
    model, tok = load_pretrained(args.model)
    model.eval()
    adapter = ModelAdapter(model)
    probes = [json.loads(line) for line in open(resolve(args.probes)) if line.strip()]
    K = probe_keys(adapter, tok, probes, layers)
    rows = []
    for spec in args.corpora:
        t0 = time.time()
        path = resolve(spec)
        t_build = time.time() - t0
        cfg = StatsConfig(corpus=path, corpus_name=None, n_samples=args.n_samples, max_length=args.max_length, batch_size=8,
                          cache_dir=args.cache_dir)
        t0 = time.time()
        moments = second_moments(adapter, tok, layers, cfg, show_progress=False)
        t_stats = time.time() - t0
        n_tok = None
        leak, kept = [], []
        for l in layers:
            P, info = null_space_projector(moments[l].double(), args.threshold, args.mode)
            k = K[l]
            leak.append(float((k @ P.double()).pow(2).sum() / k.pow(2).sum()))
            kept.append(int(info["rank"]))
        texts = sum(1 for line in open(path) if line.strip())
        rows.append((spec, texts, round(t_build, 1), round(t_stats, 1), kept, [round(x, 4) for x in leak], round(sum(leak) / len(leak), 4)))
        print(rows[-1], flush=True)
    print(f"\n{len(probes)} probe facts; layers {layers}; projector {args.mode} {args.threshold}; n_samples {args.n_samples}\n")
    print("| corpus | texts | build s | stats s | null-space directions per layer | leakage per layer | mean leakage |")
    print("|---|---:|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| `{r[0]}` | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]} | {r[6]} |")


if __name__ == "__main__":
    main()
