"""Per-task metrics and Δm%.

* :class:`TaskMetrics` is the plumbing between ``Task(name, metrics=...)`` and the logs: one clone of each
  task's torchmetrics metrics per stage (train / val / test), updated from the ``(preds, target)`` pairs that
  :meth:`~lightning_mtl.MultiTaskModule.task_losses` may return next to its losses, computed (and synchronised
  across ranks by torchmetrics itself) once per epoch, logged as ``<stage>/<task>/<metric>``.
* :func:`delta_m` is the pure Δm% of Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple
  Tasks", CVPR 2019 (https://arxiv.org/abs/1904.08918), in the convention of the CAGrad, Nash-MTL and FAMO
  papers: the flat mean over all K metrics of all tasks of the sign-corrected relative change against the
  single-task baselines, ``Δm% = (100/K) Σₖ (−1)^{δₖ} (M_{m,k} − M_{b,k}) / M_{b,k}`` with ``δₖ = 1`` when
  higher is better. Lower is better; negative means better than the single-task baselines.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from lightning_mtl.task import Task

__all__ = ["STAGES", "TaskMetrics", "as_float_dict", "delta_m", "normalize_task_metrics", "split_task_output"]

#: the stages metrics are kept for
STAGES = ("train", "val", "test")

_VALID_METRIC_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def normalize_task_metrics(
    task: str, metrics: Any, higher_is_better: Mapping[str, bool] | None = None
) -> tuple[dict[str, Any], dict[str, bool]]:
    """Validate a task's ``metrics`` spec; return ``({metric name: Metric}, {metric name: higher is better})``.

    ``metrics`` may be a torchmetrics ``Metric`` (named after its class), a ``MetricCollection`` (its keys),
    a mapping name → ``Metric``, or a list of ``Metric`` objects (named after their classes). The direction of
    each metric is its ``higher_is_better`` attribute unless ``higher_is_better`` overrides it; a metric that
    declares neither is an error (Δm% and the summaries need it).
    """
    from torchmetrics import Metric, MetricCollection

    if isinstance(metrics, MetricCollection):
        named = dict(metrics.items(keep_base=False, copy_state=False))
    elif isinstance(metrics, Metric):
        named = {type(metrics).__name__: metrics}
    elif isinstance(metrics, Mapping):
        named = dict(metrics)
    elif isinstance(metrics, Sequence) and not isinstance(metrics, str):
        named = {}
        for m in metrics:
            name = type(m).__name__
            if name in named:
                raise ValueError(
                    f"Task {task!r}: two metrics of class {name} in metrics=[...]; pass a dict to name them, "
                    f"e.g. metrics={{'{name.lower()}_1': ..., '{name.lower()}_2': ...}}."
                )
            named[name] = m
    else:
        raise TypeError(
            f"Task {task!r}: metrics must be a torchmetrics Metric, a MetricCollection, a dict name -> Metric or "
            f"a list of Metrics, got {type(metrics).__name__}: {metrics!r}."
        )
    if not named:
        raise ValueError(f"Task {task!r}: metrics is empty; pass None for a task without metrics.")
    for name, m in named.items():
        if not isinstance(name, str) or not _VALID_METRIC_NAME.match(name):
            raise ValueError(
                f"Task {task!r}: metric name {name!r} is invalid: use letters, digits, '_' or '-' (it becomes "
                f"part of the log key '<stage>/{task}/<metric>')."
            )
        if not isinstance(m, Metric):
            raise TypeError(
                f"Task {task!r}: metric {name!r} must be a torchmetrics.Metric, got {type(m).__name__}: {m!r}."
            )
    overrides = dict(higher_is_better or {})
    unknown = sorted(set(overrides) - set(named))
    if unknown:
        raise KeyError(
            f"Task {task!r}: higher_is_better names unknown metric(s) {unknown}; the task's metrics are "
            f"{sorted(named)}."
        )
    directions: dict[str, bool] = {}
    for name, m in named.items():
        value = overrides.get(name, getattr(m, "higher_is_better", None))
        if not isinstance(value, bool):
            raise ValueError(
                f"Task {task!r}: metric {name!r} ({type(m).__name__}) does not declare whether higher is better "
                f"(higher_is_better={value!r}); pass Task({task!r}, ..., higher_is_better={{{name!r}: True}}) "
                "or False."
            )
        directions[name] = value
    return named, directions


def split_task_output(output: Any) -> tuple[Any, Mapping[str, Any] | None]:
    """Split what ``task_losses`` returned into ``(losses, outputs)``.

    ``task_losses`` returns either the losses mapping alone, or a pair ``(losses, outputs)`` where ``outputs``
    maps task name → ``(preds, target)`` for the tasks' metrics.
    """
    if isinstance(output, tuple):
        if len(output) != 2:
            raise TypeError(
                f"task_losses returned a tuple of {len(output)} items; return either {{task: loss}} or "
                "({task: loss}, {task: (preds, target)})."
            )
        losses, outputs = output
        if outputs is not None and not isinstance(outputs, Mapping):
            raise TypeError(
                "task_losses returned (losses, outputs) with outputs of type "
                f"{type(outputs).__name__}; outputs must map task name -> (preds, target)."
            )
        return losses, outputs
    return output, None


class TaskMetrics(nn.Module):
    """The per-stage clones of every task's metrics (a submodule of the module: moves with it to the device).

    Metric state is reduced across ranks by torchmetrics when :meth:`compute` runs (each metric's
    ``dist_reduce_fx``), so every rank gets the global value; nothing is synchronised per step.
    """

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        from torchmetrics import MetricCollection

        self.task_names: tuple[str, ...] = tuple(t.name for t in tasks if t.metrics is not None)
        #: tasks that may have no output in a batch (``Task(partial=True)``)
        self.partial_tasks: frozenset[str] = frozenset(t.name for t in tasks if t.partial)
        #: ``"<task>/<metric>" -> True`` when higher is better
        self.higher_is_better: dict[str, bool] = {}
        self._metric_names: dict[str, tuple[str, ...]] = {}
        stages: dict[str, nn.ModuleDict] = {}
        per_task: dict[str, dict[str, Any]] = {}
        for t in tasks:
            if t.metrics is None:
                continue
            named, directions = normalize_task_metrics(t.name, t.metrics, t.higher_is_better)
            per_task[t.name] = named
            self._metric_names[t.name] = tuple(named)
            self.higher_is_better.update({f"{t.name}/{m}": d for m, d in directions.items()})
        for stage in STAGES:
            stages[_stage_key(stage)] = nn.ModuleDict(
                {
                    _key(i): MetricCollection({m: metric.clone() for m, metric in per_task[name].items()})
                    for i, name in enumerate(self.task_names)
                }
            )
        # module names cannot contain '.', task names can: index the collections by position
        self.stages = nn.ModuleDict(stages)
        self._updated: dict[tuple[str, int], bool] = {(stage, 0): False for stage in STAGES}

    def collection(self, stage: str, task: str, dataloader_idx: int = 0) -> Any:
        """The ``MetricCollection`` of ``task`` for ``stage`` (and evaluation dataloader ``dataloader_idx``)."""
        return self._stage(stage, dataloader_idx)[_key(self.task_names.index(task))]

    def _stage(self, stage: str, dataloader_idx: int = 0) -> nn.ModuleDict:
        """The stage's collections; a further evaluation dataloader gets its own clones on first use."""
        key = _stage_key(stage, dataloader_idx)
        if key not in self.stages:
            first = self.stages[_stage_key(stage)]
            self.stages[key] = nn.ModuleDict({k: c.clone() for k, c in first.items()})
            for collection in self.stages[key].values():
                collection.reset()
        return self.stages[key]

    def update(self, stage: str, outputs: Mapping[str, Any] | None, dataloader_idx: int = 0) -> None:
        """Update ``stage``'s metrics from ``{task: (preds, target)}`` (predictions are detached); each
        evaluation dataloader has its own metric state."""
        if outputs is None:
            raise ValueError(
                f"Tasks {list(self.task_names)} declare metrics, but task_losses returned only the losses. Return "
                "(losses, outputs) with outputs = {task: (preds, target)} for these tasks."
            )
        unknown = sorted(set(outputs) - set(self.task_names), key=str)
        if unknown:
            raise KeyError(
                f"task_losses returned outputs for {unknown}, which declare no metrics; tasks with metrics: "
                f"{list(self.task_names)}. Add metrics=... to their Task or drop them from the outputs."
            )
        for i, name in enumerate(self.task_names):
            if outputs.get(name) is None and name in self.partial_tasks:
                continue  # a partial task without labels in this batch: nothing to update
            if name not in outputs:
                raise KeyError(
                    f"task {name!r} declares metrics {list(self._metric_names[name])} but task_losses returned no "
                    f"output for it; add {name!r}: (preds, target) to the outputs it returns."
                )
            pair = outputs[name]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(
                    f"task {name!r}: the output for its metrics must be a pair (preds, target), got "
                    f"{type(pair).__name__}."
                )
            preds, target = pair
            if isinstance(preds, Tensor):
                preds = preds.detach()
            self._stage(stage, dataloader_idx)[_key(i)].update(preds, target)
        self._updated[(stage, dataloader_idx)] = True

    def compute(self, stage: str, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{"<task>/<metric>": value}`` for ``stage`` (synchronised across ranks), then reset the stage.

        Empty when the stage (that dataloader's metrics) saw no update this epoch.
        """
        if not self._updated.get((stage, dataloader_idx), False):
            return {}
        values: dict[str, Tensor] = {}
        for i, name in enumerate(self.task_names):
            collection = self._stage(stage, dataloader_idx)[_key(i)]
            if name in self.partial_tasks:  # possibly no labelled sample this epoch (on this rank or any)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
                    computed = collection.compute()
                computed = {
                    m: v
                    for m, v in computed.items()
                    if not (isinstance(v, Tensor) and v.numel() == 1 and v.isnan())
                }
            else:
                computed = collection.compute()
            for metric, value in computed.items():
                if not isinstance(value, Tensor) or value.numel() != 1:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(
                        f"task {name!r}: metric {metric!r} returned {shape}, not a scalar; configure it to return "
                        "one number (e.g. average='macro') so it can be logged."
                    )
                values[f"{name}/{metric}"] = value.reshape(()).float()
            collection.reset()
        self._updated[(stage, dataloader_idx)] = False
        return values

    def reset(self, stage: str) -> None:
        for key, collections in self.stages.items():
            if key == _stage_key(stage) or key.startswith(_stage_key(stage) + "_dl"):
                for collection in collections.values():
                    collection.reset()
        for key in self._updated:
            if key[0] == stage:
                self._updated[key] = False


def _key(index: int) -> str:
    return f"t{index}"


def _stage_key(stage: str, dataloader_idx: int = 0) -> str:
    # "train" would shadow nn.Module.train; dataloader 0 keeps the plain name
    return f"{stage}_metrics" if dataloader_idx == 0 else f"{stage}_metrics_dl{dataloader_idx}"


def delta_m(
    values: Mapping[str, float | Tensor],
    baselines: Mapping[str, float],
    higher_is_better: Mapping[str, bool],
    tasks: Collection[str] | None = None,
) -> float:
    """Δm% of a multi-task model against single-task baselines (Maninis et al. 2019).

    ``Δm% = (100/K) Σₖ (−1)^{δₖ} (M_{m,k} − M_{b,k}) / M_{b,k}`` over the K keys of ``baselines`` (a flat mean
    over every metric of every task), ``δₖ = 1`` when higher is better. **Lower is better**; negative means the
    multi-task model beats the single-task baselines on average (the CAGrad / Nash-MTL / FAMO convention).

    Args:
        values: the multi-task model's metrics, ``"<task>/<metric>" -> value`` (extra keys are ignored).
        baselines: the single-task baselines ``M_{b,k}``, same keys; none may be 0.
        higher_is_better: direction of each key of ``baselines``.
        tasks: the tasks that count (``None``: all). Pass the **main** tasks (``main_task_names(module.tasks)``):
            auxiliary tasks (``Task(role="auxiliary")``) are trained but are not results, so their baselines
            are left out.
    """
    if tasks is not None:
        keep = set(tasks)
        baselines = {k: v for k, v in baselines.items() if k.split("/", 1)[0] in keep}
        if not baselines:
            raise ValueError(
                f"delta_m: no baseline metric belongs to the tasks {sorted(keep)} (the main tasks); give baselines "
                "'<task>/<metric>' for at least one of them."
            )
    if not baselines:
        raise ValueError("delta_m needs at least one baseline metric, got an empty baselines mapping.")
    total = 0.0
    for key, base in baselines.items():
        if key not in values:
            raise KeyError(f"delta_m: no value for baseline metric {key!r}; available: {sorted(values)}.")
        if key not in higher_is_better:
            raise KeyError(
                f"delta_m: direction of {key!r} unknown; pass higher_is_better={{{key!r}: True or False}}."
            )
        base = float(base)
        if base == 0.0 or not math.isfinite(base):
            raise ValueError(
                f"delta_m: the baseline of {key!r} is {base}; a relative change needs a finite, non-zero baseline."
            )
        value = values[key]
        value = float(value.detach().cpu()) if isinstance(value, Tensor) else float(value)
        sign = -1.0 if higher_is_better[key] else 1.0
        total += sign * (value - base) / base
    return 100.0 * total / len(baselines)


def as_float_dict(values: Mapping[str, Any]) -> dict[str, float]:
    """``{key: float(value)}`` for a mapping of tensors / numbers (one host sync per value)."""
    return {k: float(v.detach().cpu()) if isinstance(v, Tensor) else float(v) for k, v in values.items()}
