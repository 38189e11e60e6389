"""MoDo (Chen, Fernando, Ying & Chen, NeurIPS 2023): the λ update from two independent gradient samples and
the shared direction from both (or from a third); and the Euclidean projection onto the simplex that MoDo and
SDMGrad share.

Pure functions of tensors, on any device, without host synchronisation (no ``.item()``, no data-dependent
Python branch): a strategy can run them every step on the accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_mtl.functional._simplex import project_onto_simplex

__all__ = ["cross_gramian", "modo_direction", "modo_step", "modo_weights", "project_onto_simplex"]

_METHOD = "MoDo"


def cross_gramian(J1: Tensor, J2: Tensor) -> Tensor:
    """``J₁J₂ᵀ`` ``[T, T]`` as float64 (on the device of ``J₁``) from two Jacobians ``[T, P]`` of independent
    samples: an unbiased estimate of the Gramian ``E[J]E[J]ᵀ``, not symmetric nor PSD in general.

    Accumulated in float32 for float32 (or half-precision) Jacobians, as
    :func:`~lightning_mtl.functional.gramian` does for in-range ones (no ``P``-sized float64 copy), and in
    float64 when either is float64.
    """
    for name, J in (("J1", J1), ("J2", J2)):
        if not isinstance(J, Tensor) or J.ndim != 2 or not J.is_floating_point():
            shape = tuple(J.shape) if isinstance(J, Tensor) else type(J).__name__
            raise ValueError(f"{name} must be a floating-point [T, P] Jacobian, got {shape}.")
    if J1.shape != J2.shape:
        raise ValueError(
            f"J1 and J2 must be Jacobians of the same tasks and parameters, got shapes {tuple(J1.shape)} and "
            f"{tuple(J2.shape)}."
        )
    A, B = J1.detach(), J2.detach().to(J1.device)
    if torch.float64 in (A.dtype, B.dtype):
        return A.to(torch.float64) @ B.to(torch.float64).T
    return (A.float() @ B.float().T).to(torch.float64)


def _check_number(value: float, name: str, *, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound} for {_METHOD}, got {value!r}.")
    return float(value)


def _check_parts(parts: Tensor, method: str, counts: tuple[int, ...] = (3,)) -> None:
    if (
        not isinstance(parts, Tensor)
        or parts.ndim != 3
        or parts.shape[0] not in counts
        or not parts.is_floating_point()
    ):
        shape = tuple(parts.shape) if isinstance(parts, Tensor) else type(parts).__name__
        k = " or ".join(str(c) for c in counts)
        raise ValueError(
            f"{method} needs the Jacobians [{k}, T, P] of {k} independent samples (disjoint parts of the batch), "
            f"got {shape}."
        )


def modo_weights(M: Tensor, lam: Tensor | None, *, gamma: float = 0.1, rho: float = 0.1) -> Tensor:
    """One MoDo step of the weights: ``λ⁺ = Π_Δ(λ − γ(Mλ + ρλ))`` with ``M = J₁J₂ᵀ`` (:func:`cross_gramian`).

    ``J₁J₂ᵀλ`` is an unbiased estimate of ``∇_λ ½‖Jᵀλ‖²`` (double sampling); ``ρλ`` the gradient of the
    regulariser ``½ρ‖λ‖²`` of the authors' code (``ρ = 0`` is the paper's plain update).

    Args:
        M: ``[T, T]`` product of the Jacobians of two independent samples.
        lam: the current ``λ ∈ Δ`` ``[T]``; ``None`` starts from ``1/T`` (the authors' initialisation).
        gamma: step size ``γ > 0`` of ``λ``.
        rho: regularisation ``ρ ≥ 0``.

    Returns:
        ``λ⁺`` ``[T]`` on the simplex, float64 on the device of ``M``.
    """
    gamma = _check_number(gamma, "gamma", positive=True)
    rho = _check_number(rho, "rho", positive=False)
    if not isinstance(M, Tensor) or M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"M must be a [T, T] matrix J₁J₂ᵀ for {_METHOD}, got {shape}.")
    T = M.shape[0]
    M64 = M.detach().to(torch.float64)
    if lam is None:
        lam64 = torch.full((T,), 1.0 / T, dtype=torch.float64, device=M.device)
    else:
        if lam.shape != (T,):
            raise ValueError(f"lam must have shape [{T}] for {_METHOD}, got {tuple(lam.shape)}.")
        lam64 = lam.detach().to(device=M.device, dtype=torch.float64)
    return project_onto_simplex(lam64 - gamma * (M64 @ lam64 + rho * lam64))


def modo_step(
    parts: Tensor,
    lam: Tensor | None,
    *,
    gamma: float = 0.1,
    rho: float = 0.1,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """MoDo's ``λ⁺`` (:func:`modo_weights` on ``J₀J₁ᵀ``) from the Jacobians ``[k, T, P]`` (``k = 2`` or ``3``; parts 0
    and 1 are read): with three samples, the direction ``d = J₂ᵀλ⁺`` can then be taken without ``J₂``. ``reduce``:
    see :func:`modo_direction`."""
    _check_parts(parts, _METHOD, counts=(2, 3))
    M = cross_gramian(parts[0], parts[1])
    return modo_weights(M if reduce is None else reduce(M), lam, gamma=gamma, rho=rho)


def modo_direction(
    parts: Tensor,
    lam: Tensor | None,
    *,
    gamma: float = 0.1,
    rho: float = 0.1,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """MoDo's step from the Jacobians ``[k, T, P]`` of ``k = 2`` or ``3`` independent samples: ``λ⁺`` from parts
    0 and 1 (:func:`modo_weights` on ``J₀J₁ᵀ``), then the shared direction with ``λ⁺``:

    - ``k = 2`` (the paper's update, JMLR 2024 eq. (2.9b) as TorchJD cites it): ``d = ½(J₀ + J₁)ᵀλ⁺``, the
      gradient of the mean of the two samples' losses;
    - ``k = 3`` (LibMTL's, and the authors' code with three gradients): ``d = J₂ᵀλ⁺`` of a third sample.

    ``reduce`` (optional) completes ``J₀J₁ᵀ`` before its use: on a sharded model ``parts`` are a column shard of
    the Jacobians and ``reduce`` sums the shards' products over the ranks (``d`` is then this shard's).

    Returns:
        ``(d [P]`` in the dtype of ``parts``, ``λ⁺ [T]`` float64``)``.
    """
    new = modo_step(parts, lam, gamma=gamma, rho=rho, reduce=reduce)
    if parts.shape[0] == 3:
        return new.to(parts.dtype) @ parts[2], new
    half = (0.5 * new).to(parts.dtype)  # ½(J₀ + J₁)ᵀλ in one pass over both parts, without forming J₀ + J₁
    return torch.cat([half, half]) @ parts.reshape(2 * parts.shape[1], -1), new
