"""Scaled Loss Approximate Weighting (Crawshaw & Košecká 2021)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.functional.slaw_stch import slaw_update, slaw_warmup_steps, slaw_weights
from lightning_mtl.strategies._loss_based import LossWeighting, present_index, present_mask
from lightning_mtl.task_state import take_tasks


def _positive_float(name: str, value: Any, *, upper: float | None = None, allow_zero: bool = False) -> float:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
        and (upper is None or value < upper)
    )
    if not ok:
        bound = f"in [0, {upper})" if allow_zero and upper is not None else "> 0 and finite"
        raise ValueError(f"SLAW {name} must be {bound}, got {value!r}.")
    return float(value)


class SLAW(LossWeighting):
    """Scaled Loss Approximate Weighting: Crawshaw & Košecká, "SLAW: Scaled Loss Approximate Weighting for
    Efficient Multi-Task Learning", arXiv:2109.08218 (2021); the rule as in the authors' code (equation numbers
    of the paper not checked here).

    SLAW approximates GradNorm-style balancing without per-task gradients: the norm of task i's gradient is
    estimated by the standard deviation of its loss, ``sᵢ = √(bᵢ − aᵢ²)``, where ``aᵢ`` and ``bᵢ`` are
    running means of ``Lᵢ`` and ``Lᵢ²``, and the weights are ``wᵢ ∝ 1/max(sᵢ, ε)``, **normalised to
    Σ wᵢ = T** (equal weighting's total). Conventions, following the authors' code (class ``CLAW`` with
    its running statistics, mtcrawshaw/meta) rather than a pure EMA:

    - the moments are arithmetic means over the first ``round(1/(1−β))`` losses (100 for β = 0.99), then
      exponential moving averages ``x ← βx + (1−β)v``;
    - ε floors the standard deviation (not the variance); no weight update on the first loss, nor while a
      variance ``bᵢ − aᵢ²`` is negative (rounding): the previous weights (initially 1) are kept;
    - ``max_weight`` (not in the paper; default ``None``: off) bounds each weight: a near-constant loss has
      ``sᵢ → ε`` and would take almost all of the total ``T``. With a bound, weights above it are set to it
      and the excess goes to the other tasks in proportion to their weights (the sum stays ``T``, the order
      is kept). It must be ``>= 1``.

    Statistics and weights are updated once per micro-batch (as the other loss-based strategies: DWA, GLS),
    from the rank-averaged losses, so every rank holds the same state and the update under DDP equals the
    single-process one. ``a``, ``b`` and the step count are saved in checkpoints, by task name.

    Partial labels: each task's moments count only the steps that labelled it (per-task counts: its first
    ``round(1/(1−β))`` labelled losses are averaged arithmetically, then the EMA); an absent task's ``aᵢ``,
    ``bᵢ``, count and stored weight do not move. A step with absent tasks applies the rule to the ``P`` present
    tasks: ``wᵢ ∝ 1/max(sᵢ, ε)`` over them, normalised to sum ``P`` (then capped), 0 for the absent ones. While a
    present task has seen only one loss (no spread yet) the present tasks keep their previous weights
    (initially 1), renormalised to sum ``P``.

    Args:
        beta: β, the moving-average factor of the moments (authors' code: 0.99).
        eps: ε, the floor on each standard deviation (authors' code: 1e-5).
        max_weight: upper bound on each weight (``>= 1``), or ``None`` for the authors' unbounded rule.
    """

    def __init__(self, beta: float = 0.99, eps: float = 1e-5, max_weight: float | None = None) -> None:
        super().__init__()
        self.beta = _positive_float("beta", beta, upper=1.0, allow_zero=True)
        self.eps = _positive_float("eps", eps)
        if max_weight is not None:
            max_weight = _positive_float("max_weight", max_weight)
            if max_weight < 1:
                raise ValueError(
                    f"SLAW max_weight must be >= 1 (the weights sum to T, so a bound below 1 is infeasible), "
                    f"got {max_weight!r}."
                )
        self.max_weight = max_weight
        self._mean: Tensor | None = None
        self._mean_sq: Tensor | None = None
        self._count = 0
        #: partial labels: per-task counts of labelled steps (``None``: every step labelled every task, each
        #: count is ``_count``)
        self._counts: Tensor | None = None
        self._slaw_weights: Tensor | None = None

    #: partial labels: per-task moments over labelled steps, the rule over the present tasks
    supports_absent_tasks = True

    def compute_weights(self, losses: Tensor) -> Tensor:
        if self._counts is not None:  # per-task counts since a step with absent tasks
            return self.compute_present_weights(losses, [True] * self.num_tasks)
        # Tensor operations only, on the losses' device: no host synchronisation per step. (The module never
        # hands a strategy non-finite losses: its nonfinite policy runs first.)
        detached = losses.detach().double()
        mean = None if self._mean is None else self._mean.to(detached.device)
        mean_sq = None if self._mean_sq is None else self._mean_sq.to(detached.device)
        self._count += 1
        self._mean, self._mean_sq = slaw_update(mean, mean_sq, detached, self._count, self.beta)
        previous = None if self._slaw_weights is None else self._slaw_weights.to(detached.device)
        if self._count > 1:  # the authors skip the first step: one loss has no spread
            self._slaw_weights = slaw_weights(self._mean, self._mean_sq, self.eps, self.max_weight, previous)
        elif previous is None:
            self._slaw_weights = torch.ones_like(detached)
        return self._slaw_weights.to(losses.dtype)

    def compute_present_weights(self, losses: Tensor, present: list[bool]) -> Tensor:
        """Partial labels: the present tasks' moments take the step (each at its own count), the absent tasks'
        state stays as it was; the weights are the rule over the present tasks (sum ``P``), 0 for the others."""
        v = losses.detach().double()
        mask = present_mask(present, v)
        if self._counts is None:
            self._counts = torch.full((self.num_tasks,), float(self._count), dtype=torch.float64)
        counts = self._counts.to(v.device) + mask.double()
        self._count += 1
        mean = torch.zeros_like(v) if self._mean is None else self._mean.to(v.device)
        mean_sq = torch.zeros_like(v) if self._mean_sq is None else self._mean_sq.to(v.device)
        rate = torch.where(
            counts <= slaw_warmup_steps(self.beta),
            counts.clamp_min(1).reciprocal(),
            torch.full_like(counts, 1.0 - self.beta),
        )  # the first labelled loss has rate 1: lerp(0, v, 1) = v
        self._mean = torch.where(mask, mean.lerp(v, rate), mean)
        self._mean_sq = torch.where(mask, mean_sq.lerp(v * v, rate), mean_sq)
        self._counts = counts
        previous = torch.ones_like(v) if self._slaw_weights is None else self._slaw_weights.to(v.device)
        index = present_index(present, v)
        weights = torch.zeros_like(v)
        if index.numel() > 0:
            kept = previous[index]
            kept = kept * (index.numel() / kept.sum())  # the previous weights, renormalised to sum P
            spread = counts[index].gt(1).all()  # no update while a present task has a single loss
            new = slaw_weights(self._mean[index], self._mean_sq[index], self.eps, self.max_weight, kept)
            sub = torch.where(spread, new, kept)
            self._slaw_weights = previous.index_copy(0, index, sub)
            weights = weights.index_copy(0, index, sub)
        return weights.to(losses.dtype)

    def reset_state(self) -> None:
        super().reset_state()
        self._mean = self._mean_sq = self._slaw_weights = None
        self._count = 0
        self._counts = None

    def extra_metrics(self) -> dict[str, Tensor]:
        if self._mean is None or self._mean_sq is None:
            return {}
        std = (self._mean_sq - self._mean**2).clamp_min(0).sqrt().float()
        return {f"train/slaw/std/{n}": std[i] for i, n in enumerate(self.task_names)}

    # β and ε only shape the trajectory (the moments mean the same under any of them) and max_weight only
    # post-processes the weights, so none is in the configuration: a resumed run may change them.
    def task_state(self) -> dict[str, Any]:
        return {
            "mean": None if self._mean is None else self._mean.cpu(),
            "mean_sq": None if self._mean_sq is None else self._mean_sq.cpu(),
            "count": self._count,
            "weights": None if self._slaw_weights is None else self._slaw_weights.cpu(),
            **({} if self._counts is None else {"counts": self._counts.cpu()}),
        }

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        def take(key: str) -> Tensor | None:
            value = state.get(key)
            return None if value is None else take_tasks(value, order).double()

        self._mean, self._mean_sq, self._slaw_weights = take("mean"), take("mean_sq"), take("weights")
        self._count = int(state["count"])
        self._counts = take("counts")
