"""Task specifications: the registry a :class:`~lightning_mtl.MultiTaskModule` is built from."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

TaskKind = Literal["regression", "classification"]
TaskRole = Literal["main", "auxiliary"]

_VALID_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


@dataclass(frozen=True)
class Task:
    """One task of a multi-task model.

    Args:
        name: unique name; it appears in every log key (``train/loss/<name>``), so it may contain only
            letters, digits, ``_``, ``-`` and ``.``.
        weight: static weight of the task, used by :class:`~lightning_mtl.strategies.StaticWeighting` when
            it is given no explicit weights, and by the default strategy when no strategy is attached.
        kind: ``"regression"`` or ``"classification"``; methods whose rule depends on the likelihood (e.g.
            :class:`~lightning_mtl.strategies.UncertaintyWeighting`) read it.
        metrics: optional torchmetrics metric(s) for this task: a ``Metric``, a ``MetricCollection``, a dict
            name -> ``Metric`` or a list of ``Metric``s. The module keeps one clone per stage and logs
            ``train/<name>/<metric>``, ``val/<name>/<metric>``, ``test/<name>/<metric>`` once per epoch from the
            ``(preds, target)`` pairs that ``task_losses`` returns next to the losses (see
            :meth:`~lightning_mtl.MultiTaskModule.task_losses`).
        higher_is_better: per-metric override of the metric's own ``higher_is_better`` attribute, e.g.
            ``{"mae": False}``; required for a metric that does not declare it (Δm% needs every direction).
        partial: the task is labelled on only some batches: ``task_losses`` may leave it out (or return
            ``None``) on a batch without its labels, and the task is then absent for the step (weight 0, the
            strategy's state for it untouched). Samples labelled within a batch: return
            :func:`~lightning_mtl.masked_mean` (for any task). Undeclared tasks must be returned every step.
        role: ``"main"`` (default) or ``"auxiliary"``. An auxiliary task is trained (its loss reaches the
            strategy like any other) but is not a result: Δm% (:class:`~lightning_mtl.callbacks.DeltaM`),
            :class:`~lightning_mtl.callbacks.MTLSummary` and ``lightning-mtl compare``'s table use the main tasks
            only, and :class:`~lightning_mtl.callbacks.TaskAffinity` reports auxiliary → main affinity. The
            auxiliary-learning strategies (``GCS``, ``OLAUX``, ``HydaLearn``) weight auxiliary tasks by how much they
            help the main ones. A model needs at least one main task.
    """

    name: str
    weight: float = 1.0
    kind: TaskKind = "regression"
    metrics: Any = field(default=None, compare=False)
    higher_is_better: Mapping[str, bool] | None = field(default=None, compare=False)
    partial: bool = False
    role: TaskRole = "main"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _VALID_NAME.match(self.name):
            raise ValueError(
                f"Task name {self.name!r} is invalid: use a non-empty string of letters, digits, '_', '-' "
                "or '.' (it becomes part of log keys such as 'train/loss/<name>')."
            )
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"Task {self.name!r}: weight must be a finite number >= 0, got {self.weight!r}.")
        if not isinstance(self.partial, bool):
            raise ValueError(f"Task {self.name!r}: partial must be True or False, got {self.partial!r}.")
        if self.role not in ("main", "auxiliary"):
            raise ValueError(
                f"Task {self.name!r}: role must be 'main' or 'auxiliary', got {self.role!r}. An auxiliary task is "
                "trained but not reported as a result (Task(name, role='auxiliary'))."
            )
        if self.kind not in ("regression", "classification"):
            raise ValueError(
                f"Task {self.name!r}: kind must be 'regression' or 'classification', got {self.kind!r}."
            )
        # --- metrics validation (lightning_mtl.metrics) ---
        if self.higher_is_better is not None and self.metrics is None:
            raise ValueError(
                f"Task {self.name!r}: higher_is_better={dict(self.higher_is_better)!r} given without metrics; pass "
                "metrics=... too, or drop higher_is_better."
            )
        if self.metrics is not None:
            from lightning_mtl.metrics import normalize_task_metrics

            normalize_task_metrics(self.name, self.metrics, self.higher_is_better)


def build_tasks(tasks: Sequence[str | Task]) -> tuple[Task, ...]:
    """Turn a sequence of names and/or :class:`Task` specs into a validated tuple of tasks."""
    if isinstance(tasks, (str, Task)) or not isinstance(tasks, Sequence):
        raise TypeError(
            f"tasks must be a list of task names or Task objects, got {type(tasks).__name__}: {tasks!r}. "
            "Example: tasks=['depth', 'segmentation']."
        )
    built = []
    for t in tasks:
        if isinstance(t, Task):
            built.append(t)
        elif isinstance(t, str):
            built.append(Task(t))
        else:
            raise TypeError(f"Each task must be a name (str) or a Task, got {type(t).__name__}: {t!r}.")
    if not built:
        raise ValueError("tasks is empty: a MultiTaskModule needs at least one task.")
    names = [t.name for t in built]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Task names must be unique; duplicated: {duplicates}.")
    if all(t.role == "auxiliary" for t in built):
        raise ValueError(
            f"Every task is auxiliary ({names}): a model needs at least one main task, the one(s) its results are "
            "reported on. Declare it with Task(name) or Task(name, role='main')."
        )
    return tuple(built)


def main_task_names(tasks: Sequence[Any]) -> tuple[str, ...]:
    """Names of the main tasks among ``tasks`` (:class:`Task` objects; a plain name counts as a main task)."""
    return tuple(t if isinstance(t, str) else t.name for t in tasks if getattr(t, "role", "main") == "main")


def auxiliary_task_names(tasks: Sequence[Any]) -> tuple[str, ...]:
    """Names of the auxiliary tasks among ``tasks`` (:class:`Task` objects)."""
    return tuple(t.name for t in tasks if getattr(t, "role", "main") == "auxiliary")
