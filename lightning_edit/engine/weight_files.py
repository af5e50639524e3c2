"""Read a Hugging Face model's safetensors files tensor by tensor, and build the model with its
parameters on the ``meta`` device: what the streamed export and the sharded loading use so that
no process ever holds the whole model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class WeightsNotStreamable(Exception):
    """The base model is not a local directory of safetensors files named like its parameters
    (so its tensors cannot be read one at a time)."""


def weight_files(directory: str | Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a Hugging Face directory's safetensors weights (one file or an
    index of shards)."""
    d = Path(directory)
    if (d / INDEX).is_file():
        index = json.loads((d / INDEX).read_text())
        return {k: d / f for k, f in index.get("weight_map", {}).items()}
    if (d / SINGLE).is_file():
        with safe_open(str(d / SINGLE), framework="pt") as f:
            return {k: d / SINGLE for k in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
    raise WeightsNotStreamable(f"{d} has no {SINGLE} or {INDEX}")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block, modules register their parameters on the ``meta`` device (no memory, no
    initialization), while buffers (rotary frequencies, masks) are computed as usual."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class TensorReader:
    """Open safetensors files, read tensor by tensor."""

    def __init__(self, files: dict[str, Path]):
        self.files, self._open = files, {}

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(name)

    def close(self) -> None:
        self._open.clear()


__all__ = ["INDEX", "SINGLE", "WeightsNotStreamable", "TensorReader", "parameters_on_meta", "set_parameter", "weight_files"]
