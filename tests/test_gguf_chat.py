"""GGUF models through ``--model.model`` (a tiny GGUF file written here, never downloaded) and
chat-template prompts for instruct models."""

import pytest
import torch

pytest.importorskip("gguf")

from conftest import counterfactual_requests, make_model, make_tokenizer
from lightning_edit.chat import chat_prompt, wrap_request
from lightning_edit.module import EditModule, load_pretrained
from tiny_gguf import CHAT_TEMPLATE, write_tiny_llama_gguf


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, chat_tokenizer):
    model = make_model("llama", len(chat_tokenizer), n_layer=2, width=32)
    path = write_tiny_llama_gguf(model, chat_tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.Q.gguf")
    return model, path


def _logits(model, tok, text="Paris is the capital of"):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


@pytest.mark.parametrize("how", ["file", "dir+gguf_file"])
def test_gguf_loads_with_the_original_weights_and_tokenizer(tiny_gguf, chat_tokenizer, how):
    original, path = tiny_gguf
    args = (str(path),) if how == "file" else (str(path.parent),)
    kw = {} if how == "file" else {"gguf_file": path.name}
    model, tok = load_pretrained(*args, **kw)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    text = "Paris is the capital of"
    assert tok(text)["input_ids"] == chat_tokenizer(text)["input_ids"]
    torch.testing.assert_close(_logits(model, tok, text), _logits(original, chat_tokenizer, text), rtol=0, atol=1e-5)
    assert tok.chat_template  # carried over from the file


def test_edit_module_takes_a_gguf_path(tiny_gguf):
    _, path = tiny_gguf
    module = EditModule(model=str(path), layers=[0, 1], context_prefixes=0)
    assert module.adapter.n_layers == 2


def test_missing_gguf_file_and_missing_package_say_what_to_do(tiny_gguf, monkeypatch, tmp_path):
    import importlib.util

    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        load_pretrained(str(tmp_path / "nothere.gguf"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install gguf accelerate"):
        load_pretrained(str(tiny_gguf[1]))


def test_chat_template_wraps_every_prompt_and_keeps_the_subject_slot(chat_tokenizer):
    req = counterfactual_requests(1)[0]
    wrapped = wrap_request(chat_tokenizer, req)
    assert wrapped.prompt.startswith("<|im_start|>user\n") and wrapped.prompt.endswith("<|im_start|>assistant\n")
    assert wrapped.prompt.count("{}") == 1 and req.prompt in wrapped.prompt
    assert wrapped.rendered_prompt.count(req.subject) >= 1
    assert all(p.endswith("assistant\n") for p in wrapped.paraphrase_prompts)
    assert [a for _, a in wrapped.locality] == [a for _, a in req.locality]
    assert all(p.startswith("<|im_start|>user\n") for p, _ in wrapped.locality)
    assert wrap_request(chat_tokenizer, wrapped) is wrapped  # idempotent
    from lightning_edit.data.requests import target_text

    assert target_text(wrapped.rendered_prompt, "Paris") == "Paris"  # no space after the newline


def test_chat_template_on_a_base_tokenizer_is_a_clear_error():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(tok, "Where is Paris?")


def test_module_evaluates_chat_wrapped_requests(tiny_gguf):
    _, path = tiny_gguf
    module = EditModule(model=str(path), layers=[0, 1], context_prefixes=0, chat_template=True)
    reqs = module.prepare_requests(counterfactual_requests(3))
    assert all(r.prompt.startswith("<|im_start|>") for r in reqs)
    out = module.evaluate(reqs)
    assert 0.0 <= out["edit/efficacy"] <= 1.0
