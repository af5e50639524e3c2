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


def corpus_sentences(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        t = rng.choice(TEMPLATES)
        out.append(t.format(rng.choice(NAMES)) + " " + rng.choice(OBJECTS) + ".")
    return out


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
