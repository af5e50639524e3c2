"""The field's fixes for long edit streams, as options (all off by default):

* MPES (``residual.mpes``): a request's z optimization stops once its new target is the most
  probable answer on every rewrite row (ENCORE, Gupta et al. 2025);
* ENCORE's norm constraint (``editor.norm_lambda``): a Frobenius-norm term on each batch's update
  in the MEMIT / AlphaEdit objectives;
* NAS (``residual.nas``): the target MLP outputs rescaled to a norm anchor of the unedited model
  ("Norm Anchors Make Model Edits Last", 2026).

Each is checked against a direct computation, off is bit-equal to the plain method, and resume
and undo stay exact with all of them on."""

import copy

import pytest
import torch
from conftest import ARCHS, FAST_RESIDUAL, cli_args, counterfact_records, counterfactual_requests, make_model

from lightning_edit import Editor
from lightning_edit.callbacks import MEMIT
from lightning_edit.checkpointing import load_nested, read_edits
from lightning_edit.engine.arch import ModelAdapter
from lightning_edit.engine.closed_form import alphaedit_factors, alphaedit_update, memit_factors, memit_update
from lightning_edit.engine.residuals import (
    ResidualConfig,
    block_outputs_at_anchors,
    build_residual_batch,
    norm_anchor_targets,
    optimize_residuals,
    trimmed_mean_norm,
    unconverged_requests,
)
from lightning_edit.engine.tokens import flatten_targets
from lightning_edit.engine.update import AlphaEditMethod, MemitMethod
from lightning_edit.errors import InputError

PREFIXES = ["The cat sat. ", "Because of this. "]


# ---- MPES ------------------------------------------------------------------------------------

def _mpes_reference(adapter, tokenizer, request, cfg, z_layer=2):
    """MEMIT's compute_z for ONE request, written out step by step (full padded forwards, no
    prefix cache, no packing), with the reference's MPES rule: after each forward, count the step
    if at every target position of every rewrite row the target token is the argmax; stop at the
    ``cfg.mpes``-th counted step, before the backward. Returns ``(steps taken, z)``."""
    model = adapter.model
    rb = build_residual_batch(tokenizer, [request], PREFIXES, cfg.anchor, kl=False)
    enc = rb.enc
    rows, pos, _ = rb.anchors()
    t_rows, t_pos, _ = flatten_targets(enc)
    labels = enc.input_ids[t_rows, t_pos]
    z0 = block_outputs_at_anchors(adapter, rb, z_layer)[0]
    delta = torch.zeros_like(z0, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)
    hits = 0
    for step in range(cfg.steps + 1):
        opt.zero_grad()
        with adapter.add_at_positions(z_layer, rows, pos, delta.expand(len(rows), -1)):
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits.float()
        logp = logits[t_rows, t_pos - 1].log_softmax(-1)
        tok_lp = logp.gather(-1, labels[:, None]).squeeze(-1)
        per_row = torch.stack([-tok_lp[t_rows == r].mean() for r in t_rows.unique()])
        loss = per_row.mean() + cfg.weight_decay * delta.norm() / z0.norm() ** 2
        if bool((logp.argmax(-1) == labels).all()):
            hits += 1
            if hits == cfg.mpes:
                break
        if step == cfg.steps:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            max_norm = cfg.clamp_norm_factor * z0.norm()
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return step, (z0 + delta).detach()


@pytest.mark.parametrize("mpes", [1, 2])
def test_mpes_stops_each_request_at_its_own_first_most_probable_step(trained_gpt2, tokenizer, mpes):
    ad = ModelAdapter(trained_gpt2)
    reqs = counterfactual_requests(4, start=3)
    # no KL term and no loss threshold: only MPES can stop a request
    cfg = ResidualConfig(anchor="prompt_last", steps=25, lr=0.5, clamp_norm_factor=4.0, kl_factor=0.0, early_stop_loss=0.0, mpes=mpes)
    batch = build_residual_batch(tokenizer, reqs, PREFIXES, cfg.anchor, kl=False)
    res = optimize_residuals(ad, batch, 2, cfg)
    off = optimize_residuals(ad, batch, 2, ResidualConfig(**{**cfg.__dict__, "mpes": 0}))
    for i, r in enumerate(reqs):
        step, z = _mpes_reference(ad, tokenizer, r, cfg)
        assert step < cfg.steps, "the reference loop must stop by MPES for the test to mean anything"
        assert int(res.steps[i]) == step, (i, int(res.steps[i]), step)
        torch.testing.assert_close(res.z_target[i], z, rtol=1e-4, atol=1e-4)
        assert int(off.steps[i]) == cfg.steps  # without MPES the request went on
    assert len(set(res.steps.tolist())) > 1 or mpes == 2  # requests stop at their own steps, in one batch
    # MPES-stopped requests are the most probable answer already: never named as unconverged
    assert bool(res.most_probable.all()) and off.most_probable is None
    assert unconverged_requests(res, batch, 1e-9) == [] and len(unconverged_requests(off, batch, 1e-9)) == len(reqs)


def test_mpes_off_is_the_same_computation(trained_gpt2, tokenizer):
    """``mpes=0`` and an MPES count never reached run the identical optimization (the argmax
    bookkeeping touches nothing else): bit-equal vectors, losses and steps."""
    ad = ModelAdapter(trained_gpt2)
    reqs = counterfactual_requests(5)
    batch = build_residual_batch(tokenizer, reqs, PREFIXES, "subject_last")
    a = optimize_residuals(ad, batch, 2, ResidualConfig(steps=8))
    b = optimize_residuals(ad, batch, 2, ResidualConfig(steps=8, mpes=10**6))
    assert torch.equal(a.z_target, b.z_target) and torch.equal(a.loss, b.loss) and torch.equal(a.steps, b.steps)
    with pytest.raises(InputError, match="mpes"):
        ResidualConfig(mpes=-1)


# ---- ENCORE's norm constraint -------------------------------------------------------------------

def _problem(seed=0, n=3, d_k=7, d_v=4):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_k, generator=g, dtype=torch.float64)
    resid = torch.randn(n, d_v, generator=g, dtype=torch.float64)
    a = torch.randn(d_k, 40, generator=g, dtype=torch.float64)
    a[:2] *= 0.05  # a few directions preserved knowledge barely uses
    moment = a @ a.T / 40
    kp = torch.randn(5, d_k, generator=g, dtype=torch.float64)
    return keys, resid, moment, kp


def _grad_at(objective, delta):
    d = delta.detach().clone().requires_grad_(True)
    objective(d).backward()
    return d.grad


def test_encore_memit_minimizes_its_objective():
    keys, resid, moment, _ = _problem()
    lam, mu = 3.0, 0.7

    def objective(d):  # ||Delta K - R||^2 + lam tr(Delta C0 Delta^T) + mu ||Delta||_F^2
        return ((keys @ d.T - resid) ** 2).sum() + lam * torch.trace(d @ moment @ d.T) + mu * (d ** 2).sum()

    delta = memit_update(keys, resid, moment, lam, norm_lambda=mu)
    g = _grad_at(objective, delta)
    assert float(g.norm()) < 1e-10 * float(resid.norm())  # convex: a zero gradient is the minimum
    u, v = memit_factors(keys, resid, moment, lam, norm_lambda=mu)
    torch.testing.assert_close((u @ v).double(), delta, rtol=1e-5, atol=1e-6)
    plain = memit_update(keys, resid, moment, lam)
    assert float(objective(delta)) < float(objective(plain)) and float(delta.norm()) < float(plain.norm())
    # off: the same computation as plain MEMIT, bit for bit
    assert torch.equal(memit_update(keys, resid, moment, lam, norm_lambda=0.0), plain)
    assert all(torch.equal(a, b) for a, b in zip(memit_factors(keys, resid, moment, lam, norm_lambda=0.0),
                                                 memit_factors(keys, resid, moment, lam)))


def test_memit_memory_minimizes_its_objective_and_keeps_earlier_edits():
    keys, resid, moment, kp = _problem(2)
    lam, mem = 3.0, 2.0

    def objective(d):  # ||Delta K - R||^2 + lam tr(Delta C0 Delta^T) + memory ||Delta K_p||^2
        return ((keys @ d.T - resid) ** 2).sum() + lam * torch.trace(d @ moment @ d.T) + mem * ((kp @ d.T) ** 2).sum()

    prev = kp.T @ kp
    delta = memit_update(keys, resid, moment, lam, prev_kkt=prev, memory=mem)
    g = _grad_at(objective, delta)
    assert float(g.norm()) < 1e-10 * float(resid.norm())
    u, v = memit_factors(keys, resid, moment, lam, prev_kkt=prev, memory=mem)
    torch.testing.assert_close((u @ v).double(), delta, rtol=1e-5, atol=1e-6)
    plain = memit_update(keys, resid, moment, lam)
    assert float((kp @ delta.T).norm()) < 0.5 * float((kp @ plain.T).norm())  # the earlier edits' outputs move less
    # off: bit-equal to plain MEMIT, whatever K_p K_p^T is passed
    assert torch.equal(memit_update(keys, resid, moment, lam, prev_kkt=prev, memory=0.0), plain)
    # the method object accumulates the keys after each batch only with memory
    m = MemitMethod(lam=lam, moments={0: moment.float()}, memory=mem)
    assert m.needs_keys_after and m.hparams()["memory"] == mem
    m.commit({0: kp.float()})
    um, vm = m.factors(0, keys.float(), resid.float())
    torch.testing.assert_close((um @ vm).double(), delta, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.delta(0, keys.float(), resid.float()).double(), delta, rtol=1e-4, atol=1e-5)
    m.reset()
    assert m.prev_kkt == {}
    off = MemitMethod(lam=lam, moments={0: moment.float()})
    assert not off.needs_keys_after and "memory" not in off.hparams()
    off.commit({0: kp.float()})
    off.reset(iter(lambda: pytest.fail("keys read without memory"), None))  # the ledger is not read
    assert off.prev_kkt == {}
    with pytest.raises(InputError, match="memory must be >= 0"):
        MEMIT(lam=1.0, memory=-1.0)


@pytest.mark.parametrize("solver", ["woodbury", "direct"])
def test_encore_alphaedit_minimizes_its_objective(solver):
    keys, resid, moment, kp = _problem(1)
    evecs = torch.linalg.eigh(moment).eigenvectors[:, :3]  # a projector exact in float64 (as null_space_projector's, unrounded)
    p = evecs @ evecs.T
    l2, mu = 0.5, 0.8

    def objective(d):  # the update applied is Delta P: AlphaEdit's objective plus ENCORE's term on it
        dp = d @ p
        return ((keys @ dp.T - resid) ** 2).sum() + ((kp @ dp.T) ** 2).sum() + (l2 + mu) * (dp ** 2).sum()

    prev = kp.T @ kp
    delta = alphaedit_update(keys, resid, p, prev, l2, norm_lambda=mu)
    g = _grad_at(objective, delta)
    assert float(g.norm()) < 1e-10 * float(resid.norm())
    assert torch.allclose(delta @ p, delta, atol=1e-12)  # in the null space's range
    u, v = alphaedit_factors(keys, resid, p, prev, l2, norm_lambda=mu)
    torch.testing.assert_close((u @ v).double(), delta, rtol=1e-5, atol=1e-6)
    # the method object (Woodbury-maintained inverse, or direct) with K_p K_p^T accumulated from a batch
    m = AlphaEditMethod(l2=l2, projectors={0: p.float()}, solver=solver, norm_lambda=mu)
    m.commit({0: kp.float()})
    um, vm = m.factors(0, keys.float(), resid.float())
    torch.testing.assert_close((um @ vm).double(), alphaedit_update(keys.float(), resid.float(), p.float(), m.prev_kkt[0], l2,
                                                                    norm_lambda=mu), rtol=1e-4, atol=1e-5)
    assert m.hparams()["norm_lambda"] == mu and "norm_lambda" not in AlphaEditMethod(l2=l2, projectors={}).hparams()
    # off: bit-equal to plain AlphaEdit
    assert torch.equal(alphaedit_update(keys, resid, p, prev, l2, norm_lambda=0.0), alphaedit_update(keys, resid, p, prev, l2))
    assert "norm_lambda" not in MemitMethod(lam=1.0, moments={}).hparams()


# ---- NAS ---------------------------------------------------------------------------------------

def test_norm_anchor_targets_against_the_formula():
    g = torch.Generator().manual_seed(0)
    z0, v0, delta = (torch.randn(6, 5, generator=g) for _ in range(3))
    delta[4] *= 40  # ||v*|| far above twice the anchor: not edited
    anchor = 3.0
    z, scale = norm_anchor_targets(z0, v0, delta, anchor, max_ratio=2.0)
    for i in range(6):
        v_star = v0[i] + delta[i]
        if v_star.norm() > 2 * anchor:
            assert torch.equal(z[i], z0[i]) and scale[i] == 0
        else:
            want = z0[i] - v0[i] + v_star * (anchor / v_star.norm())
            torch.testing.assert_close(z[i], want)
            torch.testing.assert_close((z[i] - z0[i] + v0[i]).norm(), torch.tensor(anchor))  # v* lands on the anchor
    assert scale[4] == 0 and int((scale == 0).sum()) == 1
    z_all, _ = norm_anchor_targets(z0, v0, delta, anchor, max_ratio=0)  # 0: never skip
    torch.testing.assert_close((z_all - z0 + v0).norm(dim=-1), torch.full((6,), anchor))
    # the anchor: the mean without the top 5%
    norms = torch.arange(1.0, 41.0)
    assert trimmed_mean_norm(norms) == pytest.approx(float(norms[:38].mean()))


@pytest.mark.parametrize("arch", ARCHS)
def test_nas_v0_is_the_mlps_contribution_to_the_block_output(arch, tokenizer):
    """``v_init`` is what the z layer's MLP adds at the anchor: the block's output without it
    (the down projection's output zeroed there) is exactly ``z0 - v0``."""
    model = make_model(arch, vocab_size=len(tokenizer), n_layer=3, width=32)
    ad = ModelAdapter(model)
    reqs = counterfactual_requests(3)
    batch = build_residual_batch(tokenizer, reqs, ["The cat sat. "], "subject_last")
    z0, v0 = block_outputs_at_anchors(ad, batch, 2, values=True)
    rows, pos = batch.bare_row_of_chunk, batch.bare_anchor_positions()
    with torch.no_grad(), ad.replace_at_positions(2, rows, pos, torch.zeros(len(rows), z0.shape[1]), site="mlp"), \
            ad.trace(output_layers=[2], stop_after=2) as rec:
        ad.forward(batch.enc.input_ids, batch.enc.attention_mask)
    without_mlp = rec["outputs"][2][rows, pos].float()
    torch.testing.assert_close(without_mlp, z0 - v0, rtol=1e-5, atol=1e-5)


def test_nas_rescales_the_optimized_targets(trained_gpt2, tokenizer):
    ad = ModelAdapter(trained_gpt2)
    reqs = counterfactual_requests(5)
    batch = build_residual_batch(tokenizer, reqs, PREFIXES, "prompt_last")
    cfg = ResidualConfig(**{**FAST_RESIDUAL, "steps": 8}, nas=True)
    plain = optimize_residuals(ad, batch, 2, ResidualConfig(**{**FAST_RESIDUAL, "steps": 8}))
    free = optimize_residuals(ad, batch, 2, cfg)  # no anchor given: v0 recorded, nothing scaled
    assert torch.equal(free.z_target, plain.z_target) and free.nas_scale is None
    torch.testing.assert_close(free.v_star_norm, (free.v_init + free.z_target - free.z_init).norm(dim=-1))
    anchor = float(free.v_star_norm.median())
    scaled = optimize_residuals(ad, batch, 2, cfg, norm_anchor=anchor)
    want, scale = norm_anchor_targets(free.z_init, free.v_init, free.z_target - free.z_init, anchor, 2.0)
    torch.testing.assert_close(scaled.z_target, want, rtol=0, atol=0)
    assert torch.equal(scaled.nas_scale, scale) and bool((scale > 0).all())
    # an anchor under half of every ||v*||: nothing is edited
    none = optimize_residuals(ad, batch, 2, cfg, norm_anchor=0.4 * float(free.v_star_norm.min()))
    assert torch.equal(none.z_target, none.z_init.float()) and bool((none.nas_scale == 0).all())


def test_nas_refuses_blocks_that_normalize_their_mlp_output(tokenizer):
    model = make_model("llama", vocab_size=len(tokenizer), n_layer=3, width=32)
    model.model.layers[2].post_feedforward_layernorm = torch.nn.Identity()  # as Gemma 2/3, OLMo 2
    batch = build_residual_batch(tokenizer, counterfactual_requests(2), [], "subject_last")
    with pytest.raises(InputError, match="post_feedforward_layernorm"):
        optimize_residuals(ModelAdapter(model), batch, 2, ResidualConfig(steps=2, nas=True))


# ---- the options together: the Editor's undo and the CLI's resume stay exact -----------------------

def _editor(model, tokenizer, corpus_file, tmp_path, method, options):
    kw = {"l2": 1.0, "nullspace_threshold": 0.05, "threshold_mode": "energy"} if method == "alphaedit" else {"lam": 1.0}
    residual = {**FAST_RESIDUAL, "steps": 8}
    if options:
        kw["norm_lambda"] = 0.5
        residual.update(mpes=1, nas=True)
    return Editor(model, tokenizer, layers=[1, 2], method=method, method_kwargs=kw, residual=residual, context_prefixes=0,
                  stats={"corpus": str(corpus_file), "corpus_name": None, "n_samples": 300, "max_length": 64,
                         "cache_dir": str(tmp_path / "stats")})


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_undo_is_exact_with_every_option_on(trained_gpt2, tokenizer, corpus_file, tmp_path, method):
    reqs = counterfactual_requests(10)
    batches = [reqs[0:3], reqs[3:5], reqs[5:7], reqs[7:9]]
    a = _editor(copy.deepcopy(trained_gpt2), tokenizer, corpus_file, tmp_path, method, True)
    b = _editor(copy.deepcopy(trained_gpt2), tokenizer, corpus_file, tmp_path, method, True)
    plain = _editor(copy.deepcopy(trained_gpt2), tokenizer, corpus_file, tmp_path, method, False)
    for batch in batches:
        a.apply(batch)
    for batch in batches[:2]:
        b.apply(batch)
        plain.apply(batch)
    # the anchor: from the first batch on the unedited model, the same for both
    rb = build_residual_batch(tokenizer, batches[0], [], "prompt_last")
    first = optimize_residuals(ModelAdapter(trained_gpt2), rb, 2, a.module.residual_cfg)
    assert a.module.norm_anchor == b.module.norm_anchor == pytest.approx(trimmed_mean_norm(first.v_star_norm))
    assert a.history()[0]["hparams"]["norm_lambda"] == 0.5
    a.undo(2)
    for l in (1, 2):
        wa, wb = a.module.adapter.weight_as_linear(l), b.module.adapter.weight_as_linear(l)
        assert torch.equal(wa, wb), l
        assert not torch.equal(wa, plain.module.adapter.weight_as_linear(l))  # the options changed the edits
    a.apply(reqs[9:10])
    b.apply(reqs[9:10])
    assert all(torch.equal(a.module.adapter.weight_as_linear(l), b.module.adapter.weight_as_linear(l)) for l in (1, 2))


def test_resume_after_kill_is_exact_with_every_option_on(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    import json

    import lightning_edit.stream.edit_stream as residuals  # where the stream calls trimmed_mean_norm
    from lightning_edit.cli import main

    dataset = tmp_path / "cf.json"
    dataset.write_text(json.dumps(counterfact_records(12)))
    options = ["--model.residual.mpes=1", "--model.residual.nas=true", "--model.residual.nas_samples=8", "--editor.norm_lambda=0.5"]
    full = tmp_path / "full"
    cli = main(["fit", *cli_args(tiny_model_dir, dataset, corpus_file, full, extra=options)])
    anchor = cli.model.norm_anchor
    assert anchor is not None and load_nested(full / "ckpt" / "last.safetensors")["edit_module"]["norm_anchor"] == anchor
    w_full, _ = read_edits(full / "ckpt" / "edited.safetensors")

    run = tmp_path / "run"
    args = cli_args(tiny_model_dir, dataset, corpus_file, run, extra=options)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", *args, "--trainer.callbacks+=conftest.CrashAfterBatch", "--trainer.callbacks.batch=1"])

    def no_recalibration(*a, **k):
        raise AssertionError("a resumed run must take the norm anchor from its checkpoint")

    monkeypatch.setattr(residuals, "trimmed_mean_norm", no_recalibration)
    cli = main(["fit", *args, f"--ckpt_path={run}/ckpt/last.safetensors"])
    assert cli.model.num_edits == 12 and cli.model.norm_anchor == anchor
    w_res, _ = read_edits(run / "ckpt" / "edited.safetensors")
    for k in w_full:
        assert torch.equal(w_res[k], w_full[k]), k  # bit-identical
