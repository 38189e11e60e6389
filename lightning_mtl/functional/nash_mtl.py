"""Nash-MTL: multi-task learning as a bargaining game (Navon et al. 2022)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._barrier import solve_power_barrier
from ._checks import as_output, check_jacobian, check_positive_float, check_positive_int, prepare_gramian
from ._gramian import combine, gramian
from ._linalg import psd_part

_METHOD = "Nash-MTL"


class NashMTLWeights(NamedTuple):
    """Result of :func:`nash_mtl_weights`."""

    weights: Tensor
    """``[T]`` bargaining weights ``α`` (pass them back as ``previous`` at the next step)."""
    converged: bool
    """Whether ``maxᵢ |αᵢ(Gα)ᵢ − 1| ≤ tol`` was reached within ``max_iter`` Newton steps."""


class NashMTLResult(NamedTuple):
    """Result of :func:`nash_mtl`."""

    update: Tensor
    """``[P]`` update ``Jᵀα``."""
    weights: Tensor
    """``[T]`` weights ``α`` (the state to pass back as ``previous``)."""
    converged: bool
    """As in :class:`NashMTLWeights`."""


def nash_mtl_weights(
    G: Tensor,
    *,
    previous: Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
) -> NashMTLWeights:
    """Nash bargaining weights ``α > 0`` solving ``Gα = 1/α`` (elementwise), computed on ``G = J Jᵀ``.

    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya (2022), *Multi-Task Learning as a
    Bargaining Game*, ICML, https://arxiv.org/abs/2202.01017, Algorithm 1. The update is ``Jᵀα``; ``α`` is
    not normalised, and ``αᵀGα = T`` at the solution, so ``‖Jᵀα‖ = √T`` whatever the gradients' scale.

    The authors (AvivNavon/nash-mtl) normalise ``Ĝ = G/‖G‖_F`` for their solver but constrain
    ``αᵢ(Gα)ᵢ ≥ 1`` with the raw ``G``, so the ``α`` they return solves ``Gα = 1/α`` for the *raw* Gramian:
    ``α = α̂/√‖G‖_F`` where ``Ĝα̂ = 1/α̂`` (checked against their code through TorchJD's port). Here ``α̂``
    minimises the strictly convex ``½α̂ᵀĜα̂ − Σ log α̂ᵢ`` by damped Newton steps with a positivity-preserving
    backtracking line search, warm-started from ``previous`` (the authors warm-start their ≤ 20 convex
    sub-problems the same way) rescaled by the best scalar, without cvxpy. Stops when
    ``maxᵢ |αᵢ(Gα)ᵢ − 1| ≤ tol``: scale-free, unlike the authors' ``‖Ĝα − 1/α‖ < 1e-3``, which also holds
    for large ``α`` along a direction where no solution exists; one more Newton step then polishes ``α``.

    No solution exists when a task's gradient is zero or a non-negative combination of the gradients
    vanishes (e.g. two opposite gradients): the iterates then grow along that direction and
    ``converged`` is ``False``; the weights stay finite (the authors fall back to their previous ``α`` when
    their solver fails). A zero Gramian returns ``previous`` (or ones), not converged.

    The authors then back-propagate ``Σ αᵢLᵢ`` and clip the shared parameters' gradient norm to
    ``max_norm = 1.0``: that step is the caller's (:func:`~._gramian.cap_update_norm` does it on the
    Gramian); ``update_weights_every = 1`` is the caller's as well.

    Scale: not invariant by definition, and deliberately so: ``Gα = 1/α`` makes ``α`` scale by ``1/s``
    when ``J`` scales by ``s``, so the update ``Jᵀα`` does not change (``‖Jᵀα‖ = √T``). The solver works on
    ``G/‖G‖_F``, so it solves the same problem at every scale and the law holds to rounding.

    Args:
        G: ``[T, T]`` Gramian.
        previous: ``[T]`` positive weights returned at the previous step (warm start); default: ``α̂ = 1`` in
            the normalised units, rescaled by the best scalar.
        max_iter: Newton steps at most (default 20, the authors' ``optim_niter``).
        tol: tolerance on ``maxᵢ |αᵢ(Gα)ᵢ − 1|`` (default 1e-3, the authors' threshold).

    Returns:
        ``NashMTLWeights(weights, converged)``; weights have the dtype and device of ``G``.
    """
    check_positive_int(max_iter, "max_iter", _METHOD)
    check_positive_float(tol, "tol", _METHOD)
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    start = torch.ones(T, dtype=G64.dtype)
    if previous is not None:
        start = torch.as_tensor(previous).detach().to(device="cpu", dtype=G64.dtype)
        if start.shape != (T,) or not bool(torch.isfinite(start).all()) or not bool((start > 0).all()):
            raise ValueError(
                f"previous must be a finite positive [{T}] tensor for {_METHOD}, got {start.tolist()} "
                f"(shape {tuple(start.shape)})."
            )
    frobenius = float(torch.linalg.matrix_norm(G64))
    if not frobenius > 0.0:
        return NashMTLWeights(as_output(start, G), False)
    root = math.sqrt(frobenius)
    G_hat = psd_part(G64 / frobenius)
    start = start * root if previous is not None else start  # ones are a start in normalised units
    alpha_hat, converged = solve_power_barrier(G_hat, start, 1.0, max_iter=max_iter, tol=tol)
    return NashMTLWeights(as_output(alpha_hat / root, G), converged)


def nash_mtl(
    J: Tensor,
    *,
    previous: Tensor | None = None,
    max_iter: int = 20,
    tol: float = 1e-3,
) -> NashMTLResult:
    """Nash-MTL update of a Jacobian ``J`` (``[T, P]``); see :func:`nash_mtl_weights`.

    Returns ``NashMTLResult(update, weights, converged)`` with ``update = J.T @ weights`` (no norm clipping)
    and float64 ``weights, converged = nash_mtl_weights(gramian(J), ...)``.
    """
    check_jacobian(J, _METHOD)
    weights, converged = nash_mtl_weights(gramian(J), previous=previous, max_iter=max_iter, tol=tol)
    return NashMTLResult(combine(J, weights), weights, converged)
