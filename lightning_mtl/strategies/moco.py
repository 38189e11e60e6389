"""MoCo: stochastic multi-objective gradient correction (Fernando et al., ICLR 2023)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_mtl.functional.moco import (
    MoCoNormalization,
    MoCoProjection,
    MoCoState,
    check_moco_hyperparameters,
    moco_step,
)
from lightning_mtl.gradients import JacobianMethod, SyncMode
from lightning_mtl.strategies._gradient_based import merge_simplex, on_present_simplex
from lightning_mtl.strategies._gradient_direction import Direction, GradientDirection
from lightning_mtl.task_state import take_tasks

_KEYS = ("tracked", "lambdas", "step")


class MoCo(GradientDirection):
    """MoCo: Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective
    Learning: A Provably Convergent Approach", ICLR 2023 (https://arxiv.org/abs/2210.12624); LibMTL's
    ``MoCo`` (from the authors' code) and the authors' ``heshandevaka/MoCo`` and ``heshandevaka/Trade-Off-MOL``.

    MGDA on stochastic gradients is biased (the min-norm weights of noisy gradients are not those of the true
    gradients); MoCo tracks each task's true gradient with a moving estimate ``yᵢ`` and moves the weights
    ``λ`` by one projected-gradient step per iteration instead of solving MGDA's problem exactly
    (:func:`~lightning_mtl.functional.moco.moco_step`). At update ``k`` (1 at the first), with ``G`` the
    per-task gradients of the shared parameters:

    * ``Y ← Y − βₖ(Y − G)``, ``βₖ = β/k^σβ`` (``Y₀ = 0``);
    * ``λ ← Π_Δ(λ − γₖ(YYᵀ + ρI)λ)``, ``γₖ = γ/k^σγ`` (``λ₀ = 1/T``; ``Π_Δ`` the Euclidean projection onto
      the simplex);
    * the shared parameters receive ``Yᵀλ``; the task-specific parameters the plain ``∇ΣLᵢ`` (as LibMTL,
      whose per-task backward passes accumulate every head's own gradient before the shared gradient is
      replaced).

    The paper's equation numbers were not checked here (its text was not reachable); the rule above was
    checked against LibMTL's and the authors' code, which agree on the order (``Y``, then ``λ`` with the new
    ``Y``, then ``Yᵀλ`` with the new ``λ``), on ``Y₀ = 0`` and ``λ₀ = 1/T``, and have no projection of ``yᵢ``
    onto a bounded set (which the paper's analysis is recalled to use; not verified). ``Y₀ = 0`` (not the first
    gradient) follows both codes: the first steps are then shrunk by ``β₁`` (``Y₁ = βG₁``), which a decaying
    ``βₖ`` corrects within a few steps.

    Conventions:

    * **Projection**: the paper's ``Π_Δ`` by default (``projection="simplex"``); LibMTL replaces it by a
      softmax of the same argument (``projection="softmax"``).
    * **Normalisation**: none by default (the paper); ``normalize="loss_norm"`` is LibMTL's
      ``gᵢ ← Lᵢ·gᵢ/(‖gᵢ‖ + 1e-8)`` before the tracking (with the losses averaged over ranks).
    * **Sum 1**: ``λ`` lies on the simplex and the shared update is the convex combination ``Yᵀλ`` (mean-like,
      about ``1/T`` of equal weighting's ``Σgᵢ``), as in LibMTL, the authors' code and this library's :class:`MGDA`;
      ``train/weight/<task>`` logs ``λ`` (sum 1). The heads' gradient ``∇ΣLᵢ`` is a sum.
    * **Defaults** are LibMTL's: ``β = 0.5, σβ = 0.5, γ = 0.1, σγ = 0.5, ρ = 0``. The authors' ICLR code uses
      ``β = 0.1``, no ``ρ`` and a ``λ`` step twice as large (``2YYᵀλ``, i.e. ``γ = 0.2`` here) in its library
      defaults, while its NYUv2 script runs constant steps with ``β = 0.99, γ = 0.1``; their later fork uses
      constant ``β = γ = ρ = 0.1`` (``beta_sigma = gamma_sigma = 0``), with an optional normalisation of ``Y``
      that also applies to the shared update.
    * **Per optimizer step**: ``G`` is the Jacobian of the global batch (averaged over ranks and over the
      accumulation window), so ``Y``, ``λ`` and ``k`` are identical on every rank and the DDP update equals the
      single-process one. ``sync="local"``: each rank tracks its own gradients and ``Y`` and ``λ`` are averaged
      over ranks after each step (still a ``T × P`` all-reduce, so only an approximation, not a saving).

    Memory: ``Y`` is ``T × P`` in the Jacobian's dtype on its device. ``Y``, ``λ`` and ``k`` are saved in
    checkpoints (``Y`` on the CPU) and restored by task name.

    Partial labels: a step where some tasks are labelled on no rank is the update above on the present tasks
    only: their rows of ``Y`` track their gradients, and their ``λ``, rescaled to sum 1 over them (uniform if
    their share is 0), takes the projected step on the present tasks' simplex; the result is written back
    scaled by the share ``Σ_present λ`` they had, so ``λ`` stays on the full simplex. The absent tasks' rows of
    ``Y`` and entries of ``λ`` stay bit-for-bit as they were; their logged weight is 0 and the shared update
    is ``Y_presentᵀλ_present``. ``k`` counts every update (a task coming back takes the current ``βₖ``, ``γₖ``).
    When the first update has absent tasks their ``Y`` rows start at 0 and their ``λ`` at ``1/T``.

    Args:
        beta: ``β ∈ (0, 1]``, the tracking step (default 0.5; ``β = 1, beta_sigma = 0``: no tracking).
        beta_sigma: ``σβ ≥ 0``, decay exponent of the tracking step (default 0.5).
        gamma: ``γ > 0``, the step of ``λ`` (default 0.1).
        gamma_sigma: ``σγ ≥ 0``, decay exponent of the ``λ`` step (default 0.5).
        rho: ``ρ ≥ 0``, ridge of the ``λ`` sub-problem (default 0).
        normalize: ``"none"`` (default) or ``"loss_norm"`` (LibMTL).
        projection: ``"simplex"`` (default, the paper) or ``"softmax"`` (LibMTL).
        sync, jacobian: see :class:`~lightning_mtl.strategies._gradient_direction.GradientDirection`.
    """

    supports_absent_tasks = True

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: MoCoNormalization = "none",
        projection: MoCoProjection = "simplex",
        *,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        self.beta, self.beta_sigma, self.gamma, self.gamma_sigma, self.rho = check_moco_hyperparameters(
            beta, beta_sigma, gamma, gamma_sigma, rho, normalize, projection
        )
        self.normalize = normalize
        self.projection = projection
        self._state: MoCoState | None = None
        super().__init__(sync=sync, jacobian=jacobian)

    # ------------------------------------------------------------------ state, read-only views
    @property
    def tracked(self) -> Tensor | None:
        """``Y [T, P]``, the tracked per-task gradients; ``None`` before the first update."""
        return None if self._state is None else self._state.tracked

    @property
    def lambdas(self) -> Tensor | None:
        """``λ [T]`` (float64, CPU), on the simplex; ``None`` before the first update."""
        return None if self._state is None else self._state.lambdas

    @property
    def updates(self) -> int:
        """``k``, the number of updates taken."""
        return 0 if self._state is None else self._state.step

    # ------------------------------------------------------------------ the method
    def compute_direction(self, jacobian: Tensor, losses: Tensor) -> Direction:
        result = moco_step(
            jacobian,
            self._state,
            losses=losses,
            beta=self.beta,
            beta_sigma=self.beta_sigma,
            gamma=self.gamma,
            gamma_sigma=self.gamma_sigma,
            rho=self.rho,
            normalize=self.normalize,
            projection=self.projection,
        )
        self._state = result.state
        heads = torch.ones(jacobian.shape[0], device=jacobian.device)
        return Direction(result.direction, result.weights.float(), heads)

    def method_config(self) -> dict[str, Any]:
        """``normalize``: ``Y`` tracks the gradients as normalised by it."""
        return {"normalize": self.normalize}

    def method_state(self) -> dict[str, Any]:
        if self._state is None:
            return {key: None for key in _KEYS}
        return dict(zip(_KEYS, self._state))

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        """Restore :meth:`method_state`; ``order[i]`` is the saved index of task ``i`` (``None``: same order).
        The rows of ``Y`` and the entries of ``λ`` are reordered."""
        tracked, lambdas, step = (state.get(key) for key in _KEYS)
        if tracked is None and lambdas is None:
            self._state = None
            return
        if tracked is None or lambdas is None or step is None:
            missing = [k for k in _KEYS if state.get(k) is None]
            raise ValueError(
                f"MoCo: the saved state lacks {missing}: the checkpoint is incomplete. Start a new fit without "
                "ckpt_path."
            )
        tracked, lambdas = tracked.detach(), lambdas.detach().to(device="cpu", dtype=torch.float64)
        if order is not None:
            tracked, lambdas = take_tasks(tracked, order), take_tasks(lambdas, order)
        if self.present_index is not None:  # partial labels: the present tasks' λ on their own simplex
            lambdas = on_present_simplex(lambdas)
        self._state = MoCoState(tracked, lambdas, int(step))

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        """The rows of ``Y`` and the entries of ``λ`` are per task; ``k`` counts every update."""
        return {"tracked": (0,), "lambdas": (0,)}

    def method_absent_fill(self) -> dict[str, float]:
        """``Y₀ = 0`` and ``λ₀ = 1/T``."""
        return {"tracked": 0.0, "lambdas": 1.0 / self.num_tasks}

    def merge_present_state(
        self, full: Mapping[str, Any], narrowed: Mapping[str, Any], present: list[int]
    ) -> dict[str, Any]:
        """The base's merge, with the present tasks' new ``λ`` (on their simplex) scaled by the share of the
        full simplex they had before the step, so that ``λ`` still sums to 1 and the absent tasks' entries stay
        as they were."""
        merged = super().merge_present_state(full, narrowed, present)
        new = narrowed.get("lambdas")
        if isinstance(new, Tensor):
            old = full.get("lambdas")
            merged["lambdas"] = merge_simplex(
                old if isinstance(old, Tensor) else None, new, present, self.num_tasks
            )
        return merged

    def task_state(self) -> dict[str, Any]:
        """The base's checkpoint state, with ``Y`` copied to the CPU (a checkpoint loads on any device)."""
        state = super().task_state()
        Y = state["method"].get("tracked")
        if isinstance(Y, Tensor):
            state["method"]["tracked"] = Y.detach().cpu()
        return state
