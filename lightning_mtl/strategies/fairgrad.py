"""FairGrad: α-fair resource allocation between tasks (Ban & Ji 2024)."""

from __future__ import annotations

import math

from torch import Tensor

from lightning_mtl.functional.gradient_methods import fairgrad_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode


class FairGrad(GradientWeighting):
    """FairGrad: Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024
    (https://arxiv.org/abs/2402.15638), Algorithm 1.

    The update ``Σ wᵢgᵢ`` maximises the α-fair utility of the tasks' improvements: ``w > 0`` solves
    ``Gw = w^(−1/α)`` (:func:`~lightning_mtl.functional.fairgrad.fairgrad_weights`, damped Newton, no scipy).
    ``α = 1`` is proportional fairness (the Nash-MTL equation), larger ``α`` favours the worst-off task,
    ``α = 0`` is linear scalarisation. The weights are not normalised (the official code also multiplies the
    update by ``T``; this class does not). ``w`` applies to the shared parameters only: the task-specific
    parameters get the plain gradient of ``Σ Lᵢ``, as in the official code (per-task backward passes
    accumulate into them); as there, the shared gradient's norm is clipped to ``max_norm`` before the
    optimizer step.

    Args:
        alpha: fairness parameter ``α ≥ 0`` (default 1.0, the official code's; the paper tunes it per benchmark).
        max_norm: clip of the shared gradient's norm, ``None`` to disable (default 1.0, the official code's).
        max_iter: Newton steps at most (default 100).
        mode: ``"parameters"`` (default) or ``"representation"``.
        update_every, sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    heads = "plain"

    def __init__(
        self,
        alpha: float = 1.0,
        max_norm: float | None = 1.0,
        max_iter: int = 100,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not (math.isfinite(alpha) and alpha >= 0)
        ):
            raise ValueError(f"FairGrad alpha must be a finite number >= 0, got {alpha!r}.")
        if max_norm is not None and (
            isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0
        ):
            raise ValueError(f"FairGrad max_norm must be a number > 0 or None, got {max_norm!r}.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"FairGrad max_iter must be an int >= 1, got {max_iter!r}.")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self.alpha = float(alpha)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.max_iter = max_iter

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        return fairgrad_weights(stat, alpha=self.alpha, max_iter=self.max_iter)
