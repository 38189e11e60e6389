"""SDMGrad: stochastic direction-oriented multi-objective gradient descent (Xiao, Ban & Ji, NeurIPS 2023)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_mtl.functional.sdmgrad import _check_lam, _check_solver, sdmgrad_direction, sdmgrad_step
from lightning_mtl.strategies._gradient_based import JacobianMethod, SyncMode
from lightning_mtl.strategies._gradient_direction import Direction, SimplexStateDirection


class SDMGrad(SimplexStateDirection):
    """SDMGrad: Peiyao Xiao, Hao Ban & Kaiyi Ji, "Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms", NeurIPS 2023 (arXiv:2305.18409).

    The direction-oriented problem keeps the common descent direction near the mean gradient ``g₀``: its
    weights are ``w* = argmin_{w∈Δ} ½‖Jᵀw + λg₀‖²`` and the direction ``d = (Jᵀw* + λg₀)/(1 + λ)`` (``λ = 0``
    is MGDA's min-norm point, ``λ → ∞`` gradient descent on the mean loss). The stochastic algorithm (SDMGrad,
    as implemented in the authors' code OptMN-Lab/sdmgrad, ``methods/weight_methods.py``, and LibMTL's
    ``SDMGrad.py``; the paper's full text was not available here, so its equation and algorithm numbers are
    not quoted from it) takes three independent samples
    ``ξ``, ``ξ′``, ``ζ``: ``n_iter`` steps of projected SGD with momentum on ``w`` with the unbiased
    gradient ``J_ξ(J_ξ′ᵀw + λḡ_ξ′)``, warm-started from the previous step's ``w``, then::

        d = (J_ζᵀw + λḡ_ζ)/(1 + λ)

    As in the authors' code, LibMTL and TorchJD, ``M = J_ξJ_ξ′ᵀ`` is divided by the square of the mean of ``√Mᵢᵢ``
    before the inner loop (so that ``lr`` does not depend on the gradients' scale); see
    :func:`~lightning_mtl.functional.sdmgrad.sdmgrad_weights`. The inner loop runs in float64 on the device of
    the gradients, without host synchronisation (on the CPU in NumPy, the same operations).

    **Independent samples from the batch.** ``ξ``, ``ξ′`` and ``ζ`` are three disjoint contiguous slices of each
    training batch along dim 0: parts 0, 1 and 2 (``batch_parts = 3``,
    :func:`~lightning_mtl.batch_parts.split_batch`: tensors and nested dicts/lists/tuples of tensors are split;
    sizes differ by at most one). ``task_losses`` runs once per part, so each part's forward is separate
    (BatchNorm computes its statistics per part). A batch of fewer than 3 samples is a clear error naming
    SDMGrad and the fix (a batch size of at least 3, or ``drop_last=True``). Under DDP each rank splits its
    own batch; the parts' Jacobians reduced over ranks are those of the single-process parts (exact, so the
    update equals the single-process one) when the per-rank batch size is divisible by 3. Under gradient
    accumulation each part's Jacobian is averaged over the window.

    **Cost.** ``ζ`` enters the update only as ``J_ζᵀc``, so its Jacobian is not formed
    (:attr:`~lightning_mtl.strategies.GradientDirection.holds_out_last_part`): the shared parameters get ``J_ζᵀc`` by
    one vector-Jacobian product at the backward, and :meth:`compute_direction` receives ``[2, T, P]``. With
    partial labels (a missing part's rows are replaced by the window's) and on sharded models it receives all
    three. A non-finite ``J_ζᵀc`` shows in the backward: the GradScaler skips the step (AMP) or the module's
    non-finite check stops or discards it, and ``w`` and the logged weights go back to where they were.

    **Conventions.** The coefficients ``c = (w + λ/T)/(1 + λ)`` of ``d = J_ζᵀc`` sum to 1 (a *mean* gradient, as
    :class:`MGDA`; LibMTL does the same, the authors' code multiplies ``d`` by ``T`` "to match the sum loss")
    and are logged as the task weights; ``w`` itself is :attr:`inner_weights`. The task-specific parameters
    get the plain gradient ``∇ΣLᵢ`` of the whole batch (the mean over the three parts); LibMTL and the
    authors' code back-propagate all three batches' losses into the heads, i.e. three times this. The
    authors' code also clips the shared gradient's norm to 1; here clipping is the module's
    (``MultiTaskModule(gradient_clip_val=...)``), off by default.

    Args:
        lam: the regularisation ``λ ≥ 0`` (``math.inf`` allowed: the mean gradient); default 0.3 (the authors'
            NYUv2 script ``experiments/nyuv2/run.sh`` and LibMTL; the class default of their code is 0.6).
        lr: step size of the inner SGD; default 10 (the authors' code and TorchJD; LibMTL uses 5).
        momentum: momentum of the inner SGD, in ``[0, 1)``; default 0.5 (the authors' code, LibMTL).
        n_iter: inner steps per training step; default 20 (the authors' code, LibMTL).
        sync: ``"exact"`` (default: every rank uses the parts' Jacobians of the global batch) or ``"local"``
            (each rank's own parts; ``w`` averaged over ranks after each step; an approximation).
        jacobian: see :class:`~lightning_mtl.strategies.GradientWeighting`.

    Example::

        trainer = L.Trainer(callbacks=[SDMGrad(lam=0.3)])   # batch size a multiple of 3
        trainer.fit(model, loader)
        model.strategy.weights                               # {task: cᵢ}, summing to 1
    """

    batch_parts = 3
    simplex_key = "w"
    holds_out_last_part = True  # ζ enters only as J_ζᵀc: one vector-Jacobian product, not a T-row Jacobian

    def __init__(
        self,
        lam: float = 0.3,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        *,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
    ) -> None:
        _check_lam(lam)  # ValueErrors naming SDMGrad, the argument and the value
        _check_solver(lr, momentum, n_iter)
        super().__init__(sync=sync, jacobian=jacobian)
        self.lam = float(lam)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.n_iter = n_iter

    @property
    def inner_weights(self) -> Tensor | None:
        """The current ``w`` ``[T]`` of the inner problem (float64, on the simplex), ``None`` before the first
        step."""
        return self._simplex

    def compute_direction(self, jacobian: Tensor, losses: Tensor) -> Direction:
        heads = torch.ones(jacobian.shape[1], device=jacobian.device)
        if jacobian.shape[0] < self.batch_parts:  # ζ held out: d = J_ζᵀc by the window's one product
            self._simplex, c = sdmgrad_step(jacobian, self._simplex, **self._options())
            return Direction(None, c, heads, held=c)
        d, self._simplex, c = sdmgrad_direction(jacobian, self._simplex, **self._options())
        return Direction(d, c, heads)

    def _options(self) -> dict[str, Any]:
        return {
            "lam": self.lam,
            "lr": self.lr,
            "momentum": self.momentum,
            "n_iter": self.n_iter,
            "reduce": self._gradients.column_reduce,
        }
