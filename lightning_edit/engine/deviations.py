"""Keys under the model's own slips: extra rows for a long-form update.

A chunked (AnyEdit) update is solved for the teacher-forced keys at each chunk's anchor. Once free
generation writes one token the target does not have, every later anchor's key differs from
those and the write may not fire there (:mod:`lightning_edit.longform.diagnostics` measures how
much). Deviation rows ask the update to write each chunk's residual also at its anchor's key in a
copy of the text where the model has slipped before it: in every chunk before the anchor, one
target token (at a seeded random position) is replaced by the model's most likely other token
there, the slip it is most likely to make. Substitutions keep the length, so anchors stay at
their positions; the rows are read from the same bare rows the update already uses.

Plain tensor functions; :func:`lightning_edit.engine.update.apply_update` takes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.residuals import ResidualBatch


@dataclass
class Deviations:
    """Slipped copies of a batch's bare long-form rows and where to read their keys.

    Attributes:
        input_ids, attention_mask: ``(copies x requests, seq)``.
        read_row, read_pos, read_chunk: ``(m,)`` each: for every anchor after at least one slip,
            its row in ``input_ids``, its position, and the chunk whose residual it is asked for.
        swapped: ``(copies x requests, seq)`` bool, the substituted positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    read_row: torch.Tensor
    read_pos: torch.Tensor
    read_chunk: torch.Tensor
    swapped: torch.Tensor

    def __len__(self) -> int:
        return int(self.read_row.numel())


@torch.no_grad()
def make_deviations(adapter: ModelAdapter, batch: ResidualBatch, copies: int, seed: int = 0) -> Deviations | None:
    """``copies`` slipped copies of each request's bare row (see the module's text), from one
    teacher-forced forward of the model as it is now. ``None`` when ``copies`` is 0 or no
    request has two chunks."""
    if copies <= 0:
        return None
    device = next(adapter.model.parameters()).device
    rows = batch.bare_row_of_chunk.unique()  # one per request, in request order
    ids = batch.enc.input_ids[rows]
    mask = batch.enc.attention_mask[rows]
    # the most likely token other than the target at every position (predicted from the one
    # before), a row at a time: one row's logits are (seq, vocab)
    other = ids.clone()
    for i in range(len(rows)):
        n = int(mask[i].sum())
        logits = adapter.model(input_ids=ids[i : i + 1, :n].to(device), use_cache=False).logits[0, :-1].float()
        logits.scatter_(-1, ids[i, 1:n].to(device).unsqueeze(-1), float("-inf"))
        other[i, 1:n] = logits.argmax(-1).cpu()
    # each chunk's target positions, its anchor and its row, from the batch's own layout
    t_rows, t_pos, t_chunk = batch.target_chunks()
    a_rows, a_pos, a_chunk = batch.anchors()
    local = {int(r): i for i, r in enumerate(rows.tolist())}
    gen = torch.Generator().manual_seed(int(seed))
    out_ids, swapped, rr, rp, rc = [], [], [], [], []
    for j in range(copies):
        new = ids.clone()
        sw = torch.zeros_like(ids, dtype=torch.bool)
        for r_abs, i in local.items():
            on_row = a_rows == r_abs
            chunks = a_chunk[on_row].tolist()
            anchors = dict(zip(chunks, a_pos[on_row].tolist()))
            for c in sorted(chunks)[:-1]:  # a slip in every chunk that has a next anchor after it
                pos = t_pos[(t_rows == r_abs) & (t_chunk == c)]
                p = int(pos[torch.randint(len(pos), (1,), generator=gen)])
                new[i, p] = other[i, p]
                sw[i, p] = True
            for c in sorted(chunks)[1:]:
                rr.append(j * len(rows) + i)
                rp.append(anchors[c])
                rc.append(c)
        out_ids.append(new)
        swapped.append(sw)
    if not rr:
        return None
    return Deviations(torch.cat(out_ids), mask.repeat(copies, 1), torch.tensor(rr), torch.tensor(rp), torch.tensor(rc),
                      torch.cat(swapped))


@torch.no_grad()
def deviation_keys(adapter: ModelAdapter, dev: Deviations, layer: int) -> torch.Tensor:
    """Keys of ``layer`` at the deviations' read positions on the model as it is now, ``(m, d_k)``;
    one forward over the slipped rows, stopped after ``layer``."""
    device = next(adapter.model.parameters()).device
    width = int(dev.read_pos.max()) + 1  # causal: nothing after the last read position matters
    with adapter.trace(key_layers=[layer], stop_after=layer) as rec:
        adapter.forward(dev.input_ids[:, :width].to(device), dev.attention_mask[:, :width].to(device))
    return rec["keys"][layer][dev.read_row.to(device), dev.read_pos.to(device)].float()
