"""Logger integration: a TensorBoard custom-scalars layout grouping the per-task series, and epoch-level
values that are already reduced over ranks."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import Tensor

#: the keys every run logs (documented in docs/training.md)
LAYOUT = {
    "lightning-mtl": {
        "task weights": ["Multiline", [r"^train/weight/.*"]],
        "task losses (train)": ["Multiline", [r"^train/loss/.*"]],
        "task losses (val)": ["Multiline", [r"^val/loss/.*"]],
        "total loss": ["Multiline", [r"^train/loss$", r"^val/loss$"]],
    }
}


def add_tensorboard_layout(trainer: pl.Trainer) -> None:
    """Write the custom-scalars layout once to every TensorBoard logger of ``trainer`` (rank 0 only)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    if trainer.global_rank != 0:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and not getattr(logger, "_mtl_layout_written", False):
            logger.experiment.add_custom_scalars(LAYOUT)
            logger._mtl_layout_written = True


def log_reduced(module: pl.LightningModule, metrics: dict[str, Tensor]) -> None:
    """Log epoch-level values that are already identical on every rank (reduced by the module or by torchmetrics).

    ``sync_dist=True`` with ``reduce_fx="max"``: the max of identical values is exact (a mean could round), and
    Lightning then does not warn that epoch-level values should be synchronised. One small all-reduce per key
    per epoch under DDP; nothing on one process.
    """
    module.log_dict(
        metrics,
        on_step=False,
        on_epoch=True,
        batch_size=1,
        add_dataloader_idx=False,
        sync_dist=True,
        reduce_fx="max",
    )
