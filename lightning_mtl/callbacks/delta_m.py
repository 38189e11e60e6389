"""Δm%: the multi-task model's average relative change against single-task baselines."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_mtl.metrics import as_float_dict, delta_m
from lightning_mtl.task import main_task_names


class DeltaM(Callback):
    """Logs ``val/delta_m`` (and ``test/delta_m``): Δm% of Maninis, Radosavovic & Kokkinos, "Attentive
    Single-Tasking of Multiple Tasks", CVPR 2019 (https://arxiv.org/abs/1904.08918).

    ``Δm% = (100/K) Σₖ (−1)^{δₖ} (M_{m,k} − M_{b,k}) / M_{b,k}``: the flat mean over the K baseline metrics
    (all metrics of all tasks) of the relative change against the single-task baseline ``M_{b,k}``, with
    ``δₖ = 1`` when higher is better. **Lower is better; negative means better than the single-task models**
    — the convention of the CAGrad, Nash-MTL and FAMO papers (a library that flips the sign or averages per
    task first reports different numbers). See :func:`lightning_mtl.metrics.delta_m`.

    Computed once per validation / test epoch from the epoch's task metrics (``val/<task>/<metric>``,
    already synchronised across ranks) and task losses, so it is identical on every rank.

    Only the **main** tasks count: baselines of auxiliary tasks (``Task(name, role="auxiliary")``), which are
    trained but are not results, are left out (with a warning at setup).

    Args:
        baselines: single-task results, ``{"<task>/<metric>": value}``; a metric is one of the task's
            ``metrics`` names, or ``loss`` for the task's epoch loss (``val/loss/<task>``, lower is better).
            Every key is checked against the model at setup.
        higher_is_better: direction overrides, ``{"<task>/<metric>": bool}``; by default the direction the
            task's metric declares (``loss``: lower is better).
    """

    def __init__(self, baselines: dict[str, float], higher_is_better: dict[str, bool] | None = None) -> None:
        super().__init__()
        if not isinstance(baselines, Mapping) or not baselines:
            raise ValueError(
                f"DeltaM: baselines must be a non-empty dict '<task>/<metric>' -> single-task value, got "
                f"{baselines!r}. Example: DeltaM({{'depth/loss': 0.52, 'seg/acc': 0.71}})."
            )
        for key, value in baselines.items():
            if not isinstance(key, str) or key.count("/") != 1:
                raise ValueError(f"DeltaM: baseline key {key!r} must look like '<task>/<metric>'.")
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or value == 0
                or not math.isfinite(value)
            ):
                raise ValueError(
                    f"DeltaM: baseline {key!r} = {value!r}; a relative change needs a finite, non-zero number."
                )
        self.baselines = {k: float(v) for k, v in baselines.items()}
        self.higher_is_better_overrides = dict(higher_is_better or {})
        unknown = sorted(set(self.higher_is_better_overrides) - set(self.baselines))
        if unknown:
            raise KeyError(f"DeltaM: higher_is_better names {unknown}, which have no baseline.")
        self.directions: dict[str, bool] = {}
        #: the main tasks of the module (set at setup): the tasks whose baselines count
        self.main_tasks: tuple[str, ...] | None = None
        #: the last value per stage (``{"val": ..., "test": ...}``)
        self.last: dict[str, float] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(baselines=sorted(self.baselines))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.directions = resolve_directions(pl_module, self.baselines, self.higher_is_better_overrides)
        self.main_tasks = main_task_names(getattr(pl_module, "tasks", ()))
        auxiliary = sorted(k for k in self.baselines if k.split("/", 1)[0] not in self.main_tasks)
        if auxiliary:
            if len(auxiliary) == len(self.baselines):
                raise ValueError(
                    f"DeltaM: every baseline {auxiliary} belongs to an auxiliary task; Δm% is computed on the main "
                    f"tasks {list(self.main_tasks)}: give their single-task baselines."
                )
            rank_zero_warn(
                f"DeltaM: baselines {auxiliary} belong to auxiliary tasks (Task(role='auxiliary')), which are not "
                "results: Δm% leaves them out.",
                category=UserWarning,
            )

    def on_task_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, values: Mapping[str, Any]
    ) -> None:
        """Called by :class:`~lightning_mtl.MultiTaskModule` with a stage's epoch metrics and losses."""
        if stage not in ("val", "test") or trainer.sanity_checking:
            return
        counted = [
            k for k in self.baselines if self.main_tasks is None or k.split("/", 1)[0] in self.main_tasks
        ]
        present = as_float_dict({k: values[k] for k in counted if k in values})
        if len(present) < len(counted):
            missing = sorted(set(counted) - set(present))
            raise KeyError(
                f"DeltaM: no {stage} value for baseline metric(s) {missing}; the module computed {sorted(values)}."
            )
        value = delta_m(present, {k: self.baselines[k] for k in counted}, self.directions)
        self.last[stage] = value
        pl_module.log(f"{stage}/delta_m", value, on_step=False, on_epoch=True, batch_size=1)


def resolve_directions(
    pl_module: Any, keys: Mapping[str, Any] | list[str], overrides: Mapping[str, bool] | None = None
) -> dict[str, bool]:
    """``{key: higher is better}`` for ``"<task>/<metric>"`` keys of a multi-task module (``loss``: False).

    Raises with the available keys when a task or metric is unknown.
    """
    overrides = dict(overrides or {})
    task_names = tuple(getattr(pl_module, "task_names", ()))
    if not task_names:
        raise TypeError(f"DeltaM needs a lightning_mtl.MultiTaskModule, got {type(pl_module).__name__}.")
    task_metrics = getattr(pl_module, "task_metrics", None)
    known = dict(task_metrics.higher_is_better) if task_metrics is not None else {}
    known.update({f"{n}/loss": False for n in task_names})
    directions = {}
    for key in keys:
        task = key.split("/", 1)[0]
        if task not in task_names:
            raise KeyError(
                f"DeltaM: baseline {key!r} names unknown task {task!r}; tasks: {list(task_names)}."
            )
        if key in overrides:
            directions[key] = bool(overrides[key])
        elif key in known:
            directions[key] = known[key]
        else:
            raise KeyError(
                f"DeltaM: baseline {key!r}: task {task!r} has no metric of that name; available: "
                f"{sorted(k for k in known if k.startswith(task + '/'))}."
            )
    return directions
