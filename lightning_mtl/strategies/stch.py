"""Smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_mtl.functional.slaw_stch import log_loss, log_loss_weights, stch_loss, stch_weights
from lightning_mtl.strategies._loss_based import LossWeighting, on_present, present_index, present_mask
from lightning_mtl.task_state import take_tasks

if TYPE_CHECKING:
    from lightning_mtl.task import Task


class STCH(LossWeighting):
    """Smooth Tchebycheff scalarisation: Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024 (https://arxiv.org/abs/2402.19078;
    its equation numbers were not checked here), and the authors' code https://github.com/Xi-L/STCH (STCH_MTL).

    The paper's smooth Tchebycheff scalarisation ``g_μ(θ|p) = μ·log Σᵢ exp(pᵢ(Lᵢ − zᵢ*)/μ)`` (smooth
    approximation of the Tchebycheff ``maxᵢ pᵢ(Lᵢ − zᵢ*)``, reached as μ → 0), in the form of the authors'
    multi-task code (STCH_MTL, also ported by LibMTL):

    - **warm-up**: for the first ``warmup_epochs`` epochs the objective is ``Σᵢ log Lᵢ`` (effective weights
      ``1/Lᵢ``); the mean losses of the **last** warm-up epoch give the nadir estimate ``n``, fixed for the
      rest of training;
    - **afterwards**: ``T·μ·log Σᵢ exp(pᵢℓᵢ/μ)`` with ``ℓᵢ = log(Lᵢ/nᵢ)``: the log-losses normalised by the
      nadir replace ``Lᵢ − zᵢ*`` (no ideal point is estimated; the log makes it scale-free), and the factor
      ``T`` keeps the step comparable with equal weighting's.

    ``preference`` ``p`` (default uniform, ``pᵢ = 1`` as in the authors' code) is given per task and
    normalised to **sum T** (mean 1): the paper's simplex preference ``λ = p/T``; the objective equals
    ``T²·μ'·log Σ exp(λᵢℓᵢ/μ')`` with the paper's ``μ' = μ/T`` (checked against TorchJD's ``STCH``).
    ``warmup_epochs=5`` is the official code's ``STCH_warmup_epoch=4`` (epochs 0–3 log-loss, epoch 4
    log-loss while accumulating the nadir). The value minimised, :meth:`objective`, is the scalarisation
    itself (the code subtracts the detached max before the log-sum-exp, which changes the value but not the
    gradient; here it is kept).

    The objective is non-linear in the losses: the update is its gradient, ``Σ wᵢ∇Lᵢ`` with the effective
    weights ``wᵢ = ∂objective/∂Lᵢ = T·pᵢ·softmax(p·ℓ/μ)ᵢ/Lᵢ`` (``1/Lᵢ`` in the warm-up), which is what
    :attr:`weights` reports (``Σ wᵢLᵢ = T`` for uniform p). The weights come from the rank-averaged losses,
    so under DDP the update is the gradient of the objective of the full-batch losses, and the nadir is the
    mean of rank-averaged losses. Every loss must be strictly positive (an error names the task and value).
    Like the other loss-based strategies, it applies to each micro-batch's losses under accumulation, and
    the nadir averages every micro-batch of the last warm-up epoch. The nadir, the running sum and count and
    the epoch are saved in checkpoints, by task name (a resume during the warm-up keeps the partial sums).

    Partial labels: a step with absent tasks applies the method to the ``P`` present tasks: the warm-up
    objective ``Σ_present log Lᵢ``, then ``P·μ·log Σ_present exp(pᵢℓᵢ/μ)`` with the preference of the present
    tasks renormalised to sum ``P`` (the paper's simplex preference restricted to them); the absent tasks have
    weight 0 and their (zero) losses are not checked. The nadir of a task averages its losses over the steps of
    the last warm-up epoch that labelled it (per-task counts); an absent task's sum and count do not move. A
    task labelled in no step of that epoch has no nadir: at its first labelled step after the warm-up its
    nadir is set to that step's loss (a one-step estimate; a warning says so).

    Args:
        mu: μ > 0, the smoothing (authors' MTL code and LibMTL: 1.0); μ → 0 approaches Tchebycheff.
        warmup_epochs: number of log-loss epochs, >= 1 (the nadir needs one; default 5 as the official code).
        preference: ``{task: p}`` with ``p > 0`` for every task, normalised to sum T; ``None``: uniform.
    """

    def __init__(
        self, mu: float = 1.0, warmup_epochs: int = 5, preference: Mapping[str, float] | None = None
    ) -> None:
        super().__init__()
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or not mu > 0:
            raise ValueError(f"STCH mu must be > 0 and finite (authors' code: 1.0), got {mu!r}.")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 1:
            raise ValueError(
                f"STCH warmup_epochs must be an int >= 1 (the nadir is the mean loss of the last warm-up epoch; "
                f"default 5), got {warmup_epochs!r}."
            )
        if preference is not None:
            if not isinstance(preference, Mapping):
                raise TypeError(
                    f"STCH preference must be a {{task: value}} dict or None, got {preference!r}."
                )
            for task, p in preference.items():
                if (
                    isinstance(p, bool)
                    or not isinstance(p, (int, float))
                    or not math.isfinite(p)
                    or not p > 0
                ):
                    raise ValueError(f"STCH preference for task {task!r} must be > 0 and finite, got {p!r}.")
            preference = {str(k): float(v) for k, v in preference.items()}
        self.mu = float(mu)
        self.warmup_epochs = warmup_epochs
        self.preference = preference
        self._pref: Tensor | None = None
        self._epoch = -1  # index of the current epoch (-1 before the first batch)
        self._sum: Tensor | None = None
        self._count = 0
        #: partial labels: per-task counts of the nadir epoch's labelled steps (``None``: each is ``_count``)
        self._counts: Tensor | None = None
        self._nadir: Tensor | None = None

    #: partial labels: the method over the present tasks, the nadir over each task's labelled steps
    supports_absent_tasks = True

    def bind(self, tasks: Sequence[Task]) -> None:
        super().bind(tasks)
        if self.preference is None:
            self._pref = None
            return
        names = self.task_names
        unknown = sorted(set(self.preference) - set(names))
        missing = [n for n in names if n not in self.preference]
        if unknown or missing:
            raise ValueError(
                f"STCH preference must give a value for every task {list(names)} and no other: "
                f"unknown {unknown}, missing {missing}."
            )
        p = torch.tensor([self.preference[n] for n in names], dtype=torch.float64)
        self._pref = p * (len(names) / p.sum())

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # A new epoch starts with batch 0; keying on the batch index (not trainer.current_epoch) keeps a
        # mid-epoch resume exact, as DWA does.
        if batch_idx == 0:
            self._epoch += 1

    @property
    def in_warmup(self) -> bool:
        """Whether the current epoch is a log-loss warm-up epoch."""
        return self._epoch < self.warmup_epochs

    def _check_positive(self, losses: Tensor, names: Sequence[str] | None = None) -> None:
        if not bool((losses > 0).all()) or not bool(torch.isfinite(losses).all()):
            bad = {
                n: float(v)
                for n, v in zip(self.task_names if names is None else names, losses.tolist())
                if not (v > 0 and math.isfinite(v))
            }
            raise ValueError(
                f"STCH needs strictly positive finite losses (it uses log Lᵢ), got {bad}. Use a strictly "
                "positive loss for these tasks (e.g. add a small constant) or another strategy."
            )

    def compute_weights(self, losses: Tensor) -> Tensor:
        return self._stch_weights(losses, None)

    def compute_present_weights(self, losses: Tensor, present: list[bool]) -> Tensor:
        """Partial labels: the method on the present tasks (sum over them, preference renormalised to sum
        ``P``), 0 for the absent ones; the nadir sums of the present tasks only."""
        return self._stch_weights(losses, present)

    def _present_preference(self, index: Tensor | None) -> Tensor | None:
        """The preference of the present tasks (``index``; ``None``: all), renormalised to sum ``P``."""
        if self._pref is None:
            return None
        pref = self._pref.to(index.device if index is not None else self._pref.device)
        if index is None:
            return pref
        sub = pref[index]
        return sub * (index.numel() / sub.sum())

    def _stch_weights(self, losses: Tensor, present: list[bool] | None) -> Tensor:
        detached = losses.detach().double()
        index = None if present is None else present_index(present, detached)
        if index is None:
            self._check_positive(detached)  # one host synchronisation, as GLS
        else:
            self._check_positive(detached[index], [n for n, ok in zip(self.task_names, present) if ok])
        if self.in_warmup:
            if self._epoch == self.warmup_epochs - 1:  # the last warm-up epoch accumulates the nadir
                if present is None and self._counts is None:
                    self._sum = (
                        detached.clone() if self._sum is None else self._sum.to(detached.device) + detached
                    )
                else:  # partial labels: per-task sums and counts over the labelled steps
                    mask = present_mask([True] * self.num_tasks if present is None else present, detached)
                    if self._counts is None:
                        self._counts = torch.full((self.num_tasks,), float(self._count), dtype=torch.float64)
                    self._counts = self._counts.to(detached.device) + mask.double()
                    masked = torch.where(mask, detached, torch.zeros_like(detached))
                    self._sum = masked if self._sum is None else self._sum.to(detached.device) + masked
                self._count += 1
            w = on_present(log_loss_weights, detached, present)
        else:
            nadir = self._current_nadir(detached, index)
            pref = self._present_preference(index)
            sub = nadir if index is None else nadir[index]
            w = on_present(lambda x: stch_weights(x, sub, self.mu, pref), detached, present)
        return w.to(losses.dtype)

    def _current_nadir(self, losses: Tensor, index: Tensor | None) -> Tensor:
        if self._nadir is None:
            if self._count == 0 or self._sum is None:
                raise RuntimeError("STCH has no loss of the last warm-up epoch to estimate the nadir from.")
            if self._counts is None:
                self._nadir = self._sum / self._count
            else:  # partial labels: NaN for a task the nadir epoch never labelled
                counts = self._counts.to(self._sum.device)
                self._nadir = torch.where(
                    counts > 0, self._sum / counts.clamp_min(1), torch.full_like(counts, float("nan"))
                )
        self._nadir = self._nadir.to(losses.device)
        if self._counts is not None:
            needed = torch.arange(self.num_tasks, device=losses.device) if index is None else index
            missing = torch.isnan(self._nadir[needed])
            if bool(missing.any()):
                fill = needed[missing]
                names = [self.task_names[i] for i in fill.tolist()]
                rank_zero_warn(
                    f"STCH: task(s) {names} were labelled in no step of the last warm-up epoch: their nadir is "
                    "set to the loss of their first labelled step after the warm-up. Raise warmup_epochs or label "
                    "them in the last warm-up epoch for an epoch-mean estimate."
                )
                self._nadir = self._nadir.index_copy(0, fill, losses[fill])
        return self._nadir

    def objective(self, losses: Tensor) -> Tensor:
        x = losses.double().clamp_min(1e-300)
        index = None if self._present is None else present_index(self._present, x)
        if index is not None:
            if index.numel() == 0:
                return losses.sum() * 0
            x = x[index]
        if self._nadir is None or self.in_warmup:
            value = log_loss(x)
        else:
            nadir = self._nadir.to(x.device)
            value = stch_loss(
                x, nadir if index is None else nadir[index], self.mu, self._present_preference(index)
            )
        return value.to(losses.dtype)

    def extra_metrics(self) -> dict[str, Tensor]:
        if self._nadir is None:
            return {}
        return {f"train/stch/nadir/{n}": self._nadir[i].float() for i, n in enumerate(self.task_names)}

    def reset_state(self) -> None:
        super().reset_state()
        self._epoch, self._sum, self._count, self._nadir = -1, None, 0, None
        self._counts = None

    def state_config(self) -> dict[str, Any]:
        """``warmup_epochs`` decides which epoch's losses the nadir averages."""
        return {"warmup_epochs": self.warmup_epochs}

    # μ and the preference only shape the objective after the warm-up, not the state: they may change on resume.
    def task_state(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "sum": None if self._sum is None else self._sum.cpu(),
            "count": self._count,
            "nadir": None if self._nadir is None else self._nadir.cpu(),
            **({} if self._counts is None else {"counts": self._counts.cpu()}),
        }

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        def take(key: str) -> Tensor | None:
            value = state.get(key)
            return None if value is None else take_tasks(value, order).double()

        self._epoch, self._count = int(state["epoch"]), int(state["count"])
        self._sum, self._nadir, self._counts = take("sum"), take("nadir"), take("counts")
