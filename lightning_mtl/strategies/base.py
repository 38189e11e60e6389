"""The strategy protocol: how :class:`~lightning_mtl.MultiTaskModule` hands a step's losses to a method.

A strategy is a Lightning :class:`~lightning.pytorch.callbacks.Callback`. Each training step the module
calls :meth:`MTLStrategy.backward` with a :class:`~lightning_mtl.step.StepContext` holding the step's
losses in the module's task order. After the call every trainable parameter that a loss
reaches has its ``.grad`` set; the module then clips, steps the optimizer(s) and calls
:meth:`MTLStrategy.on_optimizer_step`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_mtl.step import StepContext
from lightning_mtl.task_state import task_order

if TYPE_CHECKING:
    from lightning_mtl.task import Task


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

    @override
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
    def backward(self, ctx: StepContext) -> None:
        """Turn the step's losses (``ctx.losses``, ``[T]`` in task order; ``ctx.global_losses`` averaged over
        ranks) into ``.grad`` on every parameter a loss reaches, through ``ctx.backward``."""
        raise NotImplementedError

    def objective(self, losses: Tensor) -> Tensor:
        """The value the method minimises at ``losses`` ``[T]`` (logged as ``train/loss``).

        Default: ``Σ wᵢLᵢ`` with the current weights, or ``Σ Lᵢ`` for a method without weights.
        """
        weights = self.weights_tensor()
        if weights is None:
            return losses.sum()
        return (weights.to(losses.device, losses.dtype) * losses).sum()

    #: Whether the strategy needs the losses of the same batch after the optimizer step (FAMO). When ``True``,
    #: after every optimizer step that was taken (not one the AMP scaler skipped, nor a discarded window) the
    #: module recomputes the losses of the window's last micro-batch without gradient and calls
    #: :meth:`on_post_step_losses`; the strategy never runs that forward itself.
    needs_post_step_losses: bool = False

    #: Independent gradient samples per step (MoDo, SDMGrad). With ``k > 1`` the module splits each training
    #: batch along dim 0 into ``k`` disjoint contiguous parts (:func:`~lightning_mtl.batch_parts.split_batch`),
    #: calls ``task_losses`` once per part and hands the parts' losses to :meth:`backward` as
    #: ``ctx.part_losses`` (``ctx.losses`` is their size-weighted mean, the whole batch's mean loss).
    batch_parts: int = 1

    #: Whether the strategy handles tasks absent from a step (partial labels, ``ctx.present``): weight 0 for
    #: them, and their state untouched. A module whose step has an absent task refuses a strategy without it.
    supports_absent_tasks: bool = False

    def on_post_step_losses(
        self, module: pl.LightningModule, losses_before: Tensor, losses_after: Tensor
    ) -> None:
        """Called after the optimizer step when :attr:`needs_post_step_losses` is set, with the rank-averaged
        ``[T]`` losses of the window's last micro-batch before the step (``ctx.global_losses`` of that
        micro-batch) and after it (recomputed under ``torch.no_grad()``, same batch, module in train mode)."""

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

    # ------------------------------------------------------------------ checkpoint state, keyed by task name
    def state_config(self) -> dict[str, Any]:
        """The hyper-parameters that give :meth:`task_state` its meaning (primitives; per-task values as a
        ``{task: value}`` dict). A checkpoint saved under another configuration is refused on loading."""
        return {}

    def task_state(self) -> dict[str, Any]:
        """The state to checkpoint (tensors and primitives), per-task entries in the current task order."""
        return {}

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        """Restore :meth:`task_state`; ``order[i]`` is the index in ``state`` of current task ``i`` (see
        :func:`~lightning_mtl.task_state.take_tasks`)."""

    @override
    def state_dict(self) -> dict[str, Any]:
        """``{"tasks": [names], "config": state_config(), "state": task_state()}``."""
        if self._task_names is None:
            return {"tasks": None, "config": {}, "state": {}}
        return {"tasks": list(self._task_names), "config": self.state_config(), "state": self.task_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` by task name; a different task set or configuration is an error.

        Lightning calls it after ``setup``, so the strategy is bound to the module's tasks. A checkpoint
        written by lightning-mtl 0.1 (no task names) is restored by position, with a warning, when its
        per-task state has one entry per current task.
        """
        owner = type(self).__name__
        if "tasks" not in state_dict or "state" not in state_dict:
            self._load_unnamed_state(state_dict)
            return
        state = state_dict["state"]
        if not state:
            return  # nothing was saved (a strategy without state, or one never attached)
        self._require_bound()
        order = task_order(
            owner, state_dict["tasks"], self.task_names, state_dict.get("config"), self.state_config()
        )
        self.load_task_state(state, order)

    def _require_bound(self) -> None:
        if self._task_names is None:
            raise RuntimeError(
                f"{type(self).__name__} state can only be loaded once the strategy is attached to a "
                "MultiTaskModule (Lightning restores callback state after setup): pass the checkpoint to "
                "trainer.fit(..., ckpt_path=...)."
            )

    def _load_unnamed_state(self, state: dict[str, Any]) -> None:
        """A 0.1 checkpoint: its state has the layout of :meth:`task_state` but no task names."""
        if not state:
            return
        self._require_bound()
        owner, tasks = type(self).__name__, list(self.task_names)
        try:
            self.load_task_state(state, list(range(len(tasks))))
        except ValueError as err:
            raise ValueError(
                f"{owner}: the checkpoint's state was written without task names (lightning-mtl 0.1) and does "
                f"not fit the module's {len(tasks)} tasks {tasks}: {err} Resume with the tasks of the run "
                "that wrote it, in the same order, or start a new fit without ckpt_path."
            ) from err
        rank_zero_warn(
            f"{owner}: the checkpoint's state was written without task names (lightning-mtl 0.1); it was "
            f"restored by position, assuming the module's tasks {tasks} are those of the run that wrote it, "
            "in the same order. Save a new checkpoint to store the task names."
        )


def strategies_supporting_absent_tasks() -> list[str]:
    """The names of the built-in strategies that handle absent tasks (partial labels)."""
    from lightning_mtl.cli.registry import available_strategies

    return sorted(n for n, cls in available_strategies().items() if cls.supports_absent_tasks)


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
