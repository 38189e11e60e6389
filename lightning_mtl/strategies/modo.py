"""MoDo: multi-objective gradient with double sampling (Chen, Fernando, Ying & Chen, NeurIPS 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_mtl.functional.modo import modo_direction, modo_step
from lightning_mtl.strategies._gradient_based import JacobianMethod, SyncMode
from lightning_mtl.strategies._gradient_direction import Direction, SimplexStateDirection


class MoDo(SimplexStateDirection):
    """MoDo: Lisha Chen, Heshan Fernando, Yiming Ying & Tianyi Chen, "Three-Way Trade-Off in Multi-Objective
    Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 (arXiv:2305.20057; JMLR 2024).

    A stochastic MGDA whose weights ``λ ∈ Δ`` take one projected-gradient step per training step on
    ``½‖Jᵀλ‖²`` with an **unbiased** estimate of its gradient, ``J₁J₂ᵀλ``, from two independent samples
    ("double sampling"); the shared parameters then move along the new ``λ`` applied to the mean of both
    samples' gradients (``samples=2``, the default) or to a third sample's (``samples=3``)::

        λ ← Π_Δ(λ − γ(J₁J₂ᵀλ + ρλ))        d = ½(J₁ + J₂)ᵀλ   (samples=2)   or   d = J₃ᵀλ   (samples=3)

    ``samples=2`` is the paper's update as TorchJD 0.18's ``MoDoWeighting`` cites it (JMLR version, equations
    (2.9a) for ``λ`` and (2.9b) for the parameters) and the authors' code (heshandevaka/Trade-Off-MOL) by
    default, which steps along ``(J₁ + J₂)ᵀλ`` (twice ours: its comment leaves the averaging to the learning
    rate); ``samples=3`` keeps the ``λ`` step and the parameter step on separate draws, as LibMTL's ``MoDo.py``
    and the authors' code with three gradients. ``ρλ`` is the gradient of the regulariser ``½ρ‖λ‖²`` of the
    authors' code; ``ρ = 0`` is the plain double-sampling step. (The paper's full text was not available here:
    the equation numbers are TorchJD's.) ``λ`` starts at ``1/T`` and is kept across steps.

    **Independent samples from the batch.** The samples are ``samples`` disjoint contiguous slices of each
    training batch along dim 0 (``batch_parts = samples``, :func:`~lightning_mtl.batch_parts.split_batch`:
    tensors and nested dicts/lists/tuples of tensors are split; sizes differ by at most one): ``J₁``, ``J₂``
    (and ``J₃``) are the Jacobians of the mean losses of parts 0, 1 (and 2). ``task_losses`` runs once per part,
    so each part's forward is separate (BatchNorm computes its statistics per part). A batch of fewer than
    ``samples`` samples is a clear error naming MoDo and the fix (a larger batch, or ``drop_last=True``).
    Under DDP each rank splits its own batch; the parts' Jacobians reduced over ranks are those of the
    single-process parts (exact, so the update equals the single-process one) when the per-rank batch
    size is divisible by ``samples``. Under gradient accumulation each part's Jacobian is averaged over the
    window. With ``samples=3`` the third part's Jacobian is not formed: the shared parameters get ``J₃ᵀλ`` by one
    vector-Jacobian product at the backward (except with partial labels and on sharded models; see
    :attr:`~lightning_mtl.strategies.GradientDirection.holds_out_last_part`); a step skipped for its
    non-finite gradient leaves ``λ`` as it was.

    **Conventions.** ``λ`` sums to 1 (the update follows a *mean* gradient, as :class:`MGDA`; no factor ``T``)
    and is logged as the task weights. The task-specific parameters get the plain gradient ``∇ΣLᵢ`` of the
    whole batch (the mean over the parts of their ``∇ΣLᵢ``), as in LibMTL, whose heads receive the
    mean of the three batches' gradients. Hyper-parameters of ``λ`` do not scale with the losses: ``γ`` acts
    on ``J₁J₂ᵀ``, which grows with the square of the losses' scale.

    Args:
        gamma: step size ``γ > 0`` of ``λ``; default 0.1 (the authors' code, heshandevaka/Trade-Off-MOL, and
            TorchJD's ``MoDoWeighting``; LibMTL's ``config.py`` uses 1e-3).
        rho: regularisation ``ρ ≥ 0`` of ``λ``; default 0.1 (the authors' code, LibMTL and TorchJD).
        samples: independent samples per step, ``2`` (default: the paper's update) or ``3`` (a third sample for
            the parameter step).
        sync: ``"exact"`` (default: every rank uses the parts' Jacobians of the global batch) or ``"local"``
            (each rank's own parts; ``λ`` averaged over ranks after each step; an approximation).
        jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.

    Example::

        trainer = L.Trainer(callbacks=[MoDo(gamma=0.1)])   # batch size a multiple of 2
        trainer.fit(model, loader)
        model.strategy.weights                              # {task: λᵢ}, summing to 1
    """

    batch_parts = 2
    simplex_key = "lambda"

    def __init__(
        self,
        gamma: float = 0.1,
        rho: float = 0.1,
        *,
        samples: int = 2,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if isinstance(gamma, bool) or not (
            isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0
        ):
            raise ValueError(f"MoDo gamma must be a finite number > 0, got {gamma!r}.")
        if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"MoDo rho must be a finite number >= 0, got {rho!r}.")
        if isinstance(samples, bool) or samples not in (2, 3):
            raise ValueError(
                f"MoDo samples must be 2 (the paper's update) or 3 (a third sample for the parameter step), "
                f"got {samples!r}."
            )
        super().__init__(sync=sync, jacobian=jacobian)
        self.gamma = float(gamma)
        self.rho = float(rho)
        self.samples = int(samples)
        self.batch_parts = self.samples
        # the third sample enters only as J₃ᵀλ: one vector-Jacobian product, not a T-row Jacobian
        self.holds_out_last_part = self.samples == 3

    @property
    def lambdas(self) -> Tensor | None:
        """The current ``λ`` ``[T]`` (float64, on the simplex), ``None`` before the first step."""
        return self._simplex

    def compute_direction(self, jacobian: Tensor, losses: Tensor) -> Direction:
        reduce = self._gradients.column_reduce
        heads = torch.ones(jacobian.shape[1], device=jacobian.device)
        if jacobian.shape[0] < self.batch_parts:  # the third sample held out: d = J₃ᵀλ, one product
            self._simplex = modo_step(jacobian, self._simplex, gamma=self.gamma, rho=self.rho, reduce=reduce)
            return Direction(None, self._simplex, heads, held=self._simplex)
        d, self._simplex = modo_direction(
            jacobian, self._simplex, gamma=self.gamma, rho=self.rho, reduce=reduce
        )
        return Direction(d, self._simplex, heads)
