"""A small Python API for notebooks and scripts, on the same pieces as the CLI pipeline.

    from lightning_edit import Editor
    editor = Editor.from_pretrained("path/or/hub-id", layers=[4, 5, 6, 7, 8], method="alphaedit",
                                    stats={"corpus": "corpus.jsonl", "corpus_name": None})
    editor.apply([{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                   "target_new": "English", "target_true": "French"}])
    editor.evaluate(requests)        # {"edit/efficacy": ..., ...}
    editor.save("checkpoints/my_edits.safetensors")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from lightning_edit.callbacks import MEMIT, AlphaEdit, ClosedFormUpdate, UnKE
from lightning_edit.checkpointing import export_pretrained, load_edits
from lightning_edit.data.loaders import requests_from_records
from lightning_edit.data.requests import EditRequest, Request, RequestError
from lightning_edit.engine.loading import load_pretrained
from lightning_edit.engine.residuals import ResidualConfig
from lightning_edit.engine.stats import StatsConfig
from lightning_edit.errors import InputError
from lightning_edit.module import EditModule
from lightning_edit.stream.edit_stream import EditStream
from lightning_edit.stream.peft_export import export_lora

METHODS = {"alphaedit": AlphaEdit, "memit": MEMIT, "unke": UnKE}


def _as_requests(requests: Sequence[EditRequest | Mapping[str, Any]], seen: Mapping[str, Any] = (), start: int = 0) -> list[EditRequest]:
    """Validate a batch through the file loader (:func:`records_to_requests`): records of any
    supported format (CounterFact nested / flat, ZsRE; long-form ``{question, answer}``,
    UnKEBench, EditEverything, or :class:`LongFormRequest` objects), including the flat shape
    ``{prompt, subject, target_new, target_true | ground_truth[, paraphrase_prompts | rephrase_prompt,
    locality | locality_prompt + locality_ground_truth]}`` whose prompt has ``{}`` for the subject
    or the subject written out, or :class:`EditRequest` objects. Duplicate ``case_id`` s (within the
    batch or with ``seen``, the ids already applied) are refused, naming the record. Records are
    numbered from ``start`` (the editor's stream position), which also names records without a
    ``case_id``, as the CLI names them by their position in the stream."""
    if isinstance(requests, (Mapping, EditRequest, str)):
        raise TypeError("pass a list of requests (records or EditRequest objects), not a single one")
    out: list = []
    for i, r in enumerate(requests):
        if isinstance(r, Request):
            out.append(r.validate())
        else:
            # long-form records ({question|prompt, answer}, UnKEBench, EditEverything) or facts
            out.extend(requests_from_records([r], "auto", start + i))
    first: dict[str, int] = {}
    for i, r in enumerate(out):
        rec = r.record_index if r.record_index >= 0 else start + i
        if r.case_id in first:
            raise RequestError(rec, "case_id", f"duplicate case_id {r.case_id!r} (already used by record {first[r.case_id]})")
        if r.case_id in seen:
            raise RequestError(rec, "case_id", f"case_id {r.case_id!r} was already applied by this editor")
        first[r.case_id] = rec
    return out


class Editor:
    """Edit a loaded model in place, batch after batch.

    Args:
        model, tokenizer: a Hugging Face causal LM and its fast tokenizer.
        layers: edit layers, or ``"auto"`` (five consecutive blocks from depth / 8; see
            :meth:`~lightning_edit.engine.arch.ModelAdapter.default_edit_layers`).
        method: ``"alphaedit"``, ``"memit"``, ``"unke"`` (the block update), or a configured editing callback.
        residual: residual-optimization settings (:class:`ResidualConfig` or a dict).
        stats: key-statistics settings (:class:`StatsConfig` or a dict); ignored when ``method``
            is an instance.
        method_kwargs: e.g. ``l2=10, nullspace_threshold=0.02`` or ``lam=15000``.
        ledger_dir: where the edit ledger appends one file per applied batch (default: kept in
            memory, ``O(rows x (d_model + 2 d_k))`` floats per layer and batch).
        module_kwargs: other :class:`EditModule` arguments (``context_prefixes``, templates, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layers: Sequence[int] | str = "auto",
        method: str | ClosedFormUpdate = "alphaedit",
        residual: ResidualConfig | Mapping | None = None,
        stats: StatsConfig | Mapping | None = None,
        method_kwargs: Mapping | None = None,
        ledger_dir: str | Path | None = None,
        **module_kwargs,
    ):
        residual = residual if isinstance(residual, ResidualConfig) else ResidualConfig(**(residual or {}))
        self.module = EditModule.from_model(model, tokenizer, layers=layers if layers == "auto" else list(layers), residual=residual, **module_kwargs)
        if isinstance(method, ClosedFormUpdate):
            self.callback = method
        else:
            if method not in METHODS:
                raise InputError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
            st = stats if isinstance(stats, StatsConfig) else StatsConfig(**(stats or {}))
            self.callback = METHODS[method](stats=st, **dict(method_kwargs or {}))
        self.callback.attach(self.module)
        if ledger_dir is not None:
            self.module.ledger.directory = Path(ledger_dir)

    @classmethod
    def from_pretrained(cls, name_or_path: str, layers: Sequence[int] | str = "auto", dtype: str = "float32", device: str | None = None,
                        trust_remote_code: bool = False, **kwargs) -> "Editor":
        model, tok = load_pretrained(name_or_path, dtype, trust_remote_code)  # type: ignore[arg-type]
        if device is not None:
            model.to(device)
        ed = cls(model, tok, layers, **kwargs)
        ed.module.model_name = name_or_path
        ed.module.ledger.meta["model"] = name_or_path
        return ed

    @property
    def model(self) -> nn.Module:
        return self.module.lm

    @property
    def tokenizer(self):
        return self.module.tokenizer

    @property
    def num_edits(self) -> int:
        return self.module.num_edits

    @property
    def stream(self) -> EditStream:
        """The :class:`~lightning_edit.stream.edit_stream.EditStream` that applies the batches."""
        return self.module.stream

    @property
    def ledger(self):
        """The :class:`~lightning_edit.stream.ledger.EditLedger`: every batch applied, in order."""
        return self.module.ledger

    def prepare(self) -> None:
        """Compute (or load from cache) statistics and projectors; done on first :meth:`apply`."""
        self.stream.keep_base()  # the unedited edit-layer weights (CPU), for exact undo
        self.callback.prepare(self.module)

    def apply(self, requests: Sequence[EditRequest | Mapping[str, Any]]) -> dict[str, float]:
        """Apply one batch of edits (all requests are validated before any weight changes).
        Returns the residual-optimization losses and per-layer relative update norms."""
        applied = self.module.edit_history
        reqs = _as_requests(requests, seen={r.case_id for r in applied}, start=len(applied))
        if not reqs:
            return {}
        reqs = self.module.prepare_requests(reqs)  # chat turns when the module has chat_template on
        self.module.check_lengths(reqs, prefixes=True)
        self.prepare()
        # residual.nas: the norm anchor from this first batch on the unedited model (or residual.nas_anchor)
        self.module.ensure_norm_anchor(reqs, batch_size=len(reqs))
        record = self.stream.apply(reqs, progress=self.module.progress_enabled())
        res = self.stream.last_residuals
        return {**record.info, "z/loss": float(res.loss.mean()), "z/nll": float(res.nll.mean())}

    def undo(self, n: int = 1) -> list[dict]:
        """Take the last ``n`` batches back: weights rebuilt from the unedited ones plus the kept
        batches (bit-identical to never having applied the others, also in bf16), ``K_p K_p^T``
        without their keys, ledger and history rewound. Returns the removed batches' rows."""
        return self.stream.undo(n)

    def history(self) -> list[dict]:
        """What the model carries: one row per applied batch (request ids, method, hyper-parameters,
        edits after it, update norms)."""
        return self.module.ledger.history()

    def evaluate(self, requests: Sequence[EditRequest | Mapping[str, Any]] | None = None) -> dict[str, float]:
        """Edit metrics on ``requests`` (default: everything applied so far)."""
        reqs = self.module.edit_history if requests is None else self.module.prepare_requests(_as_requests(requests))
        return self.module.evaluate(reqs)

    def save(self, path: str | Path) -> Path:
        """Export the edited weights (safetensors, only the edited tensors + metadata)."""
        return self.callback.export(self.module, path)

    def export(self, directory: str | Path, peft: bool = False, batches: int | None = None, rank: int | None = None,
               overwrite: bool = False) -> Path:
        """Write the edited model as a full ``save_pretrained`` directory (safetensors, config,
        tokenizer) plus ``edit_ledger.json`` (what it carries), loadable by
        ``AutoModelForCausalLM.from_pretrained`` and serving engines.

        ``peft=True``: write the edits instead as a PEFT LoRA adapter directory for the unedited
        base model (``PeftModel.from_pretrained(base, directory)``, vLLM ``--enable-lora``), of every
        batch or of the last ``batches``; ``rank`` truncates each layer's update by SVD (the
        relative error is in ``edit_ledger.json``'s ``lora`` section). See
        :mod:`lightning_edit.stream.peft_export`; raises :class:`~lightning_edit.stream.peft_export.PeftExportError`
        when PEFT cannot express the edits. A ``directory`` that exists and is not empty is refused
        unless ``overwrite`` (then replaced only once the new export is complete)."""
        if peft:
            name = self.module.ledger.meta.get("model")  # a path or hub id; the class name for an in-memory model
            out, _ = export_lora(self.module.adapter, self.module.ledger, directory, self.module.layers, batches, rank,
                                 base_model=None if name in (None, "None", type(self.model).__name__) else name, overwrite=overwrite)
            return out
        if batches is not None or rank is not None:
            raise ValueError("batches and rank apply to peft=True exports; a full export carries every batch (undo first)")
        return export_pretrained(self.module.lm, self.module.tokenizer, self.module.ledger, directory, overwrite=overwrite)

    def config(self) -> dict:
        return {"layers": self.module.layers, "residual": asdict(self.module.residual_cfg),
                "stats": asdict(self.callback.stats), "method": self.callback.method_name}


def load_edited(name_or_path: str, edits: str | Path, dtype: str = "float32", device: str | None = None):
    """Load a base model and apply exported edits onto it; returns ``(model, tokenizer)``."""
    model, tok = load_pretrained(name_or_path, dtype)  # type: ignore[arg-type]
    load_edits(model, edits)
    if device is not None:
        model.to(device)
    return model, tok


__all__ = ["Editor", "load_edited", "METHODS"]
