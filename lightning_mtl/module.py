"""`MultiTaskModule`: the manual optimisation loop every strategy plugs into."""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_mtl._logging import add_tensorboard_layout
from lightning_mtl.metrics import TaskMetrics, split_task_output
from lightning_mtl.step import StepContext, reduce_mean
from lightning_mtl.strategies.base import MTLStrategy, check_single_strategy
from lightning_mtl.task import Task, build_tasks

NonFinitePolicy = Literal["raise", "skip"]


class MultiTaskModule(pl.LightningModule):
    """A LightningModule for multi-task learning.

    Subclass it, return one scalar loss per task from :meth:`task_losses`, and attach one strategy
    callback (e.g. ``UncertaintyWeighting()``) to the Trainer; with none attached the losses are summed
    (:class:`~lightning_mtl.strategies.EqualWeighting`, or the :attr:`Task.weight` values when some differ
    from 1). The module runs the optimisation itself (manual optimisation): the strategy turns the losses
    into gradients, then the module clips, steps the optimizer(s), zeroes the gradients and steps the LR
    schedulers. Do not override ``training_step``.

    Args:
        tasks: task names or :class:`~lightning_mtl.Task` specs; their order is the order of every weight
            vector and log.
        accumulate_grad_batches: optimizer step every k batches (gradients averaged over the k batches).
            Lightning rejects the Trainer flag in manual optimisation: set it here.
        gradient_clip_val: clip gradients to this norm/value before each optimizer step (on unscaled
            gradients under AMP). ``None`` disables clipping. Set it here, not on the Trainer.
        gradient_clip_algorithm: ``"norm"`` (total 2-norm per optimizer) or ``"value"``.
        nonfinite: what a NaN/inf task loss does: ``"raise"`` (default) stops with an error naming the task
            and the value; ``"skip"`` warns, discards that accumulation window's gradients and skips its
            optimizer step (all ranks agree, since the check runs on rank-averaged losses).
    """

    def __init__(
        self,
        tasks: Sequence[str | Task],
        *,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: Literal["norm", "value"] = "norm",
        nonfinite: NonFinitePolicy = "raise",
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.tasks: tuple[Task, ...] = build_tasks(tasks)
        self.task_names: tuple[str, ...] = tuple(t.name for t in self.tasks)
        if (
            isinstance(accumulate_grad_batches, bool)
            or not isinstance(accumulate_grad_batches, int)
            or accumulate_grad_batches < 1
        ):
            raise ValueError(f"accumulate_grad_batches must be an int >= 1, got {accumulate_grad_batches!r}.")
        if gradient_clip_val is not None and not (
            isinstance(gradient_clip_val, (int, float))
            and not isinstance(gradient_clip_val, bool)
            and math.isfinite(gradient_clip_val)
            and gradient_clip_val > 0
        ):
            raise ValueError(f"gradient_clip_val must be a number > 0 or None, got {gradient_clip_val!r}.")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(
                f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}."
            )
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.nonfinite = nonfinite
        self._name_set = frozenset(self.task_names)
        self._strategy: MTLStrategy | None = None
        self._strategy_trainer: Any = None
        self._window_discarded = False
        self._skipped_windows = 0
        self._eval_sums: Tensor | None = None
        self._eval_count: Tensor | None = None
        # --- per-task metrics (lightning_mtl.metrics): None when no task declares metrics ---
        self.task_metrics: TaskMetrics | None = (
            TaskMetrics(self.tasks) if any(t.metrics is not None for t in self.tasks) else None
        )
        self._shared_representation: Tensor | None = None  # set by shared_representation() in training

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Lightning drops a scheduler dict's "interval"/"monitor"/"strict" in manual optimisation; the module
        # steps schedulers itself, so it records them from what configure_optimizers returns.
        original = cls.__dict__.get("configure_optimizers")
        if original is not None and not getattr(original, "_mtl_wrapped", False):

            @functools.wraps(original)
            def configure_optimizers(self: MultiTaskModule, *args: Any, **kw: Any) -> Any:
                return self._record_schedulers(original(self, *args, **kw))

            configure_optimizers._mtl_wrapped = True  # type: ignore[attr-defined]
            cls.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    # ================================================================== user API
    def task_losses(self, batch: Any, batch_idx: int) -> Any:
        """Return one scalar loss tensor per task, keyed by task name (called in train, val and test).

        Tasks with ``metrics`` need their predictions too (no second forward pass): return the pair
        ``(losses, outputs)`` with ``outputs = {task: (preds, target)}`` for those tasks; the module updates
        the stage's metrics with ``metric.update(preds.detach(), target)`` and logs ``<stage>/<task>/<metric>``
        once per epoch.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement task_losses(batch, batch_idx).")

    def shared_parameters(self) -> Iterable[torch.nn.Parameter] | None:
        """The parameters every task shares (the encoder). Gradient-based strategies need it; ``None`` means
        not declared."""
        return None

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
        return self._skipped_windows

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

    def setup(self, stage: str) -> None:
        if self._trainer is not None:
            check_single_strategy(self._trainer)

    # ================================================================== validation of user output
    def _stack_losses(self, losses: Any, stage: str, training: bool) -> Tensor:
        """Check ``task_losses``' output and stack it in task order: ``[T]`` float32."""
        if not isinstance(losses, Mapping):
            raise TypeError(
                f"task_losses must return a mapping task name -> scalar loss tensor, got {type(losses).__name__}. "
                f"Return e.g. {{{', '.join(repr(n) + ': loss' for n in self.task_names)}}}."
            )
        if losses.keys() != self._name_set:
            unknown = sorted(set(losses) - self._name_set, key=str)
            missing = [n for n in self.task_names if n not in losses]
            parts = []
            if unknown:
                parts.append(f"unknown task(s) {unknown}")
            if missing:
                parts.append(f"missing task(s) {missing}")
            raise KeyError(
                f"task_losses returned {' and '.join(parts)} during {stage}; the module's tasks are "
                f"{list(self.task_names)}. Return exactly one loss per task (declare new tasks in tasks=[...])."
            )
        values = []
        for name in self.task_names:
            value = losses[name]
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"task {name!r}: loss must be a torch.Tensor, got {type(value).__name__} ({value!r}) during "
                    f"{stage}. Return the loss tensor itself, not loss.item()."
                )
            if value.ndim != 0:
                raise ValueError(
                    f"task {name!r}: loss must be a scalar (0-dim) tensor, got shape {tuple(value.shape)} during "
                    f"{stage}. Reduce it to one number, e.g. loss.mean()."
                )
            if not value.is_floating_point():
                raise TypeError(
                    f"task {name!r}: loss must be a floating-point tensor, got dtype {value.dtype}."
                )
            if training and not value.requires_grad:
                raise ValueError(
                    f"task {name!r}: the loss does not require grad (value {float(value):.6g}): it is detached from "
                    "the model, so it cannot train it. Compute it from the model's outputs without .detach(), "
                    "torch.no_grad() or .item()."
                )
            values.append(value if value.dtype == torch.float32 else value.float())
        return torch.stack(values)

    def _nonfinite_message(self, local: Tensor, global_: Tensor, stage: str, batch_idx: int) -> str:
        local_values, global_values = local.tolist(), global_.tolist()
        bad = []
        for i, name in enumerate(self.task_names):
            if not math.isfinite(global_values[i]) or not math.isfinite(local_values[i]):
                where = f"{local_values[i]}" + (
                    f" on this rank, {global_values[i]} averaged over ranks" if local is not global_ else ""
                )
                bad.append(f"task {name!r} loss is {where}")
        return f"Non-finite loss at {stage} batch {batch_idx} (epoch {self.current_epoch}): " + "; ".join(bad)

    # ================================================================== training
    def training_step(self, batch: Any, batch_idx: int) -> None:
        trainer = self.trainer
        strategy = self._active_strategy()
        k = self.accumulate_grad_batches
        position = batch_idx % k
        is_sync = position == k - 1 or bool(trainer.is_last_batch)
        self._shared_representation = None
        losses, outputs = split_task_output(self.task_losses(batch, batch_idx))
        stacked = self._stack_losses(losses, "training", training=True)
        detached = stacked.detach()
        global_losses = reduce_mean(trainer, detached)
        if not bool(torch.isfinite(global_losses).all()):
            message = self._nonfinite_message(detached, global_losses, "training", batch_idx)
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    message
                    + ". Fix the loss (check inputs, learning rate, log of zero) or construct the module "
                    "with nonfinite='skip' to skip such steps."
                )
            rank_zero_warn(message + "; skipping this optimizer step (nonfinite='skip').")
            self._window_discarded = True

        if not self._window_discarded:
            ctx = StepContext(self, stacked, global_losses, k, is_sync, position == 0, batch_idx)
            # --- metrics & diagnostics hooks (lightning_mtl.metrics, lightning_mtl.callbacks) ---
            if self.task_metrics is not None:
                self.task_metrics.update("train", outputs)
            loss_dict = dict(zip(self.task_names, stacked.unbind()))
            for cb in _callbacks_with(trainer, "on_task_losses"):
                cb.on_task_losses(trainer, self, loss_dict, batch, batch_idx, ctx)
            # --- end hooks ---
            block = getattr(trainer.strategy, "block_backward_sync", None)
            with nullcontext() if is_sync or block is None or trainer.world_size == 1 else block():
                strategy.backward(ctx)
        self._shared_representation = None  # do not keep this step's graph alive

        if is_sync:
            if self._window_discarded:
                for opt in self._optimizer_list():
                    opt.zero_grad(set_to_none=True)
                strategy.on_accumulation_window_discarded(self)
                self._skipped_windows += 1
                self._window_discarded = False
            else:
                self._optimizer_step(strategy)
        self._log_training(strategy, global_losses)

    def _optimizer_list(self) -> list[Any]:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def _optimizer_step(self, strategy: MTLStrategy) -> None:
        optimizers = self._optimizer_list()
        scaler = self._grad_scaler()
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
        strategy.on_optimizer_step(self, skipped)
        self._step_schedulers("step")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clips gradients (already unscaled under AMP). Call ``super()`` if you override it."""
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer,
                gradient_clip_val=self.gradient_clip_val,
                gradient_clip_algorithm=self.gradient_clip_algorithm,
            )

    def _record_schedulers(self, output: Any) -> Any:
        """Record (and strip) the scheduler-dict keys Lightning ignores in manual optimisation."""
        specs = self.__dict__.setdefault("_scheduler_specs", {})
        ignored = ("interval", "monitor", "strict", "reduce_on_plateau")

        def strip(config: Any) -> Any:
            if not isinstance(config, Mapping) or "scheduler" not in config:
                return config
            if any(k in config for k in ignored):
                specs[id(config["scheduler"])] = {
                    "interval": config.get("interval", "epoch"),
                    "monitor": config.get("monitor"),
                    "strict": config.get("strict", True),
                }
            return {k: v for k, v in config.items() if k not in ignored}

        def visit(item: Any) -> Any:
            if isinstance(item, Mapping) and "optimizer" in item:
                out = dict(item)
                if "lr_scheduler" in out:
                    out["lr_scheduler"] = strip(out["lr_scheduler"])
                if "monitor" in out:  # top-level monitor applies to the (single) scheduler
                    sched = out.get("lr_scheduler")
                    sched_obj = sched.get("scheduler") if isinstance(sched, Mapping) else sched
                    if sched_obj is not None:
                        specs.setdefault(id(sched_obj), {"interval": "epoch", "strict": True})["monitor"] = (
                            out["monitor"]
                        )
                    out.pop("monitor")
                return out
            return strip(item)

        if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], (list, tuple)):
            return output[0], [visit(s) for s in output[1]]
        if isinstance(output, (list, tuple)):
            return type(output)(visit(o) for o in output)
        return visit(output)

    def _step_schedulers(self, interval: str) -> None:
        configs = self.trainer.lr_scheduler_configs
        if not configs:
            return
        specs = self.__dict__.get("_scheduler_specs", {})
        n_opt = max(1, len(self.trainer.optimizers))
        counter = self.trainer.global_step // n_opt if interval == "step" else self.current_epoch + 1
        for config in configs:
            spec = specs.get(id(config.scheduler), {})
            if spec.get("interval", "epoch") != interval or counter % config.frequency != 0:
                continue
            metric = None
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                monitor = spec.get("monitor")
                if monitor is None:
                    raise ValueError(
                        "ReduceLROnPlateau needs a metric to monitor: return {'optimizer': opt, 'lr_scheduler': "
                        "{'scheduler': sched, 'monitor': 'val/loss'}} from configure_optimizers."
                    )
                metric = self.trainer.callback_metrics.get(monitor)
                if metric is None:
                    if spec.get("strict", True):
                        available = sorted(self.trainer.callback_metrics)
                        raise KeyError(
                            f"ReduceLROnPlateau monitors {monitor!r}, which was not logged; available: "
                            f"{available}. Set 'monitor' in configure_optimizers to one of them."
                        )
                    rank_zero_warn(f"ReduceLROnPlateau monitor {monitor!r} not logged yet; not stepping.")
                    continue
            self.lr_scheduler_step(config.scheduler, metric)

    def on_train_epoch_end(self) -> None:
        """Logs ``train/<task>/<metric>``, steps epoch-interval LR schedulers. Call ``super()`` if overridden."""
        self._log_task_metrics("train", {})  # --- per-task metrics (lightning_mtl.metrics) ---
        self._step_schedulers("epoch")

    def _should_log(self) -> bool:
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _log_training(self, strategy: MTLStrategy, global_losses: Tensor) -> None:
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
        to_loggers = self._should_log()
        if to_loggers:  # method-specific quantities may cost something to build: logging steps only
            metrics.update(strategy.extra_metrics())
            if self._skipped_windows:
                metrics["train/skipped_steps"] = torch.tensor(float(self._skipped_windows))
        self._write_step_metrics(metrics, to_loggers)

    def _write_step_metrics(self, metrics: dict[str, Tensor], to_loggers: bool) -> None:
        """Put per-step values in ``trainer.callback_metrics`` (every step, as ``self.log(on_step=True)`` would)
        and, when ``to_loggers``, write them straight to the Trainer's loggers at the step Lightning uses for
        its own training logs (also updating ``trainer.logged_metrics``).

        ``self.log`` costs ~0.3 ms per key (Lightning's result collection), i.e. ~6 ms per step for ``2T + 1``
        keys at T = 10; this path costs a dict update, plus one host transfer on logging steps.
        """
        connector = getattr(self.trainer, "_logger_connector", None)
        callback_metrics = getattr(connector, "_callback_metrics", None)
        if (
            connector is None
            or not hasattr(connector, "log_metrics")
            or not isinstance(callback_metrics, dict)
        ):
            if to_loggers:  # Lightning internals changed: fall back to the public (slower) API
                self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
            return
        detached = {k: v.detach() for k, v in metrics.items()}
        callback_metrics.update(detached)
        if to_loggers and self.trainer.loggers:
            values = torch.stack([v.reshape(()).float() for v in detached.values()]).tolist()  # one sync
            connector.log_metrics(dict(zip(detached, values)))

    # ================================================================== validation / test
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Mapping[str, Tensor]:
        """Accumulates per-task losses for ``val/loss/<task>``; returns the losses (call it via ``super()``).

        With several validation dataloaders each one is averaged separately and logged with Lightning's
        suffix, ``val/loss/<task>/dataloader_idx_<k>`` (likewise ``val/loss`` and ``val/<task>/<metric>``).
        """
        return self._eval_step(batch, batch_idx, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Mapping[str, Tensor]:
        """Accumulates per-task losses for ``test/loss/<task>`` (per dataloader, as in validation)."""
        return self._eval_step(batch, batch_idx, "test", dataloader_idx)

    def _eval_step(
        self, batch: Any, batch_idx: int, stage: str, dataloader_idx: int = 0
    ) -> Mapping[str, Tensor]:
        losses, outputs = split_task_output(self.task_losses(batch, batch_idx))
        stacked = self._stack_losses(
            losses, "validation" if stage == "val" else stage, training=False
        ).detach()
        if not bool(torch.isfinite(stacked).all()):
            message = self._nonfinite_message(stacked, stacked, stage, batch_idx)
            if self.nonfinite == "raise":
                raise FloatingPointError(
                    message + ". Fix the loss, or use nonfinite='skip' to leave such batches out."
                )
            rank_zero_warn(message + "; leaving this batch out of the epoch average (nonfinite='skip').")
            return losses
        size = float(_batch_size(batch))
        # [num dataloaders, T + 1]: per-task sums of loss x batch size, then the sample count
        sums = self._eval_buffer(stage, dataloader_idx, stacked.device)
        sums[dataloader_idx, :-1] += stacked.double() * size
        sums[dataloader_idx, -1] += size
        if self.task_metrics is not None:  # --- per-task metrics (lightning_mtl.metrics) ---
            self.task_metrics.update(stage, outputs, dataloader_idx)
        return losses

    def _num_eval_dataloaders(self, stage: str) -> int:
        trainer = self._trainer
        counts = None
        if trainer is not None:
            counts = (
                trainer.num_sanity_val_batches
                if trainer.sanity_checking
                else (trainer.num_val_batches if stage == "val" else trainer.num_test_batches)
            )
        return max(1, len(counts)) if isinstance(counts, (list, tuple)) else 1

    def _eval_buffer(self, stage: str, dataloader_idx: int, device: torch.device) -> Tensor:
        rows = max(self._num_eval_dataloaders(stage), dataloader_idx + 1)
        sums = self._eval_sums
        if sums is None or sums.device != device or sums.shape[0] < rows:
            grown = torch.zeros(rows, len(self.task_names) + 1, dtype=torch.float64, device=device)
            if sums is not None:
                grown[: sums.shape[0]] = sums.to(device)
            self._eval_sums = sums = grown
        return sums

    def _reset_eval(self) -> None:
        self._eval_sums, self._eval_count = None, None

    def _log_eval(self, stage: str) -> None:
        # every rank takes part in the reduction, even one whose batches were all left out (nonfinite='skip')
        packed = self._eval_buffer(
            stage, 0, self._eval_sums.device if self._eval_sums is not None else self.device
        )
        if self.trainer.world_size > 1:
            packed = self.trainer.strategy.reduce(packed.clone(), reduce_op="sum")
        self._reset_eval()
        several = packed.shape[0] > 1
        for idx in range(packed.shape[0]):
            count = packed[idx, -1]
            if not bool(count > 0):
                continue
            means = (packed[idx, :-1] / count).float()
            suffix = f"/dataloader_idx_{idx}" if several else ""
            metrics = {f"{stage}/loss/{n}{suffix}": v for n, v in zip(self.task_names, means.unbind())}
            metrics[f"{stage}/loss{suffix}"] = means.sum()
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=1, add_dataloader_idx=False)
            self._log_task_metrics(
                stage, {f"{n}/loss": v for n, v in zip(self.task_names, means.unbind())}, idx, suffix
            )

    # --- per-task metrics (lightning_mtl.metrics) ---------------------------------------------------------
    def _log_task_metrics(
        self, stage: str, losses: dict[str, Tensor], dataloader_idx: int = 0, suffix: str = ""
    ) -> None:
        """Compute (synchronised by torchmetrics), log ``<stage>/<task>/<metric>``, reset, and hand the values
        (plus the epoch's ``<task>/loss``) to callbacks defining ``on_task_metrics`` (e.g. ``DeltaM``); with
        several dataloaders, only the first one's values go to those callbacks."""
        values = self.task_metrics.compute(stage, dataloader_idx) if self.task_metrics is not None else {}
        if values:
            self.log_dict(
                {f"{stage}/{k}{suffix}": v for k, v in values.items()},
                on_step=False,
                on_epoch=True,
                batch_size=1,
                add_dataloader_idx=False,
            )
        values.update(losses)
        if values and dataloader_idx == 0:
            for cb in _callbacks_with(self.trainer, "on_task_metrics"):
                cb.on_task_metrics(self.trainer, self, stage, values)

    # --- end per-task metrics -----------------------------------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._reset_eval()

    def on_validation_epoch_end(self) -> None:
        """Logs ``val/loss/<task>`` and ``val/loss`` (the unweighted sum). Call ``super()`` if overridden."""
        self._log_eval("val")

    def on_test_epoch_start(self) -> None:
        self._reset_eval()

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")


def _callbacks_with(trainer: Any, hook: str) -> list[Any]:
    """The trainer's callbacks that define ``hook`` (the module's hooks for metrics and diagnostics callbacks)."""
    return [cb for cb in trainer.callbacks if hasattr(cb, hook)]


def _batch_size(batch: Any) -> int:
    from lightning.pytorch.utilities.data import extract_batch_size

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:
        return 1
