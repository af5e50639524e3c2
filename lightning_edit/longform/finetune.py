"""A fine-tuning baseline for long-form edits: train the edit layers' down projections directly
on the answers' teacher-forced log-likelihood (the FT-UKE / LocFT line of work's claim is that
this is enough), to measure chunked closed-form editing against.

Plain functions on a model adapter and :class:`~lightning_edit.longform.chunking.Chunks`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.bars import progress_bar
from lightning_edit.longform.chunking import Chunks


def answer_rows(chunks: Sequence[Chunks], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)`` of prompt + answer (+ end text) per
    request, ``labels`` the token ids at the answer's positions and -100 elsewhere (the prompt,
    the padding)."""
    n = max(len(c.input_ids) for c in chunks)
    ids = torch.full((len(chunks), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), n), dtype=torch.long)
    labels = torch.full((len(chunks), n), -100, dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c.input_ids)] = torch.tensor(c.input_ids)
        mask[i, : len(c.input_ids)] = 1
        pos = torch.tensor(c.answer_tokens)
        labels[i, pos] = ids[i, pos]
    return ids, mask, labels


def finetune_layers(adapter: ModelAdapter, chunks: Sequence[Chunks], layers: Sequence[int], steps: int = 100, lr: float = 5e-4,
                    early_stop_loss: float = 0.01, pad_id: int = 0, progress: bool = False) -> dict[str, float]:
    """Adam on the down-projection weights of ``layers`` (nothing else moves) until the answers'
    mean token NLL is below ``early_stop_loss`` or ``steps`` are done; every request in one
    batch. Returns ``{"steps", "loss"}`` (the last step's mean NLL, nats per answer token)."""
    model = adapter.model
    params = [adapter.down_proj(l).weight for l in sorted(layers)]
    flags = {p: p.requires_grad for p in model.parameters()}
    device = params[0].device
    ids, mask, labels = (t.to(device) for t in answer_rows(chunks, pad_id))
    was_training = model.training
    loss_value, done = float("nan"), 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()  # no dropout: the same forward the edited model is judged by
        opt = torch.optim.Adam(params, lr=lr)
        with progress_bar("fine-tuning baseline", steps, "step", enabled=progress) as bar:
            for done in range(1, steps + 1):
                opt.zero_grad(set_to_none=True)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
                loss_value = float(loss.detach())
                bar.update(1)
                if loss_value < early_stop_loss:
                    break
                loss.backward()
                opt.step()
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return {"steps": done, "loss": loss_value}
