"""The notebook API: apply, evaluate, save, load the edits onto a fresh base model."""

import copy

import pytest
import torch
from conftest import FAST_RESIDUAL, counterfactual_requests

from lightning_edit import Editor, load_edited
from lightning_edit.checkpointing import load_edits
from lightning_edit.data.requests import RequestError


def test_apply_save_and_reload(trained_gpt2, tokenizer, tiny_model_dir, corpus_file, tmp_path):
    ed = Editor.from_pretrained(str(tiny_model_dir), layers=[1, 2], method="memit", method_kwargs={"lam": 1.0},
                                residual=FAST_RESIDUAL, context_prefixes=0,
                                stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 600,
                                       "max_length": 64, "cache_dir": str(tmp_path / "stats")})
    reqs = counterfactual_requests(6)
    simple = [{"prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "target_true": r.target_true}
              for r in reqs]
    info = ed.apply(simple)
    assert set(info) >= {"z/loss", "update_norm/layer_1", "update_norm/layer_2"}
    metrics = ed.evaluate()
    assert metrics["edit/efficacy"] >= 0.8 and ed.num_edits == 6
    path = ed.save(tmp_path / "edits.safetensors")
    model, tok = load_edited(str(tiny_model_dir), path)
    for name in ("transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"):
        assert torch.equal(dict(model.named_parameters())[name], dict(ed.model.named_parameters())[name])
    # a model of another shape is refused before anything is copied
    wrong = copy.deepcopy(trained_gpt2)
    wrong.config.n_embd = 999
    with pytest.raises(ValueError, match="another config"):
        load_edits(wrong, path)


def test_bad_request_is_refused_before_any_change(trained_gpt2, tokenizer, corpus_file, tmp_path):
    model = copy.deepcopy(trained_gpt2)
    ed = Editor(model, tokenizer, layers=[1, 2], method="memit", method_kwargs={"lam": 1.0},
                stats={"corpus": str(corpus_file), "corpus_name": None, "cache_dir": str(tmp_path / "s")})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {"prompt": "{} speaks", "subject": "Toko Yasuda", "target_new": "German", "target_true": "French"}
    with pytest.raises(RequestError, match="record 1.*target_new"):
        ed.apply([good, {"prompt": "{} speaks", "subject": "Oma Greti", "target_new": " ", "target_true": "French"}])
    with pytest.raises(RequestError, match="record 0.*subject.*does not occur"):
        ed.apply([{"prompt": "She speaks", "subject": "Oma Greti", "target_new": "German", "target_true": "French"}])
    with pytest.raises(RequestError, match="record 0.*ground_truth.*missing"):  # CounterFact metrics need the truth
        ed.apply([{"prompt": "{} speaks", "subject": "Oma Greti", "target_new": "German"}])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="unknown method"):
        Editor(model, tokenizer, layers=[1], method="rome")
