"""What :meth:`~lightning_mtl.MultiTaskModule.task_losses` returns, checked: every mistake is an error naming the
task, the value and the fix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["stack_losses"]


def stack_losses(
    losses: Any, task_names: Sequence[str], device: torch.device, stage: str, training: bool
) -> Tensor:
    """Check ``task_losses``' output and stack it in task order: ``[T]`` float32 (on ``device``, the model's, or
    the one device every loss is on)."""
    if not isinstance(losses, Mapping):
        raise TypeError(
            f"task_losses must return a mapping task name -> scalar loss tensor, got {type(losses).__name__}. "
            f"Return e.g. {{{', '.join(repr(n) + ': loss' for n in task_names)}}}."
        )
    if losses.keys() != set(task_names):
        unknown = sorted(set(losses) - set(task_names), key=str)
        missing = [n for n in task_names if n not in losses]
        parts = []
        if unknown:
            parts.append(f"unknown task(s) {unknown}")
        if missing:
            parts.append(f"missing task(s) {missing}")
        raise KeyError(
            f"task_losses returned {' and '.join(parts)} during {stage}; the module's tasks are "
            f"{list(task_names)}. Return exactly one loss per task (declare new tasks in tasks=[...])."
        )
    values = []
    for name in task_names:
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
            raise TypeError(f"task {name!r}: loss must be a floating-point tensor, got dtype {value.dtype}.")
        if training and not value.requires_grad:
            raise ValueError(
                f"task {name!r}: the loss does not require grad (value {float(value):.6g}): it is detached from "
                "the model, so it cannot train it. Compute it from the model's outputs without .detach(), "
                "torch.no_grad() or .item()."
            )
        values.append(value if value.dtype == torch.float32 else value.float())
    devices = {v.device for v in values}
    if len(devices) > 1:
        home = device if device in devices else values[0].device
        odd = [f"task {n!r}: loss on {v.device}" for n, v in zip(task_names, values) if v.device != home]
        where = "the model and the other losses are" if home == device else "the other losses are"
        raise RuntimeError(
            f"{'; '.join(odd)}, but {where} on {home} (the model on {device}; during {stage}). Compute "
            "every loss on the model's device, e.g. move the target with target.to(self.device)."
        )
    return torch.stack(values)
