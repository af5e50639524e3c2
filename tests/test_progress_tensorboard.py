"""Progress a person can read (bars with totals, the unconverged-edit warning, help of every
--report option) and TensorBoard as the one place to look (edit axis, text, image, hparams)."""

import glob
import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from conftest import FAST_RESIDUAL, cli_args, counterfact_records, counterfactual_requests

from lightning_edit.cli import main
from lightning_edit.engine.residuals import (
    ResidualConfig,
    UnconvergedEditWarning,
    build_chunked_batch,
    build_residual_batch,
    optimize_residuals,
)


# ---- help ------------------------------------------------------------------------------------
def _option_help(help_text: str) -> dict[str, str]:
    """``{"--report.probes": "its help text", ...}`` from argparse's option list."""
    out, name = {}, None
    for line in help_text.splitlines():
        m = re.match(r"^  (--[\w.]+)(.*)$", line)
        if m:
            name = m.group(1)
            rest = m.group(2).strip()
            # "--x X   help" on one line: drop the metavar / choices
            out[name] = re.sub(r"^(\{[^}]*\}|[A-Z_]+)\s*", "", rest)
        elif name and line.startswith(" " * 10) and line.strip():
            out[name] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            name = None
    return out


def test_every_report_option_has_help(capsys):
    from lightning_edit.report import EditReport

    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    options = _option_help(capsys.readouterr().out)
    params = [p for p in inspect.signature(EditReport.__init__).parameters if p != "self"]
    assert len(params) >= 12
    for p in params:
        text = options.get(f"--report.{p}")
        assert text is not None, f"--report.{p} missing from fit --help"
        described = re.sub(r"\(type: .*?\)", "", text).strip()
        assert len(described) > 15, f"--report.{p} has no help text: {text!r}"


# ---- the unconverged-edit warning ------------------------------------------------------------
def _module(trained_gpt2, tokenizer, **residual):
    from lightning_edit.module import EditModule

    return EditModule.from_model(trained_gpt2, tokenizer, layers=[1, 2], residual=ResidualConfig(**{**FAST_RESIDUAL, **residual}),
                                 context_prefixes=0)


def test_unconverged_edits_are_named_once_per_batch(trained_gpt2, tokenizer):
    reqs = counterfactual_requests(8)
    with pytest.warns(UnconvergedEditWarning) as rec:
        _, res = _module(trained_gpt2, tokenizer, steps=1).compute_residuals(reqs, label="edit batch 7")
    ours = [w for w in rec if issubclass(w.category, UnconvergedEditWarning)]
    assert len(ours) == 1  # one warning for the batch
    msg = str(ours[0].message)
    high = [i for i, v in enumerate(res.nll.tolist()) if v > 0.693]
    assert len(high) >= 6, res.nll  # one Adam step is far from converged on every request
    assert msg.startswith(f"edit batch 7: {len(high)} of 8 requests") and "may not take" in msg
    shown = re.findall(r"case (\d+) \('([^']+)': NLL", msg)
    assert [c for c, _ in shown] == [str(reqs[i].case_id) for i in high[:5]]  # the first five, by case id and subject
    assert [s for _, s in shown] == [reqs[i].subject for i in high[:5]]
    assert f"and {len(high) - 5} more" in msg


def test_converged_or_disabled_edits_do_not_warn(trained_gpt2, tokenizer):
    reqs = counterfactual_requests(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnconvergedEditWarning)
        _, res = _module(trained_gpt2, tokenizer).compute_residuals(reqs)
        assert float(res.nll.max()) < ResidualConfig().warn_nll
        _module(trained_gpt2, tokenizer, steps=1, warn_nll=0.0).compute_residuals(reqs)  # 0 = never
    with pytest.raises(ValueError, match="warn_nll"):
        ResidualConfig(warn_nll=-1.0)


# ---- progress of the residual optimization ---------------------------------------------------
def test_optimization_reports_every_step_with_its_total(trained_gpt2, tokenizer):
    from lightning_edit.engine.arch import ModelAdapter

    ad = ModelAdapter(trained_gpt2)
    cfg = ResidualConfig(**{**FAST_RESIDUAL, "steps": 6, "early_stop_loss": 0.0})
    calls = []
    rb = build_residual_batch(tokenizer, counterfactual_requests(3), [], cfg.anchor, kl=False)
    res = optimize_residuals(ad, rb, 2, cfg, on_step=lambda done, total, loss, chunks: calls.append((done, total, loss.clone(), chunks)))
    assert [(d, t) for d, t, _, _ in calls] == [(i, 6) for i in range(7)]  # the loss after 0..6 Adam steps
    assert torch.equal(calls[-1][2], res.loss) and bool(calls[-1][3].all())
    # autoregressive long-form requests: one phase per chunk position, the count goes on over the phases
    text = "Tell me about Danielle Darrieux. Danielle Darrieux plays the violin and lives in Rome."
    start, mid = text.index(" Danielle", 20), text.index(" the violin")
    items = [(text, [(start, mid), (mid, len(text))])]
    rb = build_chunked_batch(tokenizer, items)
    calls.clear()
    optimize_residuals(ad, rb, 2, ResidualConfig(**{**FAST_RESIDUAL, "steps": 3, "early_stop_loss": 0.0, "mode": "autoregressive"}),
                       on_step=lambda done, total, loss, chunks: calls.append((done, total, chunks.tolist())))
    assert [(d, t) for d, t, _ in calls] == [(i, 6) for i in (0, 1, 2, 3, 3, 4, 5, 6)]
    assert calls[0][2] == [True, False] and calls[-1][2] == [False, True]


def test_residual_progress_reads_the_loss_sparingly():
    """The bar ticks every step but reads the (device) loss only when its interval has passed
    and once at the end: no synchronization per step."""
    from lightning_edit.progress import ResidualProgress

    class Counting(ResidualProgress):
        reads = 0

        def _read(self):
            Counting.reads += 1
            return super()._read()

    loss, chunks = torch.tensor([0.5, 1.5, 9.0]), torch.tensor([True, True, False])
    bar = Counting("z", 20, enabled=True)
    bar.read_every_s = float("inf")
    for step in range(21):
        bar(step, 20, loss, chunks)
    assert bar.bar.n == 20 and Counting.reads == 0
    bar.close()
    assert Counting.reads == 1 and bar.mean_loss == pytest.approx(1.0)  # the mean over the phase's chunks
    off = Counting("z", 20, enabled=False)
    off(3, 20, loss, chunks)
    off.close()
    assert Counting.reads == 1 and off.mean_loss is None


def test_bars_follow_the_trainer_flag_and_rank():
    import lightning as L

    from lightning_edit.progress import EditProgressBar, drop_disabled_progress_bar, show_progress

    assert show_progress(L.Trainer(logger=False, enable_progress_bar=True, enable_checkpointing=False))
    assert not show_progress(L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False))

    class Rank1:
        progress_bar_callback = object()
        is_global_zero = False

    assert not show_progress(Rank1()) and show_progress(None)
    bar, other = EditProgressBar(), object()
    assert drop_disabled_progress_bar({"enable_progress_bar": False, "callbacks": [bar, other]})["callbacks"] == [other]
    assert drop_disabled_progress_bar({"enable_progress_bar": True, "callbacks": [bar, other]})["callbacks"] == [bar, other]


# ---- a fit with its bars, read back from TensorBoard ------------------------------------------
def _events(path: str):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e for e in EventFileLoader(path).Load() if e.HasField("summary")]


def test_fit_shows_bars_and_fills_tensorboard(tiny_model_dir, corpus_file, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    dataset = tmp_path / "cf.json"
    dataset.write_text(json.dumps(counterfact_records(12)))
    args = [a for a in cli_args(tiny_model_dir, dataset, corpus_file, tmp_path, extra=["--model.eval_every=1"])
            if a != "--trainer.enable_progress_bar=false"]
    main(["fit", *args])
    out, err = capsys.readouterr()

    # one bar per long step, on stderr, with totals; the stream's bar instead of "Epoch 0 ... v_num"
    assert re.search(r"key statistics \(layers \[1, 2\]\):.*600/600", err)
    assert "edit batches" in err and re.search(r"3/3 .*edits=12, z_loss=\d", err)
    for b in (1, 2, 3):
        assert re.search(rf"edit batch {b}: z \(4 requests\):.*/20 ", err), b
    assert re.search(r"evaluation \(12 requests\):.*/1 ", err)
    assert "Epoch" not in err and "v_num" not in err and "edit batches" not in out

    run = Path(glob.glob(str(tmp_path / "logs" / "edit" / "version_*"))[0])
    # every event file's steps only grow (TensorBoard never sees a step go back)
    files = sorted(glob.glob(str(run / "**" / "events.out.tfevents.*"), recursive=True))
    assert len(files) == 2
    for f in files:
        steps = [e.step for e in _events(f)]
        assert steps == sorted(steps), (f, steps)

    main_ea = EventAccumulator(str(run))
    main_ea.Reload()
    assert [e.step for e in main_ea.Scalars("z/loss")] == [0, 1, 2]  # per edit batch, at the global step
    assert not any(t.startswith(("edit/", "final/")) for t in main_ea.Tags()["scalars"])

    ea = EventAccumulator(str(run / "edits"), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    ea.Reload()
    for tag in ea.Tags()["scalars"]:
        steps = [e.step for e in ea.Scalars(tag)]
        assert steps == sorted(steps) and set(steps) <= {4, 8, 12}, (tag, steps)
    # (a) the edit metrics against the number of edits applied: one point per evaluation, then the final one
    assert [e.step for e in ea.Scalars("edit/efficacy")] == [4, 8, 12, 12]
    assert ea.Scalars("edit/efficacy")[-1].value == pytest.approx(json.loads((run / "summary.json").read_text())["efficacy"])
    # (b) the before / after generations of summary.md as text
    md = (run / "summary.md").read_text()
    text = tensor_util.make_ndarray(ea.Tensors("report/examples/text_summary")[-1].tensor_proto).item().decode()
    assert "## Before / after" in text and text.strip() in md
    assert ea.Tensors("report/examples/text_summary")[-1].step == 12
    # (c) the run's settings as hparams, with the final metrics
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model.layers"].string_value == "[1, 2]"
    assert start.hparams["editor.class_path"].string_value == "lightning_edit.callbacks.AlphaEdit"
    assert start.hparams["model.residual.steps"].number_value == 20 and start.hparams["data.batch_size"].number_value == 4
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"final/efficacy", "final/specificity", "final/num_edits"} <= metrics
    assert all(tag in ea.Tags()["scalars"] for tag in metrics)
    # (d) summary.png as an image
    img = ea.Images("report/summary_png")[-1]
    assert img.step == 12 and img.encoded_image_string.startswith(b"\x89PNG") and img.width > 100
