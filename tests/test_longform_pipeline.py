"""Long-form editing through the whole pipeline: the CLI on the factworld long-form requests
(reduced) and the notebook API with plain {question, answer} records."""

import json
from pathlib import Path

import pytest

from lightning_edit.cli import main


def _fit(tmp_path, extra=()):
    args = ["fit", "-c", "configs/anyedit_quickstart.yaml", "--data.limit=4", "--data.batch_size=2",
            "--model.residual.steps=3", "--model.longform.chunking.window=32", "--editor.stats.n_samples=400",
            f"--editor.stats.cache_dir={tmp_path}/stats", "--report.n_probes=40", "--report.n_perplexity=10",
            f"--checkpoint.dirpath={tmp_path}/ckpt", f"--trainer.logger.init_args.save_dir={tmp_path}/logs",
            "--trainer.enable_progress_bar=false", *extra]
    main(args)
    return json.loads(next(Path(tmp_path, "logs").rglob("summary.json")).read_text())


def test_longform_quickstart_reduced_end_to_end(tmp_path):
    s = _fit(tmp_path, ["--report.finetune_baseline=true", "--report.finetune_steps=3", "--report.longform_locality=2"])
    for key in ("method", "num_edits", "rouge_l", "rouge_l_paraphrase", "bleu", "exact_match", "retention",
                "single_anchor_rouge_l", "mode", "wall_time_s"):
        assert key in s, key
    assert s["num_edits"] == 4 and s["mode"] == "joint" and s["method"] == "alphaedit"
    assert 0.0 <= s["rouge_l"] <= 1.0 and 0.0 <= s["single_anchor_rouge_l"] <= 1.0
    assert len(s["samples"]) >= 1 and {"question", "target", "before", "generation"} <= set(s["samples"][0])
    # the unedited model on the same records; unedited questions before / after
    assert 0.0 <= s["rouge_l_unedited"] <= 1.0 and 0.0 <= s["locality_rouge_l"] <= 1.0 and "locality_unchanged" in s
    # each batch's records scored at the end: 2 batches of 2, the first one's equal to first_batch_rouge_l
    assert len(s["rouge_l_by_batch"]) == 2 and s["rouge_l_by_batch"][0] == s["first_batch_rouge_l"]
    # the fine-tuning baseline, measured as the edit is
    for key in ("finetune_rouge_l", "finetune_token_accuracy", "finetune_retention", "finetune_last_loss", "finetune_wall_time_s"):
        assert key in s, key
    assert 0.0 <= s["finetune_rouge_l"] <= 1.0 and 0.0 <= s["finetune_retention"] <= 1.0
    # where free generation left the targets, and the keys after it (longform/diagnostics.py)
    assert 0.0 <= s["divergence_left"] <= 1.0
    if s["divergence_left"] > 0:
        assert s["divergence_margin"] >= 0 and "margin" in next(t for t in s["samples"] if "expected" in t)
    md = next(Path(tmp_path, "logs").rglob("summary.md")).read_text()
    assert "**Target:**" in md and "rouge_l" in md


def test_longform_bad_window_fails_before_any_edit(tmp_path):
    with pytest.raises((SystemExit, ValueError)):
        _fit(tmp_path, ["--model.longform.chunking.window=0"])
    assert not list(Path(tmp_path).rglob("ledger/batch_*"))


def test_api_applies_plain_question_answer_records(trained_gpt2, tokenizer, corpus_file, tmp_path):
    import copy

    from lightning_edit.api import Editor
    from lightning_edit.evaluation.scoring import greedy_generate

    model = copy.deepcopy(trained_gpt2)
    ed = Editor(model, tokenizer, layers=[1, 2], method="memit", method_kwargs={"lam": 0.01},
                residual={"steps": 40, "lr": 0.5, "clamp_norm_factor": 4.0, "kl_factor": 0.0, "early_stop_loss": 0.01},
                stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 600, "max_length": 64,
                       "cache_dir": str(tmp_path / "stats")},
                context_prefixes=0, longform={"chunking": {"window": 2}})
    question, answer = "Danielle Darrieux lives in", "Rome. Toko Yasuda plays the piano."
    ed.apply([{"case_id": "lf0", "question": question, "answer": answer}])
    assert ed.num_edits == 1
    out = greedy_generate(ed.model, tokenizer, [question], max_new_tokens=12)[0]
    assert out.strip().startswith("Rome. Toko Yasuda")
    metrics = ed.evaluate()
    assert "longform/rouge_l" in metrics


@pytest.mark.slow
def test_full_longform_quickstart(tmp_path):
    """configs/anyedit_quickstart.yaml as shipped (100 long-form requests in 5 sequential
    batches, the single-anchor comparison included) within the 10-minute budget (+50% slack for
    a loaded machine)."""
    import time

    t = time.time()
    main(["fit", "-c", "configs/anyedit_quickstart.yaml", f"--trainer.logger.init_args.save_dir={tmp_path}/logs",
          f"--checkpoint.dirpath={tmp_path}/ckpt", "--trainer.enable_progress_bar=false"])
    s = json.loads(next(Path(tmp_path, "logs").rglob("summary.json")).read_text())
    assert s["num_edits"] == 100 and s["mode"] == "joint" and s["method"] == "alphaedit"
    for key in ("rouge_l", "rouge_l_paraphrase", "bleu", "exact_match", "retention", "single_anchor_rouge_l", "wall_time_s"):
        assert s[key] is not None, key
    assert time.time() - t < 600 * 1.5


def test_unke_with_memory_through_the_longform_report(tmp_path):
    """The long-form method shipped for SmolLM2 (UnKE's block update with memory) runs through the
    whole report, the single-anchor baseline (a fresh copy edited with the same method) included."""
    s = _fit(tmp_path, ["--editor=lightning_edit.callbacks.UnKE", "--editor.lr=3e-3", "--editor.steps=5",
                        "--editor.n_preserve=4", "--editor.memory=1.0", "--editor.stats.n_samples=40"])
    assert s["method"] == "unke" and s["num_edits"] == 4 and len(s["rouge_l_by_batch"]) == 2
    assert 0.0 <= s["rouge_l"] <= 1.0 and 0.0 <= s["single_anchor_rouge_l"] <= 1.0
