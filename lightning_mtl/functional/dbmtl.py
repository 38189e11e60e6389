"""DB-MTL: dual-balancing multi-task learning (Lin et al., arXiv:2308.12029).

Pure math on the Jacobian ``J`` (``[T, P]``) of the shared parameters and the task losses ``[T]``; the state
(the moving average ``Ĝ`` of the log-losses' gradients and the step count ``k``) is passed in and returned,
never mutated.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_jacobian

_METHOD = "DBMTL"
#: guard of ``‖ĝᵢ‖`` in the scale factors ``αᵢ = max‖ĝⱼ‖/(‖ĝᵢ‖ + ε)`` (LibMTL's)
NORM_EPS = 1e-8


class DBMTLState(NamedTuple):
    """What :func:`dbmtl_step` carries from one step to the next (identical on every DDP rank)."""

    ema: Tensor
    """``Ĝ [T, P]``: the moving average of the log-losses' gradients ``∇log Lᵢ``, in ``J``'s dtype and on
    ``J``'s device."""
    step: int
    """``k``: the number of updates taken (update ``k`` uses ``βₖ = β/k^σ``)."""


class DBMTLResult(NamedTuple):
    """Result of :func:`dbmtl_step`."""

    direction: Tensor
    """``[P]`` the shared update ``Σᵢ αᵢĝᵢ``, in ``J``'s dtype and on its device."""
    scales: Tensor
    """``[T]`` the gradient-magnitude scale factors ``αᵢ = max‖ĝⱼ‖/(‖ĝᵢ‖ + ε)`` (``J``'s dtype and device;
    ``αᵢ ≈ 1`` for the task with the largest ``‖ĝ‖``)."""
    norms: Tensor
    """``[T]`` ``‖ĝᵢ‖`` (``J``'s dtype and device)."""
    state: DBMTLState
    """The updated state, to pass back at the next step."""


def check_positive_losses(losses: Tensor, names: list[str] | None = None) -> Tensor:
    """Raise a ``ValueError`` naming each task whose loss is not a finite number ``> 0`` (DB-MTL takes
    ``log Lᵢ``); return the losses detached. One host synchronisation."""
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"{_METHOD} takes the task losses as a 1-D tensor [T], got {shape}.")
    L = losses.detach()
    bad = ~(torch.isfinite(L) & (L > 0))
    if bool(bad.any()):
        labels = (
            names if names is not None and len(names) == L.numel() else [str(i) for i in range(L.numel())]
        )
        values = {labels[i]: float(L[i]) for i in torch.nonzero(bad).flatten().tolist()}
        raise ValueError(
            f"{_METHOD} balances the losses by their logarithm, so every task loss must be a finite number > 0; "
            f"got {values}. Make these losses strictly positive (e.g. add a small constant to a loss that can "
            "reach 0, or shift a loss that can be negative), or use a strategy that does not take log L."
        )
    return L


def log_loss_jacobian(J: Tensor, losses: Tensor, names: list[str] | None = None) -> Tensor:
    """The Jacobian of the log-losses: ``∇log Lᵢ = ∇Lᵢ/Lᵢ``, i.e. ``diag(1/L) J`` (``[T, P]``, ``J``'s dtype).

    Formed from the Jacobian and the losses of the same (global) batch, so that under DDP it is the log-loss
    Jacobian of the union batch, exactly. Losses must be finite and ``> 0`` (:func:`check_positive_losses`).
    """
    check_jacobian(J, _METHOD)
    L = check_positive_losses(losses, names)
    if L.numel() != J.shape[0]:
        raise ValueError(f"{_METHOD}: {L.numel()} losses for a Jacobian of {J.shape[0]} tasks.")
    return J / L.to(J).unsqueeze(1)


def check_dbmtl_hyperparameters(beta: float, beta_sigma: float) -> tuple[float, float]:
    """Validate ``β ∈ [0, 1)`` and ``σ ≥ 0`` (``ValueError`` naming the argument and the value)."""
    for name, value, ok in (
        ("beta", beta, lambda v: 0.0 <= v < 1.0),
        ("beta_sigma", beta_sigma, lambda v: v >= 0.0),
    ):
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number and ok(value)):
            rule = "in [0, 1)" if name == "beta" else ">= 0"
            raise ValueError(f"{_METHOD} {name} must be a finite number {rule}, got {value!r}.")
    return float(beta), float(beta_sigma)


def dbmtl_step(
    J: Tensor,
    losses: Tensor,
    state: DBMTLState | None = None,
    *,
    beta: float = 0.9,
    beta_sigma: float = 0.0,
    names: list[str] | None = None,
) -> DBMTLResult:
    """One DB-MTL update: the log-losses' gradients, their moving average, the max-norm rescaling.

    Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang, Kwok, *Dual-Balancing for Multi-Task Learning*,
    arXiv:2308.12029 (Neural Networks, 2025); LibMTL's ``DB_MTL`` (by the first author). With ``k`` the index
    of this update (1 at the first):

    1. loss-scale balancing: ``gᵢ = ∇log Lᵢ = ∇Lᵢ/Lᵢ`` (:func:`log_loss_jacobian`);
    2. ``Ĝ ← G + βₖ(Ĝ − G)``, ``βₖ = β/k^σ`` (a moving average of the log-losses' gradients, ``Ĝ₀ = 0``);
    3. gradient-magnitude balancing: ``αᵢ = maxⱼ‖ĝⱼ‖ / (‖ĝᵢ‖ + 1e-8)``; the shared update is
       ``Σᵢ αᵢĝᵢ`` (every ``αᵢĝᵢ`` has the largest norm).

    Defaults ``β = 0.9``, ``σ = 0`` (LibMTL's ``DB_beta``, ``DB_beta_sigma``: a plain EMA). Conventions:
    LibMTL takes ``log(Lᵢ + 1e-8)``; here ``Lᵢ`` must be ``> 0`` and the log is unshifted (the ``1e-8`` only
    matters for a loss near 0, where the log-loss's gradient ``∇Lᵢ/Lᵢ`` explodes). ``Ĝ₀ = 0`` as LibMTL (so
    the first update is ``1 − β₁`` times the max-norm combination of the first gradients).

    Args:
        J: ``[T, P]`` per-task gradients ``∇Lᵢ`` of the shared parameters.
        losses: ``[T]`` the losses ``Lᵢ`` of the same batch (finite, ``> 0``).
        state: the previous :class:`DBMTLState` (``None``: ``Ĝ = 0``, ``k = 0``).
        beta: ``β ∈ [0, 1)``, the EMA's memory (``0``: no averaging).
        beta_sigma: ``σ ≥ 0``, decay exponent of ``βₖ``.
        names: task names for the error on a non-positive loss.

    Returns:
        :class:`DBMTLResult` ``(direction, scales, norms, state)``.
    """
    beta, beta_sigma = check_dbmtl_hyperparameters(beta, beta_sigma)
    G = log_loss_jacobian(J.detach(), losses, names)
    if state is None:
        ema, k = torch.zeros_like(G), 1
    else:
        if not isinstance(state.ema, Tensor) or tuple(state.ema.shape) != tuple(G.shape):
            shape = tuple(state.ema.shape) if isinstance(state.ema, Tensor) else type(state.ema).__name__
            raise ValueError(
                f"{_METHOD} state.ema must have J's shape {tuple(G.shape)}, got {shape} (the state belongs to "
                "another model or task set)."
            )
        ema, k = state.ema.to(G), int(state.step) + 1
    ema = G + (beta / k**beta_sigma) * (ema - G)
    norms = torch.linalg.vector_norm(ema, dim=1)
    scales = norms.max() / (norms + NORM_EPS)
    direction = scales @ ema
    return DBMTLResult(direction, scales, norms, DBMTLState(ema, k))
