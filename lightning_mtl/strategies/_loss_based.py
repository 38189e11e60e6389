"""Shared wiring of the loss-weighting strategies: weights from losses, then one backward of Σ wᵢLᵢ."""

from __future__ import annotations

from torch import Tensor

from lightning_mtl.strategies.base import MTLStrategy, StepContext


class LossWeighting(MTLStrategy):
    """A strategy whose update is ``∇ Σ wᵢLᵢ`` with weights computed from (rank-averaged) losses only.

    Subclasses implement :meth:`compute_weights`. The weights are detached, so one backward pass of the
    weighted sum gives the method's gradient; under DDP every rank uses the same weights (computed from
    rank-averaged losses) and DDP averages the gradients, which equals the single-process update on the
    union of the ranks' batches.
    """

    def __init__(self) -> None:
        super().__init__()
        self._weights: Tensor | None = None

    def compute_weights(self, losses: Tensor) -> Tensor:
        """Weights ``[T]`` for this step from the rank-averaged detached losses ``[T]``."""
        raise NotImplementedError

    def backward(self, ctx: StepContext) -> None:
        stacked = ctx.losses
        weights = self.compute_weights(ctx.global_losses).to(device=stacked.device, dtype=stacked.dtype)
        ctx.backward((weights * stacked).sum())
        self._weights = weights

    def weights_tensor(self) -> Tensor | None:
        return self._weights

    def reset_state(self) -> None:
        super().reset_state()
        self._weights = None
