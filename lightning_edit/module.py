"""The LightningModule: wraps the frozen LM, optimizes the residual vectors of each edit batch
(``training_step``), and evaluates (``validation_step`` / ``test_step``).

A thin shell over :class:`~lightning_edit.stream.edit_stream.EditStream`: ``training_step`` hands each batch
to :meth:`EditStream.apply` (z, keys, solve, apply, ledger record), then logs and evaluates. The
editing callback (:mod:`lightning_edit.callbacks`) computes the statistics, gives the stream its
method and restores checkpoints.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_edit.data.chat import wrap_request
from lightning_edit.data.datamodule import EditBatch
from lightning_edit.data.requests import EditRequest, RequestError, target_text
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.bars import show_progress
from lightning_edit.engine.forward_plan import Lockstep
from lightning_edit.engine.loading import DType, load_pretrained, load_skeleton
from lightning_edit.engine.sharding import load_weights
from lightning_edit.engine.weight_files import WeightsNotStreamable
from lightning_edit.engine.prefixes import PREFIX_STARTS
from lightning_edit.engine.residuals import ResidualConfig
from lightning_edit.errors import CheckpointError, InputError
from lightning_edit.evaluation.evaluate import evaluate_requests, make_edit_metrics, update_edit_metrics
from lightning_edit.longform.chunking import check_all_fit
from lightning_edit.longform.edit import LongFormConfig, evaluate_longform, is_longform
from lightning_edit.stream.edit_stream import Collective, EditStream
from lightning_edit.stream.ledger import EditLedger
from lightning_edit.strategies import data_shards
from lightning_edit.tblog import close_edit_axis, log_edit_axis

# Expected with a frozen model and manual optimization; not actionable for users.
for _msg in (r".*configure_optimizers.*returned.*None.*", r".*module\(s\) in eval mode.*", r".*no pre-optimization state was saved.*",
             r".*compute.*method of metric.*was called before.*", r".*isinstance\(treespec, LeafSpec\).*", r".*smaller than the logging interval.*",
             r".*logger=True.*but have no logger configured.*"):  # validate's table needs logger=True, with or without a logger
    warnings.filterwarnings("ignore", message=_msg)


class EditModule(L.LightningModule):
    """Knowledge editing of a frozen causal LM.

    Args:
        model: Hugging Face hub id or local directory of the causal LM to edit, or
            ``factworld:<preset>/model`` for the built-in offline fact-world model.
        layers: the edit layers (indices of decoder blocks whose MLP down projection is updated);
            the last one is where the target residuals ``z`` are defined. ``auto``: five
            consecutive blocks from depth / 8 (the papers' choice for Llama-3-8B and GPT-J,
            scaled by depth; ``lightning-edit trace`` measures a better one).
        tokenizer: tokenizer id/path when it differs from ``model``.
        dtype: dtype to load the model in.
        trust_remote_code: allow custom modelling code from the model repository (off unless asked).
        layer_template: decoder-block module name with ``{}`` for the index, for architectures
            not detected from the config (e.g. ``model.layers.{}``).
        mlp_down_template: down-projection module name with ``{}`` (e.g. ``model.layers.{}.mlp.down_proj``).
        residual: hyper-parameters of the residual-vector optimization.
        context_prefixes: number of generated context prefixes (MEMIT uses 5; 0 = bare prompts only).
        context_length: tokens per generated prefix.
        seed: seed for the prefixes.
        eval_every: evaluate the requests edited so far every this many batches during ``fit``
            (0 = only at the end of the stream).
        eval_sample: the mid-stream evaluations (``eval_every``) score a seeded sample of at most
            this many of the requests edited so far, so their cost stays flat over a long
            stream instead of growing with it (0 = all of them). The end of the stream is
            always evaluated on every edited request.
        eval_batch_size: (prompt, target) pairs per forward in evaluation.
        max_rows_per_forward: split forward passes into micro-batches of at most this many rows
            (bounds memory on large models; 0 = whole batch at once).
        longform: long-form (AnyEdit) settings, used when the stream holds long-form requests:
            chunking, single_anchor, context_keys, context_prefixes, max_new_tokens (see
            :class:`lightning_edit.longform.edit.LongFormConfig`).
        gguf_file: name of a GGUF file inside the ``model`` directory (a ``model`` path ending in
            ``.gguf`` works too); needs ``pip install gguf accelerate``.
        chat_template: render every prompt of the edit requests as a user turn of the tokenizer's
            chat template followed by the assistant's opening (instruct models; see
            :mod:`lightning_edit.data.chat`); long-form questions are rendered the same way.
        system_prompt: an optional system message for ``chat_template``.
        init_on_meta: build the LM with its parameters on the ``meta`` device and let the
            ``sharded_edit`` strategy read each process's share of every weight from the model's
            safetensors files, so no process ever holds the whole model. ``true`` requires a
            local directory of safetensors files whose tensors carry the model's parameter names
            (under another strategy the whole model is then read at set-up); ``auto``: on where the
            files allow it, else the whole model is loaded (with a warning saying why); ``null``
            (default): ``auto`` under ``sharded_edit``, off otherwise.
    """

    def __init__(
        self,
        model: str,
        layers: list[int] | Literal["auto"],
        tokenizer: str | None = None,
        dtype: DType = "float32",
        trust_remote_code: bool = False,
        layer_template: str | None = None,
        mlp_down_template: str | None = None,
        residual: ResidualConfig = ResidualConfig(),
        context_prefixes: int = 5,
        context_length: int = 10,
        seed: int = 0,
        eval_every: int = 0,
        eval_sample: int = 0,
        eval_batch_size: int = 64,
        max_rows_per_forward: int = 0,
        longform: LongFormConfig | None = None,
        gguf_file: str | None = None,
        chat_template: bool = False,
        system_prompt: str | None = None,
        init_on_meta: bool | Literal["auto"] | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False
        self.model_name = model
        self.layers = [] if layers == "auto" else sorted(int(l) for l in layers)
        if layers != "auto" and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise InputError(f"layers must be a non-empty list of distinct indices or 'auto', got {layers}")
        self.residual_cfg = residual if isinstance(residual, ResidualConfig) else ResidualConfig(**residual)
        self.residual_cfg.max_rows_per_forward = self.residual_cfg.max_rows_per_forward or max_rows_per_forward
        if longform is None or isinstance(longform, dict):
            longform = LongFormConfig(**(longform or {}))
        self.longform_cfg = longform
        self.n_prefixes, self.prefix_length, self.seed = context_prefixes, context_length, seed
        self.eval_every, self.eval_batch_size, self.max_rows = eval_every, eval_batch_size, max_rows_per_forward
        if eval_sample < 0:
            raise InputError(f"eval_sample must be >= 0 (0 = every edited request), got {eval_sample}")
        self.eval_sample = eval_sample
        self.eval_indices: list[int] | None = None  # the stream positions the last mid-stream evaluation scored (None: all)
        self.templates = (layer_template, mlp_down_template)
        self._tokenizer_name, self._trust_remote_code = tokenizer, trust_remote_code
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.weight_files = None  # {tensor name: file} while the LM's parameters wait on the meta device
        self.built_on_meta = False  # the LM was built on the meta device and its weights read where they are kept
        if init_on_meta not in (None, True, False, "auto"):
            raise InputError(f"init_on_meta must be true, false, 'auto' or null, got {init_on_meta!r}")
        if init_on_meta and isinstance(model, str):
            try:
                if gguf_file:
                    raise WeightsNotStreamable("a GGUF model is loaded whole")
                self.lm, self.tokenizer, self.weight_files = load_skeleton(model, dtype, trust_remote_code, tokenizer)
                self.built_on_meta = True
            except WeightsNotStreamable as err:
                if init_on_meta is True:
                    raise InputError(f"init_on_meta: {err}; set --model.init_on_meta=false to load the whole model in every "
                                     "process") from None
                rank_zero_warn(f"init_on_meta=auto: {err}, so every process loads the whole model")
        if not self.built_on_meta:
            self.lm, self.tokenizer = load_pretrained(model, dtype, trust_remote_code, tokenizer, gguf_file) if isinstance(model, str) else model
        if not isinstance(model, str):  # a loaded model: name it by its config's path
            self.model_name = str(getattr(getattr(self.lm, "config", None), "_name_or_path", "") or type(self.lm).__name__)
        self._finish_init()

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, layers: list[int], **kwargs) -> "EditModule":
        """Wrap an already loaded model and tokenizer (notebook use)."""
        return cls(model=(model, tokenizer), layers=layers, **kwargs)  # type: ignore[arg-type]

    def _finish_init(self) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise InputError("lightning-edit needs a fast tokenizer (character offsets locate anchors and targets)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm.requires_grad_(False)
        self.lm.eval()
        self.adapter = ModelAdapter(self.lm, *self.templates)
        if not self.layers:  # layers: auto
            self.layers = self.adapter.default_edit_layers()
            rank_zero_info(f"edit layers (auto): {self.layers} of {self.adapter.n_layers} decoder blocks")
        self.adapter.check_layers(self.layers)
        # the stream's state: the ledger (every applied batch, the position, the evaluation
        # history), the method, the masters, the prefixes, NAS's norm anchor
        self.stream = EditStream(self.adapter, self.tokenizer, self.layers, self.residual_cfg, self.longform_cfg,
                                 EditLedger(meta=self.ledger_meta()), n_prefixes=self.n_prefixes, prefix_length=self.prefix_length,
                                 seed=self.seed, max_rows=self.max_rows, chat_template=self.chat_template,
                                 system_prompt=self.system_prompt)

    def ledger_meta(self) -> dict:
        """What the edit stream edits (written into checkpoints and exports)."""
        p = next(self.lm.parameters())
        return {"model": str(self.model_name), "dtype": str(p.dtype).removeprefix("torch."), "layers": list(self.layers),
                "layer_template": self.templates[0], "mlp_down_template": self.templates[1],
                "tokenizer": self._tokenizer_name, "trust_remote_code": self._trust_remote_code}

    @property
    def ledger(self) -> EditLedger:
        """The stream's :class:`~lightning_edit.stream.ledger.EditLedger`."""
        return self.stream.ledger

    @property
    def num_edits(self) -> int:
        """Requests applied so far (from the ledger)."""
        return self.stream.num_edits

    @property
    def edit_history(self) -> list[EditRequest]:
        """The requests applied so far, in stream order (the stream's)."""
        return self.stream.requests

    @property
    def prefixes(self) -> list[str] | None:
        return self.stream.prefixes

    @property
    def norm_anchor(self) -> float | None:
        return self.stream.norm_anchor

    @property
    def last_z_loss(self) -> float | None:
        return self.stream.last_z_loss

    @property
    def stream_history(self) -> list[dict]:
        """Mid-stream evaluations ``{"num_edits", "edit/efficacy", ...}`` (the ledger's)."""
        return self.ledger.evals

    @stream_history.setter
    def stream_history(self, rows: list[dict]) -> None:
        self.ledger.evals = list(rows)

    # ---- Lightning plumbing ----------------------------------------------------------------
    def configure_optimizers(self):
        # z is optimized with a fresh Adam per batch inside training_step; returning None gives
        # Lightning's mock optimizer, stepped once per batch so global_step counts batches.
        return None

    def setup(self, stage: str) -> None:
        # runs after the datamodule's setup: render its requests as chat turns once, so the
        # stream, the evaluation and the report all see the same prompts; then check the whole
        # stream's lengths, before the first batch is applied
        if self.weight_files is not None and not getattr(self.trainer.strategy, "shards_weights", False):
            self.materialize()  # not sharded: every process holds the whole model anyway
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.chat_template and dm is not None and getattr(dm, "requests", None):
            dm.requests = self.prepare_requests(dm.requests)
        requests = getattr(dm, "requests", None)
        if requests:
            self.check_lengths(requests, prefixes=stage == "fit")
        if stage == "fit" and dm is not None and hasattr(dm, "train_dataloader"):
            loader = dm.train_dataloader()
            if hasattr(loader, "follow"):
                loader.follow(self.ledger)  # the stream starts after the ledger's last batch

    def materialize(self, device: torch.device | str = "cpu") -> None:
        """Read the whole LM's weights from its files onto ``device`` when it was built on the
        meta device (``init_on_meta``) and no sharding strategy reads them; else nothing."""
        if self.weight_files is not None:
            load_weights(self.lm, self.weight_files, torch.device(device))
            self.weight_files = None

    def prepare_requests(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The requests as this module edits them (chat turns when ``chat_template`` is on; a
        long-form question is rendered with the template when it is chunked, not here)."""
        if not self.chat_template or is_longform(requests):
            return list(requests)
        return [wrap_request(self.tokenizer, r, self.system_prompt) for r in requests]

    def on_train_start(self) -> None:
        self.lm.eval()  # Lightning switched the module to train mode: keep HF dropout off
        # a resumed run carries the edits applied before it: mid-stream evaluations cover them too
        dm = self.trainer.datamodule
        requests = getattr(dm, "requests", None)
        if requests and len(self.edit_history) < self.num_edits:
            if [r.case_id for r in requests[: self.num_edits]] != self.ledger.request_ids():
                raise CheckpointError("the checkpoint's edit ledger holds other requests than the first "
                                 f"{self.num_edits} of this stream (check dataset, limit, offset, batch_size)")
            self.stream.requests[:] = requests[: self.num_edits]

    def on_validation_model_train(self) -> None:
        self.lm.eval()

    def state_dict(self, *args, **kwargs):
        # The frozen LM never goes into checkpoints; the edit callback saves the edited tensors.
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["edit_module"] = self.stream.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.stream.load_state_dict(checkpoint.get("edit_module", {}))

    @property
    def device_(self) -> torch.device:
        return next(self.lm.parameters()).device

    def ensure_prefixes(self) -> list[str]:
        return self.stream.ensure_prefixes()

    def ensure_norm_anchor(self, requests: Sequence[EditRequest] | None, batch_size: int = 100,
                           broadcast=None) -> float | None:
        """NAS's norm anchor (:meth:`EditStream.ensure_norm_anchor`), reported once set."""
        had = self.stream.norm_anchor
        anchor = self.stream.ensure_norm_anchor(requests, batch_size, broadcast, progress=self.progress_enabled())
        if had is None and anchor is not None:
            rank_zero_info(f"NAS norm anchor: mean ||v*|| = {anchor:.4g} over {min(len(requests), self.residual_cfg.nas_samples)} "
                           "requests (top 5% dropped)")
        return anchor

    # ---- input lengths ----------------------------------------------------------------------
    def max_positions(self) -> int | None:
        """The model's maximum number of positions (``n_positions`` / ``max_position_embeddings``)."""
        cfg = getattr(self.lm, "config", None)
        for name in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length", "seq_length"):
            v = getattr(cfg, name, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return None

    def check_lengths(self, requests: Sequence[EditRequest], prefixes: bool = True) -> None:
        """Refuse, before anything is applied, any request whose texts (prompt + target, with the
        longest context prefix when ``prefixes``; paraphrases, locality and generation prompts
        with their answers) do not fit the model's positions. Raises :class:`RequestError`
        naming the record and the field."""
        limit = self.max_positions()
        if limit is None or not requests:
            return
        if is_longform(requests):
            check_all_fit(self.tokenizer, requests, limit, self.chat_template, self.system_prompt)
            return
        # a generated prefix is a start word + context_length sampled tokens + ". " (re-tokenized:
        # bounded by its length in tokens plus a margin for the start word and the period)
        pre = (self.prefix_length + max(len(self.tokenizer(w, add_special_tokens=False)["input_ids"]) for w in PREFIX_STARTS) + 3
               if prefixes and self.n_prefixes > 0 else 0)
        texts, where = [], []
        for i, r in enumerate(requests):
            rec = r.record_index if r.record_index >= 0 else r.case_id
            prompt = r.rendered_prompt
            for field_name, t, extra in [("prompt", prompt + target_text(prompt, r.target_new), pre)] + \
                    ([("target_true", prompt + target_text(prompt, r.target_true), 0)] if r.target_true else []) + \
                    [(f"paraphrase_prompts[{j}]", p + target_text(p, r.target_new), 0) for j, p in enumerate(r.paraphrase_prompts)] + \
                    [(f"locality[{j}]", p + target_text(p, a), 0) for j, (p, a) in enumerate(r.locality)] + \
                    [(f"generation_prompts[{j}]", g, 0) for j, g in enumerate(r.generation_prompts)]:
                texts.append(t)
                where.append((rec, r.case_id, field_name, extra))
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        by_id = {r.case_id: r for r in requests}
        for n, (rec, cid, field_name, extra) in zip(lengths, where):
            if n + extra > limit:
                ctx = f" plus up to {extra} context-prefix tokens" if extra else ""
                what = f"{n} tokens with its target{ctx}"
                if field_name == "prompt":  # name the part that makes it long: the template, the subject or the target
                    r = by_id[cid]
                    parts = {"prompt": r.prompt.replace("{}", ""), "subject": r.subject, "target_new": r.target_new}
                    sizes = {k: len(self.tokenizer(v, add_special_tokens=False)["input_ids"]) for k, v in parts.items()}
                    field_name = max(sizes, key=sizes.get)
                    what = f"the edit text (prompt, subject and target) is {n} tokens{ctx}, its longest part this field ({sizes[field_name]})"
                raise RequestError(rec, field_name, f"{what} (case_id {cid!r}), more than the model's {limit} positions; "
                                                    "shorten or drop the record")

    # ---- sharding a batch across processes ---------------------------------------------------
    def shard(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """This process's share of a batch (every process gets the whole batch from the loader)."""
        world, rank = data_shards(self._trainer)  # (1, 0) when the weights are sharded: every process runs all
        return list(requests[rank::world])

    def gather_rows(self, t: torch.Tensor, every_process: bool = False) -> torch.Tensor:
        """Concatenate every process's rows ``(n_i, d)`` into ``(sum_i n_i, d)``, rank by rank,
        identical on all processes. ``n_i`` may differ (an uneven or empty shard, a request with
        several chunks): the counts are gathered first, rows are padded to the largest count for
        the collective (gloo / NCCL need equal shapes) and the padding is dropped again. Without
        ``every_process`` only across the processes a batch's data is split between (none when
        the weights are sharded)."""
        world = self.trainer.world_size if every_process and self._trainer is not None else data_shards(self._trainer)[0]
        if world == 1:
            return t
        counts = self.all_gather(torch.tensor([t.shape[0]], device=t.device)).reshape(-1).tolist()
        padded = t.new_zeros(max(counts), *t.shape[1:])
        padded[: t.shape[0]] = t
        gathered = self.all_gather(padded)  # (world, max_n, d)
        return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])

    # ---- editing ---------------------------------------------------------------------------
    def compute_residuals(self, requests: Sequence[EditRequest], label: str | None = None):
        """The residual vectors of ``requests`` (:meth:`EditStream.residuals`), without applying them."""
        return self.stream.residuals(requests, label, progress=self.progress_enabled())

    def collective(self) -> Collective:
        """How this run's processes combine a batch (gather rows, rank 0's factors, rank 0 writes)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return Collective()
        if data_shards(self._trainer)[0] == 1:  # sharded weights: the same rows everywhere, rank 0's factors
            return Collective(broadcast=lambda obj, src=0: self.trainer.strategy.broadcast(obj, src=src),
                              is_writer=self.trainer.is_global_zero, lockstep=Lockstep(self.all_max),
                              z_share=(world, self.trainer.global_rank),
                              z_gather=lambda t: self.gather_rows(t, every_process=True))
        return Collective(gather=self.gather_rows, broadcast=lambda obj: self.trainer.strategy.broadcast(obj, src=0),
                          is_writer=self.trainer.is_global_zero)

    def all_max(self, n: int) -> int:
        """The largest ``n`` over this run's processes (a collective: every process calls it)."""
        t = torch.tensor([int(n)], dtype=torch.long, device=self.trainer.strategy.root_device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def training_step(self, batch: EditBatch, batch_idx: int):
        mine = self.shard(batch.requests)
        record = self.stream.apply(batch.requests, local=mine, index=batch.index, label=f"edit batch {batch.index + 1}",
                                   collective=self.collective(), progress=self.progress_enabled())
        res = self.stream.last_residuals
        if res is not None:
            self.log_dict(
                {"z/loss": res.loss.mean(), "z/nll": res.nll.mean(), "z/steps": res.steps.float().mean(),
                 "z/delta_norm": (res.z_target - res.z_init).norm(dim=-1).mean()},
                prog_bar=False, on_step=True, batch_size=len(mine),
            )
            if res.nas_scale is not None:  # NAS: the anchor, the mean factor on v*, the share left unedited
                self.log_dict({"z/nas_anchor": float(self.norm_anchor), "z/nas_scale": res.nas_scale.mean(),
                               "z/nas_skipped": (res.nas_scale == 0).float().mean()},
                              prog_bar=False, on_step=True, batch_size=len(mine))
        self.log_dict(record.info, on_step=True, batch_size=len(batch.requests))
        self.log("edits_applied", float(self.num_edits), on_step=True, prog_bar=True, batch_size=1)
        self.record_applied(batch)  # mid-stream evaluation, before this batch's checkpoint
        opt = self.optimizers()
        opt.step()  # advances global_step (mock optimizer)
        return None

    def record_applied(self, batch: EditBatch) -> None:
        """The mid-stream evaluation after ``batch`` is applied (every ``eval_every`` batches;
        before the checkpoint of the same batch is written, so it holds this evaluation too)."""
        if self.eval_every and (batch.index + 1) % self.eval_every == 0:
            self.eval_indices = self.mid_stream_sample()
            reqs = self.edit_history if self.eval_indices is None else [self.edit_history[i] for i in self.eval_indices]
            results = self.evaluate(reqs)
            self.ledger.add_eval(self.num_edits, results)
            self.log_edit_metrics(results, prefix="")

    # ---- evaluation ------------------------------------------------------------------------
    def mid_stream_sample(self) -> list[int] | None:
        """The positions (in stream order) of the edited requests a mid-stream evaluation
        scores: a sample of ``eval_sample`` of them seeded by the model's seed and the number of
        edits, sorted; None = all."""
        n = len(self.edit_history)
        if not self.eval_sample or n <= self.eval_sample:
            return None
        return sorted(random.Random(f"{self.seed}:{n}").sample(range(n), self.eval_sample))

    def evaluate(self, requests: Sequence[EditRequest]) -> dict[str, float]:
        was = self.lm.training
        self.lm.eval()
        with torch.no_grad():
            if requests and is_longform(requests):
                out = self.evaluate_longform(requests)
            else:
                out = evaluate_requests(self.lm, self.tokenizer, list(requests), batch_size=self.eval_batch_size,
                                        progress=self.progress_enabled())
        self.lm.train(was)
        return out

    def evaluate_longform(self, requests, return_texts: bool = False):
        return evaluate_longform(self.lm, self.tokenizer, list(requests), self.longform_cfg, self.chat_template,
                                 self.system_prompt, batch_size=min(self.eval_batch_size, 32), return_texts=return_texts)

    def progress_enabled(self) -> bool:
        return show_progress(self._trainer)

    def log_edit_metrics(self, metrics: dict[str, float], prefix: str = "") -> None:
        """Log metrics as curves against the number of edits applied (TensorBoard: in the run's
        ``edits`` sub-directory, see :mod:`lightning_edit.tblog`)."""
        if self.logger is not None and self.trainer.is_global_zero:
            log_edit_axis(self.trainer, {prefix + k: float(v) for k, v in metrics.items()}, self.num_edits)

    def teardown(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.is_global_zero:
            close_edit_axis(self.trainer)  # flush the edit-axis event file

    def on_validation_epoch_start(self) -> None:
        self._val_requests: list[EditRequest] = []

    def validation_step(self, batch: EditBatch, batch_idx: int):
        self._val_requests.extend(self.shard(batch.requests))

    def on_validation_epoch_end(self) -> None:
        self._finish_eval()

    def on_test_epoch_start(self) -> None:
        self._val_requests = []

    def test_step(self, batch: EditBatch, batch_idx: int):
        self._val_requests.extend(self.shard(batch.requests))

    def on_test_epoch_end(self) -> None:
        self._finish_eval()

    def _finish_eval(self) -> None:
        if self._val_requests and is_longform(self._val_requests):
            results = self.evaluate(self._val_requests)
        else:
            # every process updates its shard; compute() sums the states across processes
            metrics = make_edit_metrics("all").to(self.device_)
            with torch.no_grad():
                update_edit_metrics(metrics, self.lm, self.tokenizer, self._val_requests, batch_size=self.eval_batch_size,
                                    progress=self.progress_enabled())
            results = {k: float(m.compute()) for k, m in metrics.items()}
        results = {k: v for k, v in results.items() if not math.isnan(v)}  # families without data
        self.last_eval = results
        in_fit = self._trainer is not None and self.trainer.state.fn == "fit"
        # In fit the curve is logged against the number of edits applied (log_edit_metrics); in
        # validate / test the metrics go through Lightning's own logging, so `lightning-edit
        # validate` prints its table and trainer.validate() returns the numbers.
        for k, v in results.items():
            self.log(k, v, rank_zero_only=True, logger=not in_fit)
        if in_fit:
            self.log_edit_metrics(results)  # TensorBoard, against the number of edits applied
