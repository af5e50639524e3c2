"""Tiny offline models and tokenizers for tests: built from config, never downloaded."""

from __future__ import annotations

import random

import pytest
import torch

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


def corpus_sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    world = facts()
    return [t.format(name) + " " + obj + "." for t, name, obj in (rng.choice(world) for _ in range(n))]


def make_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus_sentences(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def make_model(arch: str, vocab_size: int, n_layer: int = 4, width: int = 48, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig,
                              LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM)

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


@pytest.fixture(scope="session")
def trained_gpt2(tokenizer):
    return train_tiny("gpt2", tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, trained_gpt2):
    d = tmp_path_factory.mktemp("tiny_model")
    trained_gpt2.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    import json

    p = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(p, "w") as f:
        for s in corpus_sentences(600, seed=1):
            f.write(json.dumps({"text": s}) + "\n")
    return p
