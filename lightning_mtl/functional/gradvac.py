"""GradVac: gradient vaccine (Wang et al. 2021)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import as_output, check_generator, check_jacobian, prepare_gramian, randperms
from ._gramian import combine, gramian

_METHOD = "GradVac"


class GradVacWeights(NamedTuple):
    """Result of :func:`gradvac_weights`."""

    weights: Tensor
    """``[T]`` weights (``[K, T]``: one row per parameter group when the Gramian is ``[K, T, T]``)."""
    targets: Tensor
    """Updated EMA targets ``φ̂``, shaped like the Gramian (the state to pass back at the next step)."""


class GradVacResult(NamedTuple):
    """Result of :func:`gradvac`."""

    update: Tensor
    """``[P]`` update ``Σᵢ gᵢᴾᶜ``."""
    targets: Tensor
    """Updated EMA targets ``φ̂`` (``[T, T]``, or ``[K, T, T]`` with ``groups``)."""


def gradvac_weights(
    G: Tensor,
    targets: Tensor | None = None,
    *,
    beta: float = 1e-2,
    eps: float = 1e-8,
    generator: torch.Generator | None = None,
) -> GradVacWeights:
    """GradVac on Gramians: per-group weights of ``Σᵢ gᵢᴾᶜ`` and the updated similarity targets.

    Wang, Tsvetkov, Firat, Cao (2021), *Gradient Vaccine: Investigating and Improving Multi-task Optimization
    in Massively Multilingual Models*, ICLR, https://arxiv.org/abs/2010.05874, Algorithm 1. For each task
    ``i``, ``gᵢᴾᶜ = gᵢ``; for each other task ``j`` in a random order, with ``φ = cos(gᵢᴾᶜ, gⱼ)`` and the
    target ``φ̂ᵢⱼ``: if ``φ < φ̂ᵢⱼ`` then
    ``gᵢᴾᶜ += gⱼ·‖gᵢᴾᶜ‖(φ̂ᵢⱼ√(1−φ²) − φ√(1−φ̂ᵢⱼ²)) / (‖gⱼ‖√(1−φ̂ᵢⱼ²))`` (which brings the cosine to
    ``φ̂ᵢⱼ``); always ``φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφ`` (with the ``φ`` measured before the correction). The update
    is the **sum** ``Σᵢ gᵢᴾᶜ``, as in PCGrad, which GradVac generalises (``φ̂ = 0``, no EMA).

    Everything is computed per parameter group ``k`` (the paper's per-layer targets ``φ̂ᵢⱼₖ``) from that
    group's Gramian, tracking ``gᵢᴾᶜ`` by its coefficients on the original gradients. The random order is
    drawn once per task ``i`` (a permutation of the other tasks, on the CPU, from ``generator``) and shared
    by all groups, as in LibMTL; with one group this is exactly TorchJD's ``GradVacWeighting`` draw.

    Defaults: ``β = 1e-2``, a slow EMA (a memory of about 100 steps); the paper (section 3.3) defines β as
    a hyper-parameter, and the value of its experiments is not confirmed here: LibMTL and TorchJD default
    to 0.5, which makes the targets follow the latest cosines much faster. Targets start at 0 (the paper).
    ``eps`` guards ``√(1−φ̂²)`` (dimensionless, so the result does not depend on the gradients' scale,
    unlike TorchJD's absolute ``1e-8`` on the norms): a target of exactly ±1 gives a large but finite step.

    Scale-invariant: the cosines ``φ`` and the ratio ``‖gᵢᴾᶜ‖/‖gⱼ‖`` do not change when every loss is
    multiplied by a constant, so neither do the weights nor the targets.

    Args:
        G: ``[T, T]`` Gramian, or ``[K, T, T]``: one Gramian per parameter group.
        targets: EMA targets ``φ̂`` shaped like ``G`` (``None``: zeros, the paper's initialisation);
            entries must lie in ``[−1, 1]``.
        beta: EMA rate in ``[0, 1]`` (default 1e-2).
        eps: lower bound of ``√(1−φ̂²)`` in the correction, > 0 (default 1e-8).
        generator: CPU generator for the task orders (``None``: torch's global generator).

    Returns:
        ``GradVacWeights(weights, targets)``: weights ``[T]`` (``[K, T]`` for grouped Gramians) in ``G``'s
        dtype and device; targets in the dtype and device of the given ``targets`` (float64 on the CPU
        when ``targets`` is ``None``).
    """
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be in [0, 1] for {_METHOD}, got {beta!r}.")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0 for {_METHOD}, got {eps!r}.")
    check_generator(generator, _METHOD)
    G64 = prepare_gramian(G, _METHOD, grouped=True)
    grouped = G64.ndim == 3
    if not grouped:
        G64 = G64[None]
    K, T = G64.shape[0], G64.shape[-1]
    if targets is None:
        phi_hat = torch.zeros(K, T, T, dtype=G64.dtype)
        out_dtype, out_device = torch.float64, torch.device("cpu")
    else:
        if not isinstance(targets, Tensor) or targets.shape != G.shape:
            shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"targets must have the Gramian's shape {tuple(G.shape)} for {_METHOD}, got {shape}."
            )
        phi_hat = targets.detach().to(device="cpu", dtype=G64.dtype).reshape(K, T, T).clone()
        if not bool(torch.isfinite(phi_hat).all()) or bool((phi_hat.abs() > 1).any()):
            raise ValueError(f"targets must be finite cosine similarities in [-1, 1] for {_METHOD}.")
        out_dtype, out_device = targets.dtype, targets.device
    orders = (
        torch.stack(
            [
                torch.tensor([j for j in range(T) if j != i], dtype=torch.long)[perm]
                for i, perm in enumerate(randperms(T - 1, T, generator))
            ]
        )
        if T > 1
        else torch.zeros(T, 0, dtype=torch.long)
    )
    tasks = torch.arange(T)
    steps = T - 1
    # Step s treats, for every task i, the pair (i, j) with j = orders[i, s]; each pair is visited once, so
    # its target φ̂ᵢⱼ, ‖gⱼ‖ and √(1−φ̂ᵢⱼ²) are gathered once (flat indices of the pairs in a [T, T] matrix).
    others = orders.T.contiguous()  # [step, i] = j
    pairs = (tasks[None, :] * T + others).contiguous()  # [step, i]
    flat_phi_hat = phi_hat.view(K, T * T)
    targets_all = flat_phi_hat[:, pairs.view(-1)].view(K, steps, T)
    norms = G64.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()  # [K, T]
    norms_j = norms[:, others.view(-1)].view(K, steps, T)
    usable = norms_j > 0
    sin_targets = (1 - targets_all.square()).clamp_min(0).sqrt()
    # where a pair is corrected, its denominator is ‖gⱼ‖·max(√(1−φ̂²), eps)
    denominators = torch.where(usable, norms_j, 1.0) * sin_targets.clamp_min(eps)
    phis = torch.empty(K, steps, T, dtype=G64.dtype)
    coefficients = torch.eye(T, dtype=G64.dtype).expand(K, T, T).clone()  # [k, i, :]: g_i^PC on the g_j
    flat_coefficients = coefficients.view(K, T * T)
    dots = G64.clone()  # dots[k, i, j] = g_i^PC · g_j within group k
    flat_dots = dots.view(K, T * T)
    for step in range(steps):
        idx = pairs[step]
        dot = flat_dots[:, idx]
        norm_i = (dots * coefficients).sum(dim=-1).clamp_min(0).sqrt()
        denominator = norm_i * norms_j[:, step]
        positive = denominator > 0
        phi = torch.where(positive, dot / torch.where(positive, denominator, 1.0), 0.0).clamp(-1.0, 1.0)
        target = targets_all[:, step]
        correct = (phi < target) & usable[:, step]
        numerator = norm_i * (target * (1 - phi.square()).clamp_min(0).sqrt() - phi * sin_targets[:, step])
        scale = torch.where(correct, numerator / denominators[:, step], 0.0)
        flat_coefficients.index_add_(1, idx, scale)
        dots.addcmul_(scale[..., None], G64.index_select(1, others[step]))
        phis[:, step] = phi
    if steps > 0:
        flat_phi_hat[:, pairs.view(-1)] = ((1 - beta) * targets_all + beta * phis).view(K, -1)
    weights = coefficients.sum(dim=1)
    if not grouped:
        weights, phi_hat = weights[0], phi_hat[0]
    return GradVacWeights(as_output(weights, G), phi_hat.to(device=out_device, dtype=out_dtype))


def gradvac(
    J: Tensor,
    targets: Tensor | None = None,
    *,
    beta: float = 1e-2,
    groups: Sequence[int] | None = None,
    eps: float = 1e-8,
    generator: torch.Generator | None = None,
) -> GradVacResult:
    """GradVac update of a Jacobian ``J`` (``[T, P]``) and the updated targets; see :func:`gradvac_weights`.

    Args:
        J: ``[T, P]`` Jacobian.
        targets: EMA targets ``φ̂``: ``[T, T]`` (whole model) or ``[K, T, T]`` with ``groups``;
            ``None``: zeros.
        beta: EMA rate in ``[0, 1]`` (default 1e-2; see :func:`gradvac_weights`).
        groups: sizes of consecutive parameter groups along ``P`` (e.g. one per layer), summing to ``P``;
            ``None``: the whole model is one group (the state is then ``[T, T]``).
        eps: as in :func:`gradvac_weights`.
        generator: CPU generator for the task orders.

    Returns:
        ``GradVacResult(update, targets)``; with one group, ``update = J.T @ weights``.
    """
    check_jacobian(J, _METHOD)
    if groups is None:
        weights, new_targets = gradvac_weights(gramian(J), targets, beta=beta, eps=eps, generator=generator)
        return GradVacResult(combine(J, weights), new_targets)
    sizes = list(groups)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
        raise ValueError(
            f"groups must be a non-empty sequence of positive sizes for {_METHOD}, got {groups!r}."
        )
    if sum(sizes) != J.shape[1]:
        raise ValueError(
            f"groups must sum to P={J.shape[1]} for {_METHOD}, got sizes summing to {sum(sizes)}."
        )
    blocks = J.split(sizes, dim=1)
    G = torch.stack([gramian(block) for block in blocks])
    weights, new_targets = gradvac_weights(G, targets, beta=beta, eps=eps, generator=generator)
    update = torch.cat([combine(block, w) for block, w in zip(blocks, weights, strict=True)])
    return GradVacResult(update, new_targets)
