"""DualProj: projection of the mean gradient onto the dual cone of the task gradients."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ._checks import as_output, check_jacobian, preference_vector, prepare_gramian
from ._gramian import combine, gramian
from .upgrad import dual_cone_projection_weights

_METHOD = "DualProj"


def dualproj_weights(
    G: Tensor, *, preference: Tensor | Sequence[float] | None = None, reg_eps: float = 1e-4
) -> Tensor:
    """Weights ``w`` of the DualProj update ``Jᵀw``, computed on the Gramian ``G = J Jᵀ``.

    The combination ``Jᵀp`` (default: the mean gradient, ``p = 1/T``) projected onto the dual cone of the
    rows of ``J``: ``w = argmin_{v ≥ p} vᵀGv``. This is equation 11 of Lopez-Paz & Ranzato (2017),
    *Gradient Episodic Memory for Continual Learning*, NeurIPS, https://arxiv.org/abs/1706.08840, applied
    to the averaged gradient as in Quinton & Rey (2024), *Jacobian Descent for Multi-Objective
    Optimization*, https://arxiv.org/abs/2406.16232. The update never conflicts with any task (up to the
    ``reg_eps`` ridge). Same QP, solver and conventions as :func:`~.upgrad.upgrad_weights` (TorchJD 0.18's
    ``DualProjWeighting``: trace normalisation, ``reg_eps = 1e-4``).

    Scale-invariant, for the reasons given in :func:`~.upgrad.upgrad_weights`: trace normalisation, a
    relative ridge and relative solver tolerances (TorchJD's absolute ``tr G < 1e-4`` cut-off is not kept).

    Args:
        G: ``[T, T]`` Gramian.
        preference: ``[T]`` combination ``p`` to project (default ``1/T`` everywhere).
        reg_eps: ridge added to the trace-normalised Gramian, > 0 (default 1e-4).

    Returns:
        ``[T]`` weights, same dtype and device as ``G``.
    """
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    p = preference_vector(preference, T, _METHOD, default=1.0 / T)
    x = dual_cone_projection_weights(G64, p[None], reg_eps=reg_eps, method=_METHOD)
    return as_output(x[0], G)


def dualproj(
    J: Tensor, *, preference: Tensor | Sequence[float] | None = None, reg_eps: float = 1e-4
) -> Tensor:
    """DualProj update (``[P]``) of a Jacobian ``J`` (``[T, P]``); see :func:`dualproj_weights`.

    Equal to ``J.T @ dualproj_weights(gramian(J), ...)``.
    """
    check_jacobian(J, _METHOD)
    return combine(J, dualproj_weights(gramian(J), preference=preference, reg_eps=reg_eps))
