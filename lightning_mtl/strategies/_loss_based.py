"""Shared wiring of the loss-weighting strategies: weights from losses, then one backward of Σ wᵢLᵢ."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_mtl.strategies.base import MTLStrategy, StepContext


def present_mask(present: Sequence[bool], like: Tensor) -> Tensor:
    """``present`` as a bool tensor on ``like``'s device."""
    return torch.tensor(list(present), dtype=torch.bool, device=like.device)


def present_index(present: Sequence[bool], like: Tensor) -> Tensor:
    """The indices of the present tasks, a long tensor on ``like``'s device."""
    return torch.tensor([i for i, ok in enumerate(present) if ok], dtype=torch.long, device=like.device)


def on_present(fn: Callable[[Tensor], Tensor], values: Tensor, present: Sequence[bool] | None) -> Tensor:
    """``fn`` applied to the present tasks' entries of ``values`` ``[T]`` only, its ``[P]`` result scattered back
    into a ``[T]`` tensor with 0 for the absent tasks (``present`` ``None``: ``fn(values)``). The method then sees
    a problem of ``P`` tasks: how a loss method "renormalises as its paper would" (a softmax, a mean, a
    geometric mean over the present tasks)."""
    if present is None:
        return fn(values)
    index = present_index(present, values)
    if index.numel() == 0:
        return torch.zeros_like(values)
    sub = fn(values.index_select(0, index))
    return torch.zeros(values.shape, dtype=sub.dtype, device=sub.device).index_copy_(0, index, sub)


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
        #: partial labels: ``StepContext.present`` of the last micro-batch (``None``: every task was labelled)
        self._present: list[bool] | None = None

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
        self._present = ctx.present
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
        self._present = None
