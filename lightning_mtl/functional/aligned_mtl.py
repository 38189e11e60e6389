"""Aligned-MTL: independent component alignment (Senushkin et al. 2023)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._checks import as_output, check_jacobian, input_eps, preference_vector, prepare_gramian
from ._gramian import combine, gramian

_METHOD = "Aligned-MTL"
_SCALE_MODES = ("min", "median", "rmse")

AlignedMTLScale = Literal["min", "median", "rmse"]


def aligned_mtl_weights(
    G: Tensor,
    *,
    scale_mode: AlignedMTLScale = "min",
    preference: Tensor | Sequence[float] | None = None,
    eps: float | None = None,
) -> Tensor:
    """Weights ``α = B w`` of the Aligned-MTL update ``Jᵀα``, computed on the Gramian ``G = J Jᵀ``.

    Senushkin, Patakin, Kuznetsov, Konushin (2023), *Independent Component Alignment for Multi-Task
    Learning*, CVPR, https://arxiv.org/abs/2305.19000, Algorithm 1. With ``G = VΛVᵀ`` (eigenvalues above
    ``λ_max·T·eps`` kept, ``eps`` the gradients' precision), ``B = √σ · VΛ^(−½)Vᵀ``, so that the aligned
    gradients ``BᵀJ`` are orthogonal with equal norms ``√σ`` (the condition number of the system is 1).

    Scaling: ``w = 1`` (the **sum** of the aligned gradients), as in the official code
    (SamsungLabs/MTL, ``grads.sum(-1)``) and LibMTL; TorchJD's ``AlignedMTLWeighting`` uses ``w = 1/T``,
    i.e. these weights divided by ``T``. ``σ = λ_min`` (``scale_mode="min"``, the default), the median
    eigenvalue (``"median"``) or the mean eigenvalue (``"rmse"``), all among the kept ones. A zero Gramian
    gives ``α = w``.

    Scale-invariant: ``σ`` and ``Λ`` both scale by ``s²`` when ``J`` scales by ``s``, so ``B`` does not
    change; the eigenvalue cut-off is relative to ``λ_max``.

    Args:
        G: ``[T, T]`` Gramian.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.
        preference: task weights ``w`` (``[T]``), default all ones.
        eps: relative precision of the gradients (default: machine epsilon of ``G``'s dtype). For a float64
            Gramian of lower-precision gradients pass theirs, ``torch.finfo(J.dtype).eps``, as
            :func:`aligned_mtl` does.

    Returns:
        ``[T]`` weights, same dtype and device as ``G``.
    """
    if scale_mode not in _SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {_SCALE_MODES} for {_METHOD}, got {scale_mode!r}.")
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    w = preference_vector(preference, T, _METHOD, default=1.0)
    eigenvalues, V = torch.linalg.eigh(G64)
    keep = eigenvalues > eigenvalues.max() * T * input_eps(G, eps, _METHOD)
    if not bool(keep.any()):
        return as_output(w, G)
    eigenvalues, V = eigenvalues[keep], V[:, keep]
    if scale_mode == "min":
        scale = eigenvalues.min()
    elif scale_mode == "median":
        scale = eigenvalues.median()  # the lower median for an even count, as torch.median in the original
    else:
        scale = eigenvalues.mean()
    B = scale.sqrt() * (V / eigenvalues.sqrt()) @ V.T
    return as_output(B @ w, G)


def aligned_mtl(
    J: Tensor,
    *,
    scale_mode: AlignedMTLScale = "min",
    preference: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Aligned-MTL update (``[P]``) of a Jacobian ``J`` (``[T, P]``); see :func:`aligned_mtl_weights`.

    Equal to ``J.T @ aligned_mtl_weights(gramian(J), ..., eps=torch.finfo(J.dtype).eps)``.
    """
    check_jacobian(J, _METHOD)
    weights = aligned_mtl_weights(
        gramian(J), scale_mode=scale_mode, preference=preference, eps=torch.finfo(J.dtype).eps
    )
    return combine(J, weights)
