"""Each supported architecture: module discovery, key capture, update orientation, hooks."""

import pytest
import torch
from conftest import ARCHS, make_model

from lightning_edit.engine.arch import ArchitectureError, ModelAdapter


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_are_down_projection_input_and_update_orientation(arch):
    model = make_model(arch, vocab_size=64, n_layer=3, width=32)
    ad = ModelAdapter(model)
    layer = 1
    d_model, d_k = ad.dims(layer)
    assert d_model == 32 and d_k in (64, 128)
    ids = torch.randint(1, 64, (2, 7))
    outs = {}
    h = ad.down_proj(layer).register_forward_hook(lambda m, a, o: outs.setdefault("v", o))
    with ad.trace(key_layers=[layer], output_layers=[layer]) as rec:
        ad.forward(ids)
    h.remove()
    k, v = rec["keys"][layer], outs["v"]
    assert k.shape == (2, 7, d_k)
    # the captured key really is what the down projection consumed
    torch.testing.assert_close(ad.down_proj(layer)(k), v)
    # an update given as (d_model, d_k) changes the output by exactly delta @ k
    delta = torch.randn(d_model, d_k) * 0.01
    before = ad.down_proj(layer)(k).detach()
    ad.add_to_weight(layer, delta)
    after = ad.down_proj(layer)(k).detach()
    torch.testing.assert_close(after - before, k @ delta.T, rtol=1e-4, atol=1e-5)
    assert ad.is_transposed(layer) == (arch == "gpt2")


@pytest.mark.parametrize("arch", ARCHS)
def test_add_at_positions_and_early_stop(arch):
    model = make_model(arch, vocab_size=64, n_layer=3, width=32)
    ad = ModelAdapter(model)
    ids = torch.randint(1, 64, (2, 6))
    with ad.trace(output_layers=[2]) as rec:
        base = ad.forward(ids).logits
    clean = rec["outputs"][2].detach().clone()
    vec = torch.randn(1, 32, requires_grad=True)
    with ad.add_at_positions(1, torch.tensor([1]), torch.tensor([3]), vec), ad.trace(output_layers=[1]) as rec:
        out = ad.forward(ids).logits
    # only row 1, positions >= 3 change (causal), and gradients reach the vector
    assert torch.allclose(out[0], base[0], atol=1e-6)
    assert torch.allclose(out[1, :3], base[1, :3], atol=1e-6)
    assert not torch.allclose(out[1, 3:], base[1, 3:])
    out.sum().backward()
    assert vec.grad is not None and vec.grad.abs().sum() > 0
    # stopping after block 0 returns None and records nothing from later blocks
    with ad.trace(key_layers=[0], output_layers=[2], stop_after=0) as rec:
        assert ad.forward(ids) is None
    assert 0 in rec["keys"] and 2 not in rec["outputs"]
    assert clean.shape == (2, 6, 32)


def test_template_overrides_and_errors():
    model = make_model("llama", vocab_size=64, n_layer=2, width=32)
    ad = ModelAdapter(model, layer_template="model.layers.{}", mlp_down_template="model.layers.{}.mlp.down_proj")
    assert ad.n_layers == 2
    with pytest.raises(ArchitectureError, match="model.layers.0.mlp.nope"):
        ModelAdapter(model, mlp_down_template="model.layers.{}.mlp.nope")
    with pytest.raises(ArchitectureError, match="out of range"):
        ad.check_layers([5])
    with pytest.raises(ArchitectureError, match="exactly one"):
        ModelAdapter(model, layer_template="model.layers")
    model.config.model_type = "mystery"
    with pytest.raises(ArchitectureError, match="unknown architecture 'mystery'"):
        ModelAdapter(model)


def test_auto_edit_layers_follow_the_papers_choice_scaled_by_depth(tokenizer):
    from types import SimpleNamespace

    from lightning_edit.api import Editor
    from lightning_edit.builtin.toy import make_model
    from lightning_edit.engine.arch import ModelAdapter

    def auto(n):
        return ModelAdapter.default_edit_layers(SimpleNamespace(n_layers=n))

    assert auto(32) == [4, 5, 6, 7, 8]  # Llama-3-8B: AlphaEdit's layers
    assert auto(28) == [3, 4, 5, 6, 7] and auto(30) == [3, 4, 5, 6, 7]  # GPT-J, SmolLM2 (its causal trace)
    assert auto(4) == [0] and auto(12) == [1, 2, 3] and auto(1) == [0]
    for n in range(1, 100):
        layers = auto(n)
        assert layers and layers[-1] < n and layers == list(range(layers[0], layers[0] + len(layers)))
    editor = Editor(make_model("llama", len(tokenizer), n_layer=8), tokenizer)  # layers default to "auto"
    assert editor.module.layers == [1, 2] and editor.module.ledger.meta["layers"] == [1, 2]
