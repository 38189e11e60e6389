"""SDMGrad (Xiao, Ban & Ji, NeurIPS 2023): the inner projected-SGD solve of the weights ``w`` from two
independent gradient samples and the direction from a third.

Pure functions of tensors. The inner loop runs in float64: on an accelerator, on its device with no host
synchronisation (no ``.item()``, no data-dependent Python branch; the simplex projection is
:func:`lightning_mtl.functional.modo.project_onto_simplex`); on the CPU, in NumPy (the same operations on
``T × T`` numbers, at a fifth of torch's per-operation cost).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from lightning_mtl.functional.modo import _check_parts, cross_gramian, project_onto_simplex

__all__ = ["sdmgrad_coefficients", "sdmgrad_direction", "sdmgrad_step", "sdmgrad_weights"]

_METHOD = "SDMGrad"


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or math.isnan(lam) or lam < 0:
        raise ValueError(f"lam must be a number >= 0 (inf allowed) for {_METHOD}, got {lam!r}.")
    return float(lam)


def _check_solver(lr: float, momentum: float, n_iter: int) -> None:
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0 for {_METHOD}, got {lr!r}.")
    if isinstance(momentum, bool) or not (isinstance(momentum, (int, float)) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be a number in [0, 1) for {_METHOD}, got {momentum!r}.")
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a positive integer for {_METHOD}, got {n_iter!r}.")


def sdmgrad_weights(
    M: Tensor,
    w: Tensor | None,
    *,
    lam: float = 0.3,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
) -> Tensor:
    """The inner solve of SDMGrad: ``n_iter`` steps of projected SGD with momentum on
    ``min_{w∈Δ} ½‖J_ξᵀw + λḡ‖²`` (``ḡ = mean gᵢ``), whose stochastic gradient is ``M(w + λ/T·1)`` with
    ``M = J_ξJ_ξ′ᵀ`` (:func:`~lightning_mtl.functional.modo.cross_gramian` of two independent samples).

    As LibMTL and TorchJD 0.18: ``M`` is first divided by ``s²``, ``s`` the mean of ``√Mᵢᵢ`` (negative
    diagonal entries, possible since ``M`` is not PSD, count as 0), which makes ``lr`` independent of the
    gradients' scale; each step is ``v ← μv + g`` (``v = g`` on the first step: a fresh ``torch.optim.SGD``
    per call), ``w ← Π_Δ(w − lr·v)``. LibMTL and TorchJD add ``1e-8`` to ``s²``, and the authors' code
    (OptMN-Lab/sdmgrad) takes ``s`` as the mean of ``√(Mᵢᵢ + 1e-4)``; here ``M`` is left unscaled only when
    ``s = 0``, so the result is exactly invariant to the scale of the losses.

    Args:
        M: ``[T, T]``.
        w: the warm start ``[T]`` on the simplex (the previous step's solution); ``None``: ``1/T``.
        lam: the regularisation ``λ ≥ 0`` (``inf`` allowed: the weights do not matter then).
        lr, momentum, n_iter: the inner SGD's step size ``> 0``, momentum in ``[0, 1)`` and number of steps.

    Returns:
        ``w⁺ [T]`` on the simplex, float64 on the device of ``M``.
    """
    lam = _check_lam(lam)
    _check_solver(lr, momentum, n_iter)
    if not isinstance(M, Tensor) or M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        shape = tuple(M.shape) if isinstance(M, Tensor) else type(M).__name__
        raise ValueError(f"M must be a [T, T] matrix J_ξJ_ξ′ᵀ for {_METHOD}, got {shape}.")
    T = M.shape[0]
    M64 = M.detach().to(torch.float64)
    if w is None:
        w64 = torch.full((T,), 1.0 / T, dtype=torch.float64, device=M.device)
    else:
        if w.shape != (T,):
            raise ValueError(f"w must have shape [{T}] for {_METHOD}, got {tuple(w.shape)}.")
        w64 = w.detach().to(device=M.device, dtype=torch.float64)
    if math.isinf(lam):
        return w64.clone()
    s2 = M64.diagonal().clamp_min(0.0).sqrt().mean() ** 2
    A = M64 / torch.where(s2 > 0, s2, torch.ones_like(s2))
    b = lam * A.mean(dim=1)  # λ·M·(1/T)
    if A.device.type == "cpu":  # T×T numbers: NumPy's per-operation cost is a fifth of torch's
        return torch.from_numpy(_inner_sgd_numpy(A.numpy(), b.numpy(), w64.numpy(), lr, momentum, n_iter))
    return _inner_sgd(A, b, w64, lr, momentum, n_iter)


def _inner_sgd(A: Tensor, b: Tensor, w: Tensor, lr: float, momentum: float, n_iter: int) -> Tensor:
    """``n_iter`` steps of projected SGD with momentum on the gradient ``Aw + b``, on the device of ``A`` with
    no host synchronisation."""
    velocity = torch.zeros_like(w)
    for step in range(n_iter):
        grad = A @ w + b
        velocity = grad if step == 0 else momentum * velocity + grad
        w = project_onto_simplex(w - lr * velocity)
    return w


def _inner_sgd_numpy(
    A: np.ndarray, b: np.ndarray, w: np.ndarray, lr: float, momentum: float, n_iter: int
) -> np.ndarray:
    """:func:`_inner_sgd` in NumPy (float64, the same operations; the projection is the same sort-based one)."""
    T = w.shape[0]
    steps = np.arange(1, T + 1, dtype=np.float64)
    velocity = np.zeros_like(w)
    for step in range(n_iter):
        grad = A @ w + b
        velocity = grad if step == 0 else momentum * velocity + grad
        v = w - lr * velocity
        u = -np.sort(-v)
        excess = np.cumsum(u) - 1.0
        rho = max(int(np.count_nonzero(u - excess / steps > 0)), 1)
        w = np.maximum(v - excess[rho - 1] / rho, 0.0)
    return w


def sdmgrad_coefficients(w: Tensor, lam: float) -> Tensor:
    """The coefficients ``c = (w + λ/T·1)/(1 + λ)`` of the direction ``d = J_ζᵀc = (J_ζᵀw + λḡ_ζ)/(1 + λ)``; they
    sum to 1 (``λ = inf``: ``1/T``, the mean gradient)."""
    lam = _check_lam(lam)
    T = w.shape[-1]
    if math.isinf(lam):
        return torch.full_like(w, 1.0 / T)
    return (w + lam / T) / (1.0 + lam)


def sdmgrad_step(
    parts: Tensor,
    w: Tensor | None,
    *,
    lam: float = 0.3,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """SDMGrad's weights from the Jacobians ``[k, T, P]`` (``k = 2`` or ``3``; parts 0 and 1 are read) of the
    samples ``ξ``, ``ξ′``: ``w⁺`` (:func:`sdmgrad_weights` on ``J₀J₁ᵀ``) and the coefficients ``c`` of the direction
    ``d = J_ζᵀc`` on the third sample, without it (:func:`sdmgrad_coefficients`). ``reduce``: see
    :func:`sdmgrad_direction`.

    Returns:
        ``(w⁺ [T]``, ``c [T]``, both float64``)``.
    """
    _check_parts(parts, _METHOD, counts=(2, 3))
    M = cross_gramian(parts[0], parts[1])
    M = M if reduce is None else reduce(M)
    new = sdmgrad_weights(M, w, lam=lam, lr=lr, momentum=momentum, n_iter=n_iter)
    return new, sdmgrad_coefficients(new, lam)


def sdmgrad_direction(
    parts: Tensor,
    w: Tensor | None,
    *,
    lam: float = 0.3,
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SDMGrad's step from the Jacobians ``[3, T, P]`` of three independent samples: ``w⁺`` from parts 0 and 1
    (``ξ``, ``ξ′``: :func:`sdmgrad_weights` on ``J₀J₁ᵀ``), then ``d = (J₂ᵀw⁺ + λḡ₂)/(1 + λ)`` on part 2 (``ζ``).

    ``reduce`` (optional) completes ``J₀J₁ᵀ`` before its use: on a sharded model ``parts`` are a column shard of
    the Jacobians and ``reduce`` sums the shards' products over the ranks (``d`` is then this shard's).

    Returns:
        ``(d [P]`` in the dtype of ``parts``, ``w⁺ [T]`` float64, the coefficients ``c [T]`` float64 with
        ``d = J₂ᵀc``).
    """
    _check_parts(parts, _METHOD)
    new, c = sdmgrad_step(parts, w, lam=lam, lr=lr, momentum=momentum, n_iter=n_iter, reduce=reduce)
    return c.to(parts.dtype) @ parts[2], new, c
