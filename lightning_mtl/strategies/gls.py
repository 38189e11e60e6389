"""Geometric loss strategy (Chennupati et al. 2019)."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.functional.loss_weighting import gls_loss, gls_weights
from lightning_mtl.strategies._loss_based import LossWeighting, on_present, present_index


class GLS(LossWeighting):
    """Geometric Loss Strategy: Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature
    Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019
    (https://arxiv.org/abs/1904.08492).

    Minimises the geometric mean of the losses ``(Π Lᵢ)^{1/T} = exp(mean log Lᵢ)``. Its gradient is
    ``Σ wᵢ∇Lᵢ`` with effective weights ``wᵢ = GLS/(T·Lᵢ)``, which is what it reports as ``weights`` (the
    coefficient of each task's gradient). The weights are computed from the rank-averaged losses, so the
    update under DDP equals the gradient of the geometric mean of the full-batch losses. Every loss must be
    strictly positive (a zero or negative loss raises an error naming the task). No hyper-parameters.

    Partial labels: a step with absent tasks minimises the geometric mean of the ``P`` present tasks' losses,
    ``(Π_present Lᵢ)^{1/P}`` (weights ``GLS_P/(P·Lᵢ)``), the paper's objective for the tasks that have data;
    the absent tasks have weight 0 (their loss 0 is not checked) and GLS has no state to leave untouched.
    """

    #: partial labels: the geometric mean over the present tasks
    supports_absent_tasks = True

    def compute_weights(self, losses: Tensor) -> Tensor:
        self._check(losses, list(self.task_names))
        return gls_weights(losses)

    def compute_present_weights(self, losses: Tensor, present: list[bool]) -> Tensor:
        """Partial labels: the GLS weights of the present tasks' geometric mean, 0 for the absent ones."""
        self._check(
            losses[present_index(present, losses)], [n for n, ok in zip(self.task_names, present) if ok]
        )
        return on_present(gls_weights, losses, present)

    def _check(self, losses: Tensor, names: list[str]) -> None:
        if not bool((losses > 0).all()):
            bad = {n: float(v) for n, v in zip(names, losses.tolist()) if not v > 0}
            raise ValueError(
                f"GLS needs strictly positive losses, got {bad}: the geometric mean of a zero or negative loss "
                "is undefined. Use a strictly positive loss for these tasks (e.g. add a small constant) or "
                "another strategy."
            )

    def objective(self, losses: Tensor) -> Tensor:
        if self._present is not None:
            index = present_index(self._present, losses)
            if index.numel() == 0:
                return losses.sum() * 0
            losses = losses.index_select(0, index)
        return gls_loss(losses.clamp_min(1e-30))
