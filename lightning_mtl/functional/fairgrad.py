"""FairGrad: α-fair resource allocation between tasks (Ban & Ji 2024)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ._barrier import solve_power_barrier
from ._checks import as_output, check_jacobian, check_positive_float, check_positive_int, prepare_gramian
from ._gramian import combine, gramian
from ._linalg import normalize_by_trace, psd_part

_METHOD = "FairGrad"


def fairgrad_weights(G: Tensor, *, alpha: float = 1.0, max_iter: int = 100, tol: float = 1e-8) -> Tensor:
    """α-fair weights ``w > 0`` solving ``Gw = w^(−1/α)`` (elementwise), computed on ``G = J Jᵀ``.

    Ban & Ji (2024), *Fair Resource Allocation in Multi-Task Learning*, ICML,
    https://arxiv.org/abs/2402.15638, Algorithm 1: the update ``d = Jᵀw`` maximises the α-fair utility of
    the tasks' improvements ``gᵢ·d``. ``α = 1`` is proportional fairness (the Nash-MTL equation, without its
    normalisation), larger ``α`` favours the worst-off task (``α → ∞``: max-min, MGDA-like), ``α = 0`` is
    linear scalarisation (weights ``1/T`` here, as in TorchJD). The paper tunes α per benchmark; the
    default 1.0 is the official code's (OptMN-Lab/fairgrad). ``w`` is not normalised; the update scales
    as ``c^((1−α)/(1+α))`` when ``J`` is multiplied by ``c > 0``.

    Scaling: the update is ``Jᵀw`` (the paper, TorchJD). The official code multiplies it by ``T`` ("to match
    the sum loss") and then clips the shared gradient norm to ``max_norm = 1.0``; that clipping is the
    caller's (:func:`~._gramian.cap_update_norm`).

    Solved without scipy: ``Gw = w^(−1/α)`` is the stationarity condition of a strictly convex function of
    ``w > 0``, minimised by damped Newton steps on the trace-normalised Gramian (the solution of the raw
    problem follows by an exact rescaling). Without a solution (a zero gradient, or gradients summing to
    zero with non-negative weights) the last iterate is returned with a ``RuntimeWarning``.

    Scale: not invariant. ``Gw = w^(−1/α)`` gives ``w(sJ) = s^(−2α/(1+α))·w(J)``: the relative weights
    (the update's direction) do not change with the scale of the losses, but their size does, and the
    update's norm scales as ``s^((1−α)/(1+α))`` (only ``α = 1`` gives a scale-free update, as Nash-MTL's).
    The solver works on ``G/tr G``, so this law holds to rounding at any scale.

    Args:
        G: ``[T, T]`` Gramian.
        alpha: fairness parameter ``α ≥ 0`` (default 1.0).
        max_iter: Newton steps at most (default 100).
        tol: tolerance on ``maxᵢ |wᵢ^(1/α)·(Gw)ᵢ − 1|`` (default 1e-8).

    Returns:
        ``[T]`` weights, same dtype and device as ``G``.
    """
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0 for {_METHOD}, got {alpha!r}.")
    check_positive_int(max_iter, "max_iter", _METHOD)
    check_positive_float(tol, "tol", _METHOD)
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    if alpha == 0:
        return as_output(torch.full((T,), 1.0 / T, dtype=G64.dtype), G)
    G_hat, trace = normalize_by_trace(G64)
    if trace == 0.0:
        warnings.warn(
            f"{_METHOD}: all gradients are zero, no α-fair weights exist; returning ones.",
            RuntimeWarning,
            stacklevel=2,
        )
        return as_output(torch.ones(T, dtype=G64.dtype), G)
    power = 1.0 / alpha
    G_hat = psd_part(G_hat)
    w_hat, converged = solve_power_barrier(
        G_hat, torch.ones(T, dtype=G64.dtype), power, max_iter=max_iter, tol=tol
    )
    if not converged:
        warnings.warn(
            f"{_METHOD}: Newton's method did not reach tol={tol} in max_iter={max_iter} steps (no solution "
            "exists when a gradient is zero or the gradients cancel out); returning the last iterate.",
            RuntimeWarning,
            stacklevel=2,
        )
    # G = trace·Ĝ: if Ĝŵ = ŵ^(−p) then w = trace^(−1/(1+p))·ŵ solves Gw = w^(−p).
    return as_output(w_hat * trace ** (-1.0 / (1.0 + power)), G)


def fairgrad(J: Tensor, *, alpha: float = 1.0, max_iter: int = 100, tol: float = 1e-8) -> Tensor:
    """FairGrad update (``[P]``) of a Jacobian ``J`` (``[T, P]``); see :func:`fairgrad_weights`.

    Equal to ``J.T @ fairgrad_weights(gramian(J), ...)``.
    """
    check_jacobian(J, _METHOD)
    return combine(J, fairgrad_weights(gramian(J), alpha=alpha, max_iter=max_iter, tol=tol))
