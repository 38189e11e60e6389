"""Homoscedastic uncertainty weighting (Kendall et al. 2018) and its positive-regulariser variant."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_mtl.functional.loss_weighting import (
    uncertainty_objective,
    uncertainty_objective_grad,
    uncertainty_weights,
)
from lightning_mtl.strategies._learnable import LearnableParameters, OptimizerChoice
from lightning_mtl.strategies._loss_based import LossWeighting, present_index, present_mask
from lightning_mtl.strategies.base import StepContext
from lightning_mtl.task import TaskKind

_FACTOR = {"regression": 0.5, "classification": 1.0}


class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
    for Scene Geometry and Semantics", CVPR 2018 (https://arxiv.org/abs/1705.07115).

    ``regularizer="log"`` (the paper, eqs. 7 and 10) learns ``sᵢ = log σᵢ²`` per task and minimises
    ``Σ cᵢ·exp(−sᵢ)·Lᵢ + ½sᵢ`` with ``cᵢ = ½`` for a regression task (Gaussian likelihood) and ``cᵢ = 1``
    for a classification task (softmax likelihood); the task kind comes from :attr:`Task.kind` unless
    ``task_kinds`` overrides it. The task weight is ``cᵢ·exp(−sᵢ)``; at the optimum ``exp(sᵢ) = 2cᵢLᵢ``, so
    the weight tends to ``1/(2Lᵢ)``. (Many ports use ``exp(−s)L + s`` for every task: same optimum up to
    the factor; this class follows the paper.) The objective can be negative.

    ``regularizer="positive"`` is Liebel & Körner, "Auxiliary Tasks in Multi-task Learning", 2018
    (https://arxiv.org/abs/1805.06334): learns ``cᵢ`` (init 1) and minimises ``Σ Lᵢ/(2cᵢ²) + ln(1 + cᵢ²)``,
    the same form for every task, whose regulariser is never negative.

    The learnable parameters are stepped by a private optimizer (see ``optimizer``/``lr``) on the gradient
    of the objective at the rank-averaged losses: exact under DDP, untouched by AMP loss scaling and weight
    decay. They are saved in the checkpoint with the optimizer's state, by task name, with the regulariser
    and the task kinds (resuming under another one is an error).

    Partial labels: the objective is a sum of independent per-task terms, so a step with absent tasks uses the
    present tasks' terms only (no renormalisation; the paper's objective for the tasks that have data). An
    absent task has weight 0, its term (regulariser included) is left out of the objective and of
    ``train/loss``, and its parameter gets no gradient: when no micro-batch of the accumulation window labels
    it, its ``sᵢ`` and its entries of the private optimizer's state (Adam's moments, SGD's momentum) are left
    bit-for-bit untouched by the step (only the optimizer's shared step count, Adam's bias correction, counts
    it). :attr:`weights` reports 0 for the tasks absent at the last step.

    Args:
        regularizer: ``"log"`` (Kendall et al.) or ``"positive"`` (Liebel & Körner).
        init: initial value of every learnable parameter; default ``0.0`` for ``sᵢ`` (σ² = 1) and ``1.0``
            for ``cᵢ``.
        task_kinds: optional ``task -> "regression" | "classification"`` overriding :attr:`Task.kind`.
        bounds: optional ``(low, high)`` clamp of the learnable parameters after each step: an overfitting
            task drives ``sᵢ → −∞`` (its weight explodes); ``(-5, 5)`` is a common guard.
        optimizer: ``"match"`` (same optimizer class and settings as the model's first optimizer, weight
            decay 0), ``"adam"`` or ``"sgd"``.
        lr: learning rate of the learnable parameters; ``None`` follows the model's learning rate.
    """

    #: partial labels: absent tasks' terms are left out, their parameters and optimizer state untouched
    supports_absent_tasks = True

    def __init__(
        self,
        regularizer: Literal["log", "positive"] = "log",
        init: float | None = None,
        task_kinds: Mapping[str, TaskKind] | None = None,
        bounds: tuple[float, float] | None = None,
        optimizer: OptimizerChoice = "match",
        lr: float | None = None,
    ) -> None:
        super().__init__()
        if regularizer not in ("log", "positive"):
            raise ValueError(
                f"UncertaintyWeighting regularizer must be 'log' or 'positive', got {regularizer!r}."
            )
        if init is None:
            init = 0.0 if regularizer == "log" else 1.0
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"UncertaintyWeighting init must be a finite number (or None), got {init!r}.")
        if regularizer == "positive" and init == 0:
            raise ValueError(
                "UncertaintyWeighting(regularizer='positive') needs init != 0 (weights are 1/(2c²))."
            )
        if bounds is not None and not (
            len(bounds) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)
            and bounds[0] < bounds[1]
        ):
            raise ValueError(
                f"UncertaintyWeighting bounds must be (low, high) numbers with low < high, e.g. (-5, 5), got "
                f"{bounds!r}."
            )
        for name, kind in (task_kinds or {}).items():
            if kind not in _FACTOR:
                raise ValueError(
                    f"task_kinds[{name!r}] must be 'regression' or 'classification', got {kind!r}."
                )
        self.regularizer = regularizer
        self.init = float(init)
        self.task_kinds = dict(task_kinds or {})
        self.bounds = bounds
        self.optimizer = optimizer
        self.lr = lr
        LearnableParameters(torch.zeros(1), optimizer, lr)  # validates optimizer / lr now
        self._learnable: LearnableParameters | None = None
        self._factors: Tensor | None = None

    def bind(self, tasks) -> None:  # noqa: ANN001 - see MTLStrategy.bind
        super().bind(tasks)
        unknown = sorted(set(self.task_kinds) - set(self.task_names))
        if unknown:
            raise ValueError(
                f"UncertaintyWeighting task_kinds names unknown task(s) {unknown}; tasks are {list(self.task_names)}."
            )
        kinds = [self.task_kinds.get(t.name, t.kind) for t in tasks]
        self._factors = torch.tensor([_FACTOR[k] for k in kinds])
        if self._learnable is None or self._learnable.param.numel() != len(kinds):
            self._learnable = LearnableParameters(
                torch.full((len(kinds),), self.init), self.optimizer, self.lr
            )

    @property
    def params(self) -> Tensor:
        """The learnable parameters (``sᵢ = log σᵢ²`` or ``cᵢ``), in task order."""
        assert self._learnable is not None, "UncertaintyWeighting is not attached to a module yet"
        return self._learnable.param

    def backward(self, ctx: StepContext) -> None:
        assert self._learnable is not None and self._factors is not None
        learn = self._learnable
        learn.prepare(ctx.trainer, ctx.losses.device)
        factors = self._factors.to(ctx.losses.device)
        params = learn.param.detach()
        weights = uncertainty_weights(params, factors, self.regularizer)
        if self.regularizer == "log":  # the closed form below, reusing the weights cᵢe^{−sᵢ}
            grad = 0.5 - weights * ctx.global_losses
        else:
            grad = uncertainty_objective_grad(ctx.global_losses, params, factors, self.regularizer)
        k = ctx.accumulate_grad_batches
        self._present = ctx.present
        learn.accumulate(grad if k == 1 else grad / k, ctx.present)
        if ctx.present is not None:  # partial labels: an absent task's term is left out
            weights = torch.where(present_mask(ctx.present, weights), weights, torch.zeros_like(weights))
        ctx.backward((weights * ctx.losses).sum())
        self._weights = weights

    def objective(self, losses: Tensor) -> Tensor:
        assert self._learnable is not None and self._factors is not None
        p = self._learnable.param.detach()
        factors = self._factors.to(p.device)
        if self._present is not None:  # the present tasks' terms only
            index = present_index(self._present, p)
            p, factors, losses = p[index], factors[index], losses[index.to(losses.device)]
            if index.numel() == 0:
                return losses.sum()
        return uncertainty_objective(losses, p, factors, self.regularizer)

    def on_optimizer_step(self, module: pl.LightningModule, skipped: bool) -> None:
        assert self._learnable is not None
        self._learnable.step(module.trainer, skipped)
        if self.bounds is not None:
            with torch.no_grad():
                self._learnable.param.clamp_(*self.bounds)
        self._weights = None  # the parameters moved: weights_tensor() recomputes on demand

    def on_accumulation_window_discarded(self, module: pl.LightningModule) -> None:
        if self._learnable is not None:
            self._learnable.discard()

    def reset_state(self) -> None:
        super().reset_state()
        self._learnable = None  # bind() builds fresh parameters at ``init`` with a fresh optimizer

    def weights_tensor(self) -> Tensor | None:
        if self._learnable is None or self._factors is None:
            return None
        p = self._learnable.param.detach()
        weights = uncertainty_weights(p, self._factors.to(p.device), self.regularizer)
        if self._present is not None:  # the tasks absent at the last step had weight 0
            weights = torch.where(present_mask(self._present, weights), weights, torch.zeros_like(weights))
        return weights

    def extra_metrics(self) -> dict[str, Tensor]:
        if self._learnable is None:
            return {}
        name = "log_var" if self.regularizer == "log" else "c"
        p = self._learnable.param.detach()
        return {f"train/uncertainty/{name}/{t}": p[i] for i, t in enumerate(self.task_names)}

    def state_config(self) -> dict[str, Any]:
        """The regulariser (``sᵢ`` or ``cᵢ``) and each task's kind (its factor ``cᵢ``) give the parameters their
        meaning; ``init``, ``bounds``, ``optimizer`` and ``lr`` only shape the trajectory."""
        assert self._tasks is not None
        kinds = {t.name: self.task_kinds.get(t.name, t.kind) for t in self._tasks}
        return {"regularizer": self.regularizer, "task_kinds": kinds}

    def task_state(self) -> dict[str, Any]:
        return {} if self._learnable is None else {"learnable": self._learnable.state_dict()}

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        if "learnable" in state:
            assert self._learnable is not None, "bind() builds the parameters before a state is loaded"
            self._learnable.load_state_dict(state["learnable"], order)
