"""`MultiTaskModule`: the manual optimisation loop every strategy plugs into.

Long because it is the one training loop: the step, the window end, partial labels, batch parts, the shared-
parameter discovery and the evaluation hooks all act on the same step state; the helpers that need none of it
already live in the modules named below.

Its helpers live next to it: :mod:`lightning_mtl.nonfinite` (the NaN/inf policy), :mod:`lightning_mtl.schedulers`
(LR schedulers under manual optimisation), :mod:`lightning_mtl.evaluation` (per-task evaluation losses) and
:mod:`lightning_mtl._lightning` (every use of Lightning's private API).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_mtl import _lightning
from lightning_mtl._logging import add_tensorboard_layout
from lightning_mtl.batch_parts import part_sizes, split_batch
from lightning_mtl.checks import check_fit_configuration, check_module_arguments, loss_rows, stack_losses
from lightning_mtl.evaluation import (
    EvalLosses,
    batch_size,
    log_eval_losses,
    log_task_metrics,
    num_eval_dataloaders,
)
from lightning_mtl.fsdp1 import fsdp1_root
from lightning_mtl.gradients.sharing import Sharing, describe_unreached, find_sharing
from lightning_mtl.metrics import TaskMetrics, split_task_output
from lightning_mtl.nonfinite import NonFiniteGuard, NonFinitePolicy
from lightning_mtl.partial import MaskedMean, combine_over_ranks, combine_part_losses, stack_partial
from lightning_mtl.regularizers.base import collect_terms
from lightning_mtl.schedulers import (
    step_schedulers,
    wrap_configure_optimizers,
    wrap_instance_configure_optimizers,
)
from lightning_mtl.step import StepContext, reduce_mean
from lightning_mtl.strategies.base import MTLStrategy, check_single_strategy
from lightning_mtl.task import Task, build_tasks

if TYPE_CHECKING:
    from lightning_mtl.nn.base import MultiTaskArchitecture

__all__ = ["MultiTaskModule", "NonFinitePolicy"]


class _PartLosses(NamedTuple):
    """The losses of a batch split into ``k`` disjoint parts (independent gradient samples: MoDo, SDMGrad)."""

    # [T], attached: the parts' size-weighted mean (partial labels: every labelled sample's mean)
    whole: Tensor
    losses: list[Tensor]  # each part's [T], attached (partial labels: the part's labelled mean)
    sizes: list[int]
    outputs: list[Any]  # each part's metric outputs
    counts: Tensor | None  # partial labels: each part's labelled counts averaged over ranks [k, T]
    global_losses: Tensor  # [T], detached, identical on every rank
    mean_counts: Tensor | None  # partial labels: the whole batch's labelled counts averaged over ranks [T]
    # without partial labels: each part's loss rows and marked representation (the Jacobian through it)
    rows: list[tuple[list[Tensor], Tensor | None]] | None = None


class MultiTaskModule(pl.LightningModule):
    """A LightningModule for multi-task learning.

    Subclass it, return one scalar loss per task from :meth:`task_losses`, and attach one strategy
    callback (e.g. ``UncertaintyWeighting()``) to the Trainer; with none attached the losses are summed
    (:class:`~lightning_mtl.strategies.EqualWeighting`, or the :attr:`Task.weight` values when some differ
    from 1). The module runs the optimisation itself (manual optimisation): the strategy turns the losses
    into gradients, then the module clips, steps the optimizer(s), zeroes the gradients and steps the LR
    schedulers. Put all per-step work in :meth:`task_losses`: overriding ``training_step`` is refused when a fit
    starts (it would replace the loop, and nothing would train).

    Args:
        tasks: task names or :class:`~lightning_mtl.Task` specs; their order is the order of every weight
            vector and log.
        accumulate_grad_batches: optimizer step every k batches (gradients averaged over the k batches).
            Lightning rejects the Trainer flag in manual optimisation: set it here.
        gradient_clip_val: clip gradients to this norm/value before each optimizer step (on unscaled
            gradients under AMP). ``None`` disables clipping. Set it here, not on the Trainer.
        gradient_clip_algorithm: ``"norm"`` (total 2-norm per optimizer) or ``"value"``.
        nonfinite: what a NaN/inf task loss or gradient does: ``"raise"`` (default) stops with an error naming
            the batch, the task (or parameter) and the value; ``"skip"`` warns, discards that accumulation
            window's gradients and skips its optimizer step (all ranks agree).
        max_consecutive_skips: with ``nonfinite="skip"``, stop with an error naming the tasks after this many
            optimizer steps in a row were skipped (a task NaN on every batch would otherwise never train).
    """

    def __init__(
        self,
        tasks: Sequence[str | Task],
        *,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        nonfinite: NonFinitePolicy = "raise",
        max_consecutive_skips: int = 25,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.tasks: tuple[Task, ...] = build_tasks(tasks)
        self.task_names: tuple[str, ...] = tuple(t.name for t in self.tasks)
        check_module_arguments(accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm)
        self._nonfinite = NonFiniteGuard(nonfinite, max_consecutive_skips, self.task_names)
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self._strategy: MTLStrategy | None = None
        self._strategy_trainer: Any = None
        self._eval_losses = EvalLosses(len(self.task_names))
        # --- per-task metrics (lightning_mtl.metrics): None when no task declares metrics ---
        self.task_metrics: TaskMetrics | None = (
            TaskMetrics(self.tasks) if any(t.metrics is not None for t in self.tasks) else None
        )
        self._shared_representation: Tensor | None = None  # set by shared_representation() in training
        # this step's checked losses before the stack (StepContext.loss_rows)
        self._loss_rows: list[Tensor] | None = None
        # (batch, batch_idx, rank-averaged losses) of a window's last micro-batch, for on_post_step_losses
        self._post_step_input: tuple[Any, int, Tensor] | None = None
        self._sharing: Sharing | None = None  # the shared parameters found on the first step of a fit
        self._partial = any(t.partial for t in self.tasks)  # partial labels (lightning_mtl.partial)
        self._labelled: Tensor | None = None  # labelled samples per task over the ranks, this step

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Lightning drops a scheduler dict's "monitor"/"strict" in manual optimisation; the module steps the
        # schedulers itself, so it records them from what configure_optimizers returns (lightning_mtl.schedulers)
        if "configure_optimizers" in cls.__dict__:
            cls.configure_optimizers = wrap_configure_optimizers(cls.__dict__["configure_optimizers"])  # type: ignore[method-assign]

    # ================================================================== user API
    def task_losses(self, batch: Any, batch_idx: int) -> Any:
        """Return one scalar loss tensor per task, keyed by task name (called in train, val and test).

        Tasks with ``metrics`` need their predictions too (no second forward pass): return the pair
        ``(losses, outputs)`` with ``outputs = {task: (preds, target)}`` for those tasks; the module updates
        the stage's metrics with ``metric.update(preds.detach(), target)`` and logs ``<stage>/<task>/<metric>``
        once per epoch.

        With a strategy that takes independent gradient samples (``batch_parts = k``: MoDo, SDMGrad) it is called
        ``k`` times per training step, once per disjoint part of the batch
        (:func:`~lightning_mtl.batch_parts.split_batch`); return per-sample means, as usual.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement task_losses(batch, batch_idx).")

    def shared_parameters(self) -> Iterable[torch.nn.Parameter] | None:
        """The parameters the tasks share (the encoder), whose per-task gradients the gradient-based strategies
        balance. Override it to declare them yourself.

        By default: the :attr:`architecture`'s shared parameters when the module holds one
        (:mod:`lightning_mtl.nn`), else the set **found automatically** on the first training step of each fit
        — the trainable parameters that the graphs of two or more task losses reach, read from that step's
        autograd graph (no extra backward) and logged once; parameters reached by no task are warned about.
        ``None`` before that step.
        """
        architecture = self.architecture
        if architecture is not None:
            return architecture.shared_parameters()
        return None if self._sharing is None else self._sharing.shared_parameters

    @property
    def architecture(self) -> MultiTaskArchitecture | None:
        """The :class:`~lightning_mtl.nn.MultiTaskArchitecture` this module holds (the outermost one, when there is
        exactly one), else ``None``. It provides :meth:`shared_parameters` and marks the shared representation."""
        if "_architecture" not in self.__dict__:
            from lightning_mtl.nn.base import MultiTaskArchitecture

            found: list[MultiTaskArchitecture] = []
            for module in self.modules():
                if isinstance(module, MultiTaskArchitecture) and not any(
                    module in set(outer.modules()) for outer in found
                ):
                    found.append(module)
            self.__dict__["_architecture"] = found[0] if len(found) == 1 else None
        return self.__dict__["_architecture"]

    @property
    def finds_shared_parameters(self) -> bool:
        """``True`` when :meth:`shared_parameters` is neither overridden nor given by an :attr:`architecture`: the
        module finds the shared parameters on the first training step of each fit."""
        return type(self).shared_parameters is MultiTaskModule.shared_parameters and self.architecture is None

    # --- shared representation (gradient strategies' mode="representation") ---------------------------
    def shared_representation(self, z: Tensor) -> Tensor:
        """Mark ``z`` as the shared representation (the encoder's output every task head consumes) and return
        it unchanged. Call it once per ``task_losses`` call: ``z = self.shared_representation(self.encoder(x))``.

        Gradient strategies in ``mode="representation"`` (e.g. ``MGDA(mode="representation")``, ``GradDrop``)
        compute the per-task gradients w.r.t. ``z`` instead of the shared parameters. Outside training (or
        without a strategy that uses it) the call only returns ``z``.
        """
        if self.training and torch.is_grad_enabled():
            if self._shared_representation is not None and self._trainer is not None:
                raise RuntimeError(
                    "shared_representation() was called twice in one training step. Mark the single tensor "
                    "that all task heads consume (concatenate several feature maps first if needed)."
                )
            self._shared_representation = z
        return z

    @property
    def marked_representation(self) -> Tensor | None:
        """The tensor marked with :meth:`shared_representation` in the current training step, else ``None``."""
        return self._shared_representation

    @property
    def strategy(self) -> MTLStrategy:
        """The strategy in use (the attached callback, or the default equal weighting)."""
        return self._active_strategy()

    @property
    def skipped_steps(self) -> int:
        """How many accumulation windows were discarded for non-finite losses (``nonfinite="skip"``)."""
        return self._nonfinite.skipped

    # ================================================================== strategy resolution
    def _active_strategy(self) -> MTLStrategy:
        trainer = self._trainer
        if self._strategy is not None and self._strategy_trainer is trainer:
            return self._strategy
        strategy = check_single_strategy(trainer) if trainer is not None else None
        if strategy is None:
            from lightning_mtl.strategies.equal import EqualWeighting
            from lightning_mtl.strategies.static import StaticWeighting

            uniform = all(t.weight == 1.0 for t in self.tasks)
            strategy = EqualWeighting() if uniform else StaticWeighting()
            strategy.bind(self.tasks)
        elif strategy._task_names != self.task_names:
            strategy.bind(self.tasks)
        self._strategy, self._strategy_trainer = strategy, trainer
        if trainer is not None:
            add_tensorboard_layout(trainer)
        return strategy

    # ================================================================== checks when a fit starts
    @override
    def configure_callbacks(self) -> Sequence[pl.Callback] | pl.Callback:
        """No callbacks; checks the Trainer's configuration before Lightning does (the first hook of a run).
        Call ``super()`` if you override it."""
        self._check_fit_configuration()
        return []

    @override
    def setup(self, stage: str) -> None:
        """Checks the strategy callbacks and the fit's configuration. Call ``super()`` if you override it."""
        if self._trainer is not None:
            check_single_strategy(self._trainer)
            self._check_fit_configuration()
        self.__dict__.pop("_architecture", None)  # looked up again (the model may have changed since)
        if stage == "fit":
            self._sharing = None  # found again on this fit's first training step

    def _check_fit_configuration(self) -> None:
        if self._trainer is not None and self._trainer.state.fn == "fit":
            check_fit_configuration(self, MultiTaskModule.training_step)  # (lightning_mtl.checks)
            wrap_instance_configure_optimizers(self)  # e.g. LightningCLI's (lightning_mtl.schedulers)

    # ================================================================== validation of user output
    def _stack_losses(self, losses: Any, stage: str, training: bool) -> Tensor:
        """Check ``task_losses``' output and stack it in task order: ``[T]`` float32 (:mod:`lightning_mtl.checks`)."""
        return stack_losses(losses, self.task_names, self.device, stage, training)

    # ================================================================== training
    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """The optimisation loop (do not override; see :meth:`task_losses`)."""
        trainer = self.trainer
        strategy = self._active_strategy()
        k = self.accumulate_grad_batches
        position = batch_idx % k
        is_sync = position == k - 1 or bool(trainer.is_last_batch)
        self._shared_representation = None
        part_losses: list[Tensor] | None = None
        sizes: list[int] | None = None
        counts: Tensor | None = None
        part_counts: Tensor | None = None
        global_losses: Tensor | None = None
        mean_counts: Tensor | None = None
        part_rows: list[tuple[list[Tensor], Tensor | None]] | None = None
        if strategy.batch_parts > 1:  # independent gradient samples (MoDo, SDMGrad)
            parts = self._part_losses(strategy, batch, batch_idx)
            stacked, part_losses, sizes, outputs_list = parts.whole, parts.losses, parts.sizes, parts.outputs
            part_counts, global_losses, mean_counts = parts.counts, parts.global_losses, parts.mean_counts
            part_rows = parts.rows
        else:
            stacked, outputs, counts = self._training_losses(batch, batch_idx)
            outputs_list = [outputs]
            if counts is None:
                global_losses = reduce_mean(trainer, stacked.detach())
            else:  # partial labels: exact over ranks (lightning_mtl.partial)
                stacked, global_losses, mean_counts = combine_over_ranks(trainer, stacked, counts)
        assert global_losses is not None
        present: list[bool] | None = None
        if mean_counts is not None:
            self._labelled = mean_counts * trainer.world_size
            present = self._present_tasks(strategy, mean_counts, batch_idx)
        detached = stacked.detach()
        self._nonfinite.check_losses(detached, global_losses, "training", batch_idx, self.current_epoch)

        if not self._nonfinite.window_discarded:
            ctx = StepContext(
                self,
                stacked,
                global_losses,
                k,
                is_sync,
                position == 0,
                batch_idx,
                part_losses,
                sizes,
                present,
                part_counts,
                None if part_losses is not None else self._loss_rows,
                part_rows,
            )
            # --- metrics & diagnostics hooks (lightning_mtl.metrics, lightning_mtl.callbacks) ---
            if self.task_metrics is not None:
                for outputs in outputs_list:
                    self.task_metrics.update("train", outputs)
            loss_dict = dict(zip(self.task_names, stacked.unbind()))
            for cb in _callbacks_with(trainer, "on_task_losses"):
                cb.on_task_losses(trainer, self, loss_dict, batch, batch_idx, ctx)
            # --- end hooks ---
            # the regularisers' terms (lightning_mtl.regularizers), added by ctx.backward
            collect_terms(trainer, ctx)
            block = getattr(trainer.strategy, "block_backward_sync", None)
            if fsdp1_root(getattr(trainer.strategy, "model", None)):  # no no_sync() inside FSDP1's forward
                block = None
            with nullcontext() if is_sync or block is None or trainer.world_size == 1 else block():
                strategy.backward(ctx)
        self._shared_representation = None  # do not keep this step's graph alive
        self._loss_rows = None

        first = batch_idx == 0 and trainer.global_step == 0  # the first step of a run
        if is_sync:
            if strategy.needs_post_step_losses:  # the window's last micro-batch, recomputed after the step
                self._post_step_input = (batch, batch_idx, global_losses)
            self._end_window(strategy, batch_idx)
            self._post_step_input = None
        self._log_training(strategy, global_losses, first)

    def _part_losses(self, strategy: MTLStrategy, batch: Any, batch_idx: int) -> _PartLosses:
        """``task_losses`` on each of the strategy's ``batch_parts`` disjoint parts of ``batch``."""
        k = strategy.batch_parts
        try:
            pieces = split_batch(batch, k)
        except ValueError as err:
            raise ValueError(
                f"{type(strategy).__name__} takes {k} independent gradient samples per step from disjoint parts of "
                f"each training batch, and this batch cannot be split: {err}"
            ) from err
        sizes = part_sizes(batch, k)
        part_losses, part_counts, outputs_list = [], [], []
        rows: list[tuple[list[Tensor], Tensor | None]] = []
        for piece in pieces:
            self._shared_representation = None
            losses, outputs, counts = self._training_losses(piece, batch_idx)
            part_losses.append(losses)
            part_counts.append(counts)
            outputs_list.append(outputs)
            if self._loss_rows is not None:
                rows.append((self._loss_rows, self._shared_representation))
        whole, combined, global_losses, mean_counts, mean_part_counts = combine_part_losses(
            self.trainer, part_losses, part_counts, sizes
        )
        full_rows = rows if len(rows) == k and mean_counts is None else None
        return _PartLosses(
            whole, combined, sizes, outputs_list, mean_part_counts, global_losses, mean_counts, full_rows
        )

    def _training_losses(self, batch: Any, batch_idx: int) -> tuple[Tensor, Any, Tensor | None]:
        """``task_losses`` in training, with the architecture's representation marker installed: the stacked
        losses ``[T]``, the metric outputs, and with partial labels the labelled counts ``[T]`` (the losses are
        then the labelled totals; ``None`` otherwise). Finds the shared parameters on the first call of a fit when
        the module does not declare them (:meth:`shared_parameters`)."""
        architecture = self.architecture
        marks = architecture is not None and architecture.representation_unsupported is None
        if marks:
            architecture.set_representation_marker(self.shared_representation)
        try:
            losses, outputs = split_task_output(self.task_losses(batch, batch_idx))
        finally:
            if marks:
                architecture.set_representation_marker(None)
        counts = None
        self._loss_rows = None
        if self._partial or _has_masked_mean(losses):
            stacked, counts, losses = self._stack_partial(
                losses, "training", training=True, size=batch_size(batch)
            )
        else:
            self._loss_rows = loss_rows(losses, self.task_names, self.device, "training", True)
            stacked = torch.stack(self._loss_rows)
        if self._sharing is None and self.finds_shared_parameters:
            self._find_sharing(losses)
        return stacked, outputs, counts

    def _stack_partial(
        self, losses: Any, stage: str, training: bool, size: int = 1
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """:func:`~lightning_mtl.partial.stack_partial` of ``task_losses``' output (``size``: the batch's samples)."""
        return stack_partial(
            losses, self.tasks, self.device, stage, training, size, lambda: self._attached_zero(training)
        )

    def _attached_zero(self, training: bool) -> Tensor:
        params = [p for p in self.parameters() if p.requires_grad] if training else []
        zero = torch.zeros((), device=self.device)
        return sum((p.reshape(-1)[0].float() * 0.0 for p in params), zero)

    def _present_tasks(self, strategy: MTLStrategy, mean_counts: Tensor, batch_idx: int) -> list[bool] | None:
        """Which tasks are labelled on some rank this step; ``None`` when all are. A strategy that does not
        handle absent tasks is a clear error."""
        present = (mean_counts > 0).tolist()
        if all(present):
            return None
        if not strategy.supports_absent_tasks:
            absent = [n for n, ok in zip(self.task_names, present) if not ok]
            from lightning_mtl.strategies.base import strategies_supporting_absent_tasks

            raise ValueError(
                f"Task(s) {absent} have no labelled sample on any rank at batch {batch_idx} (partial labels), and "
                f"{type(strategy).__name__} does not handle absent tasks yet. Use one that does "
                f"({', '.join(strategies_supporting_absent_tasks())}), or make sure every step labels every task."
            )
        return present

    def _find_sharing(self, losses: Mapping[str, Tensor]) -> None:
        sharing = find_sharing(self, losses)
        self._sharing = sharing
        name = type(self).__name__
        if sharing.shared:
            rank_zero_info(
                f"{name}: shared parameters found from the first training step's graph: {sharing.summary()}."
            )
        else:
            rank_zero_info(
                f"{name}: no parameter is reached by two or more task losses: the tasks share nothing."
            )
        message = describe_unreached(name, sharing)
        if message is not None:
            rank_zero_warn(message, category=RuntimeWarning)

    def _optimizer_list(self) -> list[Any]:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _end_window(self, strategy: MTLStrategy, batch_idx: int) -> None:
        """Step the optimizers, or discard the window (non-finite loss or gradient under ``nonfinite="skip"``)."""
        guard, optimizers = self._nonfinite, self._optimizer_list()
        scaler: torch.amp.GradScaler | None = getattr(self.trainer.precision_plugin, "scaler", None)
        if not guard.window_discarded and scaler is None:  # with a GradScaler, inf/NaN gradients are its job
            params = [
                p for opt in optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None
            ]
            guard.check_gradients(self, params, batch_idx, self.current_epoch, self.accumulate_grad_batches)
        if guard.window_discarded:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            strategy.on_accumulation_window_discarded(self)
            guard.window_skipped(batch_idx, self.current_epoch)
            return
        if scaler is not None and len(optimizers) > 1:
            raise RuntimeError(
                f"precision='16-mixed' with {len(optimizers)} optimizers: Lightning's GradScaler would update its "
                "scale after each optimizer and unscale the others wrongly. Use one optimizer with several "
                "parameter groups, or bf16-mixed."
            )
        scale_before = scaler.get_scale() if scaler is not None else None
        for opt in optimizers:
            opt.step()
        skipped = scaler is not None and scaler.get_scale() < scale_before
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        guard.window_stepped()
        strategy.on_optimizer_step(self, skipped)
        if not skipped and strategy.needs_post_step_losses:
            self._post_step_losses(strategy)
        step_schedulers(self, "step")

    def _post_step_losses(self, strategy: MTLStrategy) -> None:
        """The hook of strategies with ``needs_post_step_losses`` (FAMO): the losses of the window's last
        micro-batch recomputed after the optimizer step, once per optimizer step, without gradient, in the
        forward context of the precision plugin (autocast under AMP; nothing is scaled), with ``self.log``
        silenced and no metric update; averaged over ranks and handed to ``strategy.on_post_step_losses``.
        A non-finite recomputed loss skips the hook for that step (with a warning)."""
        state = self.__dict__.get("_post_step_input")
        if state is None:
            return
        batch, batch_idx, before = state
        precision = getattr(self.trainer, "precision_plugin", None)
        forward = precision.forward_context() if precision is not None else nullcontext()
        with torch.no_grad(), forward, _lightning.silenced_logging(self):
            losses, _ = split_task_output(self.task_losses(batch, batch_idx))
            if self._partial or _has_masked_mean(losses):  # the labelled samples' mean, exact over ranks
                totals, counts, _ = self._stack_partial(
                    losses, "training", training=False, size=batch_size(batch)
                )
                _, after, _ = combine_over_ranks(self.trainer, totals.detach().float(), counts)
            else:
                after = self._stack_losses(losses, "training", training=False).detach().float()
                after = reduce_mean(self.trainer, after)
        self._shared_representation = None
        if not bool(torch.isfinite(after).all()):
            rank_zero_warn(
                f"{type(strategy).__name__}: the losses recomputed after the optimizer step at batch {batch_idx} "
                f"are not finite ({dict(zip(self.task_names, after.tolist()))}); its post-step update is skipped."
            )
            return
        strategy.on_post_step_losses(self, before, after)

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clips gradients (already unscaled under AMP). Call ``super()`` if you override it."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    @override
    def on_train_epoch_end(self) -> None:
        """Logs ``train/<task>/<metric>``, steps epoch-interval LR schedulers. Call ``super()`` if overridden."""
        log_task_metrics(self, "train", {})
        step_schedulers(self, "epoch")

    def _log_training(self, strategy: MTLStrategy, global_losses: Tensor, first: bool) -> None:
        trainer = self.trainer
        total = strategy.objective(global_losses)
        # every step, for the progress bar and callbacks; written to the loggers below on logging steps
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=False, batch_size=1, logger=False)
        keys = self.__dict__.get("_train_keys")
        if keys is None:
            keys = self._train_keys = (
                [f"train/loss/{n}" for n in self.task_names],
                [f"train/weight/{n}" for n in self.task_names],
            )
        metrics = {"train/loss": total, **dict(zip(keys[0], global_losses.unbind()))}
        weights = strategy.weights_tensor()
        if weights is not None:
            metrics.update(zip(keys[1], weights.detach().unbind()))
        # the Trainer's logging steps, plus the first step of a run and the last of every epoch: a short run
        # (fewer steps than log_every_n_steps) still shows every series
        to_loggers = _lightning.should_update_logs(trainer) or (
            trainer.log_every_n_steps > 0 and (first or bool(trainer.is_last_batch))
        )
        if to_loggers:  # method-specific quantities may cost something to build: logging steps only
            metrics.update(strategy.extra_metrics())
            if self._nonfinite.skipped:
                metrics["train/skipped_steps"] = torch.tensor(float(self._nonfinite.skipped))
            if self._labelled is not None:
                metrics.update(
                    {f"train/labelled/{n}": c for n, c in zip(self.task_names, self._labelled.unbind())}
                )
        _lightning.write_step_metrics(self, metrics, to_loggers)

    # ================================================================== validation / test
    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Mapping[str, Tensor]:
        """Accumulates per-task losses for ``val/loss/<task>``; returns the losses (call it via ``super()``).

        With several validation dataloaders each one is averaged separately and logged with Lightning's
        suffix, ``val/loss/<task>/dataloader_idx_<k>`` (likewise ``val/loss`` and ``val/<task>/<metric>``).
        """
        return self._eval_step(batch, batch_idx, "val", dataloader_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Mapping[str, Tensor]:
        """Accumulates per-task losses for ``test/loss/<task>`` (per dataloader, as in validation)."""
        return self._eval_step(batch, batch_idx, "test", dataloader_idx)

    def _eval_step(
        self, batch: Any, batch_idx: int, stage: str, dataloader_idx: int = 0
    ) -> Mapping[str, Tensor]:
        losses, outputs = split_task_output(self.task_losses(batch, batch_idx))
        name = "validation" if stage == "val" else stage
        sizes: float | Tensor
        if self._partial or _has_masked_mean(losses):  # mean over the labelled samples only
            totals, sizes, _ = self._stack_partial(losses, name, training=False, size=batch_size(batch))
            stacked = (totals / sizes.clamp_min(1)).detach()
        else:
            stacked = self._stack_losses(losses, name, training=False).detach()
            sizes = float(batch_size(batch))
        if not self._nonfinite.check_losses(stacked, stacked, stage, batch_idx, self.current_epoch):
            return losses  # nonfinite='skip': left out of the epoch average
        count = num_eval_dataloaders(self._trainer, stage)
        self._eval_losses.add(stacked, sizes, dataloader_idx, count)
        if self.task_metrics is not None:  # --- per-task metrics (lightning_mtl.metrics) ---
            self.task_metrics.update(stage, outputs, dataloader_idx)
        return losses

    @override
    def on_validation_epoch_start(self) -> None:
        self._eval_losses.reset()

    @override
    def on_validation_epoch_end(self) -> None:
        """Logs ``val/loss/<task>`` and ``val/loss`` (the unweighted sum). Call ``super()`` if overridden."""
        log_eval_losses(self, self._eval_losses, "val")

    @override
    def on_test_epoch_start(self) -> None:
        self._eval_losses.reset()

    @override
    def on_test_epoch_end(self) -> None:
        log_eval_losses(self, self._eval_losses, "test")


def _has_masked_mean(losses: Any) -> bool:
    return isinstance(losses, Mapping) and any(isinstance(v, MaskedMean) for v in losses.values())


def _callbacks_with(trainer: Any, hook: str) -> list[Any]:
    """The trainer's callbacks that define ``hook`` (the module's hooks for metrics and diagnostics callbacks)."""
    return [cb for cb in trainer.callbacks if hasattr(cb, hook)]
