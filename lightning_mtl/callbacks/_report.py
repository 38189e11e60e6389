"""Shared plumbing of the diagnostics callbacks: logging scalars off the Trainer's schedule, heat maps, tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_mtl._lightning import logging_step
from lightning_mtl.step import StepContext


def check_every_n_steps(owner: str, every_n_steps: int) -> int:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"{owner}: every_n_steps must be an int >= 1, got {every_n_steps!r}.")
    return every_n_steps


def is_measured_step(trainer: pl.Trainer, ctx: StepContext, every_n_steps: int) -> bool:
    """True on the first micro-batch of every ``every_n_steps``-th optimizer step (same answer on every rank)."""
    return bool(ctx.is_window_start) and trainer.global_step % every_n_steps == 0


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    """Write scalars to every logger at the current step, whatever ``log_every_n_steps`` says (rank 0 writes).

    Diagnostics run on their own schedule (every n steps): going through ``self.log`` would drop the values
    whenever that schedule misses the Trainer's logging steps.
    """
    if trainer.global_rank != 0 or not metrics:
        return
    step = logging_step(trainer)
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_heatmap(
    trainer: pl.Trainer, tag: str, matrix: Tensor, labels: Sequence[str], title: str, vmin: float, vmax: float
) -> None:
    """Add a heat map of ``matrix`` to every TensorBoard logger (a labelled matplotlib figure when matplotlib
    is installed, else a plain colour image with rows and columns in task order)."""
    if trainer.global_rank != 0:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not loggers:
        return
    step = logging_step(trainer)
    figure = heatmap_figure(matrix, labels, title, vmin, vmax)
    for logger in loggers:
        if figure is not None:
            logger.experiment.add_figure(tag, figure, global_step=step, close=False)
        else:
            logger.experiment.add_image(tag, heatmap_image(matrix, vmin, vmax), global_step=step)
    if figure is not None:
        import matplotlib.pyplot as plt

        plt.close(figure)


def heatmap_figure(matrix: Tensor, labels: Sequence[str], title: str, vmin: float, vmax: float) -> Any:
    """A matplotlib figure of ``matrix`` with task labels and the values written in the cells (None without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    m = matrix.detach().cpu().double().numpy()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    im = ax.imshow(m, cmap="RdBu", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def heatmap_image(matrix: Tensor, vmin: float, vmax: float, cell: int = 24) -> Tensor:
    """``[3, H, W]`` image in [0, 1]: blue for ``vmax``, white for the middle, red for ``vmin``."""
    m = matrix.detach().cpu().float()
    mid = (vmin + vmax) / 2
    half = max((vmax - vmin) / 2, 1e-12)
    t = ((m - mid) / half).clamp(-1, 1)
    pos, neg = t.clamp_min(0), (-t).clamp_min(0)
    r = 1 - pos
    g = 1 - pos.maximum(neg)
    b = 1 - neg
    img = torch.stack([r, g, b])
    return img.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)


def matrix_table(
    matrix: Tensor, labels: Sequence[str], title: str, corner: str, columns: Sequence[str] | None = None
) -> Any:
    """A ``rich`` table of a ``T×T`` matrix (rows and columns labelled by task; ``columns``: other column labels
    for a rectangular matrix)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column(corner)
    for name in labels if columns is None else columns:
        table.add_column(name, justify="right")
    m = matrix.detach().cpu().tolist()
    for name, row in zip(labels, m):
        table.add_row(name, *(f"{v:+.3g}" for v in row))
    return table


def print_rich(renderable: Any) -> None:
    from rich.console import Console

    Console().print(renderable)


class SharedGradientProbe(Callback):
    """Base of the diagnostics that read the task gradients on ``shared_parameters()`` from a training step's
    own graph (``on_task_losses``, called by :class:`~lightning_mtl.MultiTaskModule` before the backward).

    Subclasses set ``every_n_steps`` and implement :meth:`reset` (their running statistics, also called at
    construction and at the start of every new training run) and :meth:`measure`, using :meth:`shared_jacobian`.
    """

    every_n_steps: int

    def __init__(self) -> None:
        super().__init__()
        self.task_names: tuple[str, ...] = ()
        self._params: list[torch.nn.Parameter] | None = None
        self._gradients: Any = None
        self.reset()

    def reset(self) -> None:
        """Forget every measurement (a new training run starts afresh; a checkpoint is restored after setup)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning_mtl.gradients import TaskGradients, shared_parameters_of

        name = type(self).__name__
        if not hasattr(pl_module, "task_names"):
            raise TypeError(f"{name} needs a lightning_mtl.MultiTaskModule, got {type(pl_module).__name__}.")
        self.task_names = tuple(pl_module.task_names)
        if trainer.global_step == 0:
            self.reset()
        # a module that finds its shared parameters does so on its first training step (before on_task_losses)
        automatic = getattr(pl_module, "finds_shared_parameters", False)
        self._params = None if automatic else shared_parameters_of(pl_module, name)
        self._gradients = TaskGradients(name)

    def on_task_losses(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        losses: Mapping[str, Tensor],
        batch: Any,
        batch_idx: int,
        ctx: StepContext,
    ) -> None:
        """Called by :class:`~lightning_mtl.MultiTaskModule` with the step's losses, before the backward."""
        if self._params is None:
            from lightning_mtl.gradients import shared_parameters_of

            self._params = shared_parameters_of(pl_module, type(self).__name__)
        if is_measured_step(trainer, ctx, self.every_n_steps):
            self.measure(trainer, pl_module, batch, batch_idx, ctx)

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, ctx: StepContext
    ) -> None:
        """One measurement on a measured step (the step's graph is alive; ``ctx.losses`` holds the losses)."""
        raise NotImplementedError

    def shared_jacobian(self, trainer: pl.Trainer, ctx: StepContext) -> Tensor:
        """``[T, P]`` task gradients on the shared parameters of this step, unscaled and averaged over ranks
        (no DDP hook fires: one explicit reduction)."""
        assert self._gradients is not None, "setup() has not run"
        self._gradients.reset()
        self._gradients.add(ctx, keep_graph=False)
        J = self._gradients.jacobian(ctx)
        self._gradients.reset()
        return J
