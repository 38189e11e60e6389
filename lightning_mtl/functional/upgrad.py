"""UPGrad: unconflicting projection of gradients (Quinton & Rey 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._checks import as_output, check_jacobian, check_positive_float, preference_vector, prepare_gramian
from ._gramian import combine, gramian
from ._linalg import normalize_by_trace, psd_part
from ._qp import solve_bounded_qp

_METHOD = "UPGrad"


def dual_cone_projection_weights(G64: Tensor, lower: Tensor, *, reg_eps: float, method: str) -> Tensor:
    """Weights of the projections of ``Jᵀuₖ`` onto the dual cone ``{v : Jv ≥ 0}`` of the rows of ``J``.

    Quinton & Rey (2024), *Jacobian Descent for Multi-Objective Optimization*, Proposition 1: the projection
    of ``Jᵀu`` is ``Jᵀw`` with ``w = argmin_{v ≥ u} vᵀGv``. Solved per row ``uₖ`` of ``lower`` (``[B, T]``)
    by an exact active-set method on ``Ĝ = G/tr G + reg_eps·I`` (TorchJD's conventions: trace normalisation,
    ``reg_eps = 1e-4``, which makes the QP strictly convex and tolerates rounding; negative eigenvalues
    from rounding, below ``1e-7·tr G`` in float32, are removed first). ``G64`` is a prepared
    float64 Gramian (``prepare_gramian``); returns float64 ``[B, T]``.
    """
    check_positive_float(reg_eps, "reg_eps", method)
    T = G64.shape[0]
    G_hat, _ = normalize_by_trace(G64)
    Q = psd_part(G_hat) + reg_eps * torch.eye(T, dtype=G64.dtype)
    x, _ = solve_bounded_qp(Q, torch.zeros_like(lower), lower)
    return x


def upgrad_weights(
    G: Tensor, *, preference: Tensor | Sequence[float] | None = None, reg_eps: float = 1e-4
) -> Tensor:
    """Weights ``w`` of the UPGrad update ``Jᵀw``, computed on the Gramian ``G = J Jᵀ``.

    Quinton & Rey (2024), *Jacobian Descent for Multi-Objective Optimization*,
    https://arxiv.org/abs/2406.16232. Each gradient ``gᵢ`` (scaled by its preference ``pᵢ``) is projected
    onto the dual cone of the rows of ``J``, ``{v : gⱼ·v ≥ 0 ∀j}``, and the projections are summed:
    ``w = Σᵢ argmin_{v ≥ pᵢeᵢ} vᵀGv``. With the default preference ``1/T`` the update is the mean of the
    projected gradients (TorchJD's convention). The update never conflicts with any task:
    ``gⱼ·Jᵀw ≥ −reg_eps·tr(G)·wⱼ`` (exactly ``≥ 0`` as ``reg_eps → 0``).

    Conventions follow TorchJD 0.18's ``UPGradWeighting`` (``G`` normalised by its trace, ``+ 1e-4·I``),
    except that a Gramian with a tiny trace is still normalised (TorchJD replaces ``G`` by zeros when
    ``tr G < 1e-4``, which turns UPGrad into the plain mean for small gradients).

    Scale-invariant: the QP is solved on ``G/tr G`` with the ridge ``reg_eps`` relative to it and relative
    solver tolerances, so the weights do not change when every loss is multiplied by a constant (TorchJD's
    absolute ``tr G < 1e-4`` cut-off is the one convention not kept, for that reason).

    Args:
        G: ``[T, T]`` Gramian.
        preference: ``[T]`` preference vector ``p`` (default ``1/T`` everywhere).
        reg_eps: ridge added to the trace-normalised Gramian, > 0 (default 1e-4).

    Returns:
        ``[T]`` weights, same dtype and device as ``G``.
    """
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    p = preference_vector(preference, T, _METHOD, default=1.0 / T)
    x = dual_cone_projection_weights(G64, torch.diag(p), reg_eps=reg_eps, method=_METHOD)
    return as_output(x.sum(dim=0), G)


def upgrad(J: Tensor, *, preference: Tensor | Sequence[float] | None = None, reg_eps: float = 1e-4) -> Tensor:
    """UPGrad update (``[P]``) of a Jacobian ``J`` (``[T, P]``); see :func:`upgrad_weights`.

    Equal to ``J.T @ upgrad_weights(gramian(J), ...)``.
    """
    check_jacobian(J, _METHOD)
    return combine(J, upgrad_weights(gramian(J), preference=preference, reg_eps=reg_eps))
