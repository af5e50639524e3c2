#!/usr/bin/env python
"""Sweep AlphaEdit's null-space threshold and MEMIT's lam on SmolLM2 real facts (issue 7, item 4).

Each point is one `lightning-edit fit` of the quickstart configs with overrides, on records the
quickstart and the 1,000-edit stream never use (``--offset``, default 1100 of the 1,256 shipped
records), evaluated once at the end; the table ranks the points by the harmonic mean of
efficacy, generalization, specificity and retention (CounterFact's "score" is the harmonic mean
of the first three; retention of never-edited known facts is the lifelong-editing part).

    python benchmarks/sweep_realfacts.py --out benchmarks/results/cpu_smollm2_sweep.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

KEYS = ("efficacy", "generalization", "specificity", "retention")


def run(config: str, overrides: list[str], name: str, common: list[str]) -> dict:
    logs = Path("logs/sweep_realfacts")
    cmd = ["lightning-edit", "fit", "-c", config, *common, *overrides,
           f"--trainer.logger.init_args.save_dir={logs}", f"--trainer.logger.init_args.name={name}",
           f"--checkpoint.dirpath=checkpoints/sweep_realfacts/{name}", "--trainer.enable_progress_bar=false"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    version = max((logs / name).iterdir(), key=lambda p: p.stat().st_mtime)
    s = json.loads((version / "summary.json").read_text())
    s = s.get("summary", s)
    out = {k: s.get(k) for k in (*KEYS, "first_batch_efficacy", "perplexity_before", "perplexity_after")}
    out["score"] = statistics.harmonic_mean([max(float(s[k]), 1e-9) for k in KEYS]) if all(s.get(k) is not None for k in KEYS) else None
    out["wall_s"] = round(time.time() - t0, 1)
    print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items()), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--offset", type=int, default=1100)
    p.add_argument("--edits", type=int, default=40)
    p.add_argument("--thresholds", default="0.005,0.02,0.05,0.1", help="AlphaEdit energy thresholds")
    p.add_argument("--lams", default="350,1400,5600", help="MEMIT lam values")
    p.add_argument("--out", default="benchmarks/results/cpu_smollm2_sweep.json")
    a = p.parse_args(argv)
    common = [f"--data.offset={a.offset}", f"--data.limit={a.edits}", "--model.eval_every=0", "--report.n_generation=0",
              "--report.n_examples=0"]
    rows = {}
    for t in [x for x in a.thresholds.split(",") if x]:
        rows[f"alphaedit energy {t}"] = run("configs/quickstart.yaml", [f"--editor.init_args.nullspace_threshold={t}"],
                                            f"alphaedit_energy_{t}", common)
    for lam in [x for x in a.lams.split(",") if x]:
        rows[f"memit lam {lam}"] = run("configs/quickstart_memit.yaml", [f"--editor.init_args.lam={lam}"], f"memit_lam_{lam}", common)
    Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "offset": a.offset, "edits": a.edits, "rows": rows}, indent=1))
    print("\n| setting | efficacy | generalization | specificity | retention | score | wall s |\n|---|---:|---:|---:|---:|---:|---:|")
    for k, r in sorted(rows.items(), key=lambda kv: -(kv[1]["score"] or 0)):
        print(f"| {k} | " + " | ".join(f"{r[x]:.3f}" if r[x] is not None else "-" for x in (*KEYS, "score")) + f" | {r['wall_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
