"""Export an edited model without loading it whole: the base model's safetensors files, file by
file, with the edited tensors replaced.

``lightning-edit export`` loads the base model, replays the ledger and calls ``save_pretrained``:
the whole model in host memory (140 GB for Llama-3-70B in bf16). An edit changes few tensors (the
edit layers' down projections; UnKE's edit blocks), so this module builds the model's skeleton
(parameters on the ``meta`` device, buffers real), reads only the tensors the ledger changes,
replays the ledger on them with the same additions as a live run (:meth:`EditLedger.replay`,
float32 masters included), and writes the export one base file at a time: peak memory is the
edited tensors plus one file, and every base tensor is read once. The base model's identity is
checked from the same reads: its fingerprint (:func:`~lightning_edit.engine.files.full_model_fingerprint`)
is computed tensor by tensor, with the skeleton's buffers, before the export is put in place.

The result equals the in-memory export tensor for tensor (tests/test_streamed_export.py). It
needs a local Hugging Face directory of safetensors files whose tensor names are the model's
parameter names; otherwise :class:`WeightsNotStreamable` says why and the caller falls back
to the in-memory export.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.files import (
    config_fingerprint,
    finish_export_dir,
    new_export_dir,
    short_hash,
    tensor_fingerprint,
)
from lightning_edit.engine.loading import complete_export, load_skeleton
from lightning_edit.engine.update import master_copies
from lightning_edit.engine.weight_files import (
    INDEX,
    TensorReader,
    set_parameter,
)
from lightning_edit.errors import CheckpointError
from lightning_edit.stream.ledger import EditLedger


def export_streamed(ledger: EditLedger, out: str | Path, tokenizer=None, trust_remote_code: bool = False,
                    overwrite: bool = False, expected_fingerprint: str | None = None) -> Path:
    """Write the edited model of ``ledger`` to ``out`` as :func:`~lightning_edit.checkpointing.export_pretrained`
    does, reading the base model's files one tensor at a time (see the module docstring).
    ``expected_fingerprint``: the base model's fingerprint recorded in the checkpoint, computed
    from the same single read of every tensor; a base model that differs is refused before the
    export is put at ``out`` (its temporary directory is removed)."""
    m = ledger.meta
    model, tok, files = load_skeleton(m["model"], m.get("dtype", "float32"), trust_remote_code, m.get("tokenizer"))
    tokenizer = tok if tokenizer is None else tokenizer
    name = model.config._name_or_path  # the base model's directory
    model.eval()
    params = dict(model.named_parameters())
    reader = TensorReader(files)
    try:
        fingerprints: dict[str, str] = {}  # of the base tensors, as full_model_fingerprint takes them (one read each)
        adapter = ModelAdapter(model, m.get("layer_template"), m.get("mlp_down_template"))
        layers = [int(l) for l in m["layers"]]
        edited = [adapter.weight_name(l) for l in layers] + [n for n in ledger.dense_names() if n not in
                                                               {adapter.weight_name(l) for l in layers}]
        with torch.no_grad():
            for n in edited:
                set_parameter(model, n, reader.get(n).to(params[n].dtype))
                fingerprints[n] = tensor_fingerprint(model.get_parameter(n))
            base = {l: adapter.weight_as_linear(l).detach().clone() for l in layers}
            ledger.replay(adapter, layers, base, master_copies(adapter, layers))
        now = dict(model.named_parameters())
        values = {n: now[n].detach() for n in edited}
        dtypes = {n: p.dtype for n, p in now.items()}
        tmp = new_export_dir(out, overwrite)
        try:
            by_file: dict[Path, list[str]] = {}
            for k, f in files.items():
                by_file.setdefault(f, []).append(k)
            total = 0
            for f, keys in by_file.items():  # one base file in memory at a time
                tensors = {}
                for k in keys:
                    t = values[k] if k in values else reader.get(k)
                    if k in dtypes and t.is_floating_point():
                        t = t.to(dtypes[k])
                    if k in params and k not in values:
                        fingerprints[k] = tensor_fingerprint(t)
                    tensors[k] = t.contiguous()
                    total += t.numel() * t.element_size()
                save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
                del tensors
            if (Path(name) / INDEX).is_file():
                index = json.loads((Path(name) / INDEX).read_text())
                index.setdefault("metadata", {})["total_size"] = total
                (tmp / INDEX).write_text(json.dumps(index, indent=2))
            model.config.save_pretrained(str(tmp))
            gen = Path(name) / "generation_config.json"
            if gen.is_file():
                shutil.copyfile(gen, tmp / gen.name)
            complete_export(tmp, tokenizer, ledger.summary())
            if expected_fingerprint is not None:  # full_model_fingerprint, from the reads above
                parts: list = [config_fingerprint(model)]
                for n in params:
                    parts += [n, fingerprints[n]]
                for n, b in model.named_buffers():
                    parts += [n, tensor_fingerprint(b)]
                if short_hash(*parts) != expected_fingerprint:
                    raise CheckpointError(f"the checkpoint was made on another base model than {m['model']!r} (model fingerprint "
                                          "differs); nothing was exported")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        reader.close()
    return finish_export_dir(tmp, out)
