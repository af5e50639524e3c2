"""The closed forms against an independent slow float64 reference on random matrices."""

import pytest
import torch

from lightning_edit.engine.closed_form import (
    NonFiniteUpdateError,
    alphaedit_update,
    memit_update,
    normalized_moment,
    null_space_projector,
    spread_residual,
)


def _random_problem(d_k=24, d_v=16, n=7, n0=200, seed=0, noise=1e-3):
    g = torch.Generator().manual_seed(seed)
    # preserved keys live mostly in a 12-dim subspace, so a non-trivial null space exists
    basis = torch.randn(d_k, 12, generator=g, dtype=torch.float64)
    k0 = (basis @ torch.randn(12, n0, generator=g, dtype=torch.float64)).T + noise * torch.randn(n0, d_k, generator=g, dtype=torch.float64)
    keys = torch.randn(n, d_k, generator=g, dtype=torch.float64)
    resid = torch.randn(n, d_v, generator=g, dtype=torch.float64)
    return k0, keys, resid


def test_memit_matches_column_formula():
    k0, keys, resid = _random_problem()
    c0 = normalized_moment(k0.T @ k0, k0.shape[0])
    lam = 3.0
    got = memit_update(keys, resid, c0, lam)
    # paper notation: Delta = R K^T (lam C0 + K K^T)^-1 with K = keys^T, R = resid^T
    K, R = keys.T, resid.T
    want = R @ K.T @ torch.linalg.inv(lam * c0 + K @ K.T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_alphaedit_matches_paper_formula_and_reference_solve():
    k0, keys, resid = _random_problem()
    c0 = normalized_moment(k0.T @ k0, k0.shape[0])
    P, info = null_space_projector(c0, threshold=1e-3, mode="relative")
    assert 0 < info["rank"] < c0.shape[0]
    kp = torch.randn(5, keys.shape[1], dtype=torch.float64)
    prev = kp.T @ kp
    l2 = 0.7
    got = alphaedit_update(keys, resid, P, prev, l2)
    K, R, Pd = keys.T, resid.T, P.double()
    eye = torch.eye(Pd.shape[0], dtype=torch.float64)
    # the paper: Delta = R K^T P (Kp Kp^T P + K K^T P + a I)^-1, applied as Delta P
    paper = R @ K.T @ Pd @ torch.linalg.inv(prev @ Pd + K @ K.T @ Pd + l2 * eye) @ Pd
    torch.testing.assert_close(got, paper, rtol=1e-6, atol=1e-8)
    # the reference code's transposed system, X^T (equal up to P's float32 rounding: we
    # return (P X)^T, which is exactly in P's range)
    x = torch.linalg.solve(Pd @ (K @ K.T + prev) + l2 * eye, Pd @ K @ R.T)
    torch.testing.assert_close(got, x.T, rtol=1e-5, atol=1e-6)


def test_alphaedit_update_leaves_preserved_keys_alone():
    k0, keys, resid = _random_problem(noise=1e-9)
    c0 = normalized_moment(k0.T @ k0, k0.shape[0])
    P, info = null_space_projector(c0, threshold=1e-6, mode="relative")
    assert info["rank"] == 12
    delta = alphaedit_update(keys, resid, P, None, 1.0)
    # how strongly the update acts on preserved keys, relative to its size: ~float32 rounding
    assert (k0 @ delta.T).norm() / (delta.norm() * k0.norm()) < 1e-6
    # while it acts on the edited keys (which have a component in the null space)
    assert (keys @ delta.T).norm() / (delta.norm() * keys.norm()) > 1e-2


def test_projector_is_orthogonal_projection_and_thresholds():
    k0, _, _ = _random_problem()
    c0 = normalized_moment(k0.T @ k0, k0.shape[0])
    P, info = null_space_projector(c0, threshold=1e-3, mode="relative")
    Pd = P.double()
    torch.testing.assert_close(Pd @ Pd, Pd, atol=1e-5, rtol=0)
    torch.testing.assert_close(Pd, Pd.T, atol=1e-6, rtol=0)
    assert info["rank"] == 12  # d_k 24 minus the 12-dim preserved subspace
    evals = torch.linalg.eigvalsh(c0)
    P_abs, info_abs = null_space_projector(c0, threshold=float(evals[5]) + 1e-12, mode="absolute")
    assert info_abs["rank"] == 6
    # energy mode: the kept directions hold at most that share of trace(C0), which bounds ||P K0||
    P_en, info_en = null_space_projector(c0, threshold=1e-4, mode="energy")
    assert info_en["kept_energy"] <= 1e-4 and info_en["rank"] >= 12
    assert float((k0 @ P_en.double()).norm() ** 2) <= 1e-4 * float(k0.norm() ** 2) * 1.001
    with pytest.raises(ValueError):
        null_space_projector(c0, 0.1, mode="fraction")


def test_spread_residual_shares():
    z, zc = torch.ones(2, 3) * 10, torch.zeros(2, 3)
    assert [float(spread_residual(z, zc, k)[0, 0]) for k in (5, 4, 1)] == [2.0, 2.5, 10.0]
    with pytest.raises(ValueError):
        spread_residual(z, zc, 0)


def test_non_finite_update_refused():
    keys = torch.tensor([[float("nan"), 1.0]])
    with pytest.raises(NonFiniteUpdateError):
        memit_update(keys, torch.ones(1, 2), torch.eye(2), 1.0)


def _stream(batches=40, d_k=48, d_v=16, n=6, seed=3):
    """Anisotropic keys (scales over 1.5 decades, as real keys), a projector of rank 30."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_k, d_k, generator=g, dtype=torch.float64))
    proj = q[:, :30] @ q[:, :30].T
    scale = torch.logspace(0, 1.5, d_k, dtype=torch.float64)
    out = []
    for _ in range(batches):
        k = torch.randn(n, d_k, generator=g, dtype=torch.float64) * scale
        out.append((k, torch.randn(n, d_v, generator=g, dtype=torch.float64), k + 0.05 * torch.randn(n, d_k, generator=g, dtype=torch.float64)))
    return proj, out


def test_woodbury_factors_match_the_direct_solve_over_a_stream():
    from lightning_edit.engine.closed_form import (
        alphaedit_base_inverse,
        alphaedit_factors,
        alphaedit_factors_woodbury,
        alphaedit_inverse_commit,
    )

    proj, stream = _stream()
    l2 = 10.0
    b = alphaedit_base_inverse(proj, None, l2)
    assert torch.equal(b, torch.eye(proj.shape[0], dtype=torch.float64) / l2)
    c = None
    for keys, resid, keys_after in stream:
        u1, v1 = alphaedit_factors(keys, resid, proj, c, l2)
        u2, v2 = alphaedit_factors_woodbury(keys, resid, proj, b)
        assert torch.equal(u1, u2)
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-7)
        c = keys_after.T @ keys_after + (c if c is not None else 0)
        b = alphaedit_inverse_commit(b, keys_after, proj)
    # 40 rank-6 Woodbury steps stay on the directly computed inverse
    torch.testing.assert_close(b, alphaedit_base_inverse(proj, c, l2), rtol=1e-9, atol=1e-12)
    # the woodbury update is the AlphaEdit update: it leaves the preserved (null-space) keys alone
    delta = (u2.double() @ v2.double())
    null_dir = torch.eye(proj.shape[0], dtype=torch.float64) - proj
    assert float((delta @ null_dir).norm()) < 1e-5 * float(delta.norm())


def test_alphaedit_method_solvers_agree_and_reset_is_bit_identical():
    from lightning_edit.engine.update import AlphaEditMethod

    proj, stream = _stream(batches=12)
    proj = proj.float()
    live = AlphaEditMethod(l2=10.0, projectors={3: proj})
    direct = AlphaEditMethod(l2=10.0, projectors={3: proj}, solver="direct")
    after = []
    for keys, resid, keys_after in stream:
        k, r, ka = keys.float(), resid.float(), keys_after.float()
        u1, v1 = live.factors(3, k, r)
        u2, v2 = direct.factors(3, k, r)
        torch.testing.assert_close(v1, v2, rtol=1e-4, atol=1e-6)
        live.commit({3: ka})
        direct.commit({3: ka})
        after.append({3: ka})
    assert torch.equal(live.prev_kkt[3], direct.prev_kkt[3])
    rebuilt = AlphaEditMethod(l2=10.0, projectors={3: proj})
    rebuilt.reset(iter(after))  # what a resume from the ledger does
    assert torch.equal(rebuilt.inverse[3], live.inverse[3]) and torch.equal(rebuilt.prev_kkt[3], live.prev_kkt[3])
    k, r, _ = stream[0]
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.factors(3, k.float(), r.float()), live.factors(3, k.float(), r.float())))
    with pytest.raises(ValueError, match="solver"):
        AlphaEditMethod(l2=1.0, projectors={}, solver="lu")
