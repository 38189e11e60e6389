"""MGDA: the minimum-norm point of the convex hull of the task gradients (Sener & Koltun 2018)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._checks import as_output, check_jacobian, prepare_gramian
from ._gramian import combine, gramian
from ._linalg import normalize_by_trace, psd_part
from ._qp import solve_bounded_qp

_METHOD = "MGDA"
_NORMALIZATIONS = ("none", "l2", "loss", "loss+")
# Ridge (relative to tr G) that makes the small QP strictly convex; it moves ‖Jᵀw‖² by at most 1e-10·tr G.
_RIDGE = 1e-10

MGDANormalization = Literal["none", "l2", "loss", "loss+"]


def mgda_weights(
    G: Tensor,
    *,
    normalization: MGDANormalization = "none",
    losses: Tensor | None = None,
) -> Tensor:
    """Weights ``w ∈ Δ`` (the simplex: ``w ≥ 0``, ``Σw = 1``) minimising ``‖Jᵀw‖² = wᵀGw``.

    Sener & Koltun (2018), *Multi-Task Learning as Multi-Objective Optimization*, NeurIPS,
    https://arxiv.org/abs/1810.04650 (MGDA-UB is this step applied to gradients with respect to the shared
    representation). Weights sum to 1, as in the official code (one port multiplies them by ``T``).

    Solved exactly instead of by the authors' Frank–Wolfe / projected-gradient iterations (≤ 250 steps,
    and their two-task rule clips γ to [0.001, 0.999]): ``x = argmin_{x ≥ 0} ½xᵀĜx − Σx`` satisfies
    ``(Ĝx)ᵢ ≥ 1`` with equality where ``xᵢ > 0``, so ``w = x / Σx`` meets the simplex optimality conditions
    ``(Gw)ᵢ ≥ wᵀGw`` (equality on the support). ``Ĝ = G/tr G + 1e-10·I`` (after removing the negative
    eigenvalues that rounding gives a float32 Gramian) keeps the problem strictly convex, which also picks
    the most even ``w`` among equivalent ones (duplicated or zero-sum gradients).

    Scale-invariant: ``cG`` (every loss multiplied by ``√c``) has the same minimiser on the simplex, and the
    problem is solved on ``G/tr G`` with a ridge relative to it, so the weights do not change with the
    scale of the losses.

    Args:
        G: ``[T, T]`` Gramian.
        normalization: gradient normalisation of the official code, applied only to find ``w`` (the weights
            then multiply the *unnormalised* losses, as there): ``"none"`` (default), ``"l2"`` (``gᵢ/‖gᵢ‖``),
            ``"loss"`` (``gᵢ/Lᵢ``), ``"loss+"`` (``gᵢ/(Lᵢ‖gᵢ‖)``, their CelebA setting). Tasks whose
            normaliser is zero are left unscaled.
        losses: ``[T]`` non-negative losses, required by ``"loss"`` and ``"loss+"``.

    Returns:
        ``[T]`` weights on the simplex, same dtype and device as ``G``.
    """
    if normalization not in _NORMALIZATIONS:
        raise ValueError(
            f"normalization must be one of {_NORMALIZATIONS} for {_METHOD}, got {normalization!r}."
        )
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    scale = torch.ones(T, dtype=G64.dtype)
    if normalization in ("l2", "loss+"):
        scale = scale * G64.diagonal().clamp_min(0).sqrt()
    if normalization in ("loss", "loss+"):
        if losses is None:
            raise ValueError(f"losses are required by normalization={normalization!r} for {_METHOD}.")
        L = torch.as_tensor(losses).detach().to(device="cpu", dtype=G64.dtype)
        if L.shape != (T,) or not bool(torch.isfinite(L).all()) or bool((L < 0).any()):
            raise ValueError(
                f"losses must be a finite non-negative [{T}] tensor for {_METHOD}, got {L.tolist()} "
                f"(shape {tuple(L.shape)})."
            )
        scale = scale * L
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    G_hat, _ = normalize_by_trace(G64 / scale[:, None] / scale[None, :])
    G_hat = psd_part(G_hat)
    Q = G_hat + _RIDGE * torch.eye(T, dtype=G64.dtype)
    if T == 2:
        return as_output(_two_task_weights(Q), G)
    x, _ = solve_bounded_qp(Q, -torch.ones(1, T, dtype=G64.dtype), torch.zeros(1, T, dtype=G64.dtype))
    return as_output(x[0] / x[0].sum(), G)


def _two_task_weights(Q: Tensor) -> Tensor:
    """The minimiser ``(γ, 1 − γ)`` of ``wᵀQw`` on the two-task simplex, in closed form.

    ``γ = (Q₂₂ − Q₁₂) / (Q₁₁ + Q₂₂ − 2Q₁₂)`` clipped to ``[0, 1]`` (Sener & Koltun 2018, Algorithm 1, without
    the official code's clip to ``[0.001, 0.999]``): the same point as the QP, since ``Q`` (positive
    definite, ridge included) has one minimiser on the simplex. The denominator ``‖g₁ − g₂‖²/tr G + 2·ridge``
    is positive.
    """
    q11, q12, q22 = float(Q[0, 0]), float(Q[0, 1]), float(Q[1, 1])
    gamma = min(max((q22 - q12) / (q11 + q22 - 2.0 * q12), 0.0), 1.0)
    return torch.tensor([gamma, 1.0 - gamma], dtype=Q.dtype)


def mgda(
    J: Tensor,
    *,
    normalization: MGDANormalization = "none",
    losses: Tensor | None = None,
) -> Tensor:
    """MGDA update ``Jᵀw`` (``[P]``), the min-norm element of the convex hull of the rows of ``J``.

    Equal to ``J.T @ mgda_weights(gramian(J), ...)``; see :func:`mgda_weights`.
    """
    check_jacobian(J, _METHOD)
    return combine(J, mgda_weights(gramian(J), normalization=normalization, losses=losses))
