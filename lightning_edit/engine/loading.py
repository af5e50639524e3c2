"""Loading a causal LM and its tokenizer: hub ids, local directories, built-in resource names
(``factworld:...``, ``smollm2:...``) and GGUF files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lightning_edit.engine.weight_files import (
    WeightsNotStreamable,
    parameters_on_meta,
    weight_files,
)
from lightning_edit.errors import (
    DependencyError,
    InputError,
    MissingFileError,
    require_local_path,
)
from lightning_edit.resources import resolve

DType = Literal["float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

GGUF_INSTALL = "pip install gguf accelerate   (or: pip install 'lightning-edit[gguf]')"


def split_gguf(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)``: a path to a ``.gguf`` file is split into
    its directory and name; ``gguf_file`` names the file inside ``name_or_path``."""
    if gguf_file:
        return name_or_path, gguf_file
    if isinstance(name_or_path, str) and name_or_path.lower().endswith(".gguf"):
        p = Path(name_or_path)
        if not p.is_file():
            raise MissingFileError(f"GGUF file {name_or_path!r} not found")
        return str(p.parent), p.name
    return name_or_path, None


def require_gguf(what: str) -> None:
    """Raise a :class:`~lightning_edit.errors.DependencyError` (an ``ImportError``) naming the pip
    command when GGUF support is not installed."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(f"loading {what} needs the optional package(s) {', '.join(missing)}: {GGUF_INSTALL}")


def load_pretrained(name_or_path: str, dtype: DType = "float32", trust_remote_code: bool = False, tokenizer: str | None = None,
                    gguf_file: str | None = None):
    """Load a causal LM and its (fast) tokenizer from a hub id, a local directory, a built-in
    resource name (``factworld:...``, ``smollm2:...``) or a GGUF file (a ``.gguf`` path, or a
    directory plus ``gguf_file``; dequantized to ``dtype`` by transformers)."""
    if dtype not in DTYPES:
        raise InputError(f"model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    name_or_path, gguf_file = split_gguf(resolve(name_or_path), gguf_file)
    tokenizer = resolve(tokenizer) if tokenizer else None
    kw = {}
    if gguf_file:
        require_gguf(f"GGUF file {gguf_file!r}")
        kw["gguf_file"] = gguf_file
    model = _from_pretrained(AutoModelForCausalLM, name_or_path, "model", dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kw)
    return model, load_tokenizer(name_or_path, trust_remote_code, tokenizer, gguf_file)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, tokenizer: str | None = None, gguf_file: str | None = None):
    """The (fast) tokenizer :func:`load_pretrained` gives with the model: ``tokenizer`` when set,
    else the model's own; its pad token is the end-of-sequence token when it has none."""
    name_or_path, gguf_file = split_gguf(resolve(name_or_path), gguf_file)
    tokenizer = resolve(tokenizer) if tokenizer else None
    if tokenizer:
        tok_name, tok_kw = split_gguf(tokenizer)
        tok = _from_pretrained(AutoTokenizer, tok_name, "tokenizer", trust_remote_code=trust_remote_code,
                               **({"gguf_file": tok_kw} if tok_kw else {}))
    else:
        tok = _from_pretrained(AutoTokenizer, name_or_path, "tokenizer", trust_remote_code=trust_remote_code,
                               **({"gguf_file": gguf_file} if gguf_file else {}))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(auto_class, name: str, what: str, **kwargs):
    """``auto_class.from_pretrained(name)``; a name that looks like a local path but does not exist,
    or that is no local path and fails to load from the hub (transformers' message does not name
    it), raises :class:`~lightning_edit.errors.MissingFileError` naming it."""
    require_local_path(name, what)
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as err:
        if not isinstance(name, str) or Path(name).expanduser().exists():
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MissingFileError(f"{what} {name!r} is not a local directory, and loading it from the Hugging Face hub "
                               f"failed ({first})") from err


def portable_config(cfg: dict) -> dict:
    """A ``config.json`` written by transformers 5 made readable, unchanged in meaning, by the
    transformers 4 releases this package supports: transformers 5 keeps the rotary settings only
    in ``rope_parameters``, which transformers 4 ignores (it would fall back to ``rope_theta``
    10,000 and unscaled rotary embeddings, and compute other logits without a word). The legacy
    keys ``rope_theta`` and ``rope_scaling`` are added beside it; transformers 5 reads both forms
    alike. A config without ``rope_parameters`` (or with per-attention-type parameters, which
    both versions keep in their own keys) is returned as it is."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" not in params:
        return cfg
    out = dict(cfg)
    out.setdefault("rope_theta", params["rope_theta"])
    if params.get("rope_type", "default") != "default" and out.get("rope_scaling") is None:
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def _local_weights(name_or_path: str) -> tuple[str, dict]:
    """``(directory, {tensor name: file})`` of a local directory of safetensors weights; raises
    :class:`~lightning_edit.engine.weight_files.WeightsNotStreamable` for anything else."""
    name, gguf = split_gguf(resolve(name_or_path), None)
    if gguf or not Path(name).is_dir():
        raise WeightsNotStreamable(f"the model {name_or_path!r} is not a local directory of safetensors files")
    return name, weight_files(name)


def load_skeleton(name_or_path: str, dtype: DType = "float32", trust_remote_code: bool = False, tokenizer: str | None = None):
    """The model of a local directory of safetensors files with every parameter on the ``meta``
    device (buffers computed as usual), its tokenizer and ``{tensor name: file}``: each process
    then reads only the tensors it keeps (:class:`~lightning_edit.engine.weight_files.TensorReader`).
    Raises :class:`~lightning_edit.engine.weight_files.WeightsNotStreamable` for other models."""
    if dtype not in DTYPES:
        raise InputError(f"model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    name, files = _local_weights(name_or_path)
    cfg = _from_pretrained(AutoConfig, name, "model config", trust_remote_code=trust_remote_code)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code, dtype=DTYPES[dtype])
    missing = [n for n, _ in model.named_parameters() if n not in files]
    if missing:
        raise WeightsNotStreamable(f"the files of {name_or_path!r} name their tensors otherwise ({missing[0]!r} is not among them)")
    model.config._name_or_path = name
    return model, load_tokenizer(name_or_path, trust_remote_code, tokenizer), files


def complete_export(directory: Path, tokenizer, ledger_summary: dict) -> None:
    """Finish an export directory whose weights and ``config.json`` are written: the config
    rewritten readable by transformers 4 as well (:func:`portable_config`), the tokenizer, and
    ``edit_ledger.json`` (what the model carries)."""
    config = Path(directory) / "config.json"
    if config.is_file():
        config.write_text(json.dumps(portable_config(json.loads(config.read_text())), indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    (Path(directory) / "edit_ledger.json").write_text(json.dumps(ledger_summary, indent=1))
