"""Pure math of the log-loss objectives: LogSE and the scale-invariant ``Σ log Lᵢ`` (no Lightning, no state).

Both take the task losses as a 1-D tensor ``[T]`` (task order of the module) and add a shift ``ε ≥ 0``
inside the log: ``log(Lᵢ + ε)``. The objectives reuse :func:`~lightning_mtl.functional.slaw_stch.log_loss`
(STCH's warm-up objective, ``Σ log Lᵢ``); the weights equal its ``log_loss_weights`` (``1/Lᵢ``) of the
shifted losses (the tests check both against STCH's functions and autograd).

Relation to uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, eqs. 7 and 10), in this library's
convention ``Σᵢ cᵢe^{−sᵢ}Lᵢ + ½sᵢ`` with ``sᵢ = log σᵢ²`` and ``cᵢ = ½`` (regression) or ``1``
(classification): for fixed losses the objective is convex in each ``sᵢ`` and

    ∂/∂sᵢ = −cᵢe^{−sᵢ}Lᵢ + ½ = 0   ⇔   sᵢ* = log(2cᵢLᵢ)   (σᵢ² = Lᵢ for a regression task),

    min_s Σᵢ cᵢe^{−sᵢ}Lᵢ + ½sᵢ = Σᵢ ½ + ½·log(2cᵢLᵢ) = ½·Σᵢ log Lᵢ + Σᵢ ½(1 + log 2cᵢ).

So uncertainty weighting with its log-variances at their optimum for the current losses minimises
``½·Σ log Lᵢ`` up to a constant, and (envelope theorem) its task weights there, ``cᵢe^{−sᵢ*} = 1/(2Lᵢ)``, are
exactly the effective weights ``∂/∂Lᵢ ½Σ log Lⱼ`` — whatever the task kind. That is :func:`logse_loss`
(with ε = 0). The same holds for IMTL-L (Liu et al., ICLR 2021): ``min_s Σ e^{sᵢ}Lᵢ − sᵢ = Σ 1 + log Lᵢ``,
weights ``1/Lᵢ``: that is :func:`scale_invariant_loss`, the "logarithm transformation" of the losses in
DB-MTL (Lin et al., arXiv:2308.12029, LibMTL's ``DB_MTL`` uses ``log(Lᵢ + 1e-8)``). The two differ by the
factor ½ only; both are invariant to rescaling a task's loss, ``Lᵢ → aLᵢ`` (the objective moves by a
constant, the update not at all, for ε = 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_mtl.functional.slaw_stch import _check_losses, log_loss

#: LogSE's factor: ½·Σ log Lᵢ is the profile of the Gaussian (regression) uncertainty loss, see the module doc.
LOGSE_SCALE = 0.5


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps (the shift inside log(L + eps)) must be a finite number >= 0, got {eps!r}.")
    return float(eps)


def _shifted(losses: Tensor, eps: float) -> Tensor:
    _check_losses(losses)
    eps = _check_eps(eps)
    return losses + eps if eps else losses


def scale_invariant_loss(losses: Tensor, eps: float = 1e-8) -> Tensor:
    """``Σᵢ log(Lᵢ + ε)``: the scale-invariant loss (DB-MTL's loss balancing; LibMTL: ε = 1e-8).
    Differentiable in ``losses``; ``Lᵢ + ε`` must be > 0 (not checked here: no host synchronisation)."""
    return log_loss(_shifted(losses, eps))


def scale_invariant_weights(losses: Tensor, eps: float = 1e-8) -> Tensor:
    """Effective weights of :func:`scale_invariant_loss`: ``∂/∂Lᵢ = 1/(Lᵢ + ε)`` (``log_loss_weights`` of the
    shifted losses, as one ``reciprocal`` kernel: a Python-scalar division costs several)."""
    return _shifted(losses, eps).reciprocal()


def logse_loss(losses: Tensor, eps: float = 0.0) -> Tensor:
    """``½·Σᵢ log(Lᵢ + ε)``: uncertainty weighting's objective minimised over its log-variances (module doc).
    Differentiable in ``losses``; ``Lᵢ + ε`` must be > 0 (not checked here)."""
    return log_loss(_shifted(losses, eps)).mul(LOGSE_SCALE)


def logse_weights(losses: Tensor, eps: float = 0.0) -> Tensor:
    """Effective weights of :func:`logse_loss`: ``1/(2(Lᵢ + ε))`` — uncertainty weighting's weights at its
    optimum ``sᵢ* = log(2cᵢLᵢ)``."""
    return _shifted(losses, eps).reciprocal().mul_(LOGSE_SCALE)


def uncertainty_optimal_log_variances(losses: Tensor, factors: Tensor | float = 0.5) -> Tensor:
    """The minimiser ``sᵢ* = log(2cᵢLᵢ)`` of ``Σ cᵢe^{−sᵢ}Lᵢ + ½sᵢ`` for fixed losses (``cᵢ = ½`` for a
    regression task: ``σᵢ² = Lᵢ``; ``1`` for classification). Losses must be > 0."""
    _check_losses(losses)
    return torch.log(2 * torch.as_tensor(factors, dtype=losses.dtype, device=losses.device) * losses)


__all__ = [
    "LOGSE_SCALE",
    "logse_loss",
    "logse_weights",
    "scale_invariant_loss",
    "scale_invariant_weights",
    "uncertainty_optimal_log_variances",
]
