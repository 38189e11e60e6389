"""Pure math of Dynamic Task Prioritization (Guo et al., ECCV 2018): no Lightning, no state, no I/O.

Tensors are ``[T]`` in the module's task order. The moving average of each task's KPI is passed in and
returned, never kept here. A NaN entry of a KPI average means "no KPI seen yet for that task".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: The default ε: a KPI average is clamped into ``[ε, 1 − ε]`` before the focal weight, so a task at KPI 0 gets
#: the finite weight ``−(1 − ε)^γ log ε`` (≈ 6.9 for ε = 1e-3) and one at KPI 1 the tiny ``−ε^γ log(1 − ε)``.
DTP_EPS = 1e-3


def _check_vector(name: str, value: Tensor) -> None:
    if value.ndim != 1 or value.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor [T], got shape {tuple(value.shape)}.")


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
        raise ValueError(f"DTP alpha must be in (0, 1] (the weight of the newest KPI), got {alpha!r}.")


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, (int, float)) and 0 < eps < 0.5):
        raise ValueError(f"DTP eps must be in (0, 0.5) (KPIs are clamped into [eps, 1 - eps]), got {eps!r}.")


def _gamma_tensor(gamma: float | Tensor, like: Tensor) -> Tensor:
    g = torch.as_tensor(gamma, dtype=like.dtype, device=like.device)
    if g.ndim not in (0, 1) or (g.ndim == 1 and g.shape != like.shape):
        raise ValueError(
            f"DTP gamma must be a number or a [T] tensor of shape {tuple(like.shape)}, got {gamma!r}."
        )
    if not bool(torch.isfinite(g).all()) or bool((g < 0).any()):
        raise ValueError(f"DTP gamma must be finite and >= 0, got {gamma!r}.")
    return g


def dtp_focal_weight(kpi: Tensor, gamma: float | Tensor = 2.0, eps: float = DTP_EPS) -> Tensor:
    """The task-level focal weight ``FL(κ; γ) = −(1 − κ)^γ · log κ`` of each KPI (the focal loss of Lin et al.,
    ICCV 2017, applied to a task's KPI instead of an example's probability), with ``κ`` clamped into
    ``[ε, 1 − ε]``. ``gamma`` is a number or one focusing parameter per task (``[T]``, each ``>= 0``).

    Decreasing in ``κ`` on ``(0, 1)``: a task that performs worse gets a larger weight; → 0 as ``κ`` → 1 and →
    ``+∞`` as ``κ`` → 0 (bounded here by the clamp). ``γ = 0`` gives ``−log κ``.
    """
    _check_vector("kpi", kpi)
    _check_eps(eps)
    return _focal(kpi, _gamma_tensor(gamma, kpi), eps)


def _focal(kpi: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """:func:`dtp_focal_weight` on checked arguments (``gamma`` a tensor on ``kpi``'s device)."""
    k = kpi.clamp(eps, 1.0 - eps)
    return -torch.pow(1.0 - k, gamma) * torch.log(k)


def dtp_ema(previous: Tensor | None, kpi: Tensor, alpha: float) -> Tensor:
    """One step of the KPI moving average ``κ̄ ← α·κ + (1 − α)·κ̄`` (per task).

    A task whose average is still NaN (``previous`` is ``None`` or its entry is NaN: no KPI seen yet) starts at
    its KPI, ``κ̄ = κ``; a task whose KPI is NaN (undefined on this batch) keeps its previous average.
    """
    _check_vector("kpi", kpi)
    _check_alpha(alpha)
    kpi = kpi.detach()
    if previous is None:
        return kpi.clone()
    if previous.shape != kpi.shape:
        raise ValueError(
            f"previous must have the KPI's shape {tuple(kpi.shape)}, got {tuple(previous.shape)}."
        )
    previous = previous.to(kpi)
    blended = torch.where(torch.isnan(previous), kpi, previous + alpha * (kpi - previous))
    return torch.where(torch.isnan(kpi), previous, blended)


def dtp_weights(
    kpi_ema: Tensor | None, gamma: float | Tensor = 2.0, eps: float = DTP_EPS, *, size: int = 0
) -> Tensor:
    """DTP's task weights from the KPI averages: ``wᵢ = FL(κ̄ᵢ; γᵢ)`` (:func:`dtp_focal_weight`), and ``1`` for a
    task with no average yet (NaN entry; ``kpi_ema=None`` gives ``size`` ones, float64)."""
    if kpi_ema is None:
        if size < 1:
            raise ValueError(f"dtp_weights needs size >= 1 when kpi_ema is None, got {size}.")
        return torch.ones(size, dtype=torch.float64)
    _check_vector("kpi_ema", kpi_ema)
    _check_eps(eps)
    return _weights(kpi_ema, _gamma_tensor(gamma, kpi_ema), eps)


def _weights(kpi_ema: Tensor, gamma: Tensor, eps: float) -> Tensor:
    """:func:`dtp_weights` on checked arguments (``gamma`` a tensor on ``kpi_ema``'s device and dtype)."""
    return torch.where(torch.isnan(kpi_ema), 1.0, _focal(kpi_ema.nan_to_num(0.5), gamma, eps))


def dtp_loss(
    losses: Tensor, kpi_ema: Tensor | None, gamma: float | Tensor = 2.0, eps: float = DTP_EPS
) -> Tensor:
    """The DTP objective ``Σᵢ FL(κ̄ᵢ; γᵢ)·Lᵢ`` (task-level prioritisation; the weights carry no gradient)."""
    _check_vector("losses", losses)
    w = dtp_weights(kpi_ema, gamma, eps, size=losses.numel()).to(device=losses.device, dtype=losses.dtype)
    return (w.detach() * losses).sum()


def focal_weight_bound(gamma: float, eps: float = DTP_EPS) -> float:
    """The largest weight :func:`dtp_focal_weight` gives (at ``κ = ε``): ``−(1 − ε)^γ log ε``."""
    _check_eps(eps)
    return -((1.0 - eps) ** gamma) * math.log(eps)


__all__ = ["DTP_EPS", "dtp_ema", "dtp_focal_weight", "dtp_loss", "dtp_weights", "focal_weight_bound"]
