"""Pure math of SLAW and STCH (no Lightning, no state, no I/O).

Both take the task losses as a 1-D tensor ``[T]`` (task order of the module). SLAW's running statistics are
passed in and returned, never kept here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_losses(losses: Tensor) -> None:
    if losses.ndim != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor [T], got shape {tuple(losses.shape)}.")


# ---------------------------------------------------------------------------------------------------- SLAW
def slaw_warmup_steps(beta: float) -> int:
    """Number of leading steps over which SLAW's running moments are arithmetic means: ``round(1/(1−β))``
    (100 for β = 0.99), after which they are exponential moving averages."""
    if not 0 <= beta < 1:
        raise ValueError(f"SLAW beta must be in [0, 1), got {beta}.")
    return max(1, round(1.0 / (1.0 - beta)))


def slaw_update(
    mean: Tensor | None, mean_sq: Tensor | None, losses: Tensor, count: int, beta: float = 0.99
) -> tuple[Tensor, Tensor]:
    """One update of SLAW's running moments ``a ≈ E[L]`` and ``b ≈ E[L²]`` with the ``count``-th loss
    (``count`` = 1 for the first; ``mean``/``mean_sq`` are ``None`` before it).

    For ``count ≤ round(1/(1−β))`` the moments are arithmetic means (``x ← x + (v − x)/count``), afterwards
    ``x ← βx + (1−β)v`` (the authors' code; the two agree at the switch since ``1/N = 1−β``).
    """
    _check_losses(losses)
    if count < 1:
        raise ValueError(f"SLAW count must be >= 1 (the index of this loss), got {count}.")
    v = losses.detach().double()
    if mean is None or mean_sq is None:
        return v.clone(), v * v
    rate = 1.0 / count if count <= slaw_warmup_steps(beta) else 1.0 - beta
    return mean.lerp(v, rate), mean_sq.lerp(v * v, rate)


def cap_weights(weights: Tensor, max_weight: float) -> Tensor:
    """Weights ``w ≥ 0`` summing to ``S`` with every entry capped at ``max_weight`` and the excess handed to
    the uncapped entries in proportion to their weights (water-filling), so the sum stays ``S`` and the
    order of the weights is kept. Needs ``max_weight·T ≥ S`` (``max_weight ≥ 1`` for weights summing to
    ``T``; not checked here, to stay free of host synchronisation).

    Closed form: with ``r`` sorted in decreasing order and the ``k`` largest capped, the others are scaled
    by ``cₖ = (S − k·M)/Σ_{j≥k} rⱼ``; the solution is ``min(M, c·r)`` for the smallest ``k`` with
    ``r_k·cₖ ≤ M``. A fixed number of tensor operations, whatever ``T``.
    """
    if not max_weight > 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight}.")
    r = weights.sort(descending=True).values
    tails = r.flip(0).cumsum(0).flip(0)  # Σ_{j≥k} r_j
    k = torch.arange(r.numel(), device=r.device, dtype=r.dtype)
    scale = (weights.sum() - k * max_weight) / tails.clamp_min(torch.finfo(r.dtype).tiny)
    fits = r * scale <= max_weight * (1 + 1e-12)
    first = torch.argmax(fits.to(torch.int8))  # the smallest k that fits (0 when nothing fits: all capped)
    return (weights * scale[first]).clamp_max(max_weight)


def slaw_weights(
    mean: Tensor,
    mean_sq: Tensor,
    eps: float = 1e-5,
    max_weight: float | None = None,
    previous: Tensor | None = None,
) -> Tensor:
    """SLAW's weights from the running moments: ``sᵢ = √(bᵢ − aᵢ²)`` (the standard deviation of task i's
    loss, SLAW's estimate of its gradient norm), ``wᵢ ∝ 1/max(sᵢ, ε)`` normalised to ``Σ wᵢ = T``, then
    each capped at ``max_weight`` (:func:`cap_weights`; ``None``: no cap). When a variance ``bᵢ − aᵢ²`` is
    negative (floating-point rounding) the authors' code keeps the previous weights: ``previous`` is
    returned then (``None``: all ones). No host synchronisation."""
    _check_losses(mean)
    if not eps > 0:
        raise ValueError(f"SLAW eps must be > 0, got {eps}.")
    var = torch.addcmul(mean_sq, mean, mean, value=-1.0)
    inv = var.clamp_min(eps * eps).rsqrt()  # 1/max(√var, ε) for var ≥ 0 (a negative var is discarded below)
    w = inv.div(inv.sum()).mul_(mean.numel())
    if max_weight is not None:
        if max_weight < 1:
            raise ValueError(f"SLAW max_weight must be >= 1 (the weights sum to T), got {max_weight}.")
        w = cap_weights(w, max_weight)
    keep = torch.ones_like(w) if previous is None else previous.to(w)
    valid = var.ge(0).all()  # False for a negative or NaN variance
    return torch.where(valid, w, keep)


# ---------------------------------------------------------------------------------------------------- STCH
def _stch_terms(losses: Tensor, nadir: Tensor, preference: Tensor | None) -> Tensor:
    _check_losses(losses)
    if nadir.shape != losses.shape:
        raise ValueError(
            f"nadir must have the losses' shape {tuple(losses.shape)}, got {tuple(nadir.shape)}."
        )
    terms = torch.log(losses / nadir)
    return terms if preference is None else preference.to(terms) * terms


def stch_loss(losses: Tensor, nadir: Tensor, mu: float = 1.0, preference: Tensor | None = None) -> Tensor:
    """Smooth Tchebycheff scalarisation on normalised log-losses (Lin et al., ICML 2024, as in the official
    STCH_MTL code): ``T·μ·log Σᵢ exp(pᵢ·ℓᵢ/μ)`` with ``ℓᵢ = log(Lᵢ/nᵢ)``, ``n`` the nadir estimate and
    ``p`` the preference (``None``: ``pᵢ = 1``). Differentiable in ``losses``; → ``T·maxᵢ pᵢℓᵢ`` as μ → 0.
    Losses and nadir must be > 0."""
    if not mu > 0:
        raise ValueError(f"STCH mu must be > 0, got {mu}.")
    terms = _stch_terms(losses, nadir, preference)
    return losses.numel() * mu * torch.logsumexp(terms / mu, dim=0)


def stch_weights(losses: Tensor, nadir: Tensor, mu: float = 1.0, preference: Tensor | None = None) -> Tensor:
    """Effective weights of :func:`stch_loss`: ``∂/∂Lᵢ = T·pᵢ·softmax(p·ℓ/μ)ᵢ / Lᵢ`` (so ``Σ wᵢLᵢ = T`` for
    ``p = 1``)."""
    if not mu > 0:
        raise ValueError(f"STCH mu must be > 0, got {mu}.")
    terms = _stch_terms(losses, nadir, preference)
    soft = torch.softmax(terms / mu, dim=0)
    if preference is not None:
        soft = soft * preference.to(soft)
    return losses.numel() * soft / losses


def log_loss(losses: Tensor) -> Tensor:
    """``Σ log Lᵢ`` (STCH's warm-up objective; scale-invariant per task). Losses must be > 0."""
    _check_losses(losses)
    return torch.log(losses).sum()


def log_loss_weights(losses: Tensor) -> Tensor:
    """Effective weights of :func:`log_loss`: ``1/Lᵢ``."""
    _check_losses(losses)
    return 1.0 / losses


__all__ = [
    "cap_weights",
    "log_loss",
    "log_loss_weights",
    "slaw_update",
    "slaw_warmup_steps",
    "slaw_weights",
    "stch_loss",
    "stch_weights",
]
