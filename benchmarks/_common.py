"""Models, data and timing shared by the benchmarks (not part of the package)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl import MultiTaskModule


def task_names(num_tasks: int) -> list[str]:
    return [f"t{i}" for i in range(num_tasks)]


def make_loader(
    num_tasks: int, n: int, batch_size: int, in_dim: int = 32, image: bool = False, seed: int = 0
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) if image else torch.randn(n, in_dim, generator=g)
    y = torch.randn(n, num_tasks, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, drop_last=True)


def build_encoder(kind: str, in_dim: int = 32, hidden: int = 64) -> tuple[nn.Module, int]:
    """``"mlp"``: 2 hidden layers; ``"cnn"``: 2 conv layers + pooling, on 3×16×16 inputs."""
    if kind == "mlp":
        enc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        return enc, hidden
    if kind == "cnn":
        enc = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, hidden),
            nn.ReLU(),
        )
        return enc, hidden
    raise ValueError(f"unknown model kind {kind!r}; use 'mlp' or 'cnn'")


def kpi_tasks(num_tasks: int) -> list[Any]:
    """Binary tasks (the sign of each target) with a train accuracy metric each: a KPI for DTP."""
    from torchmetrics.classification import BinaryAccuracy

    from lightning_mtl import Task

    return [
        Task(name, kind="classification", metrics={"acc": BinaryAccuracy()}) for name in task_names(num_tasks)
    ]


class BenchMTL(MultiTaskModule):
    """Shared encoder + T linear heads, MSE per task, through ``MultiTaskModule``.

    ``kpi=True``: each task is instead the binary classification of its target's sign (BCE loss) with a train
    accuracy metric, the model DTP needs (the same network and data)."""

    def __init__(
        self,
        num_tasks: int = 10,
        kind: str = "mlp",
        lr: float = 1e-3,
        mark_representation: bool = False,
        kpi: bool = False,
    ) -> None:
        super().__init__(tasks=kpi_tasks(num_tasks) if kpi else task_names(num_tasks))
        torch.manual_seed(0)
        self.encoder, hidden = build_encoder(kind)
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(num_tasks)])
        self.lr = lr
        self.mark_representation = mark_representation
        self.kpi = kpi

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_losses(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        z = self.encoder(x)
        if self.mark_representation:
            z = self.shared_representation(z)
        if self.kpi:
            logits = {name: head(z).squeeze(1) for name, head in zip(self.task_names, self.heads)}
            labels = {name: (y[:, i] > 0).long() for i, name in enumerate(self.task_names)}
            losses = {
                name: nn.functional.binary_cross_entropy_with_logits(logits[name], labels[name].float())
                for name in self.task_names
            }
            return losses, {name: (logits[name].detach().sigmoid(), labels[name]) for name in self.task_names}
        return {
            name: nn.functional.mse_loss(head(z).squeeze(1), y[:, i])
            for i, (name, head) in enumerate(zip(self.task_names, self.heads))
        }

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class BenchPlain(pl.LightningModule):
    """The same network as a plain ``LightningModule`` (automatic optimisation) returning the summed loss."""

    def __init__(self, num_tasks: int = 10, kind: str = "mlp", lr: float = 1e-3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder, hidden = build_encoder(kind)
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(num_tasks)])
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        z = self.encoder(x)
        loss = sum(nn.functional.mse_loss(head(z).squeeze(1), y[:, i]) for i, head in enumerate(self.heads))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class StepTimer(Callback):
    """Time per training iteration: from one ``on_train_batch_start`` to the next, so that everything the
    Trainer does per step is included (data fetch, the step, callbacks, writing logs on logging steps).

    On CPU the clock is the main thread's CPU time (``time.thread_time``; run with one torch thread): time
    the machine spends on other processes is not charged, which makes ratios stable on a shared machine.
    On CUDA it is wall time after a synchronisation.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None
        self._clock = time.thread_time

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        self._clock = time.perf_counter if pl_module.device.type == "cuda" else time.thread_time
        self._last = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = self._clock()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def make_trainer(tmpdir: str, max_steps: int, callbacks: list[Callback], device: str = "cpu") -> pl.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        accelerator=device,
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=CSVLogger(tmpdir, name="bench"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=50,
    )


def median_step_time(times: list[float], warmup: int) -> float:
    return statistics.median(times[warmup:])


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
