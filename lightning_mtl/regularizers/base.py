"""The regulariser protocol: terms added to the objective next to the one strategy.

A *strategy* (:class:`~lightning_mtl.strategies.base.MTLStrategy`) decides how the task losses become gradients;
exactly one is attached. A *regulariser* (:class:`MTLRegularizer`) adds a scalar term to the objective; any
number are attached next to the strategy, as Lightning callbacks, and compose with every strategy:

* For each training (micro-)batch :class:`~lightning_mtl.MultiTaskModule` calls :func:`collect_terms` right
  before ``strategy.backward(ctx)``: every regulariser's :meth:`MTLRegularizer.term` is queued on the module.
* :meth:`StepContext.backward <lightning_mtl.step.StepContext.backward>` adds the queued terms to the loss it
  back-propagates, in the same single backward (a second backward per step would break DDP's reducer). The
  loss-based strategies back-propagate every micro-batch, the gradient strategies once at the end of the
  accumulation window: either way each term is back-propagated exactly once and, as every loss, divided by
  ``accumulate_grad_batches`` (the update holds the mean of the window's terms).
* A term is added to the objective as it is: the strategy's weights never multiply it.

A window that ends with terms still queued (a strategy that back-propagates without ``ctx.backward``) is an
error, not a silently dropped term.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_mtl import _lightning
from lightning_mtl.step import (
    StepContext,
    add_pending_term,
    clear_pending_terms,
    pending_terms,
    reduce_mean,
)

__all__ = ["MTLRegularizer", "collect_terms", "regularizers_of"]

# module __dict__ key: whether the last collected micro-batch ends its accumulation window
_CLOSES = "_mtl_regularized_window_closes"


class MTLRegularizer(Callback):
    """Base class of the regularisers: a Lightning callback whose :meth:`term` is added to the objective.

    Subclasses implement :meth:`term` and set :attr:`log_key`. The base class checks that the model is a
    :class:`~lightning_mtl.MultiTaskModule`, logs the window's mean term under :attr:`log_key` (the mean over
    ranks, written on the Trainer's logging steps only; every step in ``trainer.callback_metrics``), and checks
    that every queued term was back-propagated by the end of its accumulation window.
    """

    #: the name the window's mean term is logged under
    log_key: str = "train/regularizer"

    def __init__(self) -> None:
        super().__init__()
        self.task_names: tuple[str, ...] = ()
        self._window: list[Tensor] = []

    def term(self, ctx: StepContext) -> Tensor | None:
        """The scalar term of this (micro-)batch, attached to its graph (``ctx.losses``'s), or ``None`` for no
        term this step. It is back-propagated once, divided by ``accumulate_grad_batches`` like the losses."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "task_losses") or not hasattr(pl_module, "task_names"):
            raise TypeError(
                f"{type(self).__name__} is a multi-task regulariser: the model must subclass "
                f"lightning_mtl.MultiTaskModule, got {type(pl_module).__name__}."
            )
        self.task_names = tuple(pl_module.task_names)
        self._window = []
        clear_pending_terms(pl_module)  # type: ignore[arg-type]

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        closes = pl_module.__dict__.pop(_CLOSES, False)
        if closes and pending_terms(pl_module):  # type: ignore[arg-type]
            clear_pending_terms(pl_module)  # type: ignore[arg-type]
            strategy = getattr(pl_module, "strategy", None)
            raise RuntimeError(
                f"The regulariser terms of batch {batch_idx} were never back-propagated: "
                f"{type(strategy).__name__} ended its accumulation window without calling ctx.backward(...). "
                "A strategy must back-propagate through StepContext.backward, which adds the regularisers' terms."
            )

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        clear_pending_terms(pl_module)  # type: ignore[arg-type]
        self._window = []

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        clear_pending_terms(pl_module)  # type: ignore[arg-type]
        self._window = []

    # ------------------------------------------------------------------ called by collect_terms
    def _collect(self, ctx: StepContext) -> None:
        if ctx.is_window_start:
            self._window = []
        value = self.term(ctx)
        if value is not None:
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(
                    f"{type(self).__name__}.term() must return a scalar tensor or None, got "
                    f"{type(value).__name__}{'' if not isinstance(value, Tensor) else tuple(value.shape)}."
                )
            value = value.reshape(())
            add_pending_term(ctx.module, value)
            self._window.append(value.detach().float())
        if ctx.is_sync_step:
            self._log_window(ctx)
            self._window = []

    def _log_window(self, ctx: StepContext) -> None:
        """The window's mean term under :attr:`log_key` (rank mean on logging steps; see the class docstring)."""
        trainer = ctx.trainer
        module = ctx.module
        device = ctx.losses.device
        mean = torch.stack(self._window).mean() if self._window else torch.zeros((), device=device)
        first = ctx.batch_idx == 0 and trainer.global_step == 0
        to_loggers = _lightning.should_update_logs(trainer) or (
            trainer.log_every_n_steps > 0 and (first or bool(trainer.is_last_batch))
        )
        if to_loggers:  # every rank takes this branch on the same steps: one all-reduce
            mean = reduce_mean(trainer, mean)
        _lightning.write_step_metrics(module, {self.log_key: mean}, to_loggers)


def regularizers_of(trainer: pl.Trainer | None) -> list[MTLRegularizer]:
    """The regulariser callbacks attached to ``trainer``, in callback order."""
    if trainer is None:
        return []
    return [cb for cb in trainer.callbacks if isinstance(cb, MTLRegularizer)]


def collect_terms(trainer: pl.Trainer, ctx: StepContext) -> None:
    """Queue every attached regulariser's term of this micro-batch for the strategy's backward.

    Called by :class:`~lightning_mtl.MultiTaskModule` right before ``strategy.backward(ctx)``. The terms of a
    window that was discarded (non-finite loss under ``nonfinite="skip"``) are dropped when the next window
    starts. Costs one scan of the callbacks when no regulariser is attached.
    """
    if ctx.is_window_start:
        clear_pending_terms(ctx.module)
    regularizers = regularizers_of(trainer)
    if not regularizers:
        return
    for regularizer in regularizers:
        regularizer._collect(ctx)
    ctx.module.__dict__[_CLOSES] = ctx.is_sync_step
