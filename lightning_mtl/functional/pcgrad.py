"""PCGrad: projecting conflicting gradients (Yu et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import as_output, check_generator, check_jacobian, prepare_gramian, randperms
from ._gramian import combine, gramian

_METHOD = "PCGrad"


def pcgrad_weights(G: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Weights ``w`` of PCGrad, so that the update is ``Jᵀw``, computed on the Gramian ``G = J Jᵀ``.

    Yu, Kumar, Gupta, Levine, Hausman, Finn (2020), *Gradient Surgery for Multi-Task Learning*, NeurIPS,
    https://arxiv.org/abs/2001.06782, Algorithm 1: for each task ``i``, ``gᵢᴾᶜ = gᵢ``; for each other task
    ``j`` in a random order, if ``gᵢᴾᶜ·gⱼ < 0`` then ``gᵢᴾᶜ −= (gᵢᴾᶜ·gⱼ / ‖gⱼ‖²) gⱼ`` (projection on the
    normal plane of the *original* ``gⱼ``). The update is the **sum** ``Σᵢ gᵢᴾᶜ`` (the paper; one port offers
    the mean, i.e. these weights divided by ``T``). No hyper-parameters.

    ``gᵢᴾᶜ = Σₖ cᵢₖ gₖ`` is tracked through its coefficients, so only ``G`` is needed; all tasks ``i`` are
    processed at once. For each task ``i`` in turn, one permutation of ``range(T)`` is drawn from
    ``generator`` (``i`` itself is skipped), on the CPU: a generator in the same state gives the same
    weights on every process. TorchJD's ``PCGradWeighting`` draws the same way from the global generator.

    Scale-invariant: each projection coefficient ``gᵢᴾᶜ·gⱼ/‖gⱼ‖²`` is a ratio of dot products, so the
    weights do not change when every loss is multiplied by a constant.

    Args:
        G: ``[T, T]`` Gramian.
        generator: CPU generator for the task orders (``None``: torch's global generator).

    Returns:
        ``[T]`` weights, same dtype and device as ``G``.
    """
    check_generator(generator, _METHOD)
    G64 = prepare_gramian(G, _METHOD)
    T = G64.shape[0]
    orders = randperms(T, T, generator)
    tasks = torch.arange(T)
    # Step s projects every task i on the original g_j, j = orders[i, s]; everything that does not depend
    # on the projected gradients is gathered once (flat indices of the pairs (i, j), their ‖g_j‖²).
    pairs = (tasks[:, None] * T + orders).T.contiguous()  # [step, i]: flat index of (i, j) in a [T, T] matrix
    others = orders.T.contiguous()  # [step, i] = j
    sq_norms = G64.diagonal()[others]
    valid = (others != tasks) & (sq_norms > 0)
    safe_sq_norms = torch.where(valid, sq_norms, 1.0)
    dots = G64.clone()  # dots[i, j] = g_i^PC · g_j
    flat_dots = dots.view(-1)
    coefs = torch.zeros(T, T, dtype=G64.dtype)  # [step, i]: coefficient of g_j removed from g_i^PC
    for step in range(T):
        dot = flat_dots[pairs[step]]
        coef = torch.where(valid[step], dot.clamp(max=0.0) / safe_sq_norms[step], 0.0)
        coefs[step] = coef
        dots.addcmul_(coef[:, None], G64.index_select(0, others[step]), value=-1.0)
    # row i: coefficients of g_i^PC on the original g_k (identity minus the projections)
    coefficients = (
        torch.eye(T, dtype=G64.dtype).view(-1).index_add_(0, pairs.view(-1), -coefs.view(-1)).view(T, T)
    )
    return as_output(coefficients.sum(dim=0), G)


def pcgrad(J: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad update ``Σᵢ gᵢᴾᶜ`` (``[P]``) of a Jacobian ``J`` (``[T, P]``); see :func:`pcgrad_weights`.

    Equal to ``J.T @ pcgrad_weights(gramian(J), generator=generator)``.
    """
    check_jacobian(J, _METHOD)
    return combine(J, pcgrad_weights(gramian(J), generator=generator))
