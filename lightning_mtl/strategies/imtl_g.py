"""IMTL-G: impartial multi-task learning, gradient part (Liu et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl.functional.gradient_methods import imtl_g_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode

_GRADIENT_EPS = torch.finfo(torch.float32).eps


class IMTLG(GradientWeighting):
    """IMTL-G: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning", ICLR
    2021 (https://openreview.net/forum?id=IMPnRXEWpvr).

    The update ``Σ αᵢgᵢ`` (``Σ αᵢ = 1``, ``α`` may be negative) has equal projections on every unit task
    gradient: ``α ∝ G⁻¹ diag(G)^½`` (:func:`~lightning_mtl.functional.imtl_g.imtl_g_weights`, pseudo-inverse
    for collinear gradients). No hyper-parameters. The paper computes it on the gradients w.r.t. the shared
    representation: ``mode="representation"`` (mark it with ``z = self.shared_representation(z)``) follows
    the paper and is cheaper; ``mode="parameters"`` (default, no marking needed) uses the shared parameters.
    ``α`` applies to the shared part only: the task-specific parameters get their own loss's gradient, as
    in the paper's algorithm (and LibMTL).

    Args:
        mode: ``"parameters"`` (default) or ``"representation"`` (the paper).
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    heads = "plain"

    def __init__(
        self,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        # the per-task gradients are float32 (the module stacks the losses in float32): drop what is rounding
        return imtl_g_weights(stat, eps=_GRADIENT_EPS)
