"""CAGrad: conflict-averse gradient descent (Liu et al. 2021)."""

from __future__ import annotations

import math

from torch import Tensor

from lightning_mtl.functional.gradient_methods import cagrad_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode


class CAGrad(GradientWeighting):
    """CAGrad: Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021 (https://arxiv.org/abs/2110.14048), Algorithm 1.

    With ``g₀`` the mean task gradient, the update maximises the worst task improvement within a ball of
    radius ``c‖g₀‖`` around ``g₀``: ``d = g₀ + (c‖g₀‖/‖g_w‖) g_w`` with ``w = argmin_{w∈Δ} g_wᵀg₀ + c‖g₀‖‖g_w‖``,
    divided by ``1 + c²`` (``rescale=1``, the authors' default). The update is a combination ``Σ wᵢgᵢ`` of the
    task gradients whose weights sum to about 1 (it follows the *mean* gradient, not the sum): compare
    learning rates with :class:`EqualWeighting` (sum) accordingly; the authors' code multiplies the shared
    update by ``T`` "to match the sum loss". Weights come from the Gramian
    (:func:`~lightning_mtl.functional.cagrad.cagrad_weights`) and apply to the shared parameters only: the
    task-specific parameters get the plain gradient of ``Σ Lᵢ``, as in the authors' code
    (Cranial-XIX/CAGrad, ``nyuv2/utils.py``: per-task backward passes accumulate into the heads).

    Args:
        c: radius ``≥ 0``; 0.4 (paper, NYUv2 and Cityscapes; the toy uses 0.5). ``c = 0`` is gradient
            descent on the mean loss; ``c < 1`` converges to a stationary point of the mean loss (the paper's
            Theorem 3.2), ``c ≥ 1`` only to a Pareto-stationary point (allowed, as in the authors' code).
        rescale: ``1`` (default, ``d/(1+c²)``), ``2`` (``d/(1+c)``, the toy script) or ``0`` (``d``).
        mode: ``"parameters"`` (default) or ``"representation"``.
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    heads = "plain"

    def __init__(
        self,
        c: float = 0.4,
        rescale: int = 1,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and c >= 0.0):
            raise ValueError(f"CAGrad c must be a finite number >= 0, got {c!r}.")
        if rescale not in (0, 1, 2) or isinstance(rescale, bool):
            raise ValueError(f"CAGrad rescale must be 0, 1 or 2, got {rescale!r}.")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self.c = float(c)
        self.rescale = rescale

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        return cagrad_weights(stat, c=self.c, rescale=self.rescale)
