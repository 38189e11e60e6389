"""Per-task preference vectors given by the user as a sequence or a ``task -> value`` mapping."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

Preference = Sequence[float] | Mapping[str, float] | None


def check_preference(preference: Preference, owner: str) -> None:
    """Validate the values (finite, > 0) at construction; task names are checked by :func:`preference_tensor`."""
    if preference is None:
        return
    values = list(preference.values()) if isinstance(preference, Mapping) else list(preference)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{owner} preference values must be finite numbers > 0, got {preference!r}.")


def preference_tensor(preference: Preference, task_names: Sequence[str], owner: str) -> Tensor | None:
    """The preference as a ``[T]`` tensor in task order (``None`` stays ``None``: the method's default)."""
    if preference is None:
        return None
    if isinstance(preference, Mapping):
        unknown = sorted(set(preference) - set(task_names))
        missing = [t for t in task_names if t not in preference]
        if unknown or missing:
            raise ValueError(
                f"{owner} preference must give one value per task {list(task_names)}; unknown: {unknown}, "
                f"missing: {missing}."
            )
        return torch.tensor([float(preference[t]) for t in task_names], dtype=torch.float64)
    values = list(preference)
    if len(values) != len(task_names):
        raise ValueError(
            f"{owner} preference has {len(values)} values for {len(task_names)} tasks {list(task_names)}."
        )
    return torch.tensor([float(v) for v in values], dtype=torch.float64)
