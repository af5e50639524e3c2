"""Editing under DDP (2 CPU processes, gloo) gives the same edited weights as one process.

The 2-process run is the CLI as a subprocess (the popen launcher of ``ddp_frozen`` re-executes
the command line, which inside pytest would re-run pytest); the 1-process reference runs the
same CLI arguments in this process. 11 requests in batches of 5 on 2 processes: shards of 3 + 2
(a batch not divisible by the world size) and a last batch of 1 that leaves rank 1 without a
request (it must still join every collective). :class:`RankRecorder` (a trainer callback) writes
what every rank did to files, since the per-rank objects are gone after the run: which requests
each rank optimized, its final edit weights and its last evaluation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

N_REQUESTS = 11  # with batch_size 5: batches of 5, 5, 1 -> shards 3+2, 3+2, 1+0 (an idle rank)
BATCH_SIZE = 5


class RankRecorder(L.Callback):
    """Writes ``rank{r}.json`` (shards per batch, last evaluation, edits applied) and
    ``rank{r}.safetensors`` (the edit layers' weights) into ``out_dir`` at the end of fit."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.shards: list[list] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.shards.append([batch.index, [r.case_id for r in pl_module.shard(batch.requests)]])

    def on_fit_end(self, trainer, pl_module):
        from safetensors.torch import save_file

        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        r = trainer.global_rank
        weights = {pl_module.adapter.weight_name(l): pl_module.adapter.down_proj(l).weight.detach().clone().contiguous()
                   for l in pl_module.layers}
        save_file(weights, str(out / f"rank{r}.safetensors"))
        info = {"rank": r, "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                "shards": self.shards, "num_edits": pl_module.num_edits,
                "last_eval": getattr(pl_module, "last_eval", None),
                "history": [q.case_id for q in pl_module.edit_history]}
        (out / f"rank{r}.json").write_text(json.dumps(info))


def _dataset(path: Path, n: int) -> list[str]:
    """A tiny nested-CounterFact file (``conftest.counterfact_records``: facts the statistics
    corpus never states) with one paraphrase prompt per record; returns the case ids."""
    from conftest import counterfact_records

    records = counterfact_records(n)
    for rec in records:
        rw = rec["requested_rewrite"]
        rec["paraphrase_prompts"] = ["Indeed. " + rw["prompt"].format(rw["subject"])]
    path.write_text(json.dumps(records))
    return [str(r["case_id"]) for r in records]


def _cli_args(run: Path, model_dir: Path, dataset: Path, corpus: Path, editor: list[str], world: int) -> list[str]:
    return [
        "fit",
        f"--model.model={model_dir}", "--model.layers=[1,2]", "--model.context_prefixes=0",
        "--model.residual.anchor=prompt_last", "--model.residual.clamp_norm_factor=4", "--model.residual.steps=15",
        "--model.eval_every=2",  # a mid-stream evaluation on every rank (metrics sync in compute())
        f"--data.dataset={dataset}", f"--data.batch_size={BATCH_SIZE}", "--data.eval_batch_size=4",
        *editor,
        f"--editor.stats.corpus={corpus}", "--editor.stats.corpus_name=null", "--editor.stats.n_samples=300",
        "--editor.stats.max_length=64", "--editor.stats.batch_size=4", f"--editor.stats.cache_dir={run / 'stats'}",
        f"--checkpoint.dirpath={run / 'ckpt'}",
        f"--trainer.logger.init_args.save_dir={run / 'logs'}",
        "--trainer.accelerator=cpu", f"--trainer.devices={world}",
        f"--trainer.strategy={'ddp_frozen' if world > 1 else 'auto'}",
        "--trainer.enable_progress_bar=false",
        '--trainer.callbacks=[{"class_path": "test_ddp.RankRecorder", "init_args": {"out_dir": "%s"}}]' % (run / "ranks"),
    ]


def _fit_in_process(work: Path, *args) -> Path:
    """The 1-process reference run, in this process (its imports are paid already)."""
    from lightning_edit.cli import main

    run = work / "world1"
    main(_cli_args(run, *args, 1))
    return run


def _fit_two_processes(work: Path, *args, timeout: int = 300, extra: tuple = ()) -> Path:
    """``python -m lightning_edit.cli fit ... --trainer.strategy=ddp_frozen --trainer.devices=2``:
    the popen launcher starts rank 1 by re-running this command line."""
    run = work / "world2"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONWARNINGS="ignore")
    for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "lightning_edit.cli", *_cli_args(run, *args, 2), *extra]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"2-process fit failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return run


class SkewNonZeroRankSolve(L.Callback):
    """Makes every process but rank 0 solve a different update (its U scaled by 1.5): stands for
    any numerical difference between processes (another GPU, another BLAS)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 0:
            return
        cb = next(c for c in trainer.callbacks if hasattr(c, "method_name") and getattr(c, "method", None) is not None)
        if getattr(cb.method, "_skewed", False):
            return
        real = cb.method.factors
        cb.method.factors = lambda *a: (lambda u, v: (u * 1.5, v))(*real(*a))
        cb.method._skewed = True


def test_processes_apply_rank0s_update_and_never_drift(tmp_path, tiny_model_dir, corpus_file):
    torch.set_num_threads(1)
    dataset = tmp_path / "counterfact.json"
    _dataset(dataset, N_REQUESTS)
    editor = ["--editor=lightning_edit.callbacks.AlphaEdit", "--editor.threshold_mode=relative",
              "--editor.nullspace_threshold=0.02", "--editor.l2=1"]
    two = _fit_two_processes(tmp_path, tiny_model_dir, dataset, corpus_file, editor,
                             extra=("--trainer.callbacks+=test_ddp.SkewNonZeroRankSolve",))
    w0, w1 = _load(two / "ranks" / "rank0.safetensors"), _load(two / "ranks" / "rank1.safetensors")
    for name in w0:
        assert torch.equal(w0[name], w1[name]), name  # rank 1's own (skewed) solve was never applied


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _moments(stats_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The cached key statistics (``sum``, ``count``) by layer name."""
    return {p.name.split(".moment.")[0]: _load(p) for p in sorted(stats_dir.glob("*.moment.*.safetensors"))}


@pytest.mark.parametrize("editor,elementwise", [
    pytest.param(["--editor=lightning_edit.callbacks.AlphaEdit", "--editor.threshold_mode=relative",
                  "--editor.nullspace_threshold=0.02", "--editor.l2=1"], True, id="alphaedit"),
    # MEMIT's lam C_0 + K K^T has no ridge and C_0 of this tiny model has condition ~1e6: float32
    # rounding in the statistics (which any other batching changes, in one process too) moves
    # single entries of the update by ~1e-2 relative; only the update as a whole is compared
    pytest.param(["--editor=lightning_edit.callbacks.MEMIT", "--editor.lam=1"], False, id="memit", marks=pytest.mark.slow),
])
def test_two_processes_match_one(tmp_path, tiny_model_dir, corpus_file, editor, elementwise):
    torch.set_num_threads(1)
    dataset = tmp_path / "counterfact.json"
    case_ids = _dataset(dataset, N_REQUESTS)
    two = _fit_two_processes(tmp_path, tiny_model_dir, dataset, corpus_file, editor)
    one = _fit_in_process(tmp_path, tiny_model_dir, dataset, corpus_file, editor)

    # statistics: sharded by blocks and summed across ranks == the single-process pass
    m1, m2 = _moments(one / "stats"), _moments(two / "stats")
    assert m1.keys() == m2.keys() and len(m1) == 2
    for layer in m1:
        assert torch.equal(m1[layer]["count"], m2[layer]["count"])
        # float32 k^T k per batch, other batch compositions: equal up to rounding
        torch.testing.assert_close(m2[layer]["sum"], m1[layer]["sum"], rtol=1e-5, atol=1e-6 * float(m1[layer]["sum"].abs().max()))

    # the export of the 2-process run equals the 1-process one
    e1, e2 = _load(one / "ckpt" / "edited.safetensors"), _load(two / "ckpt" / "edited.safetensors")
    base = {}
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        for name in e1:
            base[name] = f.get_tensor(name)
    assert e1.keys() == e2.keys() and len(e1) == 2
    for name in e1:
        assert (e1[name] - base[name]).abs().max() > 1e-3, "the edits did not change the weights"
        if elementwise:
            torch.testing.assert_close(e2[name], e1[name], rtol=1e-4, atol=1e-4 * float(e1[name].abs().max()))
        delta1, delta2 = e1[name] - base[name], e2[name] - base[name]
        assert float((delta2 - delta1).norm() / delta1.norm()) < 2e-3

    # every rank ends with bit-identical weights, and each request was optimized by exactly one rank
    ranks = [json.loads((two / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["strategy"] == "FrozenDDPStrategy"
    w0, w1 = _load(two / "ranks" / "rank0.safetensors"), _load(two / "ranks" / "rank1.safetensors")
    for name in w0:
        assert torch.equal(w0[name], w1[name])
        assert torch.equal(w0[name], e2[name])
    n_batches = -(-N_REQUESTS // BATCH_SIZE)
    for r in ranks:
        assert [b for b, _ in r["shards"]] == list(range(n_batches))
        assert r["num_edits"] == N_REQUESTS and r["history"] == case_ids
    for b in range(n_batches):
        batch = case_ids[b * BATCH_SIZE:(b + 1) * BATCH_SIZE]
        got = ranks[0]["shards"][b][1] + ranks[1]["shards"][b][1]
        assert sorted(got, key=int) == batch  # disjoint and complete
    assert ranks[1]["shards"][-1][1] == []  # the 1-request batch left rank 1 idle: it still took part
    meta_edits = json.loads(safe_open(str(two / "ckpt" / "edited.safetensors"), "pt").metadata()["num_edits"])
    assert meta_edits == N_REQUESTS

    # validation metrics: shards summed through the torchmetrics states == one process
    single = json.loads((one / "ranks" / "rank0.json").read_text())["last_eval"]
    assert single and single["edit/efficacy"] >= 0.8, single
    for r in ranks:
        assert r["last_eval"].keys() == single.keys()
        for k, v in single.items():
            assert abs(r["last_eval"][k] - v) < 1e-4, (k, r["last_eval"][k], v)

    # only rank 0 wrote: one log version, one checkpoint, the stats cache once
    assert len(list((two / "logs" / "edit").iterdir())) == 1
    assert sorted(p.name for p in (two / "ckpt").iterdir()) == ["edited.safetensors", "last.safetensors", "ledger"]
    # one file per batch on both (named by content: the two runs' factors differ in rounding)
    assert sorted(p.name[:12] for p in (two / "ckpt" / "ledger").iterdir()) == sorted(p.name[:12] for p in (one / "ckpt" / "ledger").iterdir())
    assert sorted(p.name for p in (two / "stats").iterdir()) == sorted(p.name for p in (one / "stats").iterdir())


def test_block_shards_partition_the_blocks(tokenizer):
    """The statistics shards of all processes are exactly the single-process blocks (the
    packing, and so every key's context, is the same whatever the number of processes)."""
    from conftest import corpus_sentences

    from lightning_edit.engine.stats import packed_blocks

    texts = corpus_sentences(120, seed=3)
    whole = [row for b in packed_blocks(tokenizer, iter(texts), 32, 4) for row in b.tolist()]
    for world in (2, 3):
        shards = [[row for b in packed_blocks(tokenizer, iter(texts), 32, 4, shard=r, num_shards=world) for row in b.tolist()]
                  for r in range(world)]
        assert sum(len(s) for s in shards) == len(whole)
        for r, rows in enumerate(shards):
            assert rows == whole[r::world]


@pytest.mark.parametrize("name,start", [("ddp_frozen", "popen"), ("ddp_frozen_spawn", "spawn"), ("ddp_frozen_fork", "fork")])
def test_frozen_strategy_names(name, start):
    from lightning_edit.strategies import FrozenDDPStrategy

    trainer = L.Trainer(strategy=name, accelerator="cpu", devices=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    assert type(trainer.strategy) is FrozenDDPStrategy and trainer.strategy._start_method == start
    assert trainer.world_size == 2


def test_frozen_strategy_does_not_wrap():
    from lightning_edit.strategies import FrozenDDPStrategy

    module = L.LightningModule()
    module.layer = torch.nn.Linear(2, 2).requires_grad_(False)  # what stock DDP refuses to wrap
    strategy = FrozenDDPStrategy()
    strategy.connect(module)
    strategy.configure_ddp()
    assert strategy.model is module and strategy.lightning_module is module


@pytest.mark.parametrize("flag,start", [("ddp", "popen"), ("ddp_spawn", "spawn"), ("auto", "popen"), ("ddp_frozen_spawn", "spawn")])
def test_cli_maps_stock_ddp_to_frozen(tmp_path, tiny_model_dir, flag, start):
    """``trainer.strategy: ddp`` (or ``auto`` on several devices) would crash on the frozen LM."""
    from lightning_edit.cli import TRAINER_DEFAULTS, EditCLI
    from lightning_edit.data.datamodule import EditDataModule
    from lightning_edit.module import EditModule
    from lightning_edit.strategies import FrozenDDPStrategy

    dataset = tmp_path / "cf.json"
    _dataset(dataset, 2)
    cli = EditCLI(EditModule, EditDataModule, trainer_defaults=TRAINER_DEFAULTS, auto_configure_optimizers=False, run=False,
                  args=[f"--model.model={tiny_model_dir}", "--model.layers=[1,2]", f"--data.dataset={dataset}",
                        f"--checkpoint.dirpath={tmp_path / 'ckpt'}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                        "--trainer.accelerator=cpu", "--trainer.devices=2", f"--trainer.strategy={flag}"])
    assert type(cli.trainer.strategy) is FrozenDDPStrategy and cli.trainer.strategy._start_method == start
    # the callbacks are not duplicated by the rebuild
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("AlphaEdit") == 1 and names.count("EditCheckpoint") == 1 and names.count("SaveConfigCallback") == 1


def test_longform_evaluation_under_ddp_matches_one_process(tmp_path, tiny_model_dir, corpus_file):
    """Long-form streams under DDP: every process evaluates its shard and the metrics sum across
    processes. 3 requests in batches of 2 -> the last batch and the evaluation of 3 requests leave
    the ranks unequal (2 + 1); only one record has a paraphrase and only another one sub-questions,
    so a rank without them must still reach those metrics' sync (before the fix it returned early or
    skipped them, and the other rank waited forever). The metrics equal the 1-process run's."""
    torch.set_num_threads(1)
    records = [
        {"question": "Tell me about the lake.", "para_question": "What is the lake like?", "answer": "The lake is deep and cold in spring."},
        {"question": "Tell me about the hill.", "answer": "The hill is green and steep all year.",
         "sub_question": ["What colour is the hill?"], "sub_answer": ["green"]},
        {"question": "Tell me about the road.", "answer": "The road is long and dusty at noon."},
    ]
    dataset = tmp_path / "longform.json"
    dataset.write_text(json.dumps(records))
    extra = ("--data.batch_size=2", "--model.longform.chunking.window=4", "--model.longform.max_new_tokens=12",
             "--model.residual.anchor=subject_last", "--model.residual.kl_factor=0", "--report.single_anchor_baseline=false",
             "--model.eval_every=1")
    two = _fit_two_processes(tmp_path, tiny_model_dir, dataset, corpus_file, [], extra=extra, timeout=420)
    from lightning_edit.cli import main

    one = tmp_path / "world1"
    main(_cli_args(one, tiny_model_dir, dataset, corpus_file, [], 1) + list(extra))
    single = json.loads((one / "ranks" / "rank0.json").read_text())["last_eval"]
    assert single and {"longform/rouge_l", "longform/paraphrase_rouge_l", "longform/sub_question_accuracy"} <= single.keys()
    ranks = [json.loads((two / "ranks" / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["num_edits"] == 3 and r["last_eval"].keys() == single.keys()
        for k, v in single.items():
            assert abs(r["last_eval"][k] - v) < 0.05, (k, r["last_eval"][k], v)  # (two processes' edits differ by rounding)
