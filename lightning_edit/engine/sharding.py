"""Weights sharded across processes (torch's FSDP2 ``fully_shard`` over a device mesh).

Under the ``sharded_edit`` strategy (:mod:`lightning_edit.strategies`) every decoder block of the
frozen LM is wrapped by :func:`torch.distributed.fsdp.fully_shard`: each parameter becomes a
:class:`~torch.distributed.tensor.DTensor` of which a process holds one slice (``Shard(0)``,
rows), and a block's full weights exist only while that block runs (gathered by FSDP's hooks,
freed after). Editing then needs three things from the weights, all here:

* read a whole tensor (:func:`full`): a collective, every process must call it;
* add a full update to a sharded weight (:func:`add_`): each process adds exactly its slice
  (:func:`~torch.distributed.tensor.distribute_tensor` cuts the update like the weight);
* the weight's Frobenius norm (:func:`frobenius`).

On an unsharded tensor each is the plain operation, so the engine calls them unconditionally.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lightning_edit.engine.weight_files import TensorReader


def is_sharded(t) -> bool:
    """True for a :class:`~torch.distributed.tensor.DTensor` (a parameter under FSDP2)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor as a plain one (gathered from every process when sharded: a collective)."""
    return t.full_tensor() if is_sharded(t) else t


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (a full, plain tensor, the same on every process) cut like ``ref``: a DTensor with
    ``ref``'s mesh and placements when ``ref`` is sharded (each process keeps its slice), else
    ``t`` itself. Cast to ``ref``'s dtype and device."""
    t = t.to(device=ref.device, dtype=ref.dtype)
    if not is_sharded(ref):
        return t
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t, ref.device_mesh, ref.placements)


@torch.no_grad()
def add_(target: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``target += delta`` in place; ``delta`` is full and plain, ``target`` may be sharded."""
    return target.add_(like(delta, target))


def frobenius(t: torch.Tensor) -> torch.Tensor:
    """``||t||_F`` in float32 as a plain scalar tensor (reduced over the shards when sharded)."""
    n = t.detach().float().norm()
    return n.full_tensor() if is_sharded(n) else n


def shard_blocks(model: nn.Module, blocks: Sequence[nn.Module], mesh, device: torch.device | None = None) -> None:
    """Shard ``model``'s decoder ``blocks`` over ``mesh`` with FSDP2: each block is its own unit,
    its weights gathered for its forward (and backward) only. The root unit ties them together
    but holds no parameters: the embeddings, the final norm and the LM head stay whole on every
    process (``ignored_params``; for Llama-3-70B ~4 GB in bf16 out of ~140 GB), since editing
    runs forwards that stop after a block and so never end the root's forward, which is where
    FSDP would free them again. FSDP moves each block to the mesh's device as it shards it (one
    whole block there at a time); the parameters kept whole are moved to ``device`` here. Frozen
    parameters stay frozen: only the residual vectors get gradients."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}  # now their DTensors
    rest = {p for p in model.parameters() if id(p) not in in_blocks}
    fully_shard(model, mesh=mesh, ignored_params=rest)  # moves the root's buffers, not ``rest``
    if device is not None:
        with torch.no_grad():
            for p in rest:
                if p.device != device:
                    p.data = p.data.to(device)


@torch.no_grad()
def load_weights(model: nn.Module, files: dict, device: torch.device) -> None:
    """Give a model built on the ``meta`` device (``parameters_on_meta``) and then sharded by
    :func:`shard_blocks` its weights on ``device``: storage is allocated for this process's share
    only, then each parameter is read from ``files`` (``{tensor name: file}``) one at a time, and a
    sharded one keeps just its own slice (``distribute_tensor`` with no source rank: every process
    cuts its slice from its own read, nothing is sent). Buffers keep the values they were built
    with. At most one whole tensor is in memory beside the shares."""
    from torch.distributed.tensor import distribute_tensor

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    tied: dict[int, list[str]] = {}  # one parameter under several names (an LM head tied to the embeddings)
    for n, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(n)
    model.to_empty(device=device)
    for names in tied.values():  # to_empty may give each name its own tensor: tie them again
        if len(names) > 1:
            first = model.get_parameter(names[0])
            for n in names[1:]:
                mod, _, leaf = n.rpartition(".")
                (model.get_submodule(mod) if mod else model)._parameters[leaf] = first
    for n, b in model.named_buffers():
        if n in buffers:
            b.copy_(buffers[n])
    reader = TensorReader(files)
    try:
        for n, p in model.named_parameters():
            full = reader.get(n).to(device=device, dtype=p.dtype)
            if is_sharded(p):
                p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
            else:
                p.copy_(full)
            del full
    finally:
        reader.close()


def model_is_sharded(model: nn.Module) -> bool:
    """True when ``model`` was wrapped by :func:`shard_blocks` (FSDP2 makes it an
    ``FSDPModule``): a type check, cheap enough for hot paths."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(model, FSDPModule)


__all__ = ["is_sharded", "full", "like", "add_", "frobenius", "shard_blocks", "load_weights", "model_is_sharded"]
