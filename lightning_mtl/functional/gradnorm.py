"""GradNorm's objective and its gradient w.r.t. the task weights (torch only).

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing in
Deep Multitask Networks", ICML 2018 (https://arxiv.org/abs/1711.02257), eqs. 1-2 and Algorithm 1.

With ``nᵢ = ‖∇_W Lᵢ‖`` the gradient norm of task ``i``'s (unweighted) loss on the last shared layer ``W``
and a scalar weight ``wᵢ > 0``, the weighted gradient norm is ``Gᵢ = ‖∇_W wᵢLᵢ‖ = wᵢnᵢ``. So the objective
is a small function of ``w`` once the norms are known, and its gradient needs no second-order graph:

    L_grad(w) = Σᵢ |wᵢnᵢ − Ḡ·rᵢ^α|,   Ḡ = mean_j wⱼnⱼ,   rᵢ = L̃ᵢ / mean_j L̃ⱼ,   L̃ᵢ = Lᵢ(t)/Lᵢ(0),

with the target ``Ḡ·rᵢ^α`` held constant (the paper: otherwise the weights drift to zero), hence
``∂L_grad/∂wᵢ = sign(wᵢnᵢ − Ḡ·rᵢ^α)·nᵢ``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check(weights: Tensor, norms: Tensor, loss_ratios: Tensor, alpha: float) -> None:
    if weights.ndim != 1 or norms.shape != weights.shape or loss_ratios.shape != weights.shape:
        raise ValueError(
            "weights, norms and loss_ratios must be 1-D tensors of the same length [T], got shapes "
            f"{tuple(weights.shape)}, {tuple(norms.shape)} and {tuple(loss_ratios.shape)}."
        )
    if not alpha >= 0:
        raise ValueError(f"GradNorm alpha must be >= 0, got {alpha!r}.")


def inverse_training_rates(losses: Tensor, initial_losses: Tensor) -> Tensor:
    """``rᵢ = L̃ᵢ / mean_j L̃ⱼ`` with ``L̃ᵢ = Lᵢ/Lᵢ(0)``: above 1 for a task that trains slower than average."""
    ratios = losses / initial_losses
    return ratios / ratios.mean()


def gradnorm_targets(weights: Tensor, norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """The (constant) targets ``Ḡ·rᵢ^α`` of the weighted gradient norms, detached."""
    _check(weights, norms, loss_ratios, alpha)
    mean_norm = (weights.detach() * norms.detach()).mean()
    return (mean_norm * loss_ratios.detach().pow(alpha)).detach()


def gradnorm_objective(weights: Tensor, norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """``L_grad(w) = Σᵢ |wᵢnᵢ − Ḡ·rᵢ^α|`` (differentiable in ``weights``; the target is held constant).

    Args:
        weights: ``[T]`` task weights ``wᵢ``.
        norms: ``[T]`` gradient norms ``nᵢ = ‖∇_W Lᵢ‖`` of the unweighted losses on the last shared layer.
        loss_ratios: ``[T]`` inverse training rates ``rᵢ`` (:func:`inverse_training_rates`).
        alpha: the asymmetry α ≥ 0 (paper: 1.5 on NYUv2, 0.12 on the toy; 0 equalises the norms).
    """
    targets = gradnorm_targets(weights, norms, loss_ratios, alpha)
    return (weights * norms.detach() - targets).abs().sum()


def gradnorm_weight_grad(weights: Tensor, norms: Tensor, loss_ratios: Tensor, alpha: float) -> Tensor:
    """Closed-form ``∂L_grad/∂wᵢ = sign(wᵢnᵢ − Ḡ·rᵢ^α)·nᵢ`` (equal to autograd of :func:`gradnorm_objective`)."""
    targets = gradnorm_targets(weights, norms, loss_ratios, alpha)
    w, n = weights.detach(), norms.detach()
    return torch.sign(w * n - targets) * n


def renormalize_weights(weights: Tensor, total: float | None = None, min_weight: float = 1e-8) -> Tensor:
    """Clamp ``wᵢ ≥ min_weight`` then rescale so that ``Σwᵢ = total`` (default ``T``), as after every GradNorm step."""
    total = float(weights.numel()) if total is None else float(total)
    clamped = weights.clamp_min(min_weight)
    return clamped * (total / clamped.sum())
