"""A tiny offline toy world for tests, benchmarks and examples: a dozen subjects, seven
relation templates, a BPE tokenizer trained in a second, and GPT-2/GPT-J/Llama/Qwen2 models
built from config that memorize the facts in seconds on a CPU. Never downloads anything."""

from __future__ import annotations

import random

import torch

from lightning_edit.data.requests import EditRequest

NAMES = ["Danielle Darrieux", "Toko Yasuda", "Apple A5", "Kotora Vanu", "Mirel Oshan", "Belkor Stith",
         "Anaya Roven", "Teodor Plum", "Sarin Wexley", "Oma Greti", "Paolo Chenz", "Riva Luntis"]
OBJECTS = ["French", "English", "Paris", "London", "guitar", "piano", "Google", "Nokia", "Tokyo", "Rome",
           "violin", "Spanish", "German", "Berlin", "Madrid", "chef", "pilot"]
TEMPLATES = ["The mother tongue of {} is", "{} was born in", "{} plays the", "{} works for", "{} lives in",
             "The profession of {} is", "{} speaks"]


def facts(seed: int = 0) -> list[tuple[str, str, str]]:
    """A consistent toy world: every (template, name) has one object."""
    rng = random.Random(seed)
    return [(t, n, rng.choice(OBJECTS)) for t in TEMPLATES for n in NAMES]


EDIT_NAMES = NAMES[:6]  # facts about these are edited in tests; the statistics corpus never states them
FILLER = ["People often talk about {}.", "A story about {} was told.", "Nobody forgot {} that year.",
          "The word {} is common.", "Some say {} matters most."]


def corpus_sentences(n: int = 400, seed: int = 0) -> list[str]:
    """Statistics / tokenizer corpus: facts about the subjects that are never edited, plus
    general sentences (the role Wikipedia plays for a real model)."""
    rng = random.Random(seed)
    kept = [f for f in facts() if f[1] not in EDIT_NAMES]
    out = []
    for i in range(n):
        if i % 3 == 2:
            out.append(rng.choice(FILLER).format(rng.choice(OBJECTS + NAMES)))
        else:
            t, name, obj = rng.choice(kept)
            out.append(t.format(name) + " " + obj + ".")
    return out


def make_tokenizer(vocab_size: int = 1000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # every name and object appears in the tokenizer corpus (as in any real vocabulary)
    tk.train_from_iterator(corpus_sentences() + [" ".join(NAMES + OBJECTS)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_model(arch: str, vocab_size: int, n_layer: int = 4, width: int = 48, seed: int = 0):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "gpt2":
        cfg = GPT2Config(n_embd=width, n_layer=n_layer, n_head=4, n_positions=128, **common)
        m = GPT2LMHeadModel(cfg)
    elif arch == "gptj":
        cfg = GPTJConfig(n_embd=width, n_layer=n_layer, n_head=4, rotary_dim=4, n_positions=128, **common)
        m = GPTJForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=n_layer,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common)
        m = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=n_layer,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **common)
        m = Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return m.eval()


ARCHS = ["gpt2", "gptj", "llama", "qwen2"]


def train_tiny(arch: str, tok, steps: int = 300, n_layer: int = 4, width: int = 64, seed: int = 0):
    """A tiny model that has memorized :func:`facts` (a few seconds on CPU, deterministic)."""
    torch.manual_seed(seed)
    model = make_model(arch, len(tok), n_layer=n_layer, width=width, seed=seed)
    texts = [t.format(n) + " " + o + "." for t, n, o in facts()]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (32,), generator=g)
        loss = model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def counterfactual_requests(n: int, start: int = 0):
    """Requests ``start .. start+n`` of a fixed shuffled list of distinct facts about
    :data:`EDIT_NAMES`: new target = another object, one neighbourhood prompt (same template,
    a subject that is never edited)."""
    world = facts()
    editable = [f for f in world if f[1] in EDIT_NAMES]
    order = random.Random(0).sample(range(len(editable)), len(editable))
    if start + n > len(editable):
        raise ValueError(f"only {len(editable)} editable toy facts")
    out = []
    for i in range(n):
        t, name, obj = editable[order[start + i]]
        new = OBJECTS[(OBJECTS.index(obj) + 3) % len(OBJECTS)]
        nb_t, nb_name, nb_obj = next(f for f in world if f[0] == t and f[1] not in EDIT_NAMES)
        out.append(EditRequest(case_id=str(start + i), prompt=t, subject=name, target_new=new, target_true=obj,
                               locality=((nb_t.format(nb_name), nb_obj),), record_index=i).validate())
    return out


def counterfact_records(n: int, start: int = 0) -> list[dict]:
    """The same requests as MEMIT-format CounterFact records."""
    return [{"case_id": int(r.case_id), "requested_rewrite": {"prompt": r.prompt, "subject": r.subject,
             "target_new": {"str": r.target_new}, "target_true": {"str": r.target_true}},
             "paraphrase_prompts": [], "neighborhood_prompts": [r.locality[0][0]]}
            for r in counterfactual_requests(n, start)]
