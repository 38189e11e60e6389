"""Nash-MTL: multi-task learning as a bargaining game (Navon et al. 2022)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_mtl.functional.gradient_methods import nash_mtl_weights
from lightning_mtl.strategies._gradient_based import GradientMode, GradientWeighting, JacobianMethod, SyncMode
from lightning_mtl.task_state import take_tasks


class NashMTL(GradientWeighting):
    """Nash-MTL: Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, "Multi-Task Learning as a
    Bargaining Game", ICML 2022 (https://arxiv.org/abs/2202.01017), Algorithm 1.

    The weights ``α > 0`` are the Nash bargaining solution ``Gα = 1/α`` (elementwise) on the Gramian of the
    shared gradients; they are not normalised (``‖Σ αᵢgᵢ‖ = √T``). Solved without cvxpy
    (:func:`~lightning_mtl.functional.nash_mtl.nash_mtl_weights`: damped Newton, warm-started from the
    previous ``α``, at most ``optim_niter`` steps, tolerance 1e-3 as the authors). Then ``Σ αᵢLᵢ`` is
    back-propagated once (the task-specific parameters get ``αᵢ∇Lᵢ`` too) and the shared parameters'
    gradient norm is clipped to ``max_norm`` before the optimizer step (on unscaled, rank-averaged
    gradients), as in the authors' code (AvivNavon/nash-mtl, ``methods/weight_methods.py``).

    When the solver does not converge (no bargaining solution exists, e.g. a zero task gradient, or the step
    budget ran out) the strategy warns and **falls back to the previous** ``α``, or to ones before any
    converged update (the authors' behaviour: their ``prvs_alpha`` starts at ones and is kept when the
    convex solver fails; the solver's last iterate can be huge on the task without a solution, and its
    head would get that weight); ``train/nash_mtl/converged`` logs 0 for that update and
    ``train/nash_mtl/failures`` counts them.

    ``update_every=k`` is Nash-MTL-T (the paper's ``update_weights_every``): recompute ``α`` every ``k``
    optimizer steps and reuse it in between.

    Args:
        max_norm: clip of the shared gradient's norm, ``None`` to disable (default 1.0, the authors').
        optim_niter: Newton steps per update at most (default 20, the authors' ``optim_niter``).
        tol: tolerance on ``maxᵢ |αᵢ(Gα)ᵢ − 1|`` (scale-free; default 1e-3, the authors' threshold, which
            they apply to ``‖Ĝα − 1/α‖`` with ``Ĝ = G/‖G‖_F``).
        update_every: see above (default 1).
        mode: ``"parameters"`` (default, the paper) or ``"representation"``.
        sync, jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.
    """

    def __init__(
        self,
        max_norm: float | None = 1.0,
        optim_niter: int = 20,
        tol: float = 1e-3,
        *,
        update_every: int = 1,
        mode: GradientMode = "parameters",
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        if max_norm is not None and (
            isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0
        ):
            raise ValueError(f"NashMTL max_norm must be a number > 0 or None, got {max_norm!r}.")
        if isinstance(optim_niter, bool) or not isinstance(optim_niter, int) or optim_niter < 1:
            raise ValueError(f"NashMTL optim_niter must be an int >= 1, got {optim_niter!r}.")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
            raise ValueError(f"NashMTL tol must be a finite number > 0, got {tol!r}.")
        super().__init__(mode=mode, update_every=update_every, sync=sync, jacobian=jacobian)
        self.max_norm = None if max_norm is None else float(max_norm)
        self.optim_niter = optim_niter
        self.tol = float(tol)
        self._alpha: Tensor | None = None  # last converged α: the warm start and the fallback
        self._failures = 0

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        previous = None if self._alpha is None else self._alpha.to(stat.device, stat.dtype)
        alpha, converged = nash_mtl_weights(stat, previous=previous, max_iter=self.optim_niter, tol=self.tol)
        self._metrics["train/nash_mtl/converged"] = torch.tensor(float(converged))
        if converged:
            self._alpha = alpha.detach().cpu().double()
            return alpha
        self._failures += 1
        self._metrics["train/nash_mtl/failures"] = torch.tensor(float(self._failures))
        fallback = "the previous weights" if self._alpha is not None else "ones (no converged update yet)"
        rank_zero_warn(
            f"NashMTL: the bargaining problem did not converge within optim_niter={self.optim_niter} steps "
            f"(failure {self._failures}; e.g. a task gradient is zero or the gradients cancel out); using "
            f"{fallback}. Raise optim_niter or check the tasks' gradients.",
            category=RuntimeWarning,
        )
        if self._alpha is None:
            return torch.ones_like(alpha)
        return self._alpha.to(stat.device, stat.dtype)

    def method_config(self) -> dict[str, Any]:
        """None: ``α`` means the bargaining solution on the Gramian of the ``mode``'s gradients (``mode`` is in the
        base's configuration); ``tol``, ``optim_niter``, ``max_norm`` and ``update_every`` change how it is
        computed and used, not what it means."""
        return {}

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        return {"alpha": (0,)}

    def method_state(self) -> dict[str, Any]:
        return {"alpha": None if self._alpha is None else self._alpha.clone(), "failures": self._failures}

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        """Restore :meth:`method_state`; ``order[i]`` is the saved index of task ``i`` (``None``: same order)."""
        alpha = state.get("alpha")
        if alpha is not None:
            alpha = alpha.detach().cpu().double()
            if order is None and self._task_names is not None:
                order = range(self.num_tasks)
            alpha = alpha.clone() if order is None else take_tasks(alpha, order).clone()
        self._alpha = alpha
        self._failures = int(state.get("failures", 0))
