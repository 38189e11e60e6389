"""Dynamic Task Prioritization (Guo, Haque, Huang, Yeung & Fei-Fei, ECCV 2018).

Long because reading a torchmetrics metric's value on one batch, exactly under DDP, takes a class of its own
(:class:`_BatchKPI`) with its checks, beside the strategy.

Two parts: :class:`_BatchKPI` reads, at each training step, the value of a task's KPI metric on that step's
batch (from the module's train metrics, synchronised across ranks); :class:`DTP` keeps the moving average of
the KPIs and weights the losses with their focal weights (:mod:`lightning_mtl.functional.dtp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_mtl.functional.dtp import DTP_EPS, _weights, dtp_ema
from lightning_mtl.metrics import normalize_task_metrics
from lightning_mtl.step import StepContext
from lightning_mtl.strategies._loss_based import LossWeighting
from lightning_mtl.task_state import take_tasks

if TYPE_CHECKING:
    from torchmetrics import Metric

    from lightning_mtl.task import Task

#: A KPI computed a little outside [0, 1] by floating-point rounding is accepted (and clipped) within this.
_RANGE_TOLERANCE = 1e-6

_KPI_EXAMPLES = "accuracy, precision, recall, F1, IoU (JaccardIndex), AUROC, average precision"


def _number(name: str, value: Any, ok: Callable[[float], bool], bound: str) -> float:
    real = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not real or not ok(value):
        raise ValueError(f"DTP {name} must be {bound}, got {value!r}.")
    return float(value)


def _metric_states(metric: Metric) -> list[Metric]:
    """The metric and its sub-metrics (e.g. the operands of ``1 - metric``), each holding its own states."""
    from torchmetrics import Metric

    return [m for m in metric.modules() if isinstance(m, Metric)]


def _check_batch_readable(task: str, name: str, metric: Metric) -> None:
    """The per-batch value is the metric computed on (state after the batch − state before): states must be
    sums (tensors reduced by ``sum``) or concatenations (lists reduced by ``cat``)."""
    from torchmetrics.utilities.data import dim_zero_cat, dim_zero_sum

    for m in _metric_states(metric):
        for state, default in m._defaults.items():
            reduction = m._reductions.get(state)
            if (isinstance(default, Tensor) and reduction is dim_zero_sum) or (
                isinstance(default, list) and reduction is dim_zero_cat
            ):
                continue
            how = getattr(reduction, "__name__", repr(reduction))
            raise ValueError(
                f"DTP: the KPI of task {task!r}, metric {name!r} ({type(metric).__name__}), cannot be read per "
                f"training batch: its state {state!r} of {type(m).__name__} is reduced by {how}. DTP computes the "
                "KPI of each batch from the part of the metric state that batch added, which needs states that "
                "are summed or concatenated (reduce 'sum' or 'cat'), as in torchmetrics' classification metrics "
                f"({_KPI_EXAMPLES}). Name another metric of the task as its KPI (kpi={{{task!r}: ...}})."
            )


def _put(metric: Metric, name: str, value: Any) -> None:
    """Set a metric's state or bookkeeping attribute without ``nn.Module.__setattr__`` (they are plain attributes,
    never parameters, buffers or modules): a tenth of the cost, several times per task and step."""
    object.__setattr__(metric, name, value)


def _compute(probe: Metric, gathered: bool) -> Any:
    """The probe's value on its states. Summed states are already reduced over ranks: the metric's own
    ``compute`` then runs without torchmetrics' wrapper (its sync context, cache and copy of the value, three
    quarters of a small metric's compute); concatenated states go through the wrapper, which gathers them.
    (Sub-metrics of a compositional metric, e.g. ``1 - metric``, go through theirs, which do not sync.)"""
    return probe.compute() if gathered else type(probe).compute(probe)


def _stacked_kpi_classes() -> tuple[type, ...]:
    """The torchmetrics classes whose ``compute`` on their one-element summed states (``tp``, ``fp``, ``tn``,
    ``fn``) is elementwise (the binary reductions: a ``_safe_divide`` of sums of the states), so the KPIs of
    several tasks are computed at once on their states concatenated."""
    from torchmetrics.classification import (
        BinaryAccuracy,
        BinaryF1Score,
        BinaryFBetaScore,
        BinaryPrecision,
        BinaryRecall,
        BinarySpecificity,
    )

    return (BinaryAccuracy, BinaryF1Score, BinaryFBetaScore, BinaryPrecision, BinaryRecall, BinarySpecificity)


def _stack_key(metric: Metric) -> tuple[Any, ...] | None:
    """The group of the tasks whose KPIs are computed together with this one (the same class and the arguments
    its ``compute`` reads), or ``None`` when its KPI is computed alone (any other metric, a subclass, a
    compositional metric, ``multidim_average="samplewise"``)."""
    from torchmetrics.utilities.data import dim_zero_sum

    if type(metric) not in _stacked_kpi_classes() or getattr(metric, "multidim_average", None) != "global":
        return None
    for state, default in metric._defaults.items():
        if (
            not (isinstance(default, Tensor) and default.shape == (1,))
            or metric._reductions[state] is not dim_zero_sum
        ):
            return None
    return (
        type(metric),
        getattr(metric, "zero_division", None),
        getattr(metric, "beta", None),
        tuple(metric._defaults),
    )


class _KPIGroup(NamedTuple):
    """Tasks whose KPI metrics are computed at once (:func:`_stack_key`): their train metrics, their positions,
    one probe whose states are the tasks' states concatenated, and the states' names."""

    sources: list[Metric]
    index: Tensor
    probe: Metric
    states: tuple[str, ...]


class _BatchKPI:
    """Each task's KPI on the current training (micro-)batch, identical on every rank.

    The module updates its train metrics with each batch (``metric.update``; see
    :class:`~lightning_mtl.metrics.TaskMetrics`) before it calls the strategy; no forward value is kept. So at
    ``on_train_batch_start`` the KPI metric's state is copied, and in the strategy's ``backward`` a private
    clone (the *probe*) receives the difference ``state after − state before`` (new list entries for ``cat``
    states) and is computed. Under DDP the per-rank differences are summed (one all-reduce for all tasks'
    summed states) or concatenated (torchmetrics' own gather, forced on, for a metric with list states): that is
    the state of the union of the ranks' batches, so the KPI equals the single-process value on that union
    batch, on every rank.

    Tasks whose KPIs are binary stat-score metrics of one class and configuration (:func:`_stack_key`) share one
    probe holding their states side by side, computed once for all of them (the metric's reduction is
    elementwise): a few operations per step instead of a dozen per task.
    """

    def __init__(self, tasks: Sequence[str], metric_names: Sequence[str]) -> None:
        self.tasks = tuple(tasks)
        self.metric_names = tuple(metric_names)
        # the states before the batch: a copy of each tensor state, and each list state's length; per group, each
        # state of its tasks concatenated
        self._before: list[Tensor] | None = None
        self._lengths: list[int] = []
        self._group_before: list[list[Tensor]] = []
        # built once per TaskMetrics object (the module's metric objects persist; only their states change):
        # per task computed alone its probe (None for a task of a group); every tensor state as (train metric,
        # probe, state, summed over ranks by hand) and list state as (train metric, probe, state)
        self._owner: Any = None
        self._probes: list[Metric | None] = []
        self._groups: list[_KPIGroup] = []
        # every probe (sub-)metric, and whether its task is gathered
        self._targets: list[tuple[Metric, bool]] = []
        self._gathered: list[bool] = []  # per task: has list states, gathered over ranks by torchmetrics
        self._tensor_states: list[tuple[Metric, Metric, str, bool]] = []
        self._list_states: list[tuple[Metric, Metric, str]] = []

    def _bind(self, module: pl.LightningModule) -> None:
        task_metrics = getattr(module, "task_metrics", None)
        if task_metrics is None:
            raise RuntimeError("DTP: the module keeps no task metrics; DTP needs one KPI metric per task.")
        if task_metrics is self._owner:
            return
        metrics = [
            task_metrics.collection("train", task).__getitem__(name, copy_state=False)
            for task, name in zip(self.tasks, self.metric_names)
        ]
        keys = [_stack_key(metric) for metric in metrics]
        members: dict[tuple[Any, ...], list[int]] = {}
        for i, key in enumerate(keys):
            if key is not None:
                members.setdefault(key, []).append(i)
        self._groups = [
            _KPIGroup(
                [metrics[i] for i in index],
                torch.tensor(index),
                metrics[index[0]].clone(),
                tuple(metrics[index[0]]._defaults),
            )
            for index in members.values()
        ]
        self._probes = [None if key is not None else metric.clone() for metric, key in zip(metrics, keys)]
        self._targets, self._tensor_states, self._list_states, self._gathered = [], [], [], []
        for metric, probe in zip(metrics, self._probes):
            if probe is None:
                self._gathered.append(False)
                continue
            pairs = list(zip(_metric_states(metric), _metric_states(probe)))
            gathered = any(isinstance(d, list) for source, _ in pairs for d in source._defaults.values())
            self._gathered.append(gathered)
            self._targets.extend((target, gathered) for _, target in pairs)
            for source, target in pairs:
                for state, default in source._defaults.items():
                    if isinstance(default, list):
                        self._list_states.append((source, target, state))
                    else:
                        self._tensor_states.append((source, target, state, not gathered))
        self._owner = task_metrics

    def snapshot(self, module: pl.LightningModule) -> None:
        """Copy the KPI metrics' states before the batch updates them (a list state: its length). Metric states
        never require grad (torchmetrics updates them with grad disabled)."""
        self._bind(module)
        self._before = [getattr(source, state).clone() for source, _, state, _ in self._tensor_states]
        self._lengths = [len(getattr(source, state)) for source, _, state in self._list_states]
        self._group_before = [
            [torch.cat([getattr(m, state) for m in group.sources]) for state in group.states]
            for group in self._groups
        ]

    def reset(self) -> None:
        self._before = None
        self._owner = None
        self._probes, self._targets, self._gathered, self._groups = [], [], [], []
        self._tensor_states, self._list_states, self._group_before = [], [], []

    def read(self, module: pl.LightningModule, present: Sequence[bool] | None = None) -> Tensor:
        """The KPIs ``[T]`` (float64) of the batch whose update happened since :meth:`snapshot`; NaN for a task
        that ``present`` marks absent (partial labels: no labelled sample on any rank, so no metric update).

        (A collection member that shares its state with others, torchmetrics' compute groups, holds references
        to the group's states again after every ``MetricCollection.update``, so its states are the batch's.)
        """
        if self._before is None:
            raise RuntimeError(
                "DTP: no metric state was recorded before this training batch (on_train_batch_start did not run); "
                "DTP must be attached to the Trainer as a callback, Trainer(callbacks=[DTP(...)])."
            )
        # (probe's metric, state, batch part) to all-reduce by hand
        summed: list[tuple[Metric, str, Tensor]] = []
        for group, before in zip(self._groups, self._group_before):
            for state, old in zip(group.states, before):
                part = torch.cat([getattr(m, state) for m in group.sources]) - old
                _put(group.probe, state, part)
                summed.append((group.probe, state, part))
        for (source, target, state, by_hand), before in zip(self._tensor_states, self._before):
            part = getattr(source, state) - before
            _put(target, state, part)
            if by_hand:
                summed.append((target, state, part))
        for (source, target, state), length in zip(self._list_states, self._lengths):
            _put(target, state, list(getattr(source, state)[length:]))
        for target, gathered in self._targets:
            _put(target, "_update_count", 1)
            _put(target, "_computed", None)
            # a task with summed states only: reduced below, in one all-reduce for all tasks; with concatenated
            # states, torchmetrics gathers them at compute (forced on, whatever the metric's sync_on_compute)
            _put(target, "_to_sync", gathered)
        self._all_reduce(module, summed)
        values = [
            None
            if probe is None or (present is not None and not present[i])
            else _compute(probe, self._gathered[i])
            for i, probe in enumerate(self._probes)
        ]
        self._before = None
        return self._as_vector(values, [type(g.probe).compute(g.probe) for g in self._groups], present)

    @staticmethod
    def _all_reduce(module: pl.LightningModule, summed: list[tuple[Metric, str, Tensor]]) -> None:
        """Sum the batch parts of the summed states over ranks, in one all-reduce (float64: counts stay exact
        below 2⁵³); no-op on one process."""
        trainer = module.trainer
        if not summed or trainer.world_size <= 1:
            return
        device = summed[0][2].device
        flat = torch.cat([delta.reshape(-1).to(device, torch.float64) for _, _, delta in summed])
        flat = trainer.strategy.reduce(flat, reduce_op="sum")
        offset = 0
        for target, state, delta in summed:
            part = flat[offset : offset + delta.numel()].reshape(delta.shape)
            _put(target, state, part.to(delta.device, delta.dtype))
            offset += delta.numel()

    def _as_vector(self, values: list[Any], stacked: list[Tensor], present: Sequence[bool] | None) -> Tensor:
        """The KPIs ``[T]`` float64 from the tasks computed alone (``values``: ``None`` for an absent task or one
        of a group) and the groups' (``stacked``, one value per member, NaN where absent)."""
        device = next((v.device for v in [*stacked, *values] if isinstance(v, Tensor)), torch.device("cpu"))
        out = torch.full((len(self.tasks),), math.nan, dtype=torch.float64, device=device)
        for group, kpis in zip(self._groups, stacked):
            out[group.index.to(device)] = kpis.detach().reshape(-1).to(device, torch.float64)
        for i, (task, name, value) in enumerate(zip(self.tasks, self.metric_names, values)):
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.numel() != 1:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"DTP: the KPI of task {task!r} (metric {name!r}) returned {shape}, not one number; configure "
                    "the metric to return a scalar (e.g. average='micro' or 'macro')."
                )
            out[i] = value.detach().reshape(()).to(device, torch.float64)
        if present is not None and not all(present):  # the groups computed every member: absent ones are NaN
            mask = torch.tensor(list(present), dtype=torch.bool, device=device)
            out = torch.where(mask, out, torch.full_like(out, math.nan))
        return out


class DTP(LossWeighting):
    """Dynamic Task Prioritization: Guo, Haque, Huang, Yeung & Fei-Fei, "Dynamic Task Prioritization for
    Multitask Learning", ECCV 2018 (doi:10.1007/978-3-030-01270-0_17). The paper's method section was not
    reachable when this was written: the rule below is its task-level prioritisation as secondary sources state
    it (a focal loss ``FL(κ̄ₜ; γₜ)`` of a moving average ``κ̄ₜ`` of each task's KPI, weighting the task losses,
    ``L = Σₜ FL(κ̄ₜ; γₜ)·Lₜ``); the paper's equation numbers and default hyper-parameters are **not verified**
    (see ``alpha`` and ``gamma``).

    Each task declares a *key performance indicator* ``κᵢ ∈ [0, 1]``, higher is better (accuracy, precision,
    IoU, average precision): one of its torchmetrics metrics (``Task(name, metrics=...)``), named in ``kpi``.
    Each training step, with ``κᵢ`` the KPI on that step's batch:

    - moving average ``κ̄ᵢ ← α·κᵢ + (1 − α)·κ̄ᵢ`` (started at the first KPI seen, ``κ̄ᵢ = κᵢ``);
    - task-level focal weights ``wᵢ = FL(κ̄ᵢ; γᵢ) = −(1 − κ̄ᵢ)^γᵢ · log κ̄ᵢ``, with ``κ̄ᵢ`` clamped into
      ``[ε, 1 − ε]``: a task that performs worse gets a larger weight, one near ``κ = 1`` a weight near 0;
    - the update is ``∇ Σᵢ wᵢLᵢ`` (weights detached; **no normalisation**: the weights do not sum to T, so the
      effective learning rate changes with them). Neither LibMTL nor TorchJD 0.18 has DTP to compare with.

    Conventions (choices of this implementation):

    - The weights of a step come from the average **before** that step's KPI is folded in (the previous
      state); the first step, and any task whose KPI was never defined yet, has weight 1.
    - The KPI of a step is the metric computed on that step's batch only (not the epoch's running value): the
      module updates its train metrics with the batch first, and DTP computes the metric on the part of its
      state that the batch added. This needs metric states that are summed or concatenated (torchmetrics'
      classification metrics are); a metric that keeps running means (e.g. ``PearsonCorrCoef``) is refused at
      setup. Under DDP the batch parts are summed over ranks in one all-reduce per step (a metric with
      concatenated states, e.g. ``BinaryAUROC``, is gathered by torchmetrics), so the KPI is the
      single-process value on the union of the ranks' batches and identical on every rank: 2 ranks × B equal
      1 process × 2B. The extra cost per step is one metric ``compute`` per task (and that all-reduce).
    - A KPI outside ``[0, 1]`` (beyond a 1e-6 rounding tolerance) is an error naming the task, the metric and
      the value; a KPI that is NaN on a batch (undefined there) leaves that task's average unchanged.
    - A lower-is-better metric (MAE, an error rate) is not a KPI: map it into a higher-is-better score in
      ``[0, 1]`` yourself, e.g. ``metrics={"kpi": 1 - BinaryHammingDistance()}`` with
      ``higher_is_better={"kpi": True}`` (torchmetrics metric arithmetic) or a small custom ``Metric``.
    - Under gradient accumulation the average and the weights are updated per micro-batch (as the other loss
      strategies). The averages ``κ̄`` and the step count are saved in checkpoints by task name, with the KPI
      metric names (resuming with another KPI is an error); ``alpha``, ``gamma``, ``eps`` may change on resume.
    - Partial labels (``Task(partial=True)``): a task labelled on no rank in a step has weight 0, its KPI is not
      read and its average stays as it was (the other tasks' weights do not change: DTP does not normalise).
      A task labelled on some samples takes the KPI of its labelled samples: return its metric outputs for
      those samples only.
    - Only the paper's *task-level* prioritisation is implemented. Its *example-level* prioritisation (focal
      losses inside each task's loss, focusing parameter ``γ₀``) belongs to the user's ``task_losses``, e.g.
      ``torchvision.ops.sigmoid_focal_loss`` for a classification task.

    Example::

        tasks = [Task("cls", metrics={"acc": MulticlassAccuracy(num_classes=10)}),
                 Task("seg", metrics={"iou": MulticlassJaccardIndex(num_classes=21), "acc": ...})]
        trainer = L.Trainer(callbacks=[DTP(kpi={"seg": "iou"})])   # "cls" has one metric: its KPI by default
        trainer.fit(model)          # task_losses returns (losses, {task: (preds, target)})
        model.strategy.weights      # e.g. {"cls": 0.02, "seg": 0.35}: the worse task weighs more

    Args:
        kpi: ``{task: metric name}``, the metric of each task to use as its KPI. A task left out uses its only
            metric; a task with several metrics must be named here; every task must have a metric.
        alpha: ``α ∈ (0, 1]``, the weight of the newest KPI in the moving average (``1``: no averaging).
            Default 0.9 (**not verified** against the paper).
        gamma: ``γ >= 0``, the task-level focusing parameter: one number, or ``{task: γᵢ}`` naming every task.
            Default 2.0, the focal loss' default (Lin et al., ICCV 2017; **not verified** against DTP's paper).
        eps: ``ε ∈ (0, 0.5)``: each ``κ̄`` is clamped into ``[ε, 1 − ε]`` before the focal weight, which bounds
            the weights by ``−(1 − ε)^γ log ε`` (6.9 for ε = 1e-3).
    """

    supports_absent_tasks = True

    def __init__(
        self,
        kpi: Mapping[str, str] | None = None,
        alpha: float = 0.9,
        gamma: float | Mapping[str, float] = 2.0,
        eps: float = DTP_EPS,
    ) -> None:
        super().__init__()
        if kpi is not None:
            if not isinstance(kpi, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in kpi.items()
            ):
                raise ValueError(
                    f"DTP kpi must map task names to metric names, e.g. kpi={{'seg': 'iou'}}, got {kpi!r}."
                )
        self.kpi: dict[str, str] | None = None if kpi is None else dict(kpi)
        self.alpha = _number("alpha", alpha, lambda a: 0 < a <= 1, "in (0, 1]")
        if isinstance(gamma, Mapping):
            self.gamma: float | dict[str, float] = {
                str(t): _number(f"gamma[{t!r}]", g, lambda v: v >= 0, ">= 0 and finite")
                for t, g in gamma.items()
            }
        else:
            self.gamma = _number("gamma", gamma, lambda v: v >= 0, ">= 0 and finite")
        self.eps = _number("eps", eps, lambda e: 0 < e < 0.5, "in (0, 0.5)")
        self._kpi_names: dict[str, str] = {}
        self._gamma: Tensor | None = None
        self._reader: _BatchKPI | None = None
        self._kpi_ema: Tensor | None = None
        self._count = 0
        self._warned_nan: set[str] = set()

    # ------------------------------------------------------------------ binding: one usable KPI per task
    @override
    def bind(self, tasks: Sequence[Task]) -> None:
        super().bind(tasks)
        names = [t.name for t in tasks]
        unknown = sorted(set(self.kpi or {}) - set(names))
        if unknown:
            raise ValueError(f"DTP kpi names unknown task(s) {unknown}; the module's tasks are {names}.")
        if isinstance(self.gamma, dict):
            missing, extra = [t for t in names if t not in self.gamma], sorted(set(self.gamma) - set(names))
            if missing or extra:
                raise ValueError(
                    f"DTP gamma={self.gamma!r} must name every task exactly once (tasks {names}); missing {missing}, "
                    f"unknown {extra}. Pass one number for all tasks, or a value for each."
                )
            gammas = [self.gamma[t] for t in names]
        else:
            gammas = [self.gamma] * len(names)
        self._kpi_names = {t.name: _resolve_kpi(t, (self.kpi or {}).get(t.name)) for t in tasks}
        self._gamma = torch.tensor(gammas, dtype=torch.float64)
        self._reader = _BatchKPI(names, [self._kpi_names[n] for n in names])

    # ------------------------------------------------------------------ the step
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._reader is not None:
            self._reader.snapshot(pl_module)

    @override
    def backward(self, ctx: StepContext) -> None:
        if self._reader is None:
            raise RuntimeError("DTP is not attached to a MultiTaskModule yet.")
        kpi = self._checked(self._reader.read(ctx.module, ctx.present), ctx.present)
        weights = self.step_weights(kpi, ctx.present).to(device=ctx.losses.device, dtype=ctx.losses.dtype)
        ctx.backward((weights * ctx.losses).sum())
        self._weights = weights

    def step_weights(self, kpi: Tensor, present: Sequence[bool] | None = None) -> Tensor:
        """This step's weights ``[T]`` (float64) from the current averages, then fold ``kpi`` ``[T]`` (this step's
        KPIs in ``[0, 1]``; NaN: undefined on this batch) into the averages. ``present`` (partial labels: which
        tasks this step labels; ``None``: all): an absent task's weight is 0 and its average stays as it was."""
        if self._gamma is None:
            raise RuntimeError("DTP is not attached to a MultiTaskModule yet.")
        if self._kpi_ema is None:
            weights = torch.ones(self.num_tasks, dtype=torch.float64)
        else:  # the arguments were checked at bind: the formula alone, as dtp_weights
            weights = _weights(self._kpi_ema, self._gamma.to(self._kpi_ema), self.eps)
        kpi = kpi.double()
        if present is not None:
            mask = torch.tensor(list(present), dtype=torch.bool, device=kpi.device)
            kpi = torch.where(mask, kpi, torch.full_like(kpi, math.nan))  # NaN: the average is left unchanged
            weights = weights * mask.to(weights.device, weights.dtype)
        self._kpi_ema = dtp_ema(self._kpi_ema, kpi, self.alpha)
        self._count += 1
        return weights

    def compute_weights(self, losses: Tensor) -> Tensor:
        raise NotImplementedError(
            "DTP weights come from the tasks' KPIs, not from the losses: see step_weights."
        )

    def _checked(self, kpi: Tensor, present: Sequence[bool] | None = None) -> Tensor:
        values = kpi.tolist()  # one host synchronisation for all tasks
        for i, (task, value) in enumerate(zip(self.task_names, values)):
            name = self._kpi_names[task]
            if present is not None and not present[i]:
                continue  # absent this step (partial labels): its KPI is not read
            if math.isnan(value):
                if task not in self._warned_nan:
                    self._warned_nan.add(task)
                    rank_zero_warn(
                        f"DTP: the KPI of task {task!r} (metric {name!r}) is NaN on a training batch (undefined "
                        "there); its moving average is left unchanged for such batches."
                    )
                continue
            if not (-_RANGE_TOLERANCE <= value <= 1 + _RANGE_TOLERANCE):
                raise ValueError(
                    f"DTP: the KPI of task {task!r} (metric {name!r}) is {value} on this training batch, outside "
                    f"[0, 1]. A KPI must be a score in [0, 1] where higher is better ({_KPI_EXAMPLES}); declare "
                    "such a metric for the task, or map this one into [0, 1] (e.g. metric arithmetic "
                    "1 - metric for an error rate) and name it in DTP(kpi=...)."
                )
        return kpi.clamp(0.0, 1.0)  # NaN stays NaN

    # ------------------------------------------------------------------ state and logs
    @override
    def reset_state(self) -> None:
        super().reset_state()
        self._kpi_ema = None
        self._count = 0
        self._warned_nan = set()
        if self._reader is not None:
            self._reader.reset()

    @property
    def kpi_average(self) -> dict[str, float] | None:
        """The moving average ``κ̄`` of each task's KPI (NaN: none seen yet), or ``None`` before the first step."""
        if self._kpi_ema is None:
            return None
        return dict(zip(self.task_names, self._kpi_ema.cpu().tolist()))

    @override
    def extra_metrics(self) -> dict[str, Tensor]:
        if self._kpi_ema is None:
            return {}
        ema = self._kpi_ema.float()
        return {f"train/dtp/kpi/{n}": ema[i] for i, n in enumerate(self.task_names)}

    @override
    def state_config(self) -> dict[str, Any]:
        # the averages mean "the average of this metric": another KPI metric on resume is an error
        return {"kpi": dict(self._kpi_names)}

    @override
    def task_state(self) -> dict[str, Any]:
        return {"kpi_ema": None if self._kpi_ema is None else self._kpi_ema.cpu(), "count": self._count}

    @override
    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        ema = state.get("kpi_ema")
        self._kpi_ema = None if ema is None else take_tasks(ema, order).double()
        self._count = int(state["count"])


def _resolve_kpi(task: Task, requested: str | None) -> str:
    """The name of ``task``'s KPI metric, checked: it exists, is higher-is-better and readable per batch."""
    if task.metrics is None:
        raise ValueError(
            f"DTP: task {task.name!r} declares no metrics, so it has no KPI. Give it a metric with values in [0, 1], "
            f"higher is better ({_KPI_EXAMPLES}), e.g. Task({task.name!r}, metrics={{'acc': "
            "MulticlassAccuracy(num_classes=...)}), and return its (preds, target) from task_losses."
        )
    named, directions = normalize_task_metrics(task.name, task.metrics, task.higher_is_better)
    if requested is None:
        if len(named) != 1:
            raise ValueError(
                f"DTP: task {task.name!r} has {len(named)} metrics {sorted(named)}; name its KPI, e.g. "
                f"DTP(kpi={{{task.name!r}: {sorted(named)[0]!r}}})."
            )
        requested = next(iter(named))
    elif requested not in named:
        raise ValueError(
            f"DTP: kpi names metric {requested!r} for task {task.name!r}, which has no such metric; its metrics "
            f"are {sorted(named)}."
        )
    if not directions[requested]:
        raise ValueError(
            f"DTP: metric {requested!r} of task {task.name!r} ({type(named[requested]).__name__}) is lower-is-better, "
            f"so it is not a KPI: DTP needs a score in [0, 1] where higher is better ({_KPI_EXAMPLES}). Map it "
            f"yourself, e.g. metrics={{'kpi': 1 - ErrorRateMetric()}} with higher_is_better={{'kpi': True}}, or "
            "name another metric."
        )
    _check_batch_readable(task.name, requested, named[requested])
    return requested


__all__ = ["DTP"]
