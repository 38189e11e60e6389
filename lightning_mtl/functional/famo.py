"""FAMO (Liu, Feng, Stone & Liu, NeurIPS 2023): the task weights from the logits ξ and the logits' gradient.

Pure functions of tensors. ``Dᵢ = Lᵢ − ℓᵢ* + eps`` (``ℓ*`` the lower bounds, default 0; ``eps = 1e-8`` as in
the authors' code); every function expects ``Lᵢ > ℓᵢ*``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["famo_effective_weights", "famo_logits_grad", "famo_objective", "famo_weights"]

EPS = 1e-8


def _gap(losses: Tensor, min_losses: Tensor | None, eps: float) -> Tensor:
    if min_losses is None:
        return losses + eps
    return losses - min_losses.to(losses.device, losses.dtype) + eps


def famo_weights(logits: Tensor) -> Tensor:
    """The task weights ``z = softmax(ξ)`` ``[T]`` (on the simplex)."""
    return torch.softmax(logits, dim=-1)


def famo_effective_weights(
    logits: Tensor, losses: Tensor, min_losses: Tensor | None = None, eps: float = EPS
) -> Tensor:
    """``wᵢ = zᵢ / (c·Dᵢ)`` with ``c = Σⱼ zⱼ/Dⱼ``: the coefficients of ``∇Lᵢ`` in the gradient of
    :func:`famo_objective` (``c`` held constant). They sum to 1."""
    z = famo_weights(logits.to(losses.dtype))
    ratio = z / _gap(losses, min_losses, eps)
    return ratio / ratio.sum()


def famo_objective(
    logits: Tensor, losses: Tensor, min_losses: Tensor | None = None, eps: float = EPS
) -> Tensor:
    """``Σᵢ zᵢ log Dᵢ / c`` with ``c = Σⱼ zⱼ/Dⱼ`` detached: what FAMO back-propagates (differentiable in the
    losses; its gradient is ``Σ wᵢ∇Lᵢ`` with :func:`famo_effective_weights`)."""
    z = famo_weights(logits.to(losses.dtype)).detach()
    gap = _gap(losses, min_losses, eps)
    c = (z / gap).sum().detach()
    return (z * gap.log()).sum() / c


def famo_logits_grad(
    logits: Tensor,
    losses_before: Tensor,
    losses_after: Tensor,
    min_losses: Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """The logits' gradient ``δ = J_softmax(ξ)ᵀ (log D(θₜ) − log D(θₜ₊₁))`` from the losses of one batch before
    and after the model's step. ``J_softmax = diag(z) − zzᵀ`` is symmetric, so ``δ = z ⊙ (d − zᵀd)``."""
    d = _gap(losses_before, min_losses, eps).log() - _gap(losses_after, min_losses, eps).log()
    z = famo_weights(logits.to(d.dtype))
    return z * (d - (z * d).sum())
