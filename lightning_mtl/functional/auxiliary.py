"""Pure math of the auxiliary-learning methods GCS, OL-AUX and HydaLearn (no Lightning, no state, no I/O).

Every function works on the Gramian ``G = J Jᵀ`` ``[T, T]`` of the per-task gradients of the shared parameters
and a boolean mask ``main`` ``[T]`` of the main tasks (the others are auxiliary). With several main tasks, **the
main gradient is their sum** ``g_main = Σ_{i∈main} gᵢ`` (the gradient of the summed main loss, which is what the
main tasks' weight 1 applies), so every quantity below is a sum of Gramian entries:

* ``g_mainᵀgₖ = Σ_{i∈main} G[i, k]`` (:func:`main_products`),
* ``‖g_main‖² = Σ_{i,j∈main} G[i, j]``, ``‖gₖ‖² = G[k, k]``.

Because only Gramian entries enter, the weights computed from the Gramian of the global batch (all-reduced
Jacobian) are those of one process on the union batch: the methods are exact under DDP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import prepare_gramian


def role_mask(main: Tensor | Sequence[bool], num_tasks: int, method: str) -> Tensor:
    """``main`` as a CPU boolean tensor ``[T]``; raises a ``ValueError`` naming ``method`` on a bad shape."""
    mask = torch.as_tensor(main, dtype=torch.bool, device="cpu")
    if mask.ndim != 1 or mask.numel() != num_tasks:
        raise ValueError(
            f"{method}: main must be a boolean mask with one entry per task ({num_tasks}), got shape "
            f"{tuple(mask.shape)}."
        )
    return mask


def main_products(
    G: Tensor, main: Tensor | Sequence[bool], method: str = "main_products"
) -> tuple[Tensor, Tensor]:
    """``(dots, main_sq)``: ``dots[k] = g_mainᵀgₖ`` for every task ``k`` ``[T]`` and ``main_sq = ‖g_main‖²``
    (float64, CPU), with ``g_main`` the sum of the main tasks' gradients (0 when no task is main)."""
    G64 = prepare_gramian(G, method)
    mask = role_mask(main, G64.shape[0], method).to(G64.dtype)
    dots = G64 @ mask
    return dots, mask @ dots


def cosines_to_main(G: Tensor, main: Tensor | Sequence[bool], method: str = "cosines_to_main") -> Tensor:
    """``cos(g_main, gₖ)`` for every task ``[T]`` (float64, CPU). **Zero-norm convention**: when ``g_main`` or
    ``gₖ`` is the zero vector the cosine is undefined and taken as 0 (no evidence that ``gₖ`` helps)."""
    G64 = prepare_gramian(G, method)
    dots, main_sq = main_products(G64, main, method)
    norms = (G64.diagonal().clamp(min=0) * main_sq.clamp(min=0)).sqrt()
    return torch.where(norms > 0, dots / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0).clamp(
        -1, 1
    )


def gcs_weights(G: Tensor, main: Tensor | Sequence[bool], *, weighted: bool = False) -> Tensor:
    """GCS weights (Du et al. 2018, arXiv:1812.02224): main tasks 1; auxiliary task ``k`` ``1[cos > 0]``
    (unweighted) or ``max(0, cos)`` (``weighted=True``), with ``cos = cos(g_main, gₖ)`` on the shared parameters.

    **Boundary**: an auxiliary gradient is used only when it is strictly positively aligned (``cos > 0``); an
    orthogonal one (``cos = 0``, which includes a zero gradient of either side, :func:`cosines_to_main`) brings
    no first-order decrease of the main loss and is dropped. With this choice the two variants agree at the
    boundary (both give 0). Returns float64 weights ``[T]`` on the CPU.
    """
    cos = cosines_to_main(G, main, "GCS")
    mask = role_mask(main, cos.numel(), "GCS")
    aux = cos.clamp(min=0) if weighted else (cos > 0).to(cos.dtype)
    return torch.where(mask, torch.ones_like(cos), aux)


def olaux_products(G: Tensor, main: Tensor | Sequence[bool]) -> Tensor:
    """What OL-AUX accumulates each step: ``g_mainᵀgₖ`` for the auxiliary tasks, 0 for the main ones (float64,
    CPU, ``[T]``): up to the θ learning rate α, ``−∂L_main(θ_{t+1})/∂wₖ``, since one step gives
    ``∂L_main(θ_{t+1})/∂wₖ = −α∇L_mainᵀ∇L_aux,k`` (Lin et al. 2019; the equation number is not verified)."""
    dots, _ = main_products(G, main, "OLAUX")
    mask = role_mask(main, dots.numel(), "OLAUX")
    return torch.where(mask, torch.zeros_like(dots), dots)


def olaux_update(
    weights: Tensor,
    accumulated: Tensor,
    main: Tensor | Sequence[bool],
    *,
    beta: float,
    nonnegative: bool = True,
) -> Tensor:
    """One OL-AUX weight update after an N-step window: ``wₖ ← wₖ + β Σ_{j<N} g_mainᵀgₖ`` for the auxiliary tasks
    (the main tasks keep weight 1), i.e. gradient descent on ``wₖ`` with the N-step, first-order estimate of
    ``∂L_main(θ_{t+N})/∂wₖ`` (the learning rate α of θ is absorbed into β); clamped at 0 when ``nonnegative``."""
    if weights.shape != accumulated.shape or weights.ndim != 1:
        raise ValueError(
            f"OLAUX: weights and accumulated must both be [T], got {tuple(weights.shape)} and "
            f"{tuple(accumulated.shape)}."
        )
    mask = role_mask(main, weights.numel(), "OLAUX").to(weights.device)
    new = weights + beta * accumulated.to(weights)
    if nonnegative:
        new = new.clamp(min=0)
    return torch.where(mask, torch.ones_like(new), new)


def hydalearn_weights(G: Tensor, main: Tensor | Sequence[bool], *, max_weight: float | None = None) -> Tensor:
    """HydaLearn-style per-batch weights from first-order main-task gains (Verboven et al., arXiv:2008.11643).

    A plain gradient step of size η on task ``k`` alone changes the main loss by
    ``δₖ = L_main(θ) − L_main(θ − ηgₖ) ≈ η g_mainᵀgₖ``; the main task's own step gains ``δ_main ≈ η‖g_main‖²``.
    Each auxiliary task is weighted by its gain relative to the main task's, ``wₖ = max(0, δₖ/δ_main) =
    max(0, g_mainᵀgₖ / ‖g_main‖²)`` (η cancels), the main tasks by 1; ``max_weight`` caps ``wₖ``. A zero main
    gradient (no gain to measure) gives the auxiliary tasks weight 0. Returns float64 weights ``[T]`` (CPU).
    """
    dots, main_sq = main_products(G, main, "HydaLearn")
    mask = role_mask(main, dots.numel(), "HydaLearn")
    if float(main_sq) > 0:
        aux = (dots / main_sq).clamp(min=0)
    else:
        aux = torch.zeros_like(dots)
    if max_weight is not None:
        aux = aux.clamp(max=max_weight)
    return torch.where(mask, torch.ones_like(aux), aux)


__all__ = [
    "cosines_to_main",
    "gcs_weights",
    "hydalearn_weights",
    "main_products",
    "olaux_products",
    "olaux_update",
    "role_mask",
]
