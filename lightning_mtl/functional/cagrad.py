"""CAGrad: conflict-averse gradient descent (Liu et al. 2021)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import as_output, check_jacobian, prepare_gramian
from ._gramian import combine, gramian
from ._linalg import normalize_by_trace, psd_part
from ._qp import solve_bounded_qp

_METHOD = "CAGrad"
_RIDGE = 1e-10  # relative to tr G: makes the inner QP strictly convex
_RESCALES = (0, 1, 2)


def cagrad_weights(G: Tensor, *, c: float = 0.4, rescale: int = 1) -> Tensor:
    """Weights ``w`` of the CAGrad update ``Jᵀw``, computed on the Gramian ``G = J Jᵀ``.

    Liu, Liu, Jin, Stone, Liu (2021), *Conflict-Averse Gradient Descent for Multi-task Learning*, NeurIPS,
    https://arxiv.org/abs/2110.14048, Algorithm 1. With ``g₀ = mean gᵢ`` and ``φ = c‖g₀‖``:
    ``w* = argmin_{w∈Δ} g_wᵀg₀ + φ‖g_w‖`` (``g_w = Jᵀw``), ``d = g₀ + (φ/‖g_w*‖) g_w*``, and the update is
    ``d/(1 + c²)`` (``rescale=1``, the default of the authors' code; ``rescale=2``: ``d/(1 + c)``, their toy
    script; ``rescale=0``: ``d``). So the weights are ``(1/T + (φ/‖g_w*‖) w*) / (1 + c²)``; they use the mean
    gradient, not the sum (ports that match a summed loss multiply by ``T``). ``c = 0`` is gradient descent
    on the average loss.

    Solved without a generic optimiser: writing ``y = (φ/‖g_w‖) w``, the optimality conditions become
    those of ``min_{y ≥ 0} ½yᵀGy + (Gu − ν1)ᵀy`` (``u = 1/T``) plus ``yᵀGy = φ²``, and ``yᵀGy`` increases
    with the multiplier ``ν``. So ``ν`` is found by a safeguarded Newton search (exact on each piece where
    the active set is fixed) over exact bound-constrained QP solves, and the weights are ``u + y``.
    When ``‖g₀‖ ≤ 1e-7·‖J‖_F`` (e.g. two opposite gradients) the update is ``g₀/(1 + c²)``, as in the
    authors' code for ``‖g₀‖ = 0``.

    Scale-invariant: ``φ/‖g_w*‖ = c‖g₀‖/‖g_w*‖`` and ``w*`` (a minimiser over the simplex of a function
    homogeneous in ``J``) do not change with the scale of ``J``; the problem is solved on ``G/tr G`` and the
    ``‖g₀‖`` threshold is relative.

    Args:
        G: ``[T, T]`` Gramian.
        c: radius of the ball around ``g₀``, a finite number ``≥ 0``. The paper's Theorem 3.2 gives
            convergence to a stationary point of the average loss for ``c < 1``, and only to a
            Pareto-stationary point for ``c ≥ 1``, which is allowed (as in the authors' code and TorchJD).
            Default 0.4 (NYUv2, Cityscapes); the toy uses 0.5.
        rescale: 0, 1 or 2 as above (default 1).

    Returns:
        ``[T]`` weights, same dtype and device as ``G``.
    """
    if isinstance(c, bool) or not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0.0):
        raise ValueError(f"c must be a finite number >= 0 for {_METHOD}, got {c!r}.")
    if rescale not in _RESCALES:
        raise ValueError(f"rescale must be 0, 1 or 2 for {_METHOD}, got {rescale!r}.")
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    u = torch.full((T,), 1.0 / T, dtype=G64.dtype)
    G_hat, _ = normalize_by_trace(G64)
    G_hat = psd_part(G_hat)
    Q = G_hat + _RIDGE * torch.eye(T, dtype=G64.dtype)
    weights = u.clone()
    # ‖g₀‖² relative to ‖J‖²_F: below 1e-14 the ball (radius c‖g₀‖) is negligible and d = g₀
    if float(u @ G_hat @ u) > 1e-14 and c > 0:
        weights = u + _ball_offset(Q, u, c * c * float(u @ Q @ u))
    factor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    return as_output(weights / factor, G)


def _ball_offset(Q: Tensor, u: Tensor, target: float) -> Tensor:
    """``y ≥ 0`` solving ``min ½yᵀQy + (Qu − ν1)ᵀy`` for the ``ν`` at which ``yᵀQy = target``."""
    T = u.shape[0]
    Qu = Q @ u
    ones = torch.ones(T, dtype=Q.dtype)
    zero = torch.zeros(1, T, dtype=Q.dtype)

    def solve(nu: float, free: Tensor | None) -> tuple[Tensor, Tensor]:
        y, free = solve_bounded_qp(Q, (Qu - nu)[None], zero, free=free)
        return y[0], free

    lo = float(Qu.min())  # y = 0 for every ν ≤ lo
    hi = math.inf
    nu = lo + math.sqrt(target)  # a first guess of the right scale (diag Q ≤ 1 after normalisation)
    free: Tensor | None = None
    y = torch.zeros(T, dtype=Q.dtype)
    for _ in range(100):
        y, free = solve(nu, free)
        psi = float(y @ Q @ y)
        if abs(psi - target) <= 1e-10 * target:
            break
        if psi < target:
            lo = nu
        else:
            hi = nu
        # On the current piece y(ν + δ) = y + δ z with z = Q_FF⁻¹ 1_F, so ψ is quadratic in δ.
        F = free[0] & (y > 0)
        step = math.nan
        if bool(F.any()):
            idx = F.nonzero().squeeze(1)
            z = torch.zeros(T, dtype=Q.dtype)
            z[idx] = torch.linalg.solve(Q[idx][:, idx], ones[idx])
            a, s = float(ones @ z), float(y.sum())
            disc = s * s - a * (psi - target)
            if a > 0 and disc >= 0:
                step = (-s + math.sqrt(disc)) / a
        candidate = nu + step
        if not (math.isfinite(candidate) and lo < candidate < hi):
            candidate = 0.5 * (lo + hi) if math.isfinite(hi) else lo + 2.0 * max(nu - lo, math.sqrt(target))
        if abs(candidate - nu) <= 1e-13 * (abs(nu) + math.sqrt(target)):
            break
        nu = candidate
    return y


def cagrad(J: Tensor, *, c: float = 0.4, rescale: int = 1) -> Tensor:
    """CAGrad update (``[P]``) of a Jacobian ``J`` (``[T, P]``); see :func:`cagrad_weights`.

    Equal to ``J.T @ cagrad_weights(gramian(J), c=c, rescale=rescale)``.
    """
    check_jacobian(J, _METHOD)
    return combine(J, cagrad_weights(gramian(J), c=c, rescale=rescale))
