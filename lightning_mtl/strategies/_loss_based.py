"""Shared wiring of the loss-weighting strategies: weights from losses, then one backward of Σ wᵢLᵢ."""

from __future__ import annotations

import torch
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

    def compute_present_weights(self, losses: Tensor, present: list[bool]) -> Tensor:
        """Weights ``[T]`` for a step with absent tasks (partial labels; ``present[i]`` is ``False`` for them,
        whose losses are 0): 0 for the absent tasks, their state untouched. The default, for methods whose
        weights do not depend on the other tasks' losses nor on state (equal, static), zeroes the absent tasks'
        weights of :meth:`compute_weights`; a strategy that sets ``supports_absent_tasks = True`` otherwise
        overrides it."""
        weights = self.compute_weights(losses)
        return weights * torch.tensor(present, dtype=weights.dtype, device=weights.device)

    def backward(self, ctx: StepContext) -> None:
        stacked = ctx.losses
        if ctx.present is None:
            weights = self.compute_weights(ctx.global_losses)
        else:
            weights = self.compute_present_weights(ctx.global_losses, ctx.present)
        weights = weights.to(device=stacked.device, dtype=stacked.dtype)
        ctx.backward((weights * stacked).sum())
        self._weights = weights

    def weights_tensor(self) -> Tensor | None:
        return self._weights

    def reset_state(self) -> None:
        super().reset_state()
        self._weights = None
