"""Everything architecture-specific lives here: where the decoder blocks and the MLP down
projections are, how their weights are laid out, and the forward hooks the editor needs.

A *key* is the input of a layer's MLP down projection (size ``d_k``, the MLP width), a
*value* its output (size ``d_model``). Updates are always computed as ``(d_model, d_k)``
matrices (the ``nn.Linear`` layout) and transposed here for GPT-2's ``Conv1D``.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_edit.engine import sharding
from lightning_edit.errors import InputError

# model_type (from the HF config) -> (decoder block template, MLP down-projection template)
KNOWN_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "gpt2": ("transformer.h.{}", "transformer.h.{}.mlp.c_proj"),
    "gptj": ("transformer.h.{}", "transformer.h.{}.mlp.fc_out"),
    "gpt_neo": ("transformer.h.{}", "transformer.h.{}.mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers.{}", "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
    "llama": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "mistral": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "qwen2": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "qwen3": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "gemma": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "gemma2": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "phi3": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "olmo": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "olmo2": ("model.layers.{}", "model.layers.{}.mlp.down_proj"),
    "falcon": ("transformer.h.{}", "transformer.h.{}.mlp.dense_4h_to_h"),
    "opt": ("model.decoder.layers.{}", "model.decoder.layers.{}.fc2"),
}


class ArchitectureError(InputError):
    """A model whose layers or down projections cannot be found; the message says which."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the layers we need have run."""


@dataclass(frozen=True)
class ArchSpec:
    layer_template: str
    mlp_down_template: str


def resolve_spec(model: nn.Module, layer_template: str | None = None, mlp_down_template: str | None = None) -> ArchSpec:
    """Templates from the config's ``model_type``, overridable per field (for any other decoder)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = KNOWN_ARCHITECTURES.get(model_type or "")
    if known is None and (layer_template is None or mlp_down_template is None):
        raise ArchitectureError(
            f"unknown architecture {model_type!r}: name its modules in the config, e.g. "
            "layer_template: 'model.layers.{}' and mlp_down_template: 'model.layers.{}.mlp.down_proj' "
            f"(known: {', '.join(sorted(KNOWN_ARCHITECTURES))})"
        )
    return ArchSpec(layer_template or known[0], mlp_down_template or known[1])


def _get_submodule(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ArchitectureError(f"{what} {name!r} not found in {type(model).__name__}") from None


def _block_output(out):
    """Decoder blocks return a tensor (GPT-2 / Llama / Qwen2 in transformers 5) or a tuple whose
    first element is the hidden state (GPT-J and older code)."""
    return out[0] if isinstance(out, tuple) else out


class ModelAdapter:
    """Uniform access to a decoder's blocks and MLP down projections.

    Args:
        model: a Hugging Face causal LM (any module with a ``config.model_type`` that is
            known, or any module when both templates are given).
        layer_template / mlp_down_template: override the module-name templates, with ``{}``
            for the layer index.
    """

    def __init__(self, model: nn.Module, layer_template: str | None = None, mlp_down_template: str | None = None):
        self.model = model
        self.spec = resolve_spec(model, layer_template, mlp_down_template)
        for tpl, what in ((self.spec.layer_template, "layer_template"), (self.spec.mlp_down_template, "mlp_down_template")):
            if tpl.count("{}") != 1:
                raise ArchitectureError(f"{what} {tpl!r} needs exactly one '{{}}' for the layer index")
        self.n_layers = self._count_layers()

    def _count_layers(self) -> int:
        n = getattr(getattr(self.model, "config", None), "num_hidden_layers", None)
        if n is None:
            n = 0
            while True:
                try:
                    self.model.get_submodule(self.spec.layer_template.format(n))
                except AttributeError:
                    break
                n += 1
        _get_submodule(self.model, self.spec.layer_template.format(0), "layer_template")
        _get_submodule(self.model, self.spec.mlp_down_template.format(0), "mlp_down_template")
        return int(n)

    def default_edit_layers(self) -> list[int]:
        """The edit layers ``layers: auto`` picks: the papers' choice for their models scaled by
        depth, five consecutive blocks from depth / 8 (Llama-3-8B's 32 blocks: 4-8 as in
        AlphaEdit; GPT-J's 28: 3-7; SmolLM2's 30: 3-7, where its causal trace points), fewer on
        models of under 20 blocks. A starting point: ``lightning-edit trace`` measures where a
        model stores facts."""
        n = self.n_layers
        count = max(1, min(5, n // 4))
        start = min(n // 8, n - count)
        return list(range(start, start + count))

    def check_layers(self, layers: Sequence[int]) -> None:
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise ArchitectureError(f"edit layer {layer} out of range: the model has {self.n_layers} layers (0..{self.n_layers - 1})")

    # ---- modules and weights -------------------------------------------------------------
    def layer(self, i: int) -> nn.Module:
        return _get_submodule(self.model, self.spec.layer_template.format(i), "layer")

    def down_proj(self, i: int) -> nn.Module:
        module = _get_submodule(self.model, self.spec.mlp_down_template.format(i), "down projection")
        if not hasattr(module, "weight") or module.weight.dim() != 2:
            raise ArchitectureError(f"down projection {self.spec.mlp_down_template.format(i)!r} ({type(module).__name__}) has no 2-D weight")
        return module

    def weight_name(self, i: int) -> str:
        """The parameter name of layer ``i``'s down-projection weight (state-dict key)."""
        return self.spec.mlp_down_template.format(i) + ".weight"

    def is_transposed(self, i: int) -> bool:
        """True when the weight is stored ``(d_k, d_model)`` (GPT-2 ``Conv1D``: ``y = x W + b``)."""
        module = self.down_proj(i)
        if isinstance(module, nn.Linear):
            return False
        if type(module).__name__ == "Conv1D":
            return True
        raise ArchitectureError(
            f"down projection {self.spec.mlp_down_template.format(i)!r} is a {type(module).__name__}; "
            "only nn.Linear and transformers' Conv1D layouts are supported"
        )

    def dims(self, i: int) -> tuple[int, int]:
        """``(d_model, d_k)`` of layer ``i``'s down projection."""
        w = self.down_proj(i).weight
        return (w.shape[1], w.shape[0]) if self.is_transposed(i) else (w.shape[0], w.shape[1])

    def weight_as_linear(self, i: int) -> torch.Tensor:
        """The down-projection weight as a ``(d_model, d_k)`` view (no copy); under the
        ``sharded_edit`` strategy a view of this process's slice (a DTensor, see
        :mod:`~lightning_edit.engine.sharding`)."""
        w = self.down_proj(i).weight
        return w.T if self.is_transposed(i) else w

    def full_weight(self, i: int) -> torch.Tensor:
        """The whole down-projection weight ``(d_model, d_k)`` as a plain tensor (gathered from
        every process when sharded: then every process must call it)."""
        return sharding.full(self.weight_as_linear(i))

    @torch.no_grad()
    def add_to_weight(self, i: int, delta: torch.Tensor) -> None:
        """``W += delta`` in place, ``delta`` given as ``(d_model, d_k)``, cast to the weight's
        dtype and device and transposed for ``Conv1D``."""
        w = self.down_proj(i).weight
        d = delta.T if self.is_transposed(i) else delta
        if d.shape != w.shape:
            raise ValueError(f"update for {self.weight_name(i)} has shape {tuple(delta.shape)}, expected {self.dims(i)} (d_model, d_k)")
        sharding.add_(w, d)  # sharded: each process adds its slice of the update

    def embedding_and_layer_params(self, upto: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Parameters that influence the keys of layers ``<= upto``: every parameter that is not
        inside a later block (used to fingerprint the model for statistics caches)."""
        later = tuple(self.spec.layer_template.format(j) + "." for j in range(upto + 1, self.n_layers))
        for name, p in self.model.named_parameters():
            if not name.startswith(later):
                yield name, p

    # ---- hooks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def trace(
        self,
        key_layers: Sequence[int] = (),
        output_layers: Sequence[int] = (),
        stop_after: int | None = None,
        value_layers: Sequence[int] = (),
    ) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
        """Record down-projection inputs (``keys[l]``: ``(batch, seq, d_k)``), down-projection
        outputs (``values[l]``: ``(batch, seq, d_model)``, bias included) and block outputs
        (``outputs[l]``: ``(batch, seq, d_model)``; ``tuple_len[l]``: the length of the tuple the
        block returned, 0 for a tensor) during forward passes inside the block, and
        optionally stop the forward pass right after block ``stop_after`` (use
        :meth:`forward` so the stop is caught)."""
        rec: dict[str, dict] = {"keys": {}, "outputs": {}, "tuple_len": {}, "values": {}}
        handles = []
        for layer in set(key_layers):
            def pre_hook(_m, args, layer=layer):
                rec["keys"][layer] = args[0]
            handles.append(self.down_proj(layer).register_forward_pre_hook(pre_hook))
        for layer in set(value_layers):
            def value_hook(_m, _args, out, layer=layer):
                rec["values"][layer] = out
            handles.append(self.down_proj(layer).register_forward_hook(value_hook))
        watch = set(output_layers) | ({stop_after} if stop_after is not None else set())
        for layer in watch:
            def hook(_m, _args, out, layer=layer):
                if layer in output_layers:
                    rec["outputs"][layer] = _block_output(out)
                    rec["tuple_len"][layer] = len(out) if isinstance(out, tuple) else 0
                if layer == stop_after:
                    raise _StopForward
            handles.append(self.layer(layer).register_forward_hook(hook))
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def add_at_positions(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor) -> Iterator[None]:
        """Add ``vectors[j]`` to block ``layer``'s output at ``(rows[j], positions[j])`` during
        forward passes inside the block (differentiably: gradients reach ``vectors``).
        ``vectors`` may be swapped by mutating the tensor; shapes: rows, positions ``(m,)``,
        vectors ``(m, d_model)``."""

        def hook(_m, _args, out):
            h = _block_output(out)
            h = h.index_put((rows, positions), vectors.to(h.dtype), accumulate=True)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = self.layer(layer).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replace_at_positions(
        self, layer: int, rows: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, site: str = "block"
    ) -> Iterator[None]:
        """Overwrite the output of block ``layer`` (``site="block"``) or of its MLP down
        projection (``site="mlp"``) with ``vectors[j]`` at ``(rows[j], positions[j])`` during
        forward passes inside the block (causal tracing restores clean states this way).
        Shapes: rows, positions ``(m,)``, vectors ``(m, d_model)``."""
        if site not in ("block", "mlp"):
            raise ValueError(f"site must be 'block' or 'mlp', got {site!r}")

        def hook(_m, _args, out):
            h = _block_output(out)
            h = h.index_put((rows, positions), vectors.to(h.dtype))
            return (h, *out[1:]) if isinstance(out, tuple) else h

        module = self.layer(layer) if site == "block" else self.down_proj(layer)
        handle = module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def skip_blocks(self, upto: int, output: torch.Tensor, tuple_len: int = 0) -> Iterator[None]:
        """Inside the block, blocks ``0 .. upto`` do not compute: blocks before ``upto`` pass
        their input through and block ``upto`` returns ``output`` (a precomputed block output
        whose shape matches the forward's ``(batch, seq, d_model)``; ``tuple_len`` is the length
        of the tuple the real blocks return, 0 for a plain tensor, as :meth:`trace` records it).
        Hooks on the blocks
        still run, so :meth:`add_at_positions` on block ``upto`` still adds its vectors.
        Used where the lower blocks' states are known not to change between forwards."""

        def shaped(h):
            return (h, *([None] * (tuple_len - 1))) if tuple_len else h

        def passthrough(*args, **kwargs):
            return shaped(args[0] if args else kwargs["hidden_states"])

        def last(*args, **kwargs):
            return shaped(output)

        saved = []
        for i in range(upto + 1):
            block = self.layer(i)
            saved.append((block, block.__dict__.get("forward")))
            block.forward = last if i == upto else passthrough
        try:
            yield
        finally:
            for block, fwd in saved:
                if fwd is None:
                    del block.forward
                else:
                    block.forward = fwd

    @contextlib.contextmanager
    def attention_implementation(self, name: str | None) -> Iterator[None]:
        """Inside the block, the model's attention runs as ``name`` (a transformers attention
        implementation: ``eager``, ``sdpa``, ...); ``None`` or the current one changes nothing."""
        cur = getattr(getattr(self.model, "config", None), "_attn_implementation", None)
        if name is None or cur is None or name == cur or not hasattr(self.model, "set_attn_implementation"):
            yield
            return
        self.model.set_attn_implementation(name)
        try:
            yield
        finally:
            self.model.set_attn_implementation(cur)

    def body_and_head(self):
        """``(body, head)`` of the model, see :func:`body_and_head` (checked once per model; an
        adapter's ``_body_head`` attribute, if set, overrides it)."""
        if "_body_head" in self.__dict__:
            return self._body_head
        return body_and_head(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kw):
        """Run the model; returns its output, or ``None`` when a hook stopped it early."""
        try:
            kw.setdefault("use_cache", False)
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        except _StopForward:
            return None


_BODY_HEAD: "weakref.WeakKeyDictionary[nn.Module, tuple | None]" = weakref.WeakKeyDictionary()


def body_and_head(model: nn.Module):
    """``(body, head)`` with ``model(x).logits == head(body(x).last_hidden_state)``: the decoder
    without its LM head, and the head alone, so a caller can run the head (and its softmax over
    the vocabulary) on exactly the positions it reads. ``None`` when this model's logits are more
    than its output embedding of the last hidden state (logit scaling, soft-capping, ...).
    Checked once per model on a two-token input (the answer is cached). Always ``None`` for a
    model sharded with FSDP2: its embeddings and head belong to the root unit, whose parameters
    are gathered only by the whole model's forward."""
    if sharding.model_is_sharded(model):
        return None
    if model in _BODY_HEAD:
        return _BODY_HEAD[model]
    out = None
    try:
        body, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        body = head = None
    if body is not None and head is not None and body is not model:
        p = next(model.parameters())
        ids = torch.tensor([[1, 2]], device=p.device)
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                want = model(input_ids=ids, use_cache=False).logits.float()
                got = head(body(input_ids=ids, use_cache=False).last_hidden_state).float()
        finally:
            model.train(was)
        tol = 1e-3 * float(want.abs().max().clamp_min(1.0))
        if got.shape == want.shape and float((got - want).abs().max()) <= tol:
            out = (body, head)
    _BODY_HEAD[model] = out
    return out


def logits_at(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """``model(input_ids).logits[rows, positions]`` ``(m, vocab)``, with the LM head run only at
    those ``m`` positions when the model splits into body and head (:func:`body_and_head`)."""
    split = body_and_head(model)
    if split is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits[rows.to(logits.device), positions.to(logits.device)]
    hidden = split[0](input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return split[1](hidden[rows.to(hidden.device), positions.to(hidden.device)])


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``(batch, 1, queries, keys)`` attention pattern as the additive mask
    transformers' attention adds to its scores (0 where allowed, the dtype's minimum elsewhere)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


_PACKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def supports_packed_rows(model: nn.Module) -> bool:
    """Whether ``model`` honours a custom 4-D additive attention mask with explicit
    ``position_ids``, so several short sequences can share one row (each attending only to
    itself). Checked once per model: two sequences packed into one row must give the first
    block's outputs they give alone (one block already applies the mask and the positions; a
    deeper comparison would mostly measure low-precision rounding). The answer is cached."""
    if model in _PACKED:
        return _PACKED[model]
    ok = False
    try:
        p = next(model.parameters())
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        a, b = torch.tensor([3, 5, 7], device=p.device), torch.tensor([4, 6], device=p.device)
        seg = torch.tensor([0, 0, 0, 1, 1], device=p.device)
        causal = torch.ones(5, 5, dtype=torch.bool, device=p.device).tril()
        allowed = (seg[:, None] == seg[None, :]) & causal
        kw = {"output_hidden_states": True, "use_cache": False}
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                alone = [model(input_ids=x[None], **kw).hidden_states[1][0].float() for x in (a, b)]
                packed = model(input_ids=torch.cat([a, b])[None], attention_mask=additive_mask(allowed[None, None], dtype),
                               position_ids=torch.tensor([[0, 1, 2, 0, 1]], device=p.device), **kw).hidden_states[1][0].float()
        finally:
            model.train(was)
        want = torch.cat(alone)
        tol = 1e-2 * float(want.abs().max().clamp_min(1.0))
        ok = packed.shape == want.shape and float((packed - want).abs().max()) <= tol
    except Exception:  # a model that refuses the mask or the arguments: no packing
        ok = False
    _PACKED[model] = ok
    return ok


def prefix_cache_kwarg(model: nn.Module) -> str | None:
    """The keyword under which ``model.forward`` takes a key/value cache of earlier positions
    (``cache`` in recent transformers 5 releases, ``past_key_values`` before), or ``None``
    when the model cannot continue from a cache with explicit ``position_ids`` (then the
    residual optimization runs every step on the whole sequence)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "position_ids" not in params:
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(keys, values)]`` per decoder layer of a transformers ``DynamicCache``
    (``(batch, kv_heads, seq, head_dim)`` each)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(l.keys, l.values) for l in layers]
    return [(cache.key_cache[i], cache.value_cache[i]) for i in range(len(cache.key_cache))]


def make_cache(model: nn.Module, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A fresh ``DynamicCache`` holding ``kv`` (one ``(keys, values)`` pair per layer)."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:
        cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model.forward`` can compute the LM head on selected positions only
    (``logits_to_keep``, transformers >= 4.50): scoring a few positions then skips the head
    (and its softmax) everywhere else."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
