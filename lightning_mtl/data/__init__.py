"""Data helpers for multi-task learning: one dataset (DataLoader) per task."""

from lightning_mtl.data.multitask_loader import MultiTaskLoader, task_eval_loaders

__all__ = ["MultiTaskLoader", "task_eval_loaders"]
