"""The Euclidean projection onto the probability simplex, shared by MoCo, MoDo and SDMGrad."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["project_onto_simplex"]


def project_onto_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection ``argmin_{x ∈ Δ} ‖x − v‖`` of ``v`` (along its last dimension) onto the probability
    simplex ``Δ = {x ≥ 0, Σx = 1}``.

    The sort-based algorithm (Held, Wolfe & Crowder 1974; Duchi et al., ICML 2008, Fig. 1): with ``u`` the entries
    sorted in decreasing order and ``ρ`` the largest ``j`` with ``uⱼ − (Σ_{i≤j} uᵢ − 1)/j > 0``, the projection is
    ``max(v − θ, 0)`` with ``θ = (Σ_{i≤ρ} uᵢ − 1)/ρ``. Vectorised (leading dimensions are batches), on the
    device and in the dtype of ``v``, with no host synchronisation.
    """
    if not isinstance(v, Tensor) or v.ndim < 1 or v.shape[-1] < 1 or not v.is_floating_point():
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(
            f"project_onto_simplex needs a floating-point tensor [..., T] with T >= 1, got {shape}."
        )
    T = v.shape[-1]
    u = torch.sort(v, dim=-1, descending=True).values
    excess = u.cumsum(dim=-1) - 1.0
    j = torch.arange(1, T + 1, device=v.device, dtype=v.dtype)
    # the condition holds for j = 1 (u₁ − (u₁ − 1) = 1) and for a prefix of j: ρ is the number of true entries
    rho = (u - excess / j > 0).sum(dim=-1, keepdim=True).clamp_min(1)
    theta = excess.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0.0)
