"""The strategy protocol: how :class:`~lightning_mtl.MultiTaskModule` hands a step's losses to a method.

A strategy is a Lightning :class:`~lightning.pytorch.callbacks.Callback`. Each training step the module
calls :meth:`MTLStrategy.backward` with the step's losses (an ordered ``task -> scalar`` mapping, in the
module's task order) and a :class:`StepContext`. After the call every trainable parameter that a loss
reaches has its ``.grad`` set; the module then clips, steps the optimizer(s) and calls
:meth:`MTLStrategy.on_optimizer_step`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

if TYPE_CHECKING:
    from lightning_mtl.task import Task


class StepContext:
    """What a strategy may use during one (micro-)batch: backward, cross-rank reduction, parameters.

    Attributes:
        module: the :class:`~lightning_mtl.MultiTaskModule` being trained.
        losses: the step's losses stacked in task order, ``[T]`` float32, still attached to the graph.
        accumulate_grad_batches: micro-batches per optimizer step (``backward`` divides by it).
        is_sync_step: ``True`` on the last micro-batch of an accumulation window (gradients are
            synchronised across ranks and the optimizer steps after it).
        is_window_start: ``True`` on the first micro-batch of an accumulation window.
    """

    def __init__(
        self,
        module: pl.LightningModule,
        losses: Tensor,
        global_losses: Tensor,
        accumulate_grad_batches: int = 1,
        is_sync_step: bool = True,
        is_window_start: bool = True,
    ) -> None:
        self.module = module
        self.losses = losses
        self._global_losses = global_losses
        self.accumulate_grad_batches = accumulate_grad_batches
        self.is_sync_step = is_sync_step
        self.is_window_start = is_window_start

    @property
    def trainer(self) -> pl.Trainer:
        return self.module.trainer

    @property
    def world_size(self) -> int:
        return self.module.trainer.world_size

    @property
    def global_losses(self) -> Tensor:
        """The step's losses averaged over ranks, detached, ``[T]`` float32 (identical on every rank)."""
        return self._global_losses

    def backward(self, loss: Tensor, **kwargs: Any) -> None:
        """Back-propagate ``loss`` through Lightning (AMP scaling, DDP all-reduce, accumulation scaling)."""
        self.module.manual_backward(loss / self.accumulate_grad_batches, **kwargs)

    def reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean of ``tensor`` over ranks (a copy; the identity on one process)."""
        return reduce_mean(self.module.trainer, tensor)


def reduce_mean(trainer: pl.Trainer, tensor: Tensor) -> Tensor:
    """Average ``tensor`` over the trainer's ranks; returns a new tensor (the input is left untouched)."""
    if trainer.world_size <= 1:
        return tensor
    return trainer.strategy.reduce(tensor.detach().clone(), reduce_op="mean")


def global_seed(seed: int | None) -> int:
    """The seed a random strategy uses: ``seed`` if given, else Lightning's global seed, else 0."""
    if seed is not None:
        return int(seed)
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class MTLStrategy(Callback):
    """Base class of every multi-task strategy callback.

    Subclasses implement :meth:`backward` and, where they have per-task weights, :attr:`weights`.
    Strategy state must be identical on every rank (Lightning saves callback state from rank 0 only).
    """

    #: whether :meth:`backward` reads :attr:`StepContext.global_losses` (rank-averaged losses)
    needs_global_losses: bool = False

    def __init__(self) -> None:
        self._task_names: tuple[str, ...] | None = None
        self._tasks: tuple[Task, ...] | None = None

    # ------------------------------------------------------------------ binding to a module
    @property
    def task_names(self) -> tuple[str, ...]:
        if self._task_names is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a MultiTaskModule yet.")
        return self._task_names

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def bind(self, tasks: Sequence[Task]) -> None:
        """Attach the strategy to a task registry; validates task-specific hyper-parameters."""
        self._tasks = tuple(tasks)
        self._task_names = tuple(t.name for t in tasks)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_single_strategy(trainer)
        tasks = getattr(pl_module, "tasks", None)
        if tasks is None or not hasattr(pl_module, "task_losses"):
            raise TypeError(
                f"{type(self).__name__} is a multi-task strategy: the model must subclass "
                f"lightning_mtl.MultiTaskModule, got {type(pl_module).__name__}."
            )
        if stage == "fit" and trainer.global_step == 0:
            # A new training run (a checkpoint given to fit() is restored after setup): the same strategy
            # object reused for another fit starts afresh, as a new instance would.
            self.reset_state()
        self.bind(tasks)

    def reset_state(self) -> None:
        """Forget what was learned or drawn during a previous fit (learnable weights, loss history, RNG).

        Called at the start of every new training run (``fit`` with ``global_step == 0``); a continued fit
        (same trainer) or a fit resuming from a checkpoint keeps or restores the state.
        """

    # ------------------------------------------------------------------ the step
    def backward(self, losses: Mapping[str, Tensor], ctx: StepContext) -> None:
        """Turn the step's losses into ``.grad`` on every parameter a loss reaches (via ``ctx.backward``)."""
        raise NotImplementedError

    def objective(self, losses: Tensor) -> Tensor:
        """The value the method minimises at ``losses`` ``[T]`` (logged as ``train/loss``).

        Default: ``Σ wᵢLᵢ`` with the current weights, or ``Σ Lᵢ`` for a method without weights.
        """
        weights = self.weights_tensor()
        if weights is None:
            return losses.sum()
        return (weights.to(losses.device, losses.dtype) * losses).sum()

    def on_optimizer_step(self, module: pl.LightningModule, skipped: bool) -> None:
        """Called after the optimizer step (``skipped``: the AMP scaler skipped it for inf/NaN gradients)."""

    def on_accumulation_window_discarded(self, module: pl.LightningModule) -> None:
        """Called when the module discards an accumulation window (non-finite loss, ``nonfinite='skip'``)."""

    # ------------------------------------------------------------------ what gets logged
    @property
    def weights(self) -> dict[str, float] | None:
        """Current per-task weights (the coefficient of each task's gradient), or ``None``."""
        w = self.weights_tensor()
        if w is None:
            return None
        return dict(zip(self.task_names, w.detach().cpu().tolist()))

    def weights_tensor(self) -> Tensor | None:
        """Current weights as a ``[T]`` tensor (cheap: no host sync), or ``None``."""
        return None

    def extra_metrics(self) -> dict[str, Tensor]:
        """Method-specific quantities to log at logging steps, keyed by their full log name."""
        return {}


def check_single_strategy(trainer: pl.Trainer) -> MTLStrategy | None:
    """Return the trainer's strategy callback; error if more than one is attached."""
    found = [cb for cb in trainer.callbacks if isinstance(cb, MTLStrategy)]
    if len(found) > 1:
        names = ", ".join(type(cb).__name__ for cb in found)
        raise ValueError(
            f"Exactly one multi-task strategy callback may be attached to a Trainer, found {len(found)}: "
            f"{names}. Keep one of them in Trainer(callbacks=[...])."
        )
    return found[0] if found else None
