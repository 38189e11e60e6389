"""What a user gives :class:`~lightning_mtl.MultiTaskModule`, checked: its arguments, the fit's configuration
(an overridden ``training_step``, Trainer flags of automatic optimisation) and what ``task_losses`` returns. Every
mistake is an error naming the task or argument, the value and the fix."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["check_fit_configuration", "check_module_arguments", "loss_rows", "stack_losses"]


def check_module_arguments(
    accumulate_grad_batches: Any, gradient_clip_val: Any, gradient_clip_algorithm: Any
) -> None:
    """Validate the module's optimisation arguments (at construction)."""
    if (
        isinstance(accumulate_grad_batches, bool)
        or not isinstance(accumulate_grad_batches, int)
        or accumulate_grad_batches < 1
    ):
        raise ValueError(f"accumulate_grad_batches must be an int >= 1, got {accumulate_grad_batches!r}.")
    if gradient_clip_val is not None and not (
        isinstance(gradient_clip_val, (int, float))
        and not isinstance(gradient_clip_val, bool)
        and math.isfinite(gradient_clip_val)
        and gradient_clip_val > 0
    ):
        raise ValueError(f"gradient_clip_val must be a number > 0 or None, got {gradient_clip_val!r}.")
    if gradient_clip_algorithm not in ("norm", "value"):
        raise ValueError(
            f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}."
        )


def check_fit_configuration(module: pl.LightningModule, loop: Callable[..., Any]) -> None:
    """When a fit starts: refuse an overridden ``training_step`` (``loop`` is the module's own) and the Trainer
    flags that manual optimisation rejects, before Lightning does (its message says to switch to automatic
    optimisation)."""
    if type(module).training_step is not loop:
        raise TypeError(
            f"{type(module).__name__} overrides training_step: a MultiTaskModule's training_step is its "
            "optimisation loop (manual optimisation: what an override returns is ignored and nothing "
            "trains). Remove the override and compute the step's losses in task_losses(batch, batch_idx) "
            "(log extra values there with self.log)."
        )
    trainer = module.trainer
    for flag, value, fine in (
        ("gradient_clip_val", trainer.gradient_clip_val, not trainer.gradient_clip_val),
        ("accumulate_grad_batches", trainer.accumulate_grad_batches, trainer.accumulate_grad_batches == 1),
    ):
        if not fine:
            raise ValueError(
                f"Trainer({flag}={value!r}) does not apply to a MultiTaskModule: it optimises manually, "
                f"where Lightning rejects the flag. Remove it from the Trainer and pass it to the module: "
                f"MultiTaskModule(tasks=..., {flag}={value!r}) (forward it from your __init__, e.g. "
                f"super().__init__(tasks=..., {flag}={value!r}))."
            )


def stack_losses(
    losses: Any, task_names: Sequence[str], device: torch.device, stage: str, training: bool
) -> Tensor:
    """Check ``task_losses``' output and stack it in task order: ``[T]`` float32 (on ``device``, the model's, or
    the one device every loss is on)."""
    return torch.stack(loss_rows(losses, task_names, device, stage, training))


def loss_rows(
    losses: Any, task_names: Sequence[str], device: torch.device, stage: str, training: bool
) -> list[Tensor]:
    """:func:`stack_losses` before the stack: the checked float32 losses in task order (the tensors stacked,
    so that each task's own graph can be back-propagated alone)."""
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
    return values
