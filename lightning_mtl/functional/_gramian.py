"""The task Gramian ``G = J Jᵀ`` and what is read from it: cosine similarities, the update's norm.

:func:`gramian` returns float64 whatever the dtype of ``J``, and rescales ``J`` by an exact power of two
whenever its entries are too large or too small for the product to stay in float32's range: every entry of
a float32 (or half) ``J`` can then be anywhere in its dtype's range, which is what makes the weights of the
scale-invariant methods independent of the scale of the losses. The products themselves are accumulated in
float32 (a float64 ``J`` in float64), at the speed of a float32 matrix product, without a copy of ``J``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import CPU, F64, check_positive_float, check_square, prepare_gramian

# Columns of J converted (to float32, or rescaled) at a time: at most 4M elements and at most an eighth of J,
# so that a conversion never dominates the step's memory.
_CHUNK_ELEMENTS = 1 << 22
_MIN_CHUNK_COLUMNS = 256
# float32 products of rows whose largest magnitudes are 2^e stay in float32's normal range, for every entry
# down to 2^-40 of its row's largest, when every -40 <= e and 2e + log2(columns) <= 100 (2^-126 to 2^128).
_LOWEST_EXPONENT, _HIGHEST_SUM_EXPONENT = -40, 100


def gramian(J: Tensor) -> Tensor:
    """Gramian ``G = J Jᵀ`` (``[T, T]``, float64, symmetric) of the task Jacobian ``J`` (``[T, ...]``).

    ``J`` is flattened to ``[T, N]`` and may have any floating dtype (float16 and bfloat16 included). The
    products are accumulated in float32 (float64 for a float64 ``J``), after multiplying each task's row by an
    exact power of two when some row's largest entry is outside the range where float32 products neither
    overflow nor underflow (a float32 ``J`` with entries of ``1e30`` or ``1e-30``, or tasks whose gradients
    differ by a factor 1e30, give the Gramian at its exact scale, to float32 precision). A float32 ``J`` in range is used as it is (no copy); otherwise, and for half
    precision, columns are converted by chunks of at most an eighth of ``J``. One host sync (the largest
    entry). The result stays on ``J``'s device.
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
    if flat.dtype == F64:
        G = flat @ flat.T
        return (G + G.T) / 2
    # each task's largest entry (amin and amax: several times faster than aminmax(dim=1) or an inf-norm on
    # CPU, and no copy as with abs()); one host sync
    largest = torch.maximum(-flat.amin(dim=1), flat.amax(dim=1)).tolist()
    exponents = [math.frexp(v)[1] if v > 0 and math.isfinite(v) else None for v in largest]
    log_columns = math.log2(flat.shape[1])
    rescale = any(
        e is not None and (e < _LOWEST_EXPONENT or 2 * e + log_columns > _HIGHEST_SUM_EXPONENT)
        for e in exponents
    )
    if flat.dtype == torch.float32 and not rescale:
        G = (flat @ flat.T).to(F64)
        return (G + G.T) / 2
    # rescale every task's row by an exact power of two, its largest entry to [0.5, 1): G = D⁻¹ (DJ)(DJ)ᵀ D⁻¹
    shifts = [-e if rescale and e is not None else 0 for e in exponents]
    factors = torch.tensor([2.0**k for k in shifts], dtype=F64, device=J.device)
    chunk = min(_CHUNK_ELEMENTS, max(T * _MIN_CHUNK_COLUMNS, flat.numel() // 8))
    width = max(1, chunk // T)
    G = torch.zeros(T, T, dtype=F64, device=J.device)
    for start in range(0, flat.shape[1], width):
        block = flat[:, start : start + width]
        # 2^shift may be outside float32's range: rescale in float64, then round to float32 (exact, except
        # for entries that are themselves below float32's range after rescaling)
        block = (block.to(F64) * factors[:, None]).float() if rescale else block.float()
        G += (block @ block.T).to(F64)
    if rescale:
        G = G / (factors[:, None] * factors[None, :])
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
