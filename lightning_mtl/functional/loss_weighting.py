"""Pure math of the loss-weighting methods (no Lightning, no state, no I/O).

Every function takes the task losses as a 1-D tensor ``[T]`` (task order of the module) and returns the
weights ``w`` of the update ``Σ wᵢ ∇Lᵢ``. The functions never see gradients: loss-weighting methods add
no backward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

RandomDistribution = Literal["normal", "uniform", "dirichlet"]


def _check_losses(losses: Tensor) -> None:
    if losses.ndim != 1 or losses.numel() == 0:
        raise ValueError(f"losses must be a non-empty 1-D tensor [T], got shape {tuple(losses.shape)}.")


def dwa_weights(
    previous: Tensor | None, before_previous: Tensor | None, temperature: float = 2.0
) -> Tensor | None:
    """Dynamic Weight Average (Liu, Johns, Davison 2019, eq. 7).

    ``wₖ = T·exp(rₖ/τ) / Σᵢ exp(rᵢ/τ)`` with ``rₖ = L̄ₖ(t−1)/L̄ₖ(t−2)``, the ratio of the epoch-average
    losses of the two previous epochs. Returns ``None`` (meaning: all weights 1) while fewer than two
    epochs of history exist.
    """
    if temperature <= 0:
        raise ValueError(f"DWA temperature must be > 0, got {temperature}.")
    if previous is None or before_previous is None:
        return None
    _check_losses(previous)
    ratio = previous / before_previous.clamp_min(torch.finfo(previous.dtype).tiny)
    return previous.numel() * torch.softmax(ratio / temperature, dim=0)


def gls_loss(losses: Tensor) -> Tensor:
    """Geometric loss strategy (Chennupati et al. 2019): ``(Π Lᵢ)^{1/T} = exp(mean log Lᵢ)``."""
    _check_losses(losses)
    return torch.exp(torch.log(losses).mean())


def gls_weights(losses: Tensor) -> Tensor:
    """Effective weights of GLS: ``∂GLS/∂Lᵢ = GLS / (T·Lᵢ)``. Losses must be > 0."""
    _check_losses(losses)
    return gls_loss(losses) / (losses.numel() * losses)


def uncertainty_weights(
    params: Tensor, factors: Tensor, regularizer: Literal["log", "positive"] = "log"
) -> Tensor:
    """Weights of homoscedastic uncertainty weighting.

    ``"log"`` (Kendall, Gal, Cipolla 2018): ``params`` are ``sᵢ = log σᵢ²`` and ``wᵢ = cᵢ·exp(−sᵢ)`` with
    ``cᵢ = ½`` for regression and ``1`` for classification (``factors``).
    ``"positive"`` (Liebel & Körner 2018): ``params`` are ``cᵢ`` and ``wᵢ = 1/(2cᵢ²)`` (``factors`` unused).
    """
    if regularizer == "log":
        return factors * torch.exp(-params)
    if regularizer == "positive":
        return 0.5 / params.square()
    raise ValueError(f"regularizer must be 'log' or 'positive', got {regularizer!r}.")


def uncertainty_objective(
    losses: Tensor, params: Tensor, factors: Tensor, regularizer: Literal["log", "positive"] = "log"
) -> Tensor:
    """Total uncertainty-weighted objective.

    ``"log"``: ``Σ cᵢ·exp(−sᵢ)·Lᵢ + ½sᵢ`` (``½sᵢ = log σᵢ``); ``"positive"``: ``Σ Lᵢ/(2cᵢ²) + ln(1 + cᵢ²)``.
    Differentiable in ``params`` (and in ``losses``).
    """
    _check_losses(losses)
    weights = uncertainty_weights(params, factors, regularizer)
    if regularizer == "log":
        penalty = 0.5 * params
    else:
        penalty = torch.log1p(params.square())
    return (weights * losses + penalty).sum()


def uncertainty_objective_grad(
    losses: Tensor, params: Tensor, factors: Tensor, regularizer: Literal["log", "positive"] = "log"
) -> Tensor:
    """Closed-form gradient of :func:`uncertainty_objective` w.r.t. ``params`` (losses held constant).

    ``"log"``: ``−cᵢ·exp(−sᵢ)·Lᵢ + ½``; ``"positive"``: ``−Lᵢ/cᵢ³ + 2cᵢ/(1 + cᵢ²)``.
    """
    if regularizer == "log":
        return 0.5 - factors * torch.exp(-params) * losses
    if regularizer == "positive":
        return -losses / params.pow(3) + 2 * params / (1 + params.square())
    raise ValueError(f"regularizer must be 'log' or 'positive', got {regularizer!r}.")


def random_weights(
    num_tasks: int,
    generator: torch.Generator | None = None,
    distribution: RandomDistribution = "normal",
    concentration: float = 1.0,
) -> Tensor:
    """Random loss weights (Lin et al. 2022, "Reasonable Effectiveness of Random Weighting").

    ``"normal"``: ``softmax(z)``, ``z ~ N(0, I)`` (the paper's default); ``"uniform"``: ``softmax(z)``,
    ``z ~ U(0, 1)``; ``"dirichlet"``: ``w ~ Dir(concentration·1)``. Weights lie on the simplex (sum 1).
    Drawn on the CPU from ``generator`` so that equal generator states give equal weights everywhere.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}.")
    if distribution == "normal":
        return torch.softmax(torch.randn(num_tasks, generator=generator, dtype=torch.float64), 0).float()
    if distribution == "uniform":
        return torch.softmax(torch.rand(num_tasks, generator=generator, dtype=torch.float64), 0).float()
    if distribution == "dirichlet":
        if concentration <= 0:
            raise ValueError(f"Dirichlet concentration must be > 0, got {concentration}.")
        # Dir(α) as normalised Gamma(α, 1) draws; Gamma sampling has no generator argument in torch, so the
        # draw uses -log(U) (exact for α = 1) or a Marsaglia–Tsang sampler driven by the generator.
        gamma = _gamma(num_tasks, concentration, generator)
        return (gamma / gamma.sum()).float()
    raise ValueError(f"distribution must be one of 'normal', 'uniform', 'dirichlet', got {distribution!r}.")


def _gamma(n: int, alpha: float, generator: torch.Generator | None) -> Tensor:
    """Gamma(alpha, 1) samples from ``generator`` (Marsaglia & Tsang 2000; boost for alpha < 1)."""
    boost = alpha < 1
    a = alpha + 1 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        while True:
            x = torch.randn((), generator=generator, dtype=torch.float64)
            v = (1 + c * x) ** 3
            if v <= 0:
                continue
            u = torch.rand((), generator=generator, dtype=torch.float64)
            if torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v):
                out[i] = d * v
                break
    if boost:
        out = out * torch.rand(n, generator=generator, dtype=torch.float64) ** (1.0 / alpha)
    return out.clamp_min(torch.finfo(torch.float64).tiny)


def static_weights(weights: Sequence[float]) -> Tensor:
    """Fixed weights ``Σ wᵢ Lᵢ`` (validated: finite, ≥ 0, not all zero)."""
    w = torch.as_tensor(list(weights), dtype=torch.float32)
    if w.ndim != 1 or not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise ValueError(f"static weights must be finite, >= 0 and not all zero, got {list(weights)}.")
    return w


def imtl_l_objective(losses: Tensor, s: Tensor) -> Tensor:
    """The IMTL-L loss ``Σᵢ e^{sᵢ}Lᵢ − sᵢ`` (the paper's eq. 6 with base ``e``)."""
    return (s.exp() * losses - s).sum()


def imtl_l_grad(losses: Tensor, s: Tensor) -> Tensor:
    """``∂/∂sᵢ (e^{sᵢ}Lᵢ − sᵢ) = e^{sᵢ}Lᵢ − 1``: zero at ``e^{sᵢ} = 1/Lᵢ`` (every scaled loss equals 1)."""
    return s.exp() * losses - 1
