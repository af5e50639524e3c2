"""Second moments of the two statistics encodings (``packed`` vs ``per_text``) on one model and
corpus: relative Frobenius difference per layer, and the projectors' kept rank for a threshold.

    python benchmarks/compare_encodings.py --model PATH --corpus FILE --layers 0 1 2 \
        --n_samples 20000 --max_length 128 --threshold 0.05 --mode energy
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> dict:
    from lightning_edit.engine.arch import ModelAdapter
    from lightning_edit.engine.closed_form import null_space_projector
    from lightning_edit.engine.loading import load_pretrained
    from lightning_edit.engine.stats import StatsConfig, second_moments

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--layers", type=int, nargs="+", required=True)
    ap.add_argument("--n_samples", type=int, default=20000)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.05)
    ap.add_argument("--mode", default="energy")
    ap.add_argument("--cache_dir", default="checkpoints/stats")
    a = ap.parse_args(argv)
    model, tok = load_pretrained(a.model)
    ad = ModelAdapter(model)
    out: dict = {}
    moments = {}
    for enc in ("packed", "per_text"):
        cfg = StatsConfig(corpus=a.corpus, corpus_name=None, n_samples=a.n_samples, max_length=a.max_length,
                          batch_size=a.batch_size, cache_dir=a.cache_dir, encoding=enc)
        t0 = time.time()
        moments[enc] = second_moments(ad, tok, a.layers, cfg, show_progress=False)
        out[f"seconds_{enc}"] = round(time.time() - t0, 1)
    for l in a.layers:
        p, q = moments["packed"][l], moments["per_text"][l]
        rp = null_space_projector(p, a.threshold, a.mode)[1]["rank"]
        rq = null_space_projector(q, a.threshold, a.mode)[1]["rank"]
        out[f"layer_{l}"] = {"rel_diff": round(float((p - q).norm() / p.norm()), 4),
                             "projector_rank_packed": rp, "projector_rank_per_text": rq, "d_k": int(p.shape[0])}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
