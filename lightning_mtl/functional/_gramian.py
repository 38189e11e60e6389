"""The task Gramian ``G = J Jᵀ`` and what is read from it: cosine similarities, the update's norm.

:func:`gramian` accumulates in float64 whatever the dtype of ``J``: every entry of a float32 (or half) ``J``
can then be anywhere in its dtype's range without the product overflowing or underflowing, which is what
makes the weights of the scale-invariant methods independent of the scale of the losses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import CPU, F64, check_positive_float, check_square, prepare_gramian

# Elements of J converted to float64 at a time: at most 32 MiB, and at most a quarter of J's float32 bytes
# (an eighth of its elements), so that the conversion never dominates the step's memory.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK_COLUMNS = 256


def gramian(J: Tensor) -> Tensor:
    """Gramian ``G = J Jᵀ`` (``[T, T]``, float64, symmetric) of the task Jacobian ``J`` (``[T, ...]``).

    ``J`` is flattened to ``[T, N]`` and may have any floating dtype (float16 and bfloat16 included); the
    product is accumulated in float64 over column chunks (at most 4M elements, and at most an eighth of
    ``J``), so neither the result
    overflows or underflows (a float32 ``J`` with entries of ``1e30`` or ``1e-30`` gives an exact-scale
    Gramian) nor is a float64 copy of a large ``J`` made. The result stays on ``J``'s device.
    """
    if not isinstance(J, Tensor):
        raise TypeError(f"J must be a torch.Tensor for gramian, got {type(J).__name__}.")
    if J.ndim < 2 or J.shape[0] < 1:
        raise ValueError(
            f"J must be a [T, P] (or [T, ...]) tensor with T >= 1 for gramian, got shape {tuple(J.shape)}."
        )
    if not J.is_floating_point():
        raise ValueError(f"J must be floating point for gramian, got dtype {J.dtype}.")
    T = J.shape[0]
    flat = J.reshape(T, -1)
    chunk = min(_CHUNK_ELEMENTS, max(T * _MIN_CHUNK_COLUMNS, flat.numel() // 8))
    width = max(1, chunk // T)
    G = torch.zeros(T, T, dtype=F64, device=J.device)
    for start in range(0, flat.shape[1], width):
        block = flat[:, start : start + width].to(F64)
        G = G.addmm(block, block.T)
    return (G + G.T) / 2


def cosine_similarities(G: Tensor) -> Tensor:
    """Pairwise cosine similarities ``[T, T]`` (float64) of the task gradients, from their Gramian ``G``.

    ``cos(gᵢ, gⱼ) = Gᵢⱼ / √(Gᵢᵢ Gⱼⱼ)``, clamped to ``[−1, 1]``, computed as ``(Gᵢⱼ/√Gᵢᵢ)/√Gⱼⱼ`` so that it
    neither overflows nor underflows. A task with a zero gradient has cosine 0 with every other task and 1
    with itself. The result is on ``G``'s device.
    """
    check_square(G, "cosine_similarities")
    G64 = G.to(F64)
    norms = G64.diagonal().clamp_min(0).sqrt()
    zero = norms == 0
    safe = torch.where(zero, torch.ones_like(norms), norms)
    cos = (G64 / safe[:, None]) / safe[None, :]
    cos = torch.where(zero[:, None] | zero[None, :], torch.zeros_like(cos), cos).clamp(-1.0, 1.0)
    return cos.fill_diagonal_(1.0)


def cosine_min(G: Tensor) -> Tensor:
    """Smallest pairwise cosine similarity (a float64 scalar tensor) of the task gradients; 1 for one task."""
    cos = cosine_similarities(G)
    T = cos.shape[0]
    if T == 1:
        return cos.new_ones(())
    return cos[~torch.eye(T, dtype=torch.bool, device=cos.device)].min()


def cap_update_norm(weights: Tensor, G: Tensor, max_norm: float) -> Tensor:
    """Rescale ``weights`` so that the update ``Jᵀw`` has norm at most ``max_norm``.

    ``‖Jᵀw‖ = √(wᵀGw)``, so this is the ``clip_grad_norm_(shared_parameters, max_norm)`` step of the Nash-MTL
    and FairGrad authors' code (the CAGrad authors do not clip), done on the Gramian. Note that the authors
    clip the *shared* gradient only; scaling the weights also scales the task-specific heads' gradients.
    """
    check_positive_float(max_norm, "max_norm", "cap_update_norm")
    G64 = prepare_gramian(G, "cap_update_norm")
    w = weights.detach().to(device=CPU, dtype=F64)
    norm = math.sqrt(max(float(w @ G64 @ w), 0.0))
    if norm <= max_norm:
        return weights
    return weights * (max_norm / norm)


def combine(J: Tensor, weights: Tensor) -> Tensor:
    """The update ``Jᵀw`` (``[P]``, ``J``'s dtype and device) of float64 weights computed on ``gramian(J)``.

    Weights whose size is outside the comfortable range of ``J``'s dtype (Nash-MTL's and FairGrad's scale
    as a power of the losses' scale) are applied as ``(Jᵀ(w/m))·m`` with ``m = max|w|``, the last product in
    float64, so that casting them neither overflows nor loses them to subnormals.
    """
    w = weights.to(device=J.device)
    info = torch.finfo(J.dtype)
    m = float(w.abs().max()) if w.numel() else 0.0
    if m == 0.0 or not math.isfinite(m) or info.tiny / info.eps <= m <= info.max * info.eps:
        return J.T @ w.to(J.dtype)
    return ((J.T @ (w / m).to(J.dtype)).to(F64) * m).to(J.dtype)
