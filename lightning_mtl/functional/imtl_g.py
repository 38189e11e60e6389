"""IMTL-G: impartial gradient balancing (Liu et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import as_output, check_jacobian, input_eps, prepare_gramian
from ._gramian import combine, gramian
from ._linalg import normalize_by_trace

_METHOD = "IMTL-G"


def imtl_g_weights(G: Tensor, *, eps: float | None = None) -> Tensor:
    """Weights ``α`` (summing to 1) of the IMTL-G update ``Jᵀα``, computed on the Gramian ``G = J Jᵀ``.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang (2021), *Towards Impartial Multi-task Learning*, ICLR,
    https://openreview.net/forum?id=IMPnRXEWpvr. The update ``d = Jᵀα`` has equal projections on every unit
    gradient ``uᵢ = gᵢ/‖gᵢ‖`` and ``Σαᵢ = 1``; the paper's closed form ``α₂:T = g₁Uᵀ(DUᵀ)⁻¹`` is equivalent
    to ``α ∝ G⁻¹ diag(G)^½`` normalised to sum 1. No hyper-parameters. ``α`` can be negative.

    Collinear or zero gradients make ``G`` singular: the pseudo-inverse is used (relative cut-off
    ``T·eps``, ``eps`` the gradients' precision), the generalisation of TorchJD's ``IMTLGWeighting``. When the
    unnormalised weights sum to (nearly) zero, e.g. all gradients zero, the weights are zero.
    The paper applies IMTL-G to gradients with respect to the shared representation.

    Scale-invariant: ``α ∝ G⁻¹ diag(G)^½`` scales by ``1/s`` when ``J`` scales by ``s``, and the
    normalisation to sum 1 removes that; the pseudo-inverse's cut-off and the zero-sum test are relative.

    Args:
        G: ``[T, T]`` Gramian.
        eps: relative precision of the gradients (default: machine epsilon of ``G``'s dtype). For a float64
            Gramian of lower-precision gradients pass theirs, ``torch.finfo(J.dtype).eps``, as :func:`imtl_g`
            does: eigenvalues below ``T·eps·λ_max`` are rounding, not a direction to balance.

    Returns:
        ``[T]`` weights, same dtype and device as ``G``.
    """
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    G_hat, _ = normalize_by_trace(G64)
    norms = G_hat.diagonal().clamp_min(0).sqrt()
    v = torch.linalg.pinv(G_hat, rtol=T * input_eps(G, eps, _METHOD), hermitian=True) @ norms
    total = float(v.sum())
    if abs(total) < 1e-12:
        return as_output(torch.zeros(T, dtype=G64.dtype), G)
    return as_output(v / total, G)


def imtl_g(J: Tensor) -> Tensor:
    """IMTL-G update (``[P]``) of a Jacobian ``J`` (``[T, P]``); see :func:`imtl_g_weights`.

    Equal to ``J.T @ imtl_g_weights(gramian(J), eps=torch.finfo(J.dtype).eps)``.
    """
    check_jacobian(J, _METHOD)
    return combine(J, imtl_g_weights(gramian(J), eps=torch.finfo(J.dtype).eps))
