#!/usr/bin/env python
"""Curves of every metric against edits applied, one line per variant, from the results JSON of
``benchmarks/stream_study.py`` (each variant's ``summary["curve"]``: the mid-stream evaluations
and the end of the stream).

    python benchmarks/plot_streams.py benchmarks/results/cpu_smollm2_paper1000.json --out docs/images/paper1000.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = ("efficacy", "generalization", "specificity", "retention", "retention_known", "probe_logprob_drop")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--only", default="", help="comma-separated variants (default: all)")
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    only = {x for x in a.only.split(",") if x}
    runs = {}
    for path in a.results:
        data = json.loads(path.read_text())
        for name, r in data.get("variants", {}).items():
            if "summary" in r and (not only or name in only):
                runs[name] = r["summary"]
    if not runs:
        raise SystemExit("no finished variant in " + ", ".join(map(str, a.results)))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, key in zip(axes.flat, METRICS):
        for i, (name, s) in enumerate(runs.items()):
            pts = [(r["num_edits"], r[key]) for r in s.get("curve", []) if r.get(key) is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=name, color=f"C{i}")
            unedited = s.get(f"{key}_unedited")
            if unedited is not None:
                ax.axhline(unedited, linestyle=":", linewidth=0.8, color=f"C{i}")
        ax.set_title(key + (" (nats)" if key == "probe_logprob_drop" else ""))
        ax.set_xlabel("edits applied")
        if key != "probe_logprob_drop":
            ax.set_ylim(0, 1.02)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("dotted: the unedited model on the same prompts", fontsize=9)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
