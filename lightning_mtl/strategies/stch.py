"""Smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_mtl.functional.slaw_stch import log_loss, log_loss_weights, stch_loss, stch_weights
from lightning_mtl.strategies._loss_based import LossWeighting
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
        self._nadir: Tensor | None = None

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

    def _check_positive(self, losses: Tensor) -> None:
        if not bool((losses > 0).all()) or not bool(torch.isfinite(losses).all()):
            bad = {
                n: float(v)
                for n, v in zip(self.task_names, losses.tolist())
                if not (v > 0 and math.isfinite(v))
            }
            raise ValueError(
                f"STCH needs strictly positive finite losses (it uses log Lᵢ), got {bad}. Use a strictly "
                "positive loss for these tasks (e.g. add a small constant) or another strategy."
            )

    def compute_weights(self, losses: Tensor) -> Tensor:
        detached = losses.detach().double()
        self._check_positive(detached)  # one host synchronisation, as GLS
        if self.in_warmup:
            if self._epoch == self.warmup_epochs - 1:  # the last warm-up epoch accumulates the nadir
                self._sum = (
                    detached.clone() if self._sum is None else self._sum.to(detached.device) + detached
                )
                self._count += 1
            w = log_loss_weights(detached)
        else:
            if self._nadir is None:
                if self._count == 0 or self._sum is None:
                    raise RuntimeError(
                        "STCH has no loss of the last warm-up epoch to estimate the nadir from."
                    )
                self._nadir = self._sum / self._count
            self._nadir = self._nadir.to(detached.device)
            pref = None if self._pref is None else self._pref.to(detached.device)
            w = stch_weights(detached, self._nadir, self.mu, pref)
        return w.to(losses.dtype)

    def objective(self, losses: Tensor) -> Tensor:
        x = losses.double().clamp_min(1e-300)
        if self._nadir is None or self.in_warmup:
            value = log_loss(x)
        else:
            pref = None if self._pref is None else self._pref.to(x.device)
            value = stch_loss(x, self._nadir.to(x.device), self.mu, pref)
        return value.to(losses.dtype)

    def extra_metrics(self) -> dict[str, Tensor]:
        if self._nadir is None:
            return {}
        return {f"train/stch/nadir/{n}": self._nadir[i].float() for i, n in enumerate(self.task_names)}

    def reset_state(self) -> None:
        super().reset_state()
        self._epoch, self._sum, self._count, self._nadir = -1, None, 0, None

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
        }

    def load_task_state(self, state: dict[str, Any], order: list[int]) -> None:
        def take(key: str) -> Tensor | None:
            value = state.get(key)
            return None if value is None else take_tasks(value, order).double()

        self._epoch, self._count = int(state["epoch"]), int(state["count"])
        self._sum, self._nadir = take("sum"), take("nadir")
