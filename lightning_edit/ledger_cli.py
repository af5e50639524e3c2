"""The command-line tools on an edit checkpoint's ledger: ``lightning-edit ledger`` (list the
batches), ``undo`` (take the last batches back) and ``export`` (the edited model as a Hugging Face
directory, or its edits as a PEFT LoRA adapter)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_edit.checkpointing import (
    export_pretrained,
    full_model_fingerprint,
    read_checkpoint,
    save_edited_layers,
    write_checkpoint,
)
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.files import (
    MANIFEST,
    SKELETON_KEY,
    check_export_target,
    read_verified,
    verify_manifest,
)
from lightning_edit.engine.loading import load_pretrained
from lightning_edit.engine.update import master_copies
from lightning_edit.engine.weight_files import WeightsNotStreamable
from lightning_edit.errors import CheckpointError, EditError, MissingFileError
from lightning_edit.stream.ledger import EditLedger
from lightning_edit.stream.peft_export import (
    PeftExportError,
    describe_export,
    export_lora,
    structure_model,
)
from lightning_edit.stream.streamed_export import export_streamed


def _read_checkpoint(path: str) -> tuple[dict, EditLedger]:
    ckpt = read_checkpoint(path)
    state = ckpt.get("edit_module", {})
    if "ledger" not in state:
        raise SystemExit(f"{path}: no edit ledger in this checkpoint (not written by lightning-edit fit, or by an older version)")
    ledger = EditLedger()
    ledger.load_state_dict(state["ledger"])  # verifies every batch file, naming it
    return ckpt, ledger


def base_fingerprint(ckpt: dict) -> str | None:
    """The base model's fingerprint an edit checkpoint was made on (the editing callback's state)."""
    return next((cb.get("base_fingerprint") for cb in ckpt.get("callbacks", {}).values()
                 if isinstance(cb, dict) and "base_fingerprint" in cb), None)


def rewind_checkpoint(ckpt: dict, ledger: EditLedger, position: int) -> dict:
    """A checkpoint dict rewound to ``position`` batches: the ledger (which is the stream's
    position and evaluation history) and Lightning's loop counters (as a checkpoint written after
    batch ``position`` holds them), so ``fit --ckpt_path`` continues from there."""
    n = ledger.position - position
    ledger.truncate(position)
    num_edits = ledger.num_edits
    ckpt["edit_module"]["ledger"] = ledger.state_dict()
    ckpt["edit_module"].pop("num_edits", None)  # a copy kept by earlier versions
    for cb in ckpt.get("callbacks", {}).values():
        if not isinstance(cb, dict):
            continue
        cb.pop("batches_applied", None), cb.pop("num_edits", None)  # copies kept by earlier versions
        for key in ("history", "stream"):  # the report's curves (earlier versions kept them here)
            if isinstance(cb.get(key), str):
                cb[key] = json.dumps([h for h in json.loads(cb[key]) if int(h.get("num_edits", 0)) <= num_edits])
    ckpt["global_step"] = max(0, int(ckpt.get("global_step", 0)) - n)
    fit = ckpt.get("loops", {}).get("fit_loop", {})
    # Lightning's loop state: flat keys with dotted names ("epoch_loop.batch_progress", ...)
    stepped = fit.get("epoch_loop.state_dict", {})
    if "_batches_that_stepped" in stepped:
        stepped["_batches_that_stepped"] = max(0, int(stepped["_batches_that_stepped"]) - n)
    for key in ("epoch_loop.batch_progress", "epoch_loop.manual_optimization.optim_step_progress"):
        prog = fit.get(key, {})
        for which in ("total", "current"):
            for k, v in list(prog.get(which, {}).items()):
                prog[which][k] = max(0, int(v) - n)
        if "is_last_batch" in prog:
            prog["is_last_batch"] = False
    return ckpt


def _check_trust(path: str, meta: dict, trust_remote_code: bool) -> None:
    if meta.get("trust_remote_code") and not trust_remote_code:
        # the checkpoint's record is only a hint: running a repository's code is the user's decision
        raise SystemExit(f"{path}: its base model {meta.get('model')!r} was loaded with trust_remote_code; pass "
                         "--trust_remote_code if you trust that repository's code to run here")


def edited_model(path: str, ckpt: dict, ledger: EditLedger, trust_remote_code: bool):
    """The checkpoint's base model (loaded from its record, checked against its fingerprint) with
    the ledger's batches replayed: ``(model, tokenizer, adapter, layers)``. Remote code runs only
    when the user says so (``trust_remote_code``), whatever the checkpoint records."""
    m = ledger.meta
    _check_trust(path, m, trust_remote_code)
    model, tok = load_pretrained(m["model"], m.get("dtype", "float32"), trust_remote_code, m.get("tokenizer"))
    adapter = ModelAdapter(model, m.get("layer_template"), m.get("mlp_down_template"))
    layers = [int(l) for l in m["layers"]]
    saved = base_fingerprint(ckpt)
    if saved is not None and saved != full_model_fingerprint(model):
        raise SystemExit(f"{path} was made on another base model than {m['model']!r} (model fingerprint differs)")
    base = {l: adapter.weight_as_linear(l).detach().clone() for l in layers}
    ledger.replay(adapter, layers, base, master_copies(adapter, layers))
    return model, tok, adapter, layers


def undo_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lightning-edit undo", description="take the last N edit batches back from a checkpoint "
                                 "(weights, K_p K_p^T, ledger and stream position; `fit --ckpt_path` continues from there)")
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--batches", type=int, required=True, help="how many of the last batches to take back")
    ap.add_argument("--out", default=None, help="write the rewound checkpoint here (default: rewrite --ckpt_path atomically)")
    ap.add_argument("--trust_remote_code", action="store_true", help="when edited.safetensors is rewritten: allow the base "
                    "model's own modelling code to run while it is loaded; never taken from the checkpoint")
    a = ap.parse_args(argv)
    ckpt, ledger = _read_checkpoint(a.ckpt_path)
    if not 0 <= a.batches <= ledger.position:
        raise SystemExit(f"cannot undo {a.batches} batches: the checkpoint holds {ledger.position}")
    removed = ledger.history()[ledger.position - a.batches:]
    rewind_checkpoint(ckpt, ledger, ledger.position - a.batches)
    out = a.out or a.ckpt_path
    # in place: edited.safetensors beside the checkpoint (what fit wrote) is kept equal to an export
    edited = Path(out).parent / "edited.safetensors" if a.out is None and a.batches else None
    built = None
    if edited is not None and edited.exists():
        try:  # before anything is written
            built = edited_model(a.ckpt_path, ckpt, ledger, a.trust_remote_code)
        except (EditError, OSError, SystemExit) as err:  # the base model cannot be loaded here (or not trusted)
            print(f"note: {edited} cannot be rebuilt ({err}); it is removed rather than left stale: "
                  "`lightning-edit export` writes the edited model")
    write_checkpoint(ckpt, out)
    ids = [i for r in removed for i in r["request_ids"]]
    print(f"took back {a.batches} batches ({len(ids)} edits: {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}); "
          f"{out} now holds {ledger.num_edits} edits in {ledger.position} batches")
    if built is not None:
        _, _, adapter, layers = built
        method = ledger.records[-1].method if ledger.records else removed[0]["method"]
        save_edited_layers(edited, adapter, layers, method, ledger.meta["model"], ledger.num_edits, ledger.position,
                           params=ledger.dense_names())
        print(f"rewrote {edited} to match ({ledger.num_edits} edits)")
    elif edited is not None:
        edited.unlink(missing_ok=True)
    return 0


def _cell(text) -> str:
    """Text for a markdown table cell (a "|" in a target would split the row)."""
    return str(text).replace("|", "\\|")


def describe_batch(row: dict, show: int = 3) -> str:
    """The first ``show`` requests of a :meth:`EditLedger.history` row as ``id: description``,
    "; "-separated, then "... and N more"; ``(not recorded)`` for a batch of an older ledger
    (its request ids are still listed beside it)."""
    ids, desc = row["request_ids"], row.get("descriptions") or []
    if not desc:
        return "(not recorded)"
    parts = [f"{i}: {d}" for i, d in zip(ids, desc)]
    text = "; ".join(parts[:show])
    if len(parts) > show:
        text += f"{'; ' if text else ''}... and {len(parts) - show} more"
    return text


def ledger_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lightning-edit ledger", description="list the edit batches a checkpoint carries")
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--json", action="store_true", help="print the ledger summary as JSON")
    ap.add_argument("--show", type=int, default=3, metavar="N",
                    help="what the first N requests of each batch changed (subject: old -> new target; "
                         "question -> start of the answer); 0 hides the column (default: 3)")
    a = ap.parse_args(argv)
    if a.show < 0:
        raise SystemExit(f"--show must be >= 0, got {a.show}")
    _, ledger = _read_checkpoint(a.ckpt_path)
    if a.json:
        print(json.dumps(ledger.summary(), indent=1))
        return 0
    changes = a.show > 0
    print("| batch | requests | edits after | method | request ids |" + (" changes |" if changes else "") + " update norms | bytes |")
    print("|---:|---:|---:|---|---|" + ("---|" if changes else "") + "---|---:|")
    for r, h in zip(ledger.records, ledger.history()):
        ids = ", ".join(h["request_ids"][:4]) + (" ..." if len(h["request_ids"]) > 4 else "")
        norms = ", ".join(f"{k.rsplit('_', 1)[-1]}: {v:.3g}" for k, v in h.items() if k.startswith("update_norm/"))
        row = f"| {h['batch']} | {h['num_requests']} | {h['num_edits']} | {h['method']} | {_cell(ids)} |"
        if changes:
            row += f" {_cell(describe_batch(h, a.show))} |"
        print(f"{row} {norms} | {ledger.batch_bytes(r)} |")
    m = ledger.meta
    print(f"\n{ledger.num_edits} edits in {ledger.position} batches ({m.get('model')}, layers {m.get('layers')}, {m.get('dtype')})")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lightning-edit export", description="write the edited model of a checkpoint as a "
                                 "save_pretrained directory (safetensors, config, tokenizer, edit_ledger.json), or with "
                                 "--peft its edits as a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors)")
    ap.add_argument("--ckpt_path", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty (it is "
                    "replaced only once the new export is complete; default: refuse)")
    ap.add_argument("--trust_remote_code", action="store_true", help="allow the base model's own modelling code (from "
                    "its repository) to run while it is loaded; never taken from the checkpoint")
    ap.add_argument("--peft", action="store_true", help="write the edits as a PEFT LoRA adapter for the base model "
                    "(PeftModel.from_pretrained(base, OUT), vLLM --enable-lora) instead of the edited model")
    ap.add_argument("--batches", type=int, default=None, metavar="N",
                    help="with --peft: only the last N batches (the adapter then turns the model after the other batches "
                         "into the full stream's; default: every batch)")
    ap.add_argument("--rank", type=int, default=None, metavar="R",
                    help="with --peft: truncate each layer's update to its best rank-R approximation (SVD) and report the "
                         "relative error left; for servers that cap the LoRA rank (vLLM --max-lora-rank, default 16)")
    ap.add_argument("--in_memory", action="store_true", help="load the whole base model and export with save_pretrained "
                    "(default: stream the base model's safetensors files one at a time, replacing the edited tensors, "
                    "when it is a local directory of them; the results are equal)")
    a = ap.parse_args(argv)
    if not a.peft and (a.batches is not None or a.rank is not None):
        raise SystemExit("--batches and --rank apply to --peft exports; a full export carries every batch "
                         "(take batches back with `lightning-edit undo` first)")
    check_export_target(a.out, a.overwrite)  # before any loading: an export never replaces what a user keeps there
    ckpt, ledger = _read_checkpoint(a.ckpt_path)
    m = ledger.meta
    if a.peft:
        _check_trust(a.ckpt_path, m, a.trust_remote_code)
        return _export_peft(a, ckpt, ledger)
    if not a.in_memory:
        _check_trust(a.ckpt_path, m, a.trust_remote_code)
        try:
            out = export_streamed(ledger, a.out, None, a.trust_remote_code, a.overwrite, base_fingerprint(ckpt))
            print(f"exported {ledger.num_edits} edits ({ledger.position} batches) of {m['model']} to {out} "
                  "(streamed: the base model's files one at a time, the edited tensors replaced)")
            return 0
        except WeightsNotStreamable as err:
            print(f"note: {err}; loading the whole model to export it")
        except CheckpointError as err:
            raise SystemExit(f"{a.ckpt_path}: {err}") from None
    model, tok, _, _ = edited_model(a.ckpt_path, ckpt, ledger, a.trust_remote_code)
    out = export_pretrained(model, tok, ledger, a.out, overwrite=a.overwrite)
    print(f"exported {ledger.num_edits} edits ({ledger.position} batches) of {m['model']} to {out}")
    return 0


def _export_peft(a, ckpt: dict, ledger: EditLedger) -> int:
    m = ledger.meta
    try:
        model, name = structure_model({**m, "trust_remote_code": a.trust_remote_code})  # names and types only, meta device
        adapter = ModelAdapter(model, m.get("layer_template"), m.get("mlp_down_template"))
        fingerprint = base_fingerprint(ckpt)
        out, lora = export_lora(adapter, ledger, a.out, batches=a.batches, rank=a.rank, base_model=name,
                                extra={"base_fingerprint": fingerprint} if fingerprint else None, overwrite=a.overwrite)
    except PeftExportError as err:
        raise SystemExit(f"{a.ckpt_path}: {err}") from None
    print(describe_export(out, lora, m.get("model")))
    return 0


def verify_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lightning-edit verify", description="check that an export directory is complete and "
                                 "unchanged (every file against the SHA-256 of its manifest), or that a checkpoint file, its "
                                 "JSON state and every ledger batch file it names match their digests; exit status 0 when "
                                 "everything matches, 1 otherwise")
    ap.add_argument("path", help="an export directory (lightning-edit export, Editor.export) or a checkpoint .safetensors")
    a = ap.parse_args(argv)
    path = Path(a.path)
    if path.is_dir():
        problems = verify_manifest(path)
        if problems:
            print(f"{path}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))
            return 1
        n = len(json.loads((path / MANIFEST).read_text())["files"])
        print(f"{path}: OK, {n} files match the manifest")
        return 0
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file or directory")
    try:
        _, meta = read_verified(path, require_digest=True, finite=False)
        if SKELETON_KEY not in meta:  # another file lightning-edit wrote (edited.safetensors, a ledger batch, a cache)
            print(f"{path}: OK, every tensor and its metadata match their digests")
            return 0
        _, ledger = _read_checkpoint(str(path))
    except (EditError, SystemExit) as err:  # a corrupt, altered or incomplete file
        print(f"{path}: {err}")
        return 1
    print(f"{path}: OK, the checkpoint and its {ledger.position} ledger batch files ({ledger.num_edits} edits) match their digests")
    return 0
