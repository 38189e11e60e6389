"""Checkpointed per-task state, restored by task name, never by position.

A strategy or diagnostic that keeps per-task state saves its task names (and the hyper-parameters that give
the state its meaning) beside it. On loading, :func:`task_order` checks them against the current ones and
returns where each current task's entry sits in the saved state; :func:`take_tasks` applies that order to a
tensor's task dimensions. Pure helpers: torch only, no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

_ABSENT = "<absent>"


def task_order(
    owner: str,
    saved_tasks: Sequence[str] | None,
    tasks: Sequence[str],
    saved_config: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[int]:
    """``order`` with ``order[i]`` = the index in the saved state of current task ``i``.

    Raises a :class:`ValueError` naming ``owner`` and both sides when the task sets differ (the missing and
    the unknown names) or when a configuration value differs (each differing key, saved vs current value).
    Configuration values are compared after turning tuples into lists (a checkpoint stores lists).
    """
    saved = list(saved_tasks or [])
    current = list(tasks)
    if len(set(saved)) != len(saved):
        raise ValueError(f"{owner}: the checkpoint's state names a task twice: {saved}.")
    if set(saved) != set(current):
        missing = [t for t in current if t not in saved]
        unknown = [t for t in saved if t not in current]
        parts = []
        if missing:
            parts.append(f"no saved state for {missing}")
        if unknown:
            parts.append(f"saved state for {unknown}, which the module does not declare")
        raise ValueError(
            f"{owner}: the checkpoint's state was saved for tasks {saved}, but the module's tasks are "
            f"{current} ({'; '.join(parts)}). Resume with the same tasks (their order may differ), or start "
            "a new fit without ckpt_path."
        )
    saved_cfg, current_cfg = _plain(dict(saved_config or {})), _plain(dict(config or {}))
    differing = [
        key
        for key in sorted(set(saved_cfg) | set(current_cfg), key=str)
        if saved_cfg.get(key, _ABSENT) != current_cfg.get(key, _ABSENT)
    ]
    if differing:
        details = "; ".join(
            f"{key}: saved {saved_cfg.get(key, _ABSENT)!r}, current {current_cfg.get(key, _ABSENT)!r}"
            for key in differing
        )
        raise ValueError(
            f"{owner}: the checkpoint's state was saved with another configuration ({details}); the saved "
            f"state means something else under the current one. Resume with {owner}(...) configured as in "
            "the run that wrote the checkpoint, or start a new fit without ckpt_path."
        )
    return [saved.index(t) for t in current]


def take_tasks(value: Tensor, order: Sequence[int], dims: Sequence[int] = (0,)) -> Tensor:
    """``value`` with its task dimensions ``dims`` reordered: entry ``i`` is saved entry ``order[i]``.

    ``dims=(0, 1)`` reorders both dimensions of a ``T × T`` matrix. Raises a :class:`ValueError` when a task
    dimension does not have one entry per task. Returns ``value`` itself when ``order`` is the identity.
    """
    order = [int(i) for i in order]
    for d in dims:
        if d >= value.dim() or value.shape[d] != len(order):
            raise ValueError(
                f"take_tasks: a tensor of shape {tuple(value.shape)} has no dimension {d} with one entry per "
                f"task ({len(order)} tasks): the state was written for a different number of tasks."
            )
    if order == list(range(len(order))):
        return value
    index = torch.tensor(order, dtype=torch.long, device=value.device)
    for d in dims:
        value = value.index_select(d, index)
    return value


def _plain(value: Any) -> Any:
    """Tuples → lists, recursively (a checkpoint round trip may turn one into the other)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
