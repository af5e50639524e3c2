"""The closed-form weight updates of MEMIT and AlphaEdit, as plain functions on tensors.

Shapes follow the rows-are-samples convention: ``keys`` is ``(n, d_k)`` (one key per row),
``resid`` is ``(n, d_model)``; an update is returned as ``(d_model, d_k)`` (``nn.Linear``
layout; :class:`lightning_edit.engine.arch.ModelAdapter` transposes it for ``Conv1D``).
In the papers' column notation ``K = keys.T`` and ``R = resid.T``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from lightning_edit.engine import sharding
from lightning_edit.errors import EditError, InputError

ThresholdMode = Literal["absolute", "relative", "energy"]


class NonFiniteUpdateError(EditError, FloatingPointError):
    """A solve produced NaN/Inf; the weights must stay untouched."""


class OversizedUpdateError(EditError, ArithmeticError):
    """An update far larger than any a sound edit makes (a near-singular solve, absurd settings);
    the weights must stay untouched."""


MAX_UPDATE = 1e4
"""The default bound on one batch's relative update of one layer, ``||Delta||_F / ||W||_F``: 40x
the largest of the shipped configs' measured updates (docs/design.md, Update bound)."""


def check_update(delta: torch.Tensor, weight: torch.Tensor, layer: int, limit: float) -> float:
    """The relative size ``||Delta||_F / ||W||_F`` of ``layer``'s update, after checking it.

    Raises:
        NonFiniteUpdateError: ``Delta`` holds NaN or Inf.
        OversizedUpdateError: the relative size exceeds ``limit`` (``limit <= 0``: no bound).
    """
    size = float(delta.float().norm() / sharding.frobenius(weight).to(delta.device).clamp_min(1e-30))
    if not math.isfinite(size) or not bool(torch.isfinite(delta).all()):
        raise NonFiniteUpdateError(f"layer {layer}: the update holds NaN or Inf values")
    if limit > 0 and size > limit:
        raise OversizedUpdateError(f"layer {layer}: the update's relative size ||Delta||/||W|| is {size:.3g}, above the bound "
                                   f"{limit:g} (editor max_update): refused; a near-singular solve or an absurd setting makes "
                                   "updates this large")
    return size


def normalized_moment(kkt_sum: torch.Tensor, count: int | float | torch.Tensor) -> torch.Tensor:
    """``C_0 = E[k k^T]`` from the running sum of ``k k^T`` and the number of keys."""
    count = float(count)
    if count <= 0:
        raise ValueError("second moment from zero keys")
    return kkt_sum / count


def null_space_projector(
    moment: torch.Tensor, threshold: float = 0.02, mode: ThresholdMode = "absolute"
) -> tuple[torch.Tensor, dict]:
    """AlphaEdit's projector onto the (approximate) null space of the preserved keys.

    ``moment`` is the normalized second moment ``C_0`` ``(d_k, d_k)``. The kept eigenvectors span
    the directions preserved knowledge barely uses; ``P = U U^T`` projects onto them:

    * ``absolute``: eigenvalue < ``threshold`` (the reference code, 0.02); depends on the
      model's activation scale.
    * ``relative``: eigenvalue < ``threshold`` x the largest eigenvalue. Scale-free, but the
      uncentered moment's top eigenvalue is the keys' mean direction, often far above the rest.
    * ``energy``: the smallest eigenvalues whose sum is at most ``threshold`` x ``trace(C_0)``.
      Scale-free and a guarantee: ``||P K_0||_F^2 <= threshold * ||K_0||_F^2`` for the keys
      the moment was computed from, so ``||Delta P K_0|| <= ||Delta||_2 sqrt(threshold) ||K_0||``.

    Computed in float64 with ``eigh`` (symmetric PSD).

    Returns ``(P (d_k, d_k) float32, info)`` where info holds the kept rank and spectrum summary.
    """
    if mode not in ("absolute", "relative", "energy"):
        raise InputError(f"threshold mode must be 'absolute', 'relative' or 'energy', got {mode!r}")
    m = moment.double()
    m = (m + m.T) / 2
    evals, evecs = torch.linalg.eigh(m)  # ascending
    if mode == "energy":
        frac = torch.cumsum(evals.clamp_min(0), 0) / evals.clamp_min(0).sum().clamp_min(1e-300)
        keep = frac <= threshold
        cut = float(evals[keep][-1]) if bool(keep.any()) else float("-inf")
    else:
        cut = threshold if mode == "absolute" else threshold * float(evals[-1].clamp_min(0))
        keep = evals < cut
    u = evecs[:, keep]
    proj = u @ u.T
    info = {
        "rank": int(keep.sum()),
        "dim": int(m.shape[0]),
        "cutoff": float(cut),
        "max_eigenvalue": float(evals[-1]),
        "min_eigenvalue": float(evals[0]),
        "kept_energy": float(evals[keep].clamp_min(0).sum() / evals.clamp_min(0).sum().clamp_min(1e-300)),
    }
    return proj.float(), info


def spread_residual(z_target: torch.Tensor, z_current: torch.Tensor, layers_left: int) -> torch.Tensor:
    """MEMIT's residual share for the current layer: ``(z - z_cur) / layers_left`` where
    ``layers_left`` counts the edit layers from this one to the last (5, 4, ..., 1)."""
    if layers_left < 1:
        raise ValueError("layers_left must be >= 1")
    return (z_target - z_current) / layers_left


def _check_finite(delta: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(delta).all():
        raise NonFiniteUpdateError(f"{what}: the closed-form solve produced non-finite values; no weight was changed")
    return delta


def _memit_system(k: torch.Tensor, moment: torch.Tensor, lam: float, norm_lambda: float, solve_dtype: torch.dtype,
                  prev_kkt: torch.Tensor | None = None, memory: float = 0.0) -> torch.Tensor:
    """``lam C_0 + K K^T`` (``+ norm_lambda I``, ENCORE's term; ``+ memory K_p K_p^T``, the earlier
    batches' edit keys) in ``solve_dtype``."""
    a = lam * moment.to(solve_dtype) + k.T @ k
    if norm_lambda:
        a = a + norm_lambda * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    if memory and prev_kkt is not None:
        a = a + memory * prev_kkt.to(device=a.device, dtype=solve_dtype)
    return a


def memit_update(
    keys: torch.Tensor,
    resid: torch.Tensor,
    moment: torch.Tensor,
    lam: float,
    solve_dtype: torch.dtype = torch.float64,
    norm_lambda: float = 0.0,
    prev_kkt: torch.Tensor | None = None,
    memory: float = 0.0,
) -> torch.Tensor:
    """MEMIT: ``Delta = R K^T (lam C_0 + K K^T)^-1``; with ENCORE's norm term
    ``Delta = R K^T (lam C_0 + norm_lambda I + K K^T)^-1``; with the earlier edits kept
    ``Delta = R K^T (lam C_0 + memory K_p K_p^T + K K^T)^-1``.

    The minimizer of ``||Delta K - R||^2 + lam tr(Delta C_0 Delta^T) + norm_lambda ||Delta||_F^2
    + memory ||Delta K_p||^2``. The last term is the sequential objective of the AlphaEdit paper
    (its eq. 3, without the projection): the outputs at the earlier batches' edit keys ``K_p``
    are preserved like those at ``C_0``'s keys, so a later batch does not overwrite them. The
    norm term:
    the last term (ENCORE, Gupta et al. 2025; ``update_norm_lambda`` in its reference code, 20
    for Llama-3-8B and 10 for GPT2-XL) penalizes the Frobenius norm of this batch's update, i.e.
    the change relative to the weights before the batch (not to the original weights), which
    keeps the edited matrices' norm from growing over a long stream.

    Args:
        keys: ``(n, d_k)`` keys of the edited facts at this layer.
        resid: ``(n, d_model)`` residuals this layer must add.
        moment: ``(d_k, d_k)`` normalized second moment of preserved keys.
        lam: weight of the preservation term (``mom2_update_weight``, 15000-20000 in the reference).
        norm_lambda: weight of ENCORE's ``||Delta||_F^2`` (0 = plain MEMIT).
        prev_kkt: ``(d_k, d_k)`` running ``K_p K_p^T`` of earlier batches' keys (``None`` = zero).
        memory: its weight (0 = plain MEMIT, ``prev_kkt`` unused).
    Returns:
        ``(d_model, d_k)`` update.
    """
    k, r = keys.to(solve_dtype), resid.to(solve_dtype)
    a = _memit_system(k, moment, lam, norm_lambda, solve_dtype, prev_kkt, memory)
    x = torch.linalg.solve(a, k.T @ r)  # (d_k, d_model); a is symmetric so Delta = x^T
    return _check_finite(x.T, "MEMIT update")


def alphaedit_ridge(l2: float, norm_lambda: float = 0.0) -> float:
    """The weight of ``||Delta P||_F^2`` in AlphaEdit's objective: ``l2``, plus ENCORE's norm term.

    AlphaEdit already penalizes the Frobenius norm of the update it applies (``Delta P``, weight
    ``L2``); ENCORE's ``norm_lambda ||Delta P||_F^2`` on that same update adds to it, so its solve
    is AlphaEdit's with ``l2 + norm_lambda`` (no other change)."""
    return l2 + norm_lambda if norm_lambda else l2


def _alphaedit_system(k: torch.Tensor, projector: torch.Tensor, prev_kkt: torch.Tensor | None, l2: float,
                      solve_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, P (K K^T + K_p K_p^T) + l2 I)`` in ``solve_dtype``: the projector and the left-hand
    side shared by :func:`alphaedit_update` and :func:`alphaedit_factors`."""
    p = projector.to(solve_dtype)
    kkt = k.T @ k
    if prev_kkt is not None:
        kkt = kkt + prev_kkt.to(solve_dtype)
    eye = torch.eye(p.shape[0], dtype=solve_dtype, device=p.device)
    return p, p @ kkt + l2 * eye


def alphaedit_update(
    keys: torch.Tensor,
    resid: torch.Tensor,
    projector: torch.Tensor,
    prev_kkt: torch.Tensor | None,
    l2: float,
    solve_dtype: torch.dtype = torch.float64,
    norm_lambda: float = 0.0,
) -> torch.Tensor:
    """AlphaEdit: ``Delta = R K^T P (K_p K_p^T P + K K^T P + l2 I)^-1``, applied through ``P``.

    Solved as the transposed system ``(P (K K^T + K_p K_p^T) + l2 I) X = P K R^T`` (as the
    reference does). ``X`` lies in the range of ``P`` analytically; we return ``(P X)^T`` so the
    null-space property ``Delta K_0 ~ 0`` also holds to rounding error.

    Args:
        keys: ``(n, d_k)``; resid: ``(n, d_model)``.
        projector: ``(d_k, d_k)`` null-space projector ``P``.
        prev_kkt: ``(d_k, d_k)`` running ``K_p K_p^T`` of earlier edits (``None`` = zero).
        l2: ridge term (``L2`` = 10 in the reference).
        norm_lambda: ENCORE's norm term on the applied update: ``l2 + norm_lambda``
            (:func:`alphaedit_ridge`).
    Returns:
        ``(d_model, d_k)`` update.
    """
    k, r = keys.to(solve_dtype), resid.to(solve_dtype)
    p, lhs = _alphaedit_system(k, projector, prev_kkt, alphaedit_ridge(l2, norm_lambda), solve_dtype)
    x = torch.linalg.solve(lhs, p @ (k.T @ r))  # (d_k, d_model)
    return _check_finite((p @ x).T, "AlphaEdit update")


# ---- factored forms: Delta = U @ V with U = R (d_model, n), V (n, d_k) -----------------------
# Both updates have rank <= n (the batch's rows): storing (U, V) costs n (d_model + d_k) numbers
# instead of d_model x d_k, and Delta = U @ V recomputed from them is bit-identical, which is what
# lets the edit ledger replay, undo and resume exactly.


def memit_factors(keys: torch.Tensor, resid: torch.Tensor, moment: torch.Tensor, lam: float,
                  solve_dtype: torch.dtype = torch.float64, norm_lambda: float = 0.0, prev_kkt: torch.Tensor | None = None,
                  memory: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """MEMIT's update as float32 factors: ``Delta = R^T (K A^-1)`` with ``A = lam C_0 + K^T K``
    (``+ norm_lambda I`` with ENCORE's norm term, ``+ memory K_p^T K_p`` with the earlier edits
    kept, see :func:`memit_update`; rows-are-samples ``K``), i.e. ``U = resid^T``,
    ``V = (A^-1 K^T)^T``."""
    k, r = keys.to(solve_dtype), resid.to(solve_dtype)
    a = _memit_system(k, moment, lam, norm_lambda, solve_dtype, prev_kkt, memory)
    g = torch.linalg.solve(a, k.T)  # (d_k, n)
    u, v = r.T.float().contiguous(), g.T.float().contiguous()
    return _check_finite(u, "MEMIT update"), _check_finite(v, "MEMIT update")


def alphaedit_factors(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, prev_kkt: torch.Tensor | None,
                      l2: float, solve_dtype: torch.dtype = torch.float64, norm_lambda: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AlphaEdit's update as float32 factors: ``Delta = (P X)^T`` with
    ``X = (P (K K^T + K_p K_p^T) + l2 I)^-1 P K R^T`` is ``R^T G^T``, ``G = P (.)^-1 P K`` ``(d_k, n)``:
    ``U = resid^T``, ``V = G^T`` (whose rows lie in the range of ``P``). ``norm_lambda``: ENCORE's
    norm term, ``l2 + norm_lambda`` (:func:`alphaedit_ridge`)."""
    k, r = keys.to(solve_dtype), resid.to(solve_dtype)
    p, lhs = _alphaedit_system(k, projector, prev_kkt, alphaedit_ridge(l2, norm_lambda), solve_dtype)
    g = p @ torch.linalg.solve(lhs, p @ k.T)  # (d_k, n)
    u, v = r.T.float().contiguous(), g.T.float().contiguous()
    return _check_finite(u, "AlphaEdit update"), _check_finite(v, "AlphaEdit update")


# ---- AlphaEdit with a maintained inverse (Woodbury) -------------------------------------------
# The system of batch b is A_{b-1} + P K_b^T K_b with A = P C + l2 I, C = K_p K_p^T of the
# batches before (rows-are-samples K). A grows by a rank-n term after every batch (C += K'^T K',
# K' = the keys after the update), so its inverse B = A^-1 can be kept up to date in O(d_k^2 n)
# per batch (Woodbury) instead of an O(d_k^3) solve per batch and layer. At the start of a
# stream C = 0 and B = I / l2 exactly.


def alphaedit_base_inverse(projector: torch.Tensor, prev_kkt: torch.Tensor | None, l2: float,
                           solve_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``B = (P C + l2 I)^-1`` computed directly (``C = K_p K_p^T``; ``None`` = zero: ``I / l2``)."""
    d = projector.shape[0]
    eye = torch.eye(d, dtype=solve_dtype, device=projector.device)
    if prev_kkt is None:
        return eye / l2
    a = projector.to(solve_dtype) @ prev_kkt.to(device=projector.device, dtype=solve_dtype) + l2 * eye
    return torch.linalg.solve(a, eye)


def _woodbury_apply(base_inv: torch.Tensor, pk: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B U, (I + K B U)^-1)`` for ``U = pk`` ``(d_k, n)`` and rows-are-samples ``k`` ``(n, d_k)``:
    ``(A + U K)^-1 U = B U (I + K B U)^-1`` with ``B = A^-1``."""
    bu = base_inv @ pk  # (d_k, n)
    small = torch.eye(k.shape[0], dtype=bu.dtype, device=bu.device) + k @ bu
    return bu, torch.linalg.inv(small)


def alphaedit_factors_woodbury(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, base_inv: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`alphaedit_factors` from the maintained ``base_inv = (P C + l2 I)^-1`` (in the solve
    dtype): ``G = P (A + P K^T K)^-1 P K^T = P B P K^T (I + K B P K^T)^-1`` in ``O(d_k^2 n)``."""
    dt = base_inv.dtype
    k, r, p = keys.to(dt), resid.to(dt), projector.to(dt)
    pk = p @ k.T  # (d_k, n)
    bu, small_inv = _woodbury_apply(base_inv, pk, k)
    g = p @ (bu @ small_inv)  # (d_k, n)
    u, v = r.T.float().contiguous(), g.T.float().contiguous()
    return _check_finite(u, "AlphaEdit update"), _check_finite(v, "AlphaEdit update")


def alphaedit_inverse_commit(base_inv: torch.Tensor, keys_after: torch.Tensor, projector: torch.Tensor) -> torch.Tensor:
    """``B`` after ``C += K'^T K'``: ``(A + P K'^T K')^-1 = B - B P K'^T (I + K' B P K'^T)^-1 K' B``."""
    dt = base_inv.dtype
    k, p = keys_after.to(device=base_inv.device, dtype=dt), projector.to(dt)
    if k.shape[0] == 0:
        return base_inv
    bu, small_inv = _woodbury_apply(base_inv, p @ k.T, k)
    out = base_inv - (bu @ small_inv) @ (k @ base_inv)
    return _check_finite(out, "AlphaEdit inverse update")
