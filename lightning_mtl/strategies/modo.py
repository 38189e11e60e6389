"""MoDo: multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen, NeurIPS 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_mtl.functional.modo import modo_direction
from lightning_mtl.strategies._gradient_based import JacobianMethod, SyncMode
from lightning_mtl.strategies._gradient_direction import Direction, SimplexStateDirection


class MoDo(SimplexStateDirection):
    """MoDo: Lisha Chen, Heshan Fernando, Yiming Ying & Tianyi Chen, "Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 (arXiv:2305.20057; JMLR 2024).

    A stochastic MGDA whose weights ``λ ∈ Δ`` take one projected-gradient step per training step on
    ``½‖Jᵀλ‖²`` with an **unbiased** estimate of its gradient, ``J₁J₂ᵀλ``, from two independent samples
    ("double sampling"); the shared parameters then move along ``J₃ᵀλ`` of a third sample with the new ``λ``::

        λ ← Π_Δ(λ − γ(J₁J₂ᵀλ + ρλ))        d = J₃ᵀλ

    (the three-sample MoDo update as implemented by the authors, heshandevaka/Trade-Off-MOL, and by LibMTL's
    ``MoDo.py``; TorchJD's ``MoDoWeighting`` cites it as equations (2.9) of the JMLR version. ``ρλ`` is the
    gradient of the regulariser ``½ρ‖λ‖²`` of that code; ``ρ = 0`` is the plain double-sampling step. The
    paper's full text was not available here: its equation numbers are not quoted from it.) ``λ`` starts
    at ``1/T`` and is kept across steps.

    **Independent samples from the batch.** The three samples are three disjoint contiguous slices of each
    training batch along dim 0 (``batch_parts = 3``, :func:`~lightning_mtl.batch_parts.split_batch`: tensors
    and nested dicts/lists/tuples of tensors are split; sizes differ by at most one): ``J₁``, ``J₂`` and
    ``J₃`` are the Jacobians of the mean losses of parts 0, 1 and 2. ``task_losses`` runs once per part, so
    each part's forward is separate (BatchNorm computes its statistics per part). A batch of fewer than 3
    samples is a clear error naming MoDo and the fix (a batch size of at least 3, or ``drop_last=True``).
    Under DDP each rank splits its own batch; the parts' Jacobians reduced over ranks are those of the
    single-process parts (exact, so the update equals the single-process one) when the per-rank batch
    size is divisible by 3. Under gradient accumulation each part's Jacobian is averaged over the window.

    **Conventions.** ``λ`` sums to 1 (the update follows a *mean* gradient, as :class:`MGDA`; no factor ``T``)
    and is logged as the task weights. The task-specific parameters get the plain gradient ``∇ΣLᵢ`` of the
    whole batch (the mean over the three parts of their ``∇ΣLᵢ``), as in LibMTL, whose heads receive the
    mean of the three batches' gradients. Hyper-parameters of ``λ`` do not scale with the losses: ``γ`` acts
    on ``J₁J₂ᵀ``, which grows with the square of the losses' scale.

    Args:
        gamma: step size ``γ > 0`` of ``λ``; default 0.1 (the authors' code, heshandevaka/Trade-Off-MOL, and
            TorchJD's ``MoDoWeighting``; LibMTL's ``config.py`` uses 1e-3).
        rho: regularisation ``ρ ≥ 0`` of ``λ``; default 0.1 (the authors' code, LibMTL and TorchJD).
        sync: ``"exact"`` (default: every rank uses the parts' Jacobians of the global batch) or ``"local"``
            (each rank's own parts; ``λ`` averaged over ranks after each step; an approximation).
        jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.

    Example::

        trainer = L.Trainer(callbacks=[MoDo(gamma=0.1)])   # batch size a multiple of 3
        trainer.fit(model, loader)
        model.strategy.weights                              # {task: λᵢ}, summing to 1
    """

    batch_parts = 3
    simplex_key = "lambda"

    def __init__(
        self,
        gamma: float = 0.1,
        rho: float = 0.1,
        *,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if isinstance(gamma, bool) or not (
            isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0
        ):
            raise ValueError(f"MoDo gamma must be a finite number > 0, got {gamma!r}.")
        if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"MoDo rho must be a finite number >= 0, got {rho!r}.")
        super().__init__(sync=sync, jacobian=jacobian)
        self.gamma = float(gamma)
        self.rho = float(rho)

    @property
    def lambdas(self) -> Tensor | None:
        """The current ``λ`` ``[T]`` (float64, on the simplex), ``None`` before the first step."""
        return self._simplex

    def compute_direction(self, jacobian: Tensor, losses: Tensor) -> Direction:
        d, lam = modo_direction(jacobian, self._simplex, gamma=self.gamma, rho=self.rho)
        self._simplex = lam
        return Direction(d, lam, torch.ones(lam.shape, device=lam.device))
