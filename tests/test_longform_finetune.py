"""The fine-tuning baseline: only the edit layers' down projections move, the answers' NLL falls,
the model's gradient flags are left as they were."""

import copy

import torch

from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.longform.chunking import ChunkingConfig, chunk_answer
from lightning_edit.longform.finetune import answer_rows, finetune_layers


def _nll(model, ids, mask, labels):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100))


def test_finetune_moves_only_the_edit_layers_and_fits_the_answers(trained_gpt2, tokenizer):
    model = copy.deepcopy(trained_gpt2).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.transformer.wte.weight.requires_grad_(True)  # a flag that must come back as it was
    ad = ModelAdapter(model)
    chunks = [chunk_answer(tokenizer, "Tell me about Danielle Darrieux.", " She plays the violin in Rome.", ChunkingConfig(window=3)),
              chunk_answer(tokenizer, "Tell me about Toko Yasuda.", " He speaks German.", ChunkingConfig(window=3))]
    ids, mask, labels = answer_rows(chunks, pad_id=0)
    assert mask[1].sum() == len(chunks[1].input_ids) < ids.shape[1]
    assert (labels[1, torch.tensor(chunks[1].answer_tokens)] == ids[1, torch.tensor(chunks[1].answer_tokens)]).all()
    assert (labels != -100).sum() == sum(len(c.answer_tokens) for c in chunks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nll0 = _nll(model, ids, mask, labels)
    out = finetune_layers(ad, chunks, [1, 2], steps=30, lr=1e-2)
    assert out["steps"] >= 1 and _nll(model, ids, mask, labels) < 0.5 * nll0
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.wte.weight"]
