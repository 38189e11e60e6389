"""lightning-mtl: multi-task learning strategies as drop-in PyTorch Lightning callbacks."""

from lightning_mtl.module import MultiTaskModule
from lightning_mtl.task import Task

__version__ = "0.1.0"

__all__ = ["MultiTaskModule", "Task", "__version__"]
