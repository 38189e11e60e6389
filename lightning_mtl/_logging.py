"""Logger integration: a TensorBoard custom-scalars layout grouping the per-task series."""

from __future__ import annotations

import lightning.pytorch as pl

#: the keys every run logs (documented in the README)
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
