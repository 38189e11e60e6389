"""The base of the gradient methods whose shared update is a direction they build, not ``Jᵀw`` of the step's
Jacobian: MoCo (tracked per-task gradients), DB-MTL (a moving average of the log-losses' gradients), MoDo and
SDMGrad (independent gradient samples from disjoint parts of the batch).

The engine (:class:`~lightning_mtl.gradients.TaskGradients`) still owns the per-task gradients, the window, the
one cross-rank reduction and the one backward (:meth:`~lightning_mtl.gradients.TaskGradients.backward_direction`:
the shared parameters receive the direction ``d``, the task-specific ones ``Σ hᵢ∇Lᵢ``). A subclass implements
:meth:`GradientDirection.compute_direction`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_mtl.gradients import JacobianMethod, SyncMode, nan_weights
from lightning_mtl.step import StepContext, reduce_mean
from lightning_mtl.strategies._gradient_based import GradientWeighting, _window_presence

__all__ = ["Direction", "GradientDirection"]


class Direction(NamedTuple):
    """What :meth:`GradientDirection.compute_direction` returns.

    Attributes:
        shared: the update direction of the shared parameters, flat ``[P]`` (in ``shared_parameters()`` order).
        weights: the per-task coefficients logged as ``train/weight/<task>`` ``[T]`` (the method's own: MoCo's
            and MoDo's λ, DB-MTL's scale factors, ...).
        heads: ``[T]``: the task-specific parameters receive ``Σ headsᵢ ∇Lᵢ``.
    """

    shared: Tensor
    weights: Tensor
    heads: Tensor


class GradientDirection(GradientWeighting):
    """Base of the strategies whose shared update is a direction ``d`` computed from the per-task gradients and
    the method's state (not ``Jᵀw`` of the step's Jacobian).

    Partial labels: in a step (an accumulation window) where some tasks are labelled on no rank,
    :meth:`compute_direction` sees a problem of the present tasks only: their Jacobian rows, their losses and
    their per-task state (narrowed along :meth:`~GradientWeighting.method_task_dims` and merged back after the
    step, as :class:`GradientWeighting` does for weights). The absent tasks' logged weights and head
    coefficients are 0 and their state stays bit-for-bit as it was.

    Subclasses implement :meth:`compute_direction`; they set :attr:`batch_parts` to ``k > 1`` to receive the
    Jacobians ``[k, T, P]`` of ``k`` disjoint parts of the batch (independent gradient samples) instead of the
    whole batch's ``[T, P]``. State, checkpoints and ``sync`` are as in :class:`GradientWeighting`; the weights
    are recomputed every step (no ``update_every``: the direction is built from the step's gradients), and only
    ``mode="parameters"`` exists (the methods need the Jacobian of the shared parameters).

    Args:
        sync: ``"exact"`` (default; every rank computes the direction from the global batch's gradients, so the
            DDP update equals the single-process one) or ``"local"`` (each rank's own direction, averaged by DDP,
            and the method's state averaged over ranks after each step: an approximation that saves the ``T × P``
            all-reduce).
        jacobian: ``"auto"``, ``"batched"`` or ``"loop"`` (see :class:`~lightning_mtl.gradients.JacobianEngine`).
        seed: seed of the generator of random methods (``None``: Lightning's global seed, else 0).
    """

    needs = "jacobian"
    #: partial labels: a subclass whose direction is defined on any subset of the tasks and whose per-task state
    #: declares its task dimensions (:meth:`~GradientWeighting.method_task_dims`) sets it to ``True``; the step
    #: with absent tasks is then built from the present tasks' rows and state only (see above)
    supports_absent_tasks = False

    def __init__(
        self, *, sync: SyncMode = "exact", jacobian: JacobianMethod = "auto", seed: int | None = None
    ) -> None:
        super().__init__(mode="parameters", update_every=1, sync=sync, jacobian=jacobian, seed=seed)

    def compute_direction(self, jacobian: Tensor, losses: Tensor) -> Direction:
        """The step's :class:`Direction` from the Jacobian ``[T, P]`` of the global batch (``[k, T, P]``: one per
        disjoint part, when :attr:`batch_parts` is ``k > 1``; float32) and the batch's losses ``[T]`` (averaged
        over ranks). Update the method's state here."""
        raise NotImplementedError

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:  # pragma: no cover - not used
        raise TypeError(f"{type(self).__name__} computes a direction, not weights: call compute_direction.")

    def backward(self, ctx: StepContext) -> None:
        gradients = self._gradients
        if ctx.is_window_start:
            gradients.reset()
        gradients.add(ctx)
        # partial labels: a task is present in the window when one of its micro-batches labels it
        self._window_present = _window_presence(self._window_present, ctx.present, ctx.is_window_start)
        if not ctx.is_sync_step:
            return
        J = gradients.part_jacobians(ctx) if self.batch_parts > 1 else gradients.jacobian(ctx)
        if gradients.check_finite(ctx, J):
            direction = self._direction(ctx, J, gradients.losses)
        else:  # AMP overflow: the GradScaler skips this step; the state stays as it was
            T = self.num_tasks
            direction = Direction(
                torch.full((J.shape[-1],), math.nan, device=J.device),
                nan_weights(T, ctx.losses.device),
                torch.ones(T, device=ctx.losses.device),
            )
        gradients.backward_direction(ctx, direction.shared, direction.heads)
        self._clip_pending = True

    def _direction(self, ctx: StepContext, J: Tensor, losses: Tensor) -> Direction:
        present, self._window_present = self._window_present, None
        if present is None or all(present):
            result = self.compute_direction(J, losses)
        else:
            result = self._present_direction(J, losses, [i for i, ok in enumerate(present) if ok])
        weights = result.weights.detach().to(device=ctx.losses.device, dtype=torch.float32)
        whole = J if J.dim() == 2 else J.mean(0)
        self._warn_unreached(whole, weights, present)
        if self.sync == "local" and ctx.world_size > 1:
            self._weights = reduce_mean(ctx.trainer, weights)
            self._average_method_state(ctx)
        else:
            self._weights = weights
        self._since_update = 0
        return Direction(result.shared.detach(), weights, result.heads.detach().to(ctx.losses.device))

    def _present_direction(self, J: Tensor, losses: Tensor, present: list[int]) -> Direction:
        """:meth:`compute_direction` on the present tasks' rows (``J[..., present, :]``), losses and state only;
        the absent tasks' weights and head coefficients are 0 (their losses have no gradient)."""
        index = torch.tensor(present, device=J.device)
        sub_J = J.index_select(J.dim() - 2, index)
        sub_losses = losses[index.to(losses.device)]
        result = self._on_present_tasks(present, lambda: self.compute_direction(sub_J, sub_losses))
        return Direction(
            result.shared, self._scatter(result.weights, index), self._scatter(result.heads, index)
        )

    def _scatter(self, values: Tensor, index: Tensor) -> Tensor:
        """``[len(index)]`` values of the present tasks as ``[T]``, 0 for the absent ones."""
        out = values.new_zeros(self.num_tasks)
        out[index.to(out.device)] = values
        return out
