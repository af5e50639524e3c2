"""Collect the end-of-stream summaries of several edit runs into one markdown table.

    python benchmarks/summarize_runs.py logs/quickstart logs/quickstart_memit

Each argument is a run's log directory (``logs/<name>/version_N``) or a logger directory
(``logs/<name>``: its newest ``version_N`` is used). Prints one row per run with the metrics of
``summary.json`` (see :mod:`lightning_edit.report`) and, from the run's ``config.yaml``, the
settings that distinguish runs of a sweep (edit layers, threshold, lam, L2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

METRICS = ("num_edits", "efficacy", "generalization", "specificity", "retention", "first_batch_efficacy",
           "perplexity_before", "perplexity_after", "fluency", "consistency", "wall_time_s")


def run_dir(path: Path) -> Path:
    if (path / "summary.json").exists():
        return path
    versions = sorted(path.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    done = [v for v in versions if (v / "summary.json").exists()]
    if not done:
        raise SystemExit(f"{path}: no summary.json (is the run finished?)")
    return done[-1]


def settings(run: Path) -> str:
    cfg_path = run / "config.yaml"
    if not cfg_path.exists():
        return ""
    cfg = yaml.safe_load(cfg_path.read_text())
    editor = (cfg.get("editor") or {}).get("init_args", {})
    parts = [f"layers {cfg.get('model', {}).get('layers')}"]
    if "lam" in editor:
        parts.append(f"lam {editor['lam']:g}")
    if "nullspace_threshold" in editor:
        parts.append(f"{editor.get('threshold_mode', 'absolute')} {editor['nullspace_threshold']:g}" + (f", L2 {editor['l2']:g}" if editor.get('l2') is not None else ""))
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    args = p.parse_args(argv)
    rows = []
    for arg in args.runs:
        run = run_dir(arg)
        s = json.loads((run / "summary.json").read_text())
        rows.append([s.get("method", "?"), settings(run)] + [s.get(k) for k in METRICS])
    print("| method | settings | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---:|" * len(METRICS))
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) and v < 10 else (f"{v:.1f}" if isinstance(v, float) else str(v)) for v in r]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
