"""What a compare run records while it trains: task losses and weights, time per step, peak memory."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_mtl.step import StepContext

#: the RunRecord fields that :class:`Recorder` saves
RECORDED = ("weight_steps", "weights", "loss_steps", "losses", "ms_per_step", "peak_mem_mb", "seconds")


@dataclass
class RunRecord:
    """What one training run leaves for the results table and the plots."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    weight_steps: list[int] = field(default_factory=list)
    weights: list[list[float]] = field(default_factory=list)
    loss_steps: list[int] = field(default_factory=list)
    losses: list[list[float]] = field(default_factory=list)
    ms_per_step: float = float("nan")
    peak_mem_mb: float = float("nan")
    seconds: float = float("nan")
    delta_m: float | None = None

    @classmethod
    def load(cls, name: str, metrics: dict[str, float], path: Path) -> RunRecord:
        """The record of run ``name``: its final ``metrics`` and what its :class:`Recorder` saved to ``path``."""
        saved = json.loads(path.read_text())
        record = cls(name=name, metrics=metrics, **{key: saved[key] for key in RECORDED})
        record.delta_m = metrics.get("val/delta_m")
        return record


class Recorder(Callback):
    """Records the rank-averaged task losses and the strategy's weights every ``every`` steps, the time per
    training step and the peak memory; rank 0 saves them to ``path`` at the end of fit (a file, so that the
    record survives ``ddp_spawn``)."""

    def __init__(self, path: str, every: int = 1, warmup: int = 3) -> None:
        self.path, self.every, self.warmup = path, every, warmup
        self._losses: list[tuple[int, torch.Tensor]] = []
        self._weights: list[tuple[int, torch.Tensor]] = []
        self._fit_t0 = self._t0 = self._step_time = 0.0
        self._timed = self._seen = self._rss0 = self._rss_peak = 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_t0 = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._rss0 = self._rss_peak = _rss_bytes()

    def on_task_losses(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        losses: Any,
        batch: Any,
        batch_idx: int,
        ctx: StepContext,
    ) -> None:
        """The module's per-step hook: keeps the rank-averaged losses of every ``every``-th step."""
        if ctx.is_window_start and trainer.global_step % self.every == 0:
            self._losses.append((trainer.global_step, ctx.global_losses.detach().clone()))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._seen += 1
        if self._seen > self.warmup:
            self._step_time += time.perf_counter() - self._t0
            self._timed += 1
        self._rss_peak = max(self._rss_peak, _rss_bytes())
        step = trainer.global_step - 1
        weights = pl_module.strategy.weights_tensor()
        if weights is not None and step % self.every == 0:
            self._weights.append((step, weights.detach().clone()))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            peak = (self._rss_peak - self._rss0) / 2**20
        record = {
            "weight_steps": [s for s, _ in self._weights],
            "weights": [w.float().cpu().tolist() for _, w in self._weights],
            "loss_steps": [s for s, _ in self._losses],
            "losses": [v.float().cpu().tolist() for _, v in self._losses],
            "ms_per_step": 1000 * self._step_time / self._timed if self._timed else float("nan"),
            "peak_mem_mb": peak,
            "seconds": time.perf_counter() - self._fit_t0,
        }
        Path(self.path).write_text(json.dumps(record))


def _rss_bytes() -> int:
    """Current resident memory of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class ProgressUpdater(Callback):
    """Advances a rich progress bar by one per training batch (single-process runs only)."""

    def __init__(self, progress: Any, task_id: Any) -> None:
        self.progress, self.task_id = progress, task_id

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.progress.advance(self.task_id)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            loss = float(trainer.callback_metrics["val/loss"])
            self.progress.update(self.task_id, status=f"val/loss {loss:.4g}")
