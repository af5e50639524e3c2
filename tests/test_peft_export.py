"""The edit ledger as a PEFT LoRA adapter (`lightning-edit export --peft`, `Editor.export(peft=True)`).

Tolerances: the edited model adds each batch's ``U_i V_i`` to its weights one batch after another
(float32); the adapter's ``B A`` sums the same products in one matmul (another summation order),
and PEFT's unmerged forward computes ``x W^T + (x A^T) B^T`` apart. Each differs from the edited
weights by float32 rounding (~1e-7 of |W|); through the 4-layer tiny models that moves logits of
magnitude ~10 by ~1e-5 (measured: 2e-6). ``ATOL = 1e-4`` is far below the edits' own effect on
the logits (asserted > 0.1 in every test, so no check passes by the edits being no-ops).
"""

import copy
import json

import pytest
import torch
from conftest import FAST_RESIDUAL, cli_args, counterfact_records, counterfactual_requests, make_model, train_tiny

from lightning_edit import Editor
from lightning_edit.cli import main
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.stream.ledger import BatchRecord, EditLedger
from lightning_edit.stream.peft_export import PeftExportError, export_lora, truncate_rank

peft = pytest.importorskip("peft")

ATOL = 1e-4
PROMPTS = ["The mother tongue of Danielle Darrieux is", "Toko Yasuda plays the", "Apple A5 works for", "Mirel Oshan lives in"]


@pytest.fixture(scope="module")
def trained_llama(tokenizer):
    return train_tiny("llama", tokenizer, steps=100)


def _logits(model, tok):
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits.float()


def _editor(model, tok, corpus_file, tmp_path):
    return Editor(model, tok, layers=[1, 2], method="alphaedit",
                  method_kwargs={"l2": 1.0, "nullspace_threshold": 0.05, "threshold_mode": "energy"},
                  residual={**FAST_RESIDUAL, "steps": 8}, context_prefixes=0,
                  stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 300, "max_length": 64,
                         "cache_dir": str(tmp_path / "stats")})


def _delta(directory, name):
    from safetensors.torch import load_file

    t = load_file(str(directory / "adapter_model.safetensors"))
    return t[f"base_model.model.{name}.lora_B.weight"].double() @ t[f"base_model.model.{name}.lora_A.weight"].double()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_adapter_on_the_base_model_gives_the_edited_model(arch, trained_gpt2, trained_llama, tokenizer, corpus_file, tmp_path):
    base = trained_gpt2 if arch == "gpt2" else trained_llama
    down = "transformer.h.{}.mlp.c_proj" if arch == "gpt2" else "model.layers.{}.mlp.down_proj"
    ed = _editor(copy.deepcopy(base), tokenizer, corpus_file, tmp_path)
    reqs = counterfactual_requests(5)
    ed.apply(reqs[:2])
    ed.apply(reqs[2:])
    out = ed.export(tmp_path / "lora", peft=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    names = [down.format(l) for l in (1, 2)]
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["target_modules"] == names
    assert cfg["r"] == 5 and cfg["lora_alpha"] == 5 and not cfg["use_rslora"]  # 2 + 3 edits per layer, scaling 1
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")  # Conv1D stores (d_in, d_out)
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert all(t.dtype == torch.float32 for t in tensors.values())
    d_k = 256 if arch == "gpt2" else 128  # tiny models: width 64, GPT-2 MLP 4x, Llama 2x
    assert tensors[f"base_model.model.{names[0]}.lora_A.weight"].shape == (5, d_k)  # (r, d_k), also for Conv1D
    assert tensors[f"base_model.model.{names[0]}.lora_B.weight"].shape == (64, 5)  # (d_model, r)

    edited = _logits(ed.model, tokenizer)
    assert (edited - _logits(base, tokenizer)).abs().max() > 0.1
    unmerged = peft.PeftModel.from_pretrained(copy.deepcopy(base), out)
    torch.testing.assert_close(_logits(unmerged, tokenizer), edited, atol=ATOL, rtol=0)
    merged = unmerged.merge_and_unload()
    torch.testing.assert_close(_logits(merged, tokenizer), edited, atol=ATOL, rtol=0)
    mine, theirs = dict(ed.model.named_parameters()), dict(merged.named_parameters())
    for n in names:
        torch.testing.assert_close(theirs[n + ".weight"], mine[n + ".weight"], atol=1e-6, rtol=0)

    # --rank at full rank: the SVD path keeps every direction (error at float rounding)
    full = ed.export(tmp_path / "full_rank", peft=True, rank=5)
    lora = json.loads((full / "edit_ledger.json").read_text())["lora"]
    assert lora["r"] == 5 and all(v["relative_error"] < 1e-6 for v in lora["layers"].values())
    for n in names:
        torch.testing.assert_close(_delta(full, n), _delta(out, n), atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), full), tokenizer), edited, atol=ATOL, rtol=0)

    # truncated: the reported error is the one the adapter carries (measured here on the product)
    cut = ed.export(tmp_path / "rank2", peft=True, rank=2)
    lora = json.loads((cut / "edit_ledger.json").read_text())["lora"]
    assert json.loads((cut / "adapter_config.json").read_text())["r"] == 2 and lora["truncated_to"] == 2
    for l, n in zip((1, 2), names):
        exact = _delta(out, n)
        err = float((_delta(cut, n) - exact).norm() / exact.norm())
        assert 1e-3 < err < 1 and lora["layers"][str(l)]["relative_error"] == pytest.approx(err, rel=1e-4)
        # no rank-2 matrix is closer (Eckart-Young): compare with the SVD of the dense product
        s = torch.linalg.svdvals(exact)
        assert err == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)


def test_bf16_model_adapter_holds_the_float32_master_delta(trained_gpt2, tokenizer, corpus_file, tmp_path):
    base = copy.deepcopy(trained_gpt2).to(torch.bfloat16)
    ed = _editor(copy.deepcopy(base), tokenizer, corpus_file, tmp_path)
    ed.apply(counterfactual_requests(4))
    out = ed.export(tmp_path / "lora", peft=True)
    with pytest.raises(ValueError, match="batches and rank apply to peft=True exports"):
        ed.export(tmp_path / "x", batches=1)
    for l in (1, 2):
        name = f"transformer.h.{l}.mlp.c_proj"
        master_delta = ed.stream.master[l].double() - base.transformer.h[l].mlp.c_proj.weight.T.double()
        # the exact float32 delta, not its bf16 rounding (which would be ~1e-3 off)
        torch.testing.assert_close(_delta(out, name), master_delta, atol=1e-6, rtol=0)
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).merge_and_unload()
    for l in (1, 2):
        w, ref = merged.transformer.h[l].mlp.c_proj.weight, ed.model.transformer.h[l].mlp.c_proj.weight
        assert w.dtype == torch.bfloat16
        diff = (w.float() - ref.float()).abs()
        # PEFT adds the float32 delta in place into the bf16 weight: one rounding, as the master's
        # write-back (measured: bit-identical); allow 1 ulp on rare entries
        assert bool((diff <= ref.float().abs() * 2.0 ** -7).all()) and float((diff > 0).float().mean()) < 0.01


def test_layers_with_different_ranks_share_one_r_by_zero_padding(tokenizer, tmp_path):
    """PEFT and vLLM take one ``r`` (vLLM reads no rank_pattern): a layer with fewer update rows
    is padded with zeros; the product, and so the model, is unchanged."""
    base = make_model("llama", len(tokenizer), width=32)
    edited = copy.deepcopy(base)
    ad = ModelAdapter(edited)
    g = torch.Generator().manual_seed(0)
    ledger = EditLedger(meta={"layers": [0, 2]})
    for i, (n0, n2) in enumerate([(1, 3), (2, 4)]):  # layer 0 gets rank 3, layer 2 rank 7
        t = {"u.0": torch.randn(32, n0, generator=g) * 0.1, "v.0": torch.randn(n0, 64, generator=g),
             "u.2": torch.randn(32, n2, generator=g) * 0.1, "v.2": torch.randn(n2, 64, generator=g)}
        ledger.append(BatchRecord(index=i, request_ids=[str(i)], method="memit", hparams={}, tensors=t))
        for l in (0, 2):
            ad.add_to_weight(l, t[f"u.{l}"] @ t[f"v.{l}"])
    out, lora = export_lora(ModelAdapter(base), ledger, tmp_path / "lora")
    assert lora["r"] == 7 and lora["layers"]["0"]["rank"] == 3 and lora["layers"]["2"]["rank"] == 7
    from safetensors.torch import load_file

    a0 = load_file(str(out / "adapter_model.safetensors"))["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"]
    assert a0.shape == (7, 64) and bool((a0[3:] == 0).all())
    ref = _logits(edited, tokenizer)
    assert (ref - _logits(base, tokenizer)).abs().max() > 0.1
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), out), tokenizer), ref, atol=ATOL, rtol=0)
    # --rank below one layer's rank: that layer is truncated, the other kept whole (zero error)
    _, lora = export_lora(ModelAdapter(base), ledger, tmp_path / "r4", rank=4)
    assert lora["r"] == 4 and lora["layers"]["0"]["relative_error"] < 1e-6 and lora["layers"]["2"]["relative_error"] > 1e-3


def test_what_peft_cannot_express_is_refused_by_name(tokenizer, tmp_path):
    from torch import nn

    class Projection(nn.Module):  # a down projection that is neither nn.Linear nor Conv1D
        def __init__(self, lin):
            super().__init__()
            self.weight = lin.weight

        def forward(self, x):
            return x @ self.weight.T

    model = make_model("llama", len(tokenizer), width=32)
    ledger = EditLedger(meta={"layers": [1]})
    with pytest.raises(PeftExportError, match="nothing to export.*no applied batch"):
        export_lora(ModelAdapter(model), ledger, tmp_path / "x")
    ledger.append(BatchRecord(index=0, request_ids=["0"], method="memit", hparams={},
                              tensors={"u.1": torch.ones(32, 1), "v.1": torch.ones(1, 64)}))
    with pytest.raises(PeftExportError, match="--batches 2: choose 1..1"):
        export_lora(ModelAdapter(model), ledger, tmp_path / "x", batches=2)
    with pytest.raises(PeftExportError, match="--rank must be >= 1"):
        export_lora(ModelAdapter(model), ledger, tmp_path / "x", rank=0)
    model.model.layers[1].mlp.down_proj = Projection(model.model.layers[1].mlp.down_proj)
    with pytest.raises(PeftExportError, match="'model.layers.1.mlp.down_proj' as a PEFT LoRA: it is a Projection"):
        export_lora(ModelAdapter(model), ledger, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(PeftExportError, match="layer 1: ledger factors"):  # factors of another model's shape
        export_lora(ModelAdapter(make_model("llama", len(tokenizer), width=48)), ledger, tmp_path / "x")


def test_truncate_rank_is_the_best_approximation():
    g = torch.Generator().manual_seed(1)
    b, a = torch.randn(40, 6, generator=g), torch.randn(6, 50, generator=g)
    dense = (b.double() @ a.double())
    for k in (1, 3, 6, 9):
        b2, a2, err = truncate_rank(b, a, k)
        assert b2.shape == (40, min(k, 6)) and a2.shape == (min(k, 6), 50)
        s = torch.linalg.svdvals(dense)
        assert err == pytest.approx(float(s[k:].norm() / s.norm()), abs=1e-7)
        assert float((b2.double() @ a2.double() - dense).norm() / dense.norm()) == pytest.approx(err, abs=1e-6)


def test_cli_export_peft_last_batches_equals_the_undone_model_plus_adapter(tiny_model_dir, corpus_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = tmp_path / "cf.json"
    p.write_text(json.dumps(counterfact_records(12)))
    main(["fit", *cli_args(tiny_model_dir, p, corpus_file, tmp_path, extra=["--model.residual.steps=5", "--model.context_prefixes=0"])])
    ckpt = tmp_path / "ckpt" / "last.safetensors"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "full")]) == 0
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    ref = _logits(full, tok)

    # every batch, onto the base model
    capsys.readouterr()
    assert main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "all"), "--peft"]) == 0
    printed = capsys.readouterr().out
    assert "12 edits (batches 0..2)" in printed and "r=12, lora_alpha=12" in printed and "--max-lora-rank 16" in printed
    cfg = json.loads((tmp_path / "all" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir) and cfg["fan_in_fan_out"] is True
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "all"), tok), ref,
                               atol=ATOL, rtol=0)

    # the last batch, onto the model with that batch undone, gives the full stream's model
    assert main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "last1"), "--peft", "--batches", "1"]) == 0
    assert "4 edits (batches 2..2)" in capsys.readouterr().out
    assert main(["undo", "--ckpt_path", str(ckpt), "--batches", "1", "--out", str(tmp_path / "undone.safetensors")]) == 0
    assert main(["export", "--ckpt_path", str(tmp_path / "undone.safetensors"), "--out", str(tmp_path / "undone")]) == 0
    undone = AutoModelForCausalLM.from_pretrained(tmp_path / "undone")
    assert (ref - _logits(undone, tok)).abs().max() > 0.1
    on_undone = peft.PeftModel.from_pretrained(copy.deepcopy(undone), tmp_path / "last1")
    torch.testing.assert_close(_logits(on_undone, tok), ref, atol=ATOL, rtol=0)
    merged = dict(on_undone.merge_and_unload().named_parameters())
    for l in (1, 2):  # merged weights: the full model's (Conv1D layout, fan_in_fan_out honoured)
        n = f"transformer.h.{l}.mlp.c_proj.weight"
        torch.testing.assert_close(merged[n], dict(full.named_parameters())[n], atol=1e-6, rtol=0)
    summary = json.loads((tmp_path / "last1" / "edit_ledger.json").read_text())
    assert summary["lora"]["batches"] == [2, 2] and summary["lora"]["num_edits"] == 4 and summary["base_fingerprint"]

    # --rank at full rank through the CLI: exact, and the error is printed
    assert main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "r12"), "--peft", "--rank", "12"]) == 0
    printed = capsys.readouterr().out
    assert "rank 12 -> 12, relative error" in printed
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "r12"), tok), ref,
                               atol=ATOL, rtol=0)
    assert main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "r3"), "--peft", "--rank", "3"]) == 0
    assert "rank 12 -> 3, relative error" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="--batches 4: choose 1..3"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "x"), "--peft", "--batches", "4"])
    with pytest.raises(SystemExit, match="--batches and --rank apply to --peft exports"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "x"), "--batches", "1"])
    assert not (tmp_path / "x").exists()
