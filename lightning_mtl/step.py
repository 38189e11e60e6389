"""What one training (micro-)batch hands a strategy or a diagnostic: :class:`StepContext`, and the one
cross-rank mean :func:`reduce_mean`.

A neutral module: it knows Lightning's Trainer and torch, nothing of any method, so the strategies, the
gradient engine, the diagnostics callbacks and the command line can all import and type against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import Tensor

from lightning_mtl.fsdp1 import fsdp1_backward

if TYPE_CHECKING:
    from lightning_mtl.module import MultiTaskModule

__all__ = ["StepContext", "add_pending_term", "clear_pending_terms", "pending_terms", "reduce_mean"]

# the module's __dict__ key of the regularisers' terms not yet back-propagated
_PENDING = "_mtl_pending_terms"


def add_pending_term(module: MultiTaskModule, term: Tensor) -> None:
    """Queue a scalar ``term`` (attached to this micro-batch's graph) for the next :meth:`StepContext.backward`.

    The regularisers' terms (:mod:`lightning_mtl.regularizers`) are queued for each micro-batch before the
    strategy's backward and consumed by the first ``ctx.backward`` that follows: per micro-batch for the
    loss-based strategies, once at the end of the accumulation window for the gradient strategies.
    """
    module.__dict__.setdefault(_PENDING, []).append(term)


def pending_terms(module: MultiTaskModule) -> list[Tensor]:
    """The queued terms not yet back-propagated (empty without regularisers)."""
    return module.__dict__.get(_PENDING) or []


def clear_pending_terms(module: MultiTaskModule) -> None:
    """Drop the queued terms (a discarded window, a new window, the end of a fit): frees their graphs."""
    module.__dict__.pop(_PENDING, None)


def reduce_mean(trainer: pl.Trainer | None, tensor: Tensor) -> Tensor:
    """Mean of ``tensor`` over the Trainer's ranks, detached; the identity on one process.

    One all-reduce, which every rank must join. The result is a new tensor: the input is never modified.
    """
    if trainer is None or trainer.world_size <= 1:
        return tensor.detach()
    return trainer.strategy.reduce(tensor.detach().clone(), reduce_op="mean")


class StepContext:
    """One (micro-)batch of training, as the module hands it to the strategy and the diagnostics.

    Attributes:
        module: the :class:`~lightning_mtl.MultiTaskModule` being trained.
        losses: the step's task losses stacked in task order, ``[T]`` float32, attached to the graph.
        global_losses: the same losses averaged over ranks, detached (identical on every rank).
        accumulate_grad_batches: micro-batches per optimizer step (:meth:`backward` divides by it).
        is_sync_step: ``True`` on the last micro-batch of an accumulation window (the optimizer steps after it).
        is_window_start: ``True`` on the first micro-batch of an accumulation window.
        batch_idx: the batch index Lightning passed to ``training_step``.
        part_losses: for strategies with ``batch_parts = k > 1`` (MoDo, SDMGrad): the losses ``[T]`` of each of
            the ``k`` disjoint parts of the batch (:func:`~lightning_mtl.batch_parts.split_batch`), attached to
            the graph; ``losses`` is then their mean weighted by :attr:`part_sizes` (with partial labels: each
            part's labelled mean, and ``losses`` the mean over every labelled sample). ``None`` otherwise.
        part_sizes: the number of samples of each part (``None`` without parts).
        part_counts: with batch parts and partial labels, each part's labelled counts averaged over ranks
            ``[k, T]`` (a task whose count is 0 in a part has no gradient sample there); ``None`` otherwise.
        loss_rows: the ``T`` scalar losses that ``losses`` stacks (``losses[i]`` is ``loss_rows[i]``), so that
            one task's graph can be back-propagated alone (the Jacobian engine's split through the marked
            representation); ``None`` with partial labels or batch parts.
        part_rows: with batch parts and no partial labels, each part's ``(loss_rows, marked representation or
            None)``, for the same split of each part's Jacobian; ``None`` otherwise.
        present: with partial labels, which tasks are labelled on some rank this step (``[T]`` bools, identical
            on every rank); ``None`` when every task is. An absent task's loss is 0 with no gradient: the strategy
            gives it weight 0 and leaves its state for that task untouched.
    """

    def __init__(
        self,
        module: MultiTaskModule,
        losses: Tensor,
        global_losses: Tensor,
        accumulate_grad_batches: int = 1,
        is_sync_step: bool = True,
        is_window_start: bool = True,
        batch_idx: int = 0,
        part_losses: list[Tensor] | None = None,
        part_sizes: list[int] | None = None,
        present: list[bool] | None = None,
        part_counts: Tensor | None = None,
        loss_rows: list[Tensor] | None = None,
        part_rows: list[tuple[list[Tensor], Tensor | None]] | None = None,
    ) -> None:
        self.module = module
        self.losses = losses
        self.global_losses = global_losses
        self.accumulate_grad_batches = accumulate_grad_batches
        self.is_sync_step = is_sync_step
        self.is_window_start = is_window_start
        self.batch_idx = batch_idx
        self.part_losses = part_losses
        self.part_sizes = part_sizes
        self.present = present
        self.part_counts = part_counts
        self.loss_rows = loss_rows
        self.part_rows = part_rows

    @property
    def present_indices(self) -> list[int]:
        """The indices of the tasks labelled this step (every task when :attr:`present` is ``None``)."""
        if self.present is None:
            return list(range(len(self.losses)))
        return [i for i, ok in enumerate(self.present) if ok]

    @property
    def trainer(self) -> pl.Trainer:
        return self.module.trainer

    @property
    def world_size(self) -> int:
        return self.module.trainer.world_size

    @property
    def task_names(self) -> tuple[str, ...]:
        return self.module.task_names

    @property
    def representation(self) -> Tensor | None:
        """The tensor ``task_losses`` marked with ``self.shared_representation(z)`` in this step, or ``None``."""
        return self.module.marked_representation

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """Back-propagate ``loss`` through Lightning (AMP scaling, DDP all-reduce, accumulation scaling).

        The regularisers' terms queued since the last call (:func:`add_pending_term`) are added to ``loss`` and
        back-propagated in the same, single backward, so each is back-propagated exactly once."""
        pending = self.module.__dict__.pop(_PENDING, None)
        if pending:
            loss = loss + sum(pending[1:], pending[0]).to(loss.dtype)
        loss = loss / self.accumulate_grad_batches
        fsdp1_backward(getattr(self.module.trainer.strategy, "model", None), loss)  # Lightning's FSDPStrategy
        self.module.manual_backward(loss, **kwargs)

    def reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean of ``tensor`` over ranks (see :func:`reduce_mean`)."""
        return reduce_mean(self.module.trainer, tensor)
