#!/usr/bin/env python
"""Long real edit streams on SmolLM2: which statistics corpus, which of the field's fixes for
long streams, AlphaEdit against MEMIT. Every variant is one ``lightning-edit fit`` of a config
with overrides; the table holds every metric of its ``summary.json`` and its wall time.

    python benchmarks/stream_study.py corpus --out benchmarks/results/cpu_smollm2_study_corpus.json
    python benchmarks/stream_study.py fixes  --out benchmarks/results/cpu_smollm2_study_fixes.json
    python benchmarks/stream_study.py paper1000 --out benchmarks/results/cpu_smollm2_paper1000.json
    python benchmarks/stream_study.py paper1000 --only alphaedit --dry-run   # print the commands
    python benchmarks/stream_study.py paper1000 --out ... --partial   # record what unfinished runs measured so far

A plan's variants run one after another; one whose result is already in ``--out`` is skipped,
so a killed study resumes where it stopped (``--rerun`` measures again). The selection plans
(``corpus``, ``fixes``) edit records 5400-5599 of the 5,646, which the reported streams (records
0-999 and 0-4999) never reach, so settings are chosen on other facts than the ones reported on.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

PAPER = "configs/realfacts_paper.yaml"
FAST = ["--model.residual.steps=10", "--model.context_prefixes=0"]  # the quickstart's z settings (CPU time)
ALL = "realfacts:smollm2:135m-instruct/counterfact_all"
EXCL = f"?exclude={ALL}"
# texts read for the statistics (max_length 128, packed): pydoc holds ~53k tokens in all
CORPORA = {
    "pydoc_250": (f"corpus:pydoc{EXCL}", 250),
    "generated_200k": (f"corpus:generated@smollm2:135m-instruct{EXCL}&n=2200", 2200),
    "facts": (f"corpus:facts@smollm2:135m-instruct{EXCL}", 5000),
    "pydoc_facts": (f"corpus:pydoc+facts@smollm2:135m-instruct{EXCL}", 5000),
    "generated_facts": (f"corpus:generated+facts@smollm2:135m-instruct{EXCL}&n=2200", 8000),
}


def corpus_args(name: str) -> list[str]:
    spec, n = CORPORA[name]
    return [f"--editor.init_args.stats.corpus={spec}", f"--editor.init_args.stats.n_samples={n}"]


MEMIT = ["--editor=lightning_edit.callbacks.MEMIT", "--editor.init_args.lam=1400"]
PLANS: dict[str, dict] = {
    # which statistics corpus (the quickstart's z settings; AlphaEdit energy 0.05)
    "corpus": {"config": PAPER, "offset": 5400, "limit": 200, "variants": {
        name: [*FAST, *corpus_args(name)] for name in CORPORA}},
    # the fixes, one at a time, at the papers' settings on the chosen corpus
    "fixes": {"config": PAPER, "offset": 5400, "limit": 200, "variants": {
        "alphaedit": [],
        "alphaedit_mpes": ["--model.residual.mpes=1"],
        "alphaedit_mpes4": ["--model.residual.mpes=4"],
        "alphaedit_norm": ["--editor.init_args.norm_lambda=10"],
        "alphaedit_nas": ["--model.residual.nas=true", "--model.residual.nas_samples=200"],
        "memit": MEMIT,
        "memit_mpes_norm": [*MEMIT, "--model.residual.mpes=1", "--editor.init_args.norm_lambda=10"],
    }},
    # the reported streams: records 0-999 and 0-4999, AlphaEdit against MEMIT
    "paper1000": {"config": PAPER, "offset": 0, "limit": 1000, "variants": {"alphaedit": [], "memit": MEMIT}},
    "paper5000": {"config": PAPER, "offset": 0, "limit": 5000, "variants": {"alphaedit": [], "memit": MEMIT}},
}


def run(name: str, plan: dict, overrides: list[str], root: Path, extra: list[str], dry: bool) -> dict | None:
    logs = root / "logs"
    cmd = ["lightning-edit", "fit", "-c", plan["config"], f"--data.offset={plan['offset']}", f"--data.limit={plan['limit']}",
           *overrides, *extra, f"--trainer.logger.init_args.save_dir={logs}", f"--trainer.logger.init_args.name={name}",
           f"--checkpoint.dirpath={root / 'ckpt' / name}", "--trainer.enable_progress_bar=false"]
    print("$ " + " ".join(cmd), flush=True)
    if dry:
        return None
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    (root / f"{name}.log").write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        print(f"{name} failed (exit {proc.returncode}); log: {root / f'{name}.log'}\n{proc.stderr[-2000:]}", file=sys.stderr)
        return {"failed": proc.returncode, "wall_s": round(wall, 1)}
    version = max((logs / name).iterdir(), key=lambda p: p.stat().st_mtime)
    data = json.loads((version / "summary.json").read_text())
    summary = data.get("summary", data)
    out = {"summary": summary, "wall_s": round(wall, 1), "command": " ".join(cmd),  # the curve: summary["curve"]
           "log_dir": str(version)}
    keys = ("efficacy", "generalization", "specificity", "specificity_unedited", "retention", "retention_known",
            "probe_logprob_drop", "perplexity_after", "next_word_accuracy_after")
    print(f"{name}: " + ", ".join(f"{k} {summary[k]:.3f}" for k in keys if isinstance(summary.get(k), float))
          + f", {wall / 60:.1f} min", flush=True)
    return out


COLUMNS = ("efficacy", "generalization", "specificity", "specificity_unedited", "retention", "retention_known",
           "probe_logprob_drop", "first_batch_efficacy", "perplexity_before", "perplexity_after", "next_word_accuracy_before",
           "next_word_accuracy_after")


def table(results: dict) -> str:
    head = "| variant | " + " | ".join(COLUMNS) + " | wall |"
    lines = [head, "|---|" + "---:|" * (len(COLUMNS) + 1)]
    for name, r in results["variants"].items():
        if "summary" not in r:
            lines.append(f"| {name} | failed (exit {r.get('failed')}) |")
            continue
        s = r["summary"]
        cells = [f"{s[c]:.3f}" if isinstance(s.get(c), (int, float)) else "" for c in COLUMNS]
        wall = f"{r['wall_s'] / 60:.1f} min" if "wall_s" in r else f"unfinished: measured at {s.get('num_edits')} edits, {s.get('edits_applied')} applied"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines)


def partial(name: str, plan: dict, root: Path) -> dict | None:
    """What an unfinished variant has measured so far: the mid-stream evaluations its last
    checkpoint's ledger holds (each on the seeded sample of edited requests), as a curve; the
    summary's top-level values are the last of them. None without a checkpoint."""
    from lightning_edit.checkpointing import read_checkpoint

    ckpt = root / "ckpt" / name / "last.safetensors"
    if not ckpt.is_file():
        return None
    ledger = read_checkpoint(ckpt)["edit_module"]["ledger"]
    curve = [{k.removeprefix("edit/"): v for k, v in row.items()} for row in json.loads(ledger["evals"])]
    if not curve:
        return None
    applied = sum(len(json.loads(r["meta"])["request_ids"]) for r in ledger["records"])
    summary = {**curve[-1], "curve": curve, "partial": True, "edits_applied": applied}
    return {"summary": summary, "partial": True, "checkpoint": str(ckpt),
            "note": f"unfinished: {applied} of the stream's {plan['limit']} edits applied; the curve's points are mid-stream "
                    "evaluations on a seeded sample of the edited requests"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", choices=sorted(PLANS))
    p.add_argument("--out", required=True, help="results JSON (read first: variants already in it are skipped)")
    p.add_argument("--only", default="", help="comma-separated variants of the plan (default: all)")
    p.add_argument("--offset", type=int, help="first record (default: the plan's)")
    p.add_argument("--limit", type=int, help="edits (default: the plan's)")
    p.add_argument("--root", default="logs/stream_study", help="logs, checkpoints and run logs go here")
    p.add_argument("--rerun", action="store_true", help="measure variants already in --out again")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--partial", action="store_true", help="run nothing: record what unfinished variants measured so far "
                   "(the mid-stream evaluations of their last checkpoints under --root) in --out")
    p.epilog = "Any other --key=value is passed to every variant's lightning-edit fit (e.g. --model.residual.steps=10)."
    a, extra = p.parse_known_args(argv)
    plan = dict(PLANS[a.plan])
    if a.offset is not None:
        plan["offset"] = a.offset
    if a.limit is not None:
        plan["limit"] = a.limit
    extra = [x for x in extra if x != "--"]
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"plan": a.plan, "config": plan["config"], "offset": plan["offset"], "limit": plan["limit"], "extra": extra,
                    "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}"})
    results.setdefault("variants", {})
    names = [n for n in (a.only.split(",") if a.only else plan["variants"]) if n]
    unknown = [n for n in names if n not in plan["variants"]]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; plan {a.plan!r} has {list(plan['variants'])}")
    root = Path(a.root) / a.plan
    root.mkdir(parents=True, exist_ok=True)
    failed = False
    if a.partial:
        for name in names:
            if "summary" in results["variants"].get(name, {}) and not results["variants"][name].get("partial"):
                continue  # finished: keep its full result
            r = partial(name, plan, root)
            if r is not None:
                results["variants"][name] = {**r, "date": time.strftime("%Y-%m-%d")}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(table(results))
        return 0
    for name in names:
        if name in results["variants"] and "summary" in results["variants"][name] and not a.rerun:
            print(f"{name}: in {out} already (--rerun measures it again)")
            continue
        r = run(name, plan, plan["variants"][name], root, extra, a.dry_run)
        if r is None:
            continue
        failed |= "summary" not in r
        results["variants"][name] = {**r, "date": time.strftime("%Y-%m-%d")}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    if not a.dry_run:
        print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
