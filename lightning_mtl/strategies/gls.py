"""Geometric loss strategy (Chennupati et al. 2019)."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.functional.loss_weighting import gls_loss, gls_weights
from lightning_mtl.strategies._loss_based import LossWeighting


class GLS(LossWeighting):
    """Geometric Loss Strategy: Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature
    Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019
    (https://arxiv.org/abs/1904.08492).

    Minimises the geometric mean of the losses ``(Π Lᵢ)^{1/T} = exp(mean log Lᵢ)``. Its gradient is
    ``Σ wᵢ∇Lᵢ`` with effective weights ``wᵢ = GLS/(T·Lᵢ)``, which is what it reports as ``weights`` (the
    coefficient of each task's gradient). The weights are computed from the rank-averaged losses, so the
    update under DDP equals the gradient of the geometric mean of the full-batch losses. Every loss must be
    strictly positive (a zero or negative loss raises an error naming the task). No hyper-parameters.
    """

    def compute_weights(self, losses: Tensor) -> Tensor:
        if not bool((losses > 0).all()):
            bad = {n: float(v) for n, v in zip(self.task_names, losses.tolist()) if not v > 0}
            raise ValueError(
                f"GLS needs strictly positive losses, got {bad}: the geometric mean of a zero or negative loss "
                "is undefined. Use a strictly positive loss for these tasks (e.g. add a small constant) or "
                "another strategy."
            )
        return gls_weights(losses)

    def objective(self, losses: Tensor) -> Tensor:
        return gls_loss(losses.clamp_min(1e-30))
