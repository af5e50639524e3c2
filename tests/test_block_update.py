"""UnKE's block update (lightning_edit/engine/block_update.py): the block run alone equals the
model's own forward, the update takes a long-form answer, the ledger replays it bit-identically,
undo restores every block parameter, a refused batch changes nothing, and the exports say what
they can hold."""

import copy
import json

import pytest
import torch

from lightning_edit.api import Editor
from lightning_edit.checkpointing import load_edits, read_edits
from lightning_edit.cli import main
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.block_update import (
    BlockUpdateMethod,
    _block_forward,
    _block_io,
    block_parameters,
    block_targets,
    masked_mse,
)
from lightning_edit.engine.closed_form import OversizedUpdateError
from lightning_edit.errors import InputError
from lightning_edit.evaluation.scoring import greedy_generate
from lightning_edit.stream.peft_export import PeftExportError
from tests.conftest import cli_args, counterfact_records, make_model

QUESTION, ANSWER = "Danielle Darrieux lives in", "Rome. Toko Yasuda plays the piano."


def _editor(model, tokenizer, corpus_file, tmp_path, **kw):
    method_kwargs = {"lr": 3e-3, "steps": 60, "n_preserve": 8, **kw}
    return Editor(model, tokenizer, layers=[1, 2], method="unke", method_kwargs=method_kwargs,
                  residual={"steps": 40, "lr": 0.5, "clamp_norm_factor": 4.0, "kl_factor": 0.0, "early_stop_loss": 0.01},
                  stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 40, "max_length": 32,
                         "cache_dir": str(tmp_path / "stats")},
                  context_prefixes=0, longform={"chunking": {"window": 2}})


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_block_run_alone_equals_the_models_forward(arch, tokenizer):
    torch.manual_seed(0)
    model = make_model(arch, len(tokenizer)).eval()
    ad = ModelAdapter(model)
    ids = torch.randint(5, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for layer in (0, 1, 2):
        h_in, tlen, out, _ = _block_io(ad, ids, mask, layer)
        alone = _block_forward(ad, ids, mask, layer, h_in, tlen)
        assert torch.allclose(alone, out, atol=1e-6), (arch, layer)
        assert alone.requires_grad or layer is None  # gradients reach the block's parameters (grad mode on)


def test_targets_and_masked_mean():
    out = torch.zeros(2, 3, 4)
    t = block_targets(out, torch.tensor([1]), torch.tensor([2]), torch.ones(1, 4))
    assert t[1, 2].sum() == 4 and t.sum() == 4
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert float(masked_mse(t, out, mask)) == pytest.approx(4 / (5 * 4))
    assert float(masked_mse(out + 7, out, torch.zeros(2, 3))) == 0.0  # nothing real: no loss


def test_settings_are_checked():
    with pytest.raises(InputError, match="lr"):
        BlockUpdateMethod(lr=0)
    with pytest.raises(InputError, match="steps"):
        BlockUpdateMethod(steps=0)


def test_unke_edits_a_long_answer_and_replays_and_undoes_exactly(trained_gpt2, tokenizer, corpus_file, tmp_path, capsys):
    model = copy.deepcopy(trained_gpt2)
    before = _params(model)
    ed = _editor(model, tokenizer, corpus_file, tmp_path)
    info = ed.apply([{"case_id": "lf0", "question": QUESTION, "answer": ANSWER}])
    bars = capsys.readouterr().err
    assert "block 1 update" in bars and "block 2 update" in bars  # a progress bar per block's training
    assert "block_loss/layer_2" in info and info["update_norm/layer_1"] > 0
    assert info["block_loss/layer_2"] < info["block_loss_start/layer_2"]  # the block moved towards its targets
    out = greedy_generate(ed.model, tokenizer, [QUESTION], max_new_tokens=12)[0]
    assert out.strip().startswith("Rome. Toko Yasuda"), out
    after = _params(model)
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    # every changed parameter lies in an edit block, and the blocks' attention changed too
    assert changed and all(n.startswith(("transformer.h.1.", "transformer.h.2.")) for n in changed)
    assert any(".attn." in n for n in changed)
    assert set(ed.ledger.dense_names()) >= changed

    # the ledger alone rebuilds the edited model bit for bit
    other = copy.deepcopy(trained_gpt2)
    ed.ledger.replay(ModelAdapter(other), [1, 2], {l: ModelAdapter(other).weight_as_linear(l).detach().clone() for l in (1, 2)}, {})
    assert all(torch.equal(p, after[n]) for n, p in other.named_parameters())

    # a second batch, then undo it: exactly the model after the first batch; undo both: the base
    ed.apply([{"case_id": "lf1", "question": "Toko Yasuda plays", "answer": "the violin in Oslo."}])
    ed.undo(1)
    assert all(torch.equal(p, after[n]) for n, p in model.named_parameters())
    ed.undo(1)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    # the export of edited weights carries every changed block parameter; LoRA cannot hold it
    ed.apply([{"case_id": "lf0", "question": QUESTION, "answer": ANSWER}])
    saved = ed.save(tmp_path / "edited.safetensors")
    fresh = copy.deepcopy(trained_gpt2)
    load_edits(fresh, saved)
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in fresh.named_parameters())
    with pytest.raises(PeftExportError, match="block update"):
        ed.export(tmp_path / "lora", peft=True)


def test_unke_memory_keeps_the_earlier_batch_and_rebuilds_exactly(trained_gpt2, tokenizer, corpus_file, tmp_path):
    """memory > 0: the second batch moves the block outputs on the first batch's text less than
    without memory; undo and a rebuilt stream keep the first batch's texts, so re-applying the
    second batch gives the same weights bit for bit; memory 0 records no texts."""
    first = [{"case_id": "lf0", "question": QUESTION, "answer": ANSWER}]
    second = [{"case_id": "lf1", "question": "Toko Yasuda plays", "answer": "the violin in Oslo. Danielle Darrieux sings."}]
    text = tokenizer([QUESTION + " " + ANSWER], return_tensors="pt")

    def drift(memory):
        model = copy.deepcopy(trained_gpt2)
        ed = _editor(model, tokenizer, corpus_file, tmp_path / f"m{memory}", memory=memory)
        ed.apply(first)
        ad = ModelAdapter(model)
        out1 = _block_io(ad, text.input_ids, text.attention_mask, 2)[2]
        ed.apply(second)
        out2 = _block_io(ad, text.input_ids, text.attention_mask, 2)[2]
        return float(masked_mse(out2, out1, text.attention_mask)), ed, model

    plain, ed0, _ = drift(0.0)
    assert ed0.callback.method.memory_rows == [] and all("rows.ids" not in ed0.ledger.tensors(r) for r in ed0.ledger.records)
    kept, ed, model = drift(10.0)
    assert kept < 0.5 * plain, (kept, plain)
    print(f"drift of the first batch's block outputs: {plain:.3g} without memory, {kept:.3g} with")
    m = ed.callback.method
    assert len(m.memory_rows) == 2 and m.hparams()["memory"] == 10.0
    after_two = _params(model)
    rows_before = [(i.clone(), k.clone()) for i, k in m.memory_rows]
    ed.undo(1)
    assert len(m.memory_rows) == 1 and torch.equal(m.memory_rows[0][0], rows_before[0][0])
    ed.apply(second)
    assert all(torch.equal(p, after_two[n]) for n, p in model.named_parameters())
    m.reset()  # a fresh stream; then, as a resumed one (rebuild, as undo above), the texts from the ledger
    assert m.memory_rows == []
    m.reset_rows(ed.ledger.rows_per_batch())
    assert [torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(m.memory_rows, rows_before)] == [True, True]
    with pytest.raises(InputError, match="memory must be >= 0"):
        BlockUpdateMethod(memory=-1.0)


def test_unke_memory_sample_is_seeded_and_all_when_it_is_not_smaller():
    """n_memory caps the earlier texts per batch: a seeded sample that depends on the stream
    position, rows intact (their own tokens, padding cut to the sample's longest); a cap at or
    above the count gives exactly the uncapped texts."""
    torch.manual_seed(0)
    batches = []
    for n, width in ((2, 7), (3, 5), (1, 9)):
        ids, mask = torch.randint(5, 50, (n, width)), torch.ones(n, width, dtype=torch.long)
        mask[0, width - 2:] = 0
        ids[mask == 0] = 0
        batches.append((ids, mask))
    every = [(i[r], m[r]) for i, m in batches for r in range(len(i))]

    def method(n_memory):
        out = BlockUpdateMethod(memory=1.0, n_memory=n_memory, seed=3)
        out.reset_rows(batches)
        return out

    ids, mask = method(0).memory_batch(5)
    assert ids.shape == (6, 7) and [int(m.sum()) for m in mask] == [int(m.sum()) for _, m in every]
    for k in (6, 10):
        assert all(torch.equal(a, b) for a, b in zip(method(k).memory_batch(5), (ids, mask)))
    picks = set()
    for position in range(6):
        s_ids, s_mask = method(3).memory_batch(position)
        again = method(3).memory_batch(position)
        assert torch.equal(s_ids, again[0]) and torch.equal(s_mask, again[1])
        assert len(s_ids) == 3 and s_ids.shape[1] == int(s_mask.sum(1).max())
        rows = []
        for i, m in zip(s_ids, s_mask):  # each sampled row is one earlier text, whole
            n = int(m.sum())
            hit = [j for j, (e, em) in enumerate(every) if int(em.sum()) == n and torch.equal(e[:n], i[:n])]
            assert len(hit) == 1 and not i[n:].any()
            rows.append(hit[0])
        assert rows == sorted(rows)
        picks.add(tuple(rows))
    assert len(picks) > 1  # the sample moves along the stream
    assert method(3).hparams()["n_memory"] == 3 and "n_memory" not in method(0).hparams()
    with pytest.raises(InputError, match="n_memory must be >= 0"):
        BlockUpdateMethod(memory=1.0, n_memory=-1)


def test_a_refused_block_update_changes_nothing(trained_gpt2, tokenizer, corpus_file, tmp_path):
    model = copy.deepcopy(trained_gpt2)
    before = _params(model)
    ed = _editor(model, tokenizer, corpus_file, tmp_path, max_update=1e-9)
    with pytest.raises(OversizedUpdateError, match="edit batch 0"):
        ed.apply([{"case_id": "lf0", "question": QUESTION, "answer": ANSWER}])
    assert ed.ledger.position == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_unke_refuses_a_low_precision_model(trained_gpt2, tokenizer, corpus_file, tmp_path):
    model = copy.deepcopy(trained_gpt2).to(torch.bfloat16)
    ed = _editor(model, tokenizer, corpus_file, tmp_path)
    with pytest.raises(InputError, match="float32"):
        ed.apply([{"case_id": "lf0", "question": QUESTION, "answer": ANSWER}])
    assert ed.ledger.position == 0


def test_unke_refuses_closed_form_only_options(trained_gpt2, tokenizer, corpus_file, tmp_path):
    ed = Editor(copy.deepcopy(trained_gpt2), tokenizer, layers=[1, 2], method="unke",
                stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 10, "max_length": 16},
                context_prefixes=0, longform={"chunking": {"window": 2}, "deviations": 2})
    with pytest.raises(InputError, match="deviations"):
        ed.apply([{"case_id": "lf0", "question": QUESTION, "answer": ANSWER}])
    assert ed.ledger.position == 0


def test_block_parameters_are_named_in_the_model(trained_gpt2):
    ad = ModelAdapter(trained_gpt2)
    names = set(dict(trained_gpt2.named_parameters()))
    params = block_parameters(ad, 1)
    assert params and set(params) <= names and all(n.startswith("transformer.h.1.") for n in params)


@pytest.mark.slow
def test_unke_run_killed_and_resumed_equals_the_whole_run(tiny_model_dir, corpus_file, tmp_path):
    """The CLI with --editor=lightning_edit.callbacks.UnKE: a run killed after batch 1 and resumed
    writes the same edited block parameters, bit for bit, as the run that was never killed."""
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(counterfact_records(8)))
    full = tmp_path / "full"
    main(["fit", *cli_args(tiny_model_dir, data, corpus_file, full, method="unke", batch_size=2)])
    w_full, meta = read_edits(full / "ckpt" / "edited.safetensors")
    assert meta["method"] == "unke" and any(".attn." in k for k in w_full)

    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, data, corpus_file, run, method="unke", batch_size=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", *args, "--trainer.callbacks+=conftest.CrashAfterBatch", "--trainer.callbacks.batch=1"])
    cli = main(["fit", *args, f"--ckpt_path={run}/ckpt/last.safetensors"])
    assert cli.model.num_edits == 8
    w_res, _ = read_edits(run / "ckpt" / "edited.safetensors")
    assert set(w_res) == set(w_full)
    for k in w_full:
        assert torch.equal(w_res[k], w_full[k]), k
