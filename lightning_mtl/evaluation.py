"""Epoch-end values of :class:`~lightning_mtl.MultiTaskModule`: per-task evaluation losses and per-task metrics.

The evaluation loss of a task is the dataset mean of its loss, per dataloader, over every rank: one float64
buffer ``[dataloaders, 2T]`` holds, per task, the sum of ``loss x samples`` and the sample count (the batch
size, or the labelled count of a :func:`~lightning_mtl.masked_mean`; 0 for an absent partial task); at epoch end
it is summed over ranks in one all-reduce and turned into means over the labelled samples. Per-task metrics are computed (and synchronised) by
torchmetrics. Both are logged once per epoch as values already reduced over ranks.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_mtl._logging import log_reduced

__all__ = ["EvalLosses", "batch_size", "log_eval_losses", "log_task_metrics", "num_eval_dataloaders"]


class EvalLosses:
    """Accumulates one stage's per-task losses (``val`` or ``test``) over an epoch."""

    def __init__(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self._sums: Tensor | None = None

    def reset(self) -> None:
        self._sums = None

    def add(self, losses: Tensor, size: float | Tensor, dataloader_idx: int, num_dataloaders: int) -> None:
        """Add one batch's mean losses ``[T]`` (detached) over ``size`` samples (a number, or ``[T]`` counts per
        task) from dataloader ``dataloader_idx``."""
        T = self.num_tasks
        sums = self._buffer(max(num_dataloaders, dataloader_idx + 1), losses.device)
        counts = (
            size.double() if isinstance(size, Tensor) else torch.full((T,), float(size), dtype=torch.float64)
        )
        counts = counts.to(losses.device)
        sums[dataloader_idx, :T] += torch.where(counts > 0, losses.double() * counts, 0.0)
        sums[dataloader_idx, T:] += counts

    def means(
        self, trainer: pl.Trainer, num_dataloaders: int, device: torch.device
    ) -> tuple[int, list[tuple[int, Tensor]]]:
        """Sum over ranks (every rank must call it, even one that added nothing), reset, and return the number of
        dataloaders and ``(dataloader_idx, per-task means [T] float32)`` for each one that saw samples."""
        packed = self._buffer(num_dataloaders, self._sums.device if self._sums is not None else device)
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed.clone(), reduce_op="sum")
        self.reset()
        T = self.num_tasks
        seen = (packed[:, T:] > 0).any(dim=1).tolist()
        # a task with no labelled sample in a dataloader has no mean there: NaN, left out of the logs
        means = [(i, (packed[i, :T] / packed[i, T:]).float()) for i in range(len(seen)) if seen[i]]
        return len(seen), means

    def _buffer(self, rows: int, device: torch.device) -> Tensor:
        sums = self._sums
        if sums is None or sums.device != device or sums.shape[0] < rows:
            grown = torch.zeros(rows, 2 * self.num_tasks, dtype=torch.float64, device=device)
            if sums is not None:
                grown[: sums.shape[0]] = sums.to(device)
            self._sums = sums = grown
        return sums


def num_eval_dataloaders(trainer: pl.Trainer | None, stage: str) -> int:
    """How many dataloaders the current evaluation loop runs (1 outside one)."""
    counts = None
    if trainer is not None:
        counts = (
            trainer.num_sanity_val_batches
            if trainer.sanity_checking
            else (trainer.num_val_batches if stage == "val" else trainer.num_test_batches)
        )
    return max(1, len(counts)) if isinstance(counts, (list, tuple)) else 1


def batch_size(batch: Any) -> int:
    """The batch's size as Lightning infers it (1 if it cannot)."""
    from lightning.pytorch.utilities.data import extract_batch_size

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return int(extract_batch_size(batch))
    except Exception:
        return 1


def log_eval_losses(module: pl.LightningModule, losses: EvalLosses, stage: str) -> None:
    """Log ``<stage>/loss/<task>`` and ``<stage>/loss`` (the unweighted sum), per dataloader (suffix
    ``/dataloader_idx_<k>`` when there are several), and the stage's per-task metrics.

    With several dataloaders of which each labels a different set of tasks (one loader per task:
    :func:`~lightning_mtl.data.task_eval_loaders`), every task's values are also logged without the suffix and the
    callbacks (``DeltaM``, ``MTLSummary``) receive every task's; otherwise they receive the first dataloader's."""
    trainer = module.trainer
    rows, means = losses.means(trainer, num_eval_dataloaders(trainer, stage), module.device)
    names = module.task_names
    per_loader: list[dict[str, Tensor]] = []
    for idx, mean in means:
        suffix = f"/dataloader_idx_{idx}" if rows > 1 else ""
        labelled = [(n, v) for n, v, ok in zip(names, mean.unbind(), torch.isfinite(mean).tolist()) if ok]
        values = [v for _, v in labelled]
        metrics = {f"{stage}/loss/{n}{suffix}": v for n, v in labelled}
        metrics[f"{stage}/loss{suffix}"] = torch.stack(values).sum() if values else mean.new_zeros(())
        log_reduced(module, metrics)
        per_loader.append(
            log_task_metrics(module, stage, {f"{n}/loss": v for n, v in labelled}, idx, suffix, notify=False)
        )
    tasks = [{key.split("/", 1)[0] for key in values} for values in per_loader]
    disjoint = len(per_loader) > 1 and sum(len(t) for t in tasks) == len(set().union(*tasks))
    if (
        disjoint
    ):  # one loader per task: each task's values under its plain key, and all of them to the callbacks
        merged = {k: v for values in per_loader for k, v in values.items()}
        log_reduced(module, {f"{stage}/{k}": v for k, v in merged.items() if not k.endswith("/loss")})
        log_reduced(
            module,
            {f"{stage}/loss/{k[: -len('/loss')]}": v for k, v in merged.items() if k.endswith("/loss")},
        )
        _notify_task_metrics(module, stage, merged)
    elif per_loader:
        _notify_task_metrics(module, stage, per_loader[0])


def log_task_metrics(
    module: pl.LightningModule,
    stage: str,
    losses: dict[str, Tensor],
    dataloader_idx: int = 0,
    suffix: str = "",
    notify: bool = True,
) -> dict[str, Tensor]:
    """Compute (synchronised by torchmetrics), log ``<stage>/<task>/<metric>`` and reset; return the values plus
    the epoch's ``<task>/loss``, and with ``notify`` hand them to callbacks defining ``on_task_metrics`` (e.g.
    ``DeltaM``)."""
    task_metrics = module.task_metrics
    values = task_metrics.compute(stage, dataloader_idx) if task_metrics is not None else {}
    if values:
        log_reduced(module, {f"{stage}/{k}{suffix}": v for k, v in values.items()})
    values.update(losses)
    if notify:
        _notify_task_metrics(module, stage, values)
    return values


def _notify_task_metrics(module: pl.LightningModule, stage: str, values: dict[str, Tensor]) -> None:
    if not values:
        return
    trainer = module.trainer
    for cb in trainer.callbacks:
        if hasattr(cb, "on_task_metrics"):
            cb.on_task_metrics(trainer, module, stage, values)
