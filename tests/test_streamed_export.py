"""`lightning-edit export` streamed from the base model's files (lightning_edit/stream/streamed_export.py):
equal, tensor for tensor, to the export from the loaded model (GPT-2 float32, a sharded Llama in
bf16 with float32 masters), refused for another base model, and replaced by the in-memory
export where the base model has no safetensors files."""

import glob
import json

import pytest
import torch
from safetensors.torch import load_file

from lightning_edit.cli import main
from lightning_edit.ledger_cli import export_main
from lightning_edit.engine.weight_files import parameters_on_meta, weight_files
from tests.conftest import cli_args, counterfact_records, make_model


def _tensors(directory):
    out = {}
    for f in glob.glob(f"{directory}/*.safetensors"):
        out.update(load_file(f))
    return out


def _fit(model_dir, corpus_file, tmp_path, extra=()):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(counterfact_records(8)))
    main(["fit", *cli_args(model_dir, data, corpus_file, tmp_path, method="memit", batch_size=4, extra=list(extra))])
    return tmp_path / "ckpt" / "last.safetensors"


def _both(ckpt, tmp_path, capsys):
    assert export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "streamed")]) == 0
    assert "streamed" in capsys.readouterr().out
    assert export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "loaded"), "--in_memory"]) == 0
    a, b = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "loaded")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == json.loads((tmp_path / "loaded" / "config.json").read_text())
    return a


def test_streamed_export_equals_the_loaded_models_gpt2(tiny_model_dir, corpus_file, tmp_path, capsys):
    ckpt = _fit(tiny_model_dir, corpus_file, tmp_path)
    edited = _both(ckpt, tmp_path, capsys)
    base = _tensors(tiny_model_dir)
    changed = [k for k in base if not torch.equal(base[k], edited[k])]
    assert sorted(changed) == ["transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight"]


def test_streamed_export_of_a_sharded_bf16_llama(tokenizer, corpus_file, tmp_path, capsys):
    model = make_model("llama", len(tokenizer))
    d = tmp_path / "llama"
    model.save_pretrained(d, max_shard_size="200KB")  # several files and an index
    tokenizer.save_pretrained(d)
    assert len(set(weight_files(d).values())) > 1
    ckpt = _fit(d, corpus_file, tmp_path / "run", ["--model.dtype=bfloat16"])
    edited = _both(ckpt, tmp_path, capsys)
    assert all(t.dtype == torch.bfloat16 for t in edited.values())
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()


def test_streamed_export_refuses_another_base_model(tiny_model_dir, corpus_file, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir, d)
    ckpt = _fit(d, corpus_file, tmp_path / "run")
    t = load_file(d / "model.safetensors")
    t["transformer.h.3.attn.c_attn.weight"][0, 0] += 1.0  # a layer the edits never touch
    from safetensors.torch import save_file

    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SystemExit, match="another base model"):
        export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # nor a half-written temporary export


@pytest.mark.slow
def test_without_safetensors_files_the_export_loads_the_model(tiny_model_dir, corpus_file, tmp_path, capsys, trained_gpt2, tokenizer):
    d = tmp_path / "bin_model"
    d.mkdir()
    trained_gpt2.config.save_pretrained(d)
    torch.save(trained_gpt2.state_dict(), d / "pytorch_model.bin")  # the older PyTorch format
    tokenizer.save_pretrained(d)
    ckpt = _fit(d, corpus_file, tmp_path / "run")
    assert export_main(["--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert "loading the whole model" in capsys.readouterr().out
    assert _tensors(tmp_path / "out")


def test_parameters_on_meta_keeps_buffers(tokenizer):
    with parameters_on_meta():
        model = make_model("llama", len(tokenizer))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # restored after the block


def test_init_on_meta_auto_falls_back_where_the_files_name_tensors_otherwise(tmp_path, tokenizer, trained_gpt2):
    """init_on_meta=auto (what sharded_edit picks by default): built on meta from a normal
    directory; from files whose tensor names differ from the model's (GPT-2's original files have
    no ``transformer.`` prefix; from_pretrained maps them) the whole model is loaded instead, with
    a warning, and holds the same weights; ``true`` refuses such files, naming the tensor."""
    from safetensors.torch import save_file

    from lightning_edit.errors import InputError
    from lightning_edit.module import EditModule

    good = tmp_path / "good"
    trained_gpt2.save_pretrained(good)
    tokenizer.save_pretrained(good)
    assert EditModule(model=str(good), layers=[1, 2], init_on_meta="auto").built_on_meta
    renamed = tmp_path / "renamed"
    trained_gpt2.save_pretrained(renamed)
    tokenizer.save_pretrained(renamed)
    t = load_file(renamed / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in t.items()}, renamed / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="name their tensors otherwise"):
        m = EditModule(model=str(renamed), layers=[1, 2], init_on_meta="auto")
    assert not m.built_on_meta and m.weight_files is None
    ref = dict(trained_gpt2.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in m.lm.named_parameters())
    with pytest.raises(InputError, match=r"init_on_meta: .*name their tensors otherwise \('transformer\."):
        EditModule(model=str(renamed), layers=[1, 2], init_on_meta=True)
    with pytest.raises(InputError, match="init_on_meta must be"):
        EditModule(model=str(good), layers=[1, 2], init_on_meta="yes")
