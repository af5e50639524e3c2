"""MEMIT's context prefixes: short texts sampled from the unedited model, prepended to the edit
prompts so an edit holds in context, not only at the start of a text."""

from __future__ import annotations

import torch
from torch import nn

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def generate_prefixes(model: nn.Module, tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """MEMIT's context prefixes: ``n`` short texts sampled (top-5) from the unedited model from
    the starts "The", "Therefore", ..., each followed by ". ". Seeded, no global RNG state."""
    if n <= 0:
        return []
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for i in range(n):
        ids = tokenizer(PREFIX_STARTS[i % len(PREFIX_STARTS)], return_tensors="pt")["input_ids"].to(device)
        for _ in range(length):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            top = logits.topk(min(5, logits.numel()))
            probs = torch.softmax(top.values, -1).cpu()
            nxt = top.indices[torch.multinomial(probs, 1, generator=gen).to(device)]
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        text = tokenizer.decode(ids[0], skip_special_tokens=True)
        out.append(text.replace("{", " ").replace("}", " ") + ". ")
    return out
