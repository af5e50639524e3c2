"""``lightning-edit trace``: the command line of causal tracing."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_edit.data.chat import chat_prompt
from lightning_edit.data.formats import records_to_requests
from lightning_edit.data.requests import EditRequest
from lightning_edit.data.sources import load_records
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.loading import load_pretrained
from lightning_edit.errors import InputError
from lightning_edit.resources import resolve
from lightning_edit.trace.core import ROLES, Fact, as_fact
from lightning_edit.trace.run import run_trace


# ---- command line --------------------------------------------------------------------------
def load_facts(path: str | Path) -> list[EditRequest | Fact]:
    """Edit records from a file, directory or dataset id (:func:`~lightning_edit.data.sources.load_records`),
    as :class:`EditRequest` s when :func:`~lightning_edit.data.formats.records_to_requests`
    recognizes them (CounterFact, flat CounterFact, ZsRE, factworld), else as simple dicts with
    ``prompt`` / ``subject`` / ``target`` (see :func:`as_fact`)."""
    records = load_records(str(path))
    try:
        return records_to_requests(records)
    except ValueError as err:  # RequestError: not a benchmark format; maybe simple dicts
        try:
            return [as_fact(r, i) for i, r in enumerate(records)]
        except (ValueError, TypeError):
            raise err from None


_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_layers(spec: str) -> list[int]:
    """``"0-15"``, ``"2,4,6"``, ``"0-29:3"`` (every 3rd) or combinations like ``"0-4,10"``."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        rng, _, step = part.partition(":")
        try:
            if "-" in rng:
                a, b = (int(x) for x in rng.split("-", 1))
                out.extend(range(a, b + 1, int(step) if step else 1))
            else:
                out.append(int(rng))
        except ValueError:
            raise InputError(f"--layers {spec!r}: cannot read {part!r} (use e.g. '0-15', '2,4,6' or '0-29:3')") from None
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-edit trace",
        description="Causal tracing (ROME): where does the model recall facts? Writes trace.md, trace.json, trace.png.",
    )
    p.add_argument("--model", required=True, help="hub id, local path, .gguf file or built-in name (smollm2:135m-instruct) of a causal LM")
    p.add_argument(
        "--dataset", required=True,
        help="JSON / JSONL file (or directory, dataset id) of edit records: CounterFact, ZsRE, factworld or prompt/subject/target dicts",
    )
    p.add_argument("--num_facts", type=int, default=50, help="facts to trace (a seeded sample); 0 for all")
    p.add_argument("--n_samples", type=int, default=10, help="noise samples per fact")
    p.add_argument("--noise_factor", type=float, default=3.0, help="noise std in units of the embedding matrix's std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score", choices=["prob", "logprob"], default="prob")
    p.add_argument("--answer", choices=["greedy", "true"], default="greedy",
                   help="trace the model's own answer or the true object")
    p.add_argument("--kind", choices=["hidden", "mlp"], default="hidden", help="restore block outputs or MLP outputs")
    p.add_argument("--window", type=int, default=1,
                   help="layers restored together per cell, centred (ROME restores 10 MLP layers; single MLP layers of real models often show nothing)")
    p.add_argument("--layers", default=None, help="trace only these layers (window centres): '0-15', '2,4,6' or '0-9:3' (start-stop:step)")
    p.add_argument("--roles", default=None,
                   help=f"trace only the tokens of these roles, comma-separated, from {','.join(ROLES)} (e.g. subject_last,prompt_last)")
    p.add_argument("--noise_z", type=float, default=2.0, help="recommend only when the effect exceeds this many standard errors over facts")
    p.add_argument("--gguf_file", default=None, help="GGUF file inside --model (a --model path ending in .gguf works too)")
    p.add_argument("--chat_template", action="store_true", help="render prompts as chat turns (instruct models)")
    p.add_argument("--n_layers_window", type=int, default=3, help="width of the recommended layer window")
    p.add_argument("--batch_size", type=int, default=128, help="rows per batched forward")
    p.add_argument("--out", default="logs/trace", help="output directory")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="auto", help="auto: float32")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    p.add_argument("--layer_template", default=None, help="module name of block {} for unknown architectures")
    p.add_argument("--mlp_down_template", default=None, help="module name of block {}'s MLP down projection")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-edit trace``: trace a sample of facts and write the report."""
    args = build_parser().parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_pretrained(args.model, "float32" if args.dtype == "auto" else args.dtype, gguf_file=args.gguf_file)
    model = model.to(device)
    adapter = ModelAdapter(model, args.layer_template, args.mlp_down_template)
    facts = load_facts(resolve(args.dataset))
    if args.chat_template:
        facts = [dataclasses.replace(f, prompt=chat_prompt(tokenizer, f.prompt)) for f in (as_fact(x, i) for i, x in enumerate(facts))]
    roles = [r.strip() for r in args.roles.split(",") if r.strip()] if args.roles else None
    result = run_trace(
        model, tokenizer, facts, n_samples=args.n_samples, noise_factor=args.noise_factor, seed=args.seed,
        num_facts=args.num_facts or None, score=args.score, answer=args.answer, kind=args.kind, window=args.window,
        n_layers_window=args.n_layers_window, batch_size=args.batch_size, adapter=adapter, progress=True,
        layers=parse_layers(args.layers) if args.layers else None, roles=roles, noise_z=args.noise_z,
    )
    result.settings["model"] = args.model
    result.settings["dataset"] = str(args.dataset)
    paths = result.save(args.out)
    print(result.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
