"""The LightningModule: wraps the frozen LM, optimizes the residual vectors of each edit batch
(``training_step``), and evaluates (``validation_step`` / ``test_step``).

The weight update itself happens in a callback (:mod:`lightning_edit.callbacks`), which runs
after ``training_step`` and before the checkpoint of the same batch is written.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
from torch import nn

from .arch import ModelAdapter
from .data.datamodule import EditBatch
from .data.requests import EditRequest
from .residuals import ResidualConfig, build_residual_batch, optimize_residuals

DType = Literal["float32", "bfloat16", "float16"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")

# Expected with a frozen model and manual optimization; not actionable for users.
for _msg in (r".*configure_optimizers.*returned.*None.*", r".*module\(s\) in eval mode.*", r".*no pre-optimization state was saved.*",
             r".*compute.*method of metric.*was called before.*", r".*isinstance\(treespec, LeafSpec\).*", r".*smaller than the logging interval.*"):
    warnings.filterwarnings("ignore", message=_msg)


GGUF_INSTALL = "pip install gguf accelerate   (or: pip install 'lightning-edit[gguf]')"


def split_gguf(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)``: a path to a ``.gguf`` file is split into
    its directory and name; ``gguf_file`` names the file inside ``name_or_path``."""
    if gguf_file:
        return name_or_path, gguf_file
    if isinstance(name_or_path, str) and name_or_path.lower().endswith(".gguf"):
        p = Path(name_or_path)
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file {name_or_path!r} not found")
        return str(p.parent), p.name
    return name_or_path, None


def require_gguf(what: str) -> None:
    """Raise an ImportError naming the pip command when GGUF support is not installed."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading {what} needs the optional package(s) {', '.join(missing)}: {GGUF_INSTALL}")


def load_pretrained(name_or_path: str, dtype: DType = "float32", trust_remote_code: bool = False, tokenizer: str | None = None,
                    gguf_file: str | None = None):
    """Load a causal LM and its (fast) tokenizer from a hub id, a local directory, a built-in
    resource name (``factworld:...``, ``smollm2:...``) or a GGUF file (a ``.gguf`` path, or a
    directory plus ``gguf_file``; dequantized to ``dtype`` by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .resources import resolve

    if dtype not in DTYPES:
        raise ValueError(f"model dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    name_or_path, gguf_file = split_gguf(resolve(name_or_path), gguf_file)
    tokenizer = resolve(tokenizer) if tokenizer else None
    kw = {}
    if gguf_file:
        require_gguf(f"GGUF file {gguf_file!r}")
        kw["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kw)
    if tokenizer:
        tok_name, tok_kw = split_gguf(tokenizer)
        tok = AutoTokenizer.from_pretrained(tok_name, trust_remote_code=trust_remote_code, **({"gguf_file": tok_kw} if tok_kw else {}))
    else:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


@torch.no_grad()
def generate_prefixes(model: nn.Module, tokenizer, n: int, length: int, seed: int = 0) -> list[str]:
    """MEMIT's context prefixes: ``n`` short texts sampled (top-5) from the unedited model from
    the starts "The", "Therefore", ..., each followed by ". ". Seeded, no global RNG state."""
    if n <= 0:
        return []
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for i in range(n):
        ids = tokenizer(PREFIX_STARTS[i % len(PREFIX_STARTS)], return_tensors="pt")["input_ids"].to(device)
        for _ in range(length):
            logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            top = logits.topk(min(5, logits.numel()))
            probs = torch.softmax(top.values, -1).cpu()
            nxt = top.indices[torch.multinomial(probs, 1, generator=gen).to(device)]
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        text = tokenizer.decode(ids[0], skip_special_tokens=True)
        out.append(text.replace("{", " ").replace("}", " ") + ". ")
    return out


class EditModule(L.LightningModule):
    """Knowledge editing of a frozen causal LM.

    Args:
        model: Hugging Face hub id or local directory of the causal LM to edit, or
            ``factworld:<preset>/model`` for the built-in offline fact-world model.
        layers: the edit layers (indices of decoder blocks whose MLP down projection is updated);
            the last one is where the target residuals ``z`` are defined.
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
        eval_batch_size: (prompt, target) pairs per forward in evaluation.
        max_rows_per_forward: split forward passes into micro-batches of at most this many rows
            (bounds memory on large models; 0 = whole batch at once).
        gguf_file: name of a GGUF file inside the ``model`` directory (a ``model`` path ending in
            ``.gguf`` works too); needs ``pip install gguf accelerate``.
        chat_template: render every prompt of the edit requests as a user turn of the tokenizer's
            chat template followed by the assistant's opening (instruct models; see
            :mod:`lightning_edit.chat`).
        system_prompt: an optional system message for ``chat_template``.
    """

    def __init__(
        self,
        model: str,
        layers: list[int],
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
        eval_batch_size: int = 64,
        max_rows_per_forward: int = 0,
        gguf_file: str | None = None,
        chat_template: bool = False,
        system_prompt: str | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False
        self.model_name = model
        self.layers = sorted(int(l) for l in layers)
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be a non-empty list of distinct indices, got {layers}")
        self.residual_cfg = residual if isinstance(residual, ResidualConfig) else ResidualConfig(**residual)
        self.residual_cfg.max_rows_per_forward = self.residual_cfg.max_rows_per_forward or max_rows_per_forward
        self.n_prefixes, self.prefix_length, self.seed = context_prefixes, context_length, seed
        self.eval_every, self.eval_batch_size, self.max_rows = eval_every, eval_batch_size, max_rows_per_forward
        self._templates = (layer_template, mlp_down_template)
        self.chat_template, self.system_prompt = chat_template, system_prompt
        self.lm, self.tokenizer = load_pretrained(model, dtype, trust_remote_code, tokenizer, gguf_file) if isinstance(model, str) else model
        self._finish_init()

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, layers: list[int], **kwargs) -> "EditModule":
        """Wrap an already loaded model and tokenizer (notebook use)."""
        return cls(model=(model, tokenizer), layers=layers, **kwargs)  # type: ignore[arg-type]

    def _finish_init(self) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("lightning-edit needs a fast tokenizer (character offsets locate anchors and targets)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.lm.requires_grad_(False)
        self.lm.eval()
        self.adapter = ModelAdapter(self.lm, *self._templates)
        self.adapter.check_layers(self.layers)
        self.prefixes: list[str] | None = None
        self.num_edits = 0
        self._pending = None
        self.edit_history: list[EditRequest] = []
        # mid-stream evaluations: {"num_edits", "edit/efficacy", ...} (for the report's plot)
        self.stream_history: list[dict] = []

    # ---- Lightning plumbing ----------------------------------------------------------------
    def configure_optimizers(self):
        # z is optimized with a fresh Adam per batch inside training_step; returning None gives
        # Lightning's mock optimizer, stepped once per batch so global_step counts batches.
        return None

    def setup(self, stage: str) -> None:
        # runs after the datamodule's setup: render its requests as chat turns once, so the
        # stream, the evaluation and the report all see the same prompts
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.chat_template and dm is not None and getattr(dm, "requests", None):
            dm.requests = self.prepare_requests(dm.requests)

    def prepare_requests(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """The requests as this module edits them (chat turns when ``chat_template`` is on)."""
        if not self.chat_template:
            return list(requests)
        from .chat import wrap_request

        return [wrap_request(self.tokenizer, r, self.system_prompt) for r in requests]

    def on_train_start(self) -> None:
        self.lm.eval()  # Lightning switched the module to train mode: keep HF dropout off

    def on_validation_model_train(self) -> None:
        self.lm.eval()

    def state_dict(self, *args, **kwargs):
        # The frozen LM never goes into checkpoints; the edit callback saves the edited tensors.
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["edit_module"] = {"prefixes": self.prefixes, "num_edits": self.num_edits}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("edit_module", {})
        self.prefixes = state.get("prefixes")
        self.num_edits = int(state.get("num_edits", 0))

    @property
    def device_(self) -> torch.device:
        return next(self.lm.parameters()).device

    def ensure_prefixes(self) -> list[str]:
        if self.prefixes is None:
            self.prefixes = generate_prefixes(self.lm, self.tokenizer, self.n_prefixes, self.prefix_length, self.seed)
        return self.prefixes

    # ---- sharding a batch across processes ---------------------------------------------------
    def shard(self, requests: Sequence[EditRequest]) -> list[EditRequest]:
        """This process's share of a batch (every process gets the whole batch from the loader)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return list(requests[rank::world])

    def gather_rows(self, t: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Concatenate every process's rows ``(n_i, d)`` into ``(sum_i n_i, d)``, rank by rank,
        identical on all processes. ``n_i`` may differ (an uneven or empty shard, a request with
        several chunks): the counts are gathered first, rows are padded to the largest count for
        the collective (gloo / NCCL need equal shapes) and the padding is dropped again.
        ``batch_size`` is unused (kept for callers of the older signature)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return t
        counts = self.all_gather(torch.tensor([t.shape[0]], device=t.device)).reshape(-1).tolist()
        padded = t.new_zeros(max(counts), *t.shape[1:])
        padded[: t.shape[0]] = t
        gathered = self.all_gather(padded)  # (world, max_n, d)
        return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])

    # ---- editing ---------------------------------------------------------------------------
    def compute_residuals(self, requests: Sequence[EditRequest]):
        """Encode and optimize the residual vectors of ``requests`` (one padded batch)."""
        rb = build_residual_batch(self.tokenizer, requests, self.ensure_prefixes(), self.residual_cfg.anchor, kl=self.residual_cfg.kl_factor > 0)
        return rb, optimize_residuals(self.adapter, rb, self.layers[-1], self.residual_cfg)

    def training_step(self, batch: EditBatch, batch_idx: int):
        mine = self.shard(batch.requests)
        if not mine:
            self._pending = (batch, None, None)
        else:
            rb, res = self.compute_residuals(mine)
            self._pending = (batch, rb, res)
            self.log_dict(
                {"z/loss": res.loss.mean(), "z/nll": res.nll.mean(), "z/steps": res.steps.float().mean(),
                 "z/delta_norm": (res.z_target - res.z_init).norm(dim=-1).mean()},
                prog_bar=False, on_step=True, batch_size=len(mine),
            )
        opt = self.optimizers()
        opt.step()  # advances global_step (mock optimizer)
        return None

    def on_train_batch_end(self, outputs, batch: EditBatch, batch_idx: int) -> None:
        # runs after the update callback: the batch is applied
        self.edit_history.extend(batch.requests)
        if self.eval_every and (batch.index + 1) % self.eval_every == 0:
            results = self.evaluate(self.edit_history)
            self.stream_history.append({"num_edits": self.num_edits, **results})
            self.log_edit_metrics(results, prefix="")

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self, requests: Sequence[EditRequest]) -> dict[str, float]:
        from .evaluate import evaluate_requests

        was = self.lm.training
        self.lm.eval()
        with torch.no_grad():
            out = evaluate_requests(self.lm, self.tokenizer, list(requests), batch_size=self.eval_batch_size)
        self.lm.train(was)
        return out

    def log_edit_metrics(self, metrics: dict[str, float], prefix: str = "") -> None:
        """Log metrics as curves against the number of edits applied."""
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics({prefix + k: float(v) for k, v in metrics.items()}, step=self.num_edits)

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
        from .evaluate import make_edit_metrics, update_edit_metrics

        # every process updates its shard; compute() sums the states across processes
        metrics = make_edit_metrics("all").to(self.device_)
        with torch.no_grad():
            update_edit_metrics(metrics, self.lm, self.tokenizer, self._val_requests, batch_size=self.eval_batch_size)
        results = {k: float(m.compute()) for k, m in metrics.items()}
        results = {k: v for k, v in results.items() if not math.isnan(v)}  # families without data
        self.last_eval = results
        for k, v in results.items():
            self.log(k, v, rank_zero_only=True, logger=False)  # progress bar / callback_metrics
        self.log_edit_metrics(results)  # TensorBoard, against the number of edits applied
