"""lightning-mtl: multi-task learning strategies as drop-in PyTorch Lightning callbacks."""

from lightning_mtl.module import MultiTaskModule
from lightning_mtl.partial import MaskedMean, masked_mean
from lightning_mtl.task import Task

__version__ = "0.1.0"

__all__ = ["MaskedMean", "MultiTaskModule", "Task", "__version__", "masked_mean"]
