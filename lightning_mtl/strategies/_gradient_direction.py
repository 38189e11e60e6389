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
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_mtl.gradients import JacobianMethod, SyncMode, nan_weights
from lightning_mtl.step import StepContext, reduce_mean
from lightning_mtl.strategies._gradient_based import (
    GradientWeighting,
    _window_presence,
    merge_simplex,
    on_present_simplex,
)
from lightning_mtl.task_state import take_tasks

__all__ = ["Direction", "GradientDirection", "SimplexStateDirection"]


class Direction(NamedTuple):
    """What :meth:`GradientDirection.compute_direction` returns.

    Attributes:
        shared: the update direction of the shared parameters, flat ``[P]`` (in ``shared_parameters()`` order);
            ``None`` (zero) only with ``held``.
        weights: the per-task coefficients logged as ``train/weight/<task>`` ``[T]`` (the method's own: MoCo's
            and MoDo's λ, DB-MTL's scale factors, ...).
        heads: ``[T]``: the task-specific parameters receive ``Σ headsᵢ ∇Lᵢ``.
        held: with batch parts whose last part was held out (:attr:`GradientDirection.holds_out_last_part`), the
            coefficients ``c`` ``[T]`` of that part: the shared parameters receive ``shared + J_lastᵀc``.
    """

    shared: Tensor | None
    weights: Tensor
    heads: Tensor
    held: Tensor | None = None


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
    #: batch parts: the direction uses the last part's Jacobian only as ``J_lastᵀc`` (SDMGrad's ``ζ``, MoDo's third
    #: sample). Set to ``True``, the window does not form that Jacobian (one vector-Jacobian product at the
    #: backward instead of ``T`` rows): :meth:`compute_direction` then receives the first ``k − 1`` parts'
    #: Jacobians and returns ``c`` as :attr:`Direction.held`. It still receives all ``k`` where the window forms
    #: them (partial labels, a sharded model).
    holds_out_last_part = False
    #: partial labels: a subclass whose direction is defined on any subset of the tasks and whose per-task state
    #: declares its task dimensions (:meth:`~GradientWeighting.method_task_dims`) sets it to ``True``; the step
    #: with absent tasks is then built from the present tasks' rows and state only (see above)
    supports_absent_tasks = False

    def __init__(
        self, *, sync: SyncMode = "exact", jacobian: JacobianMethod = "auto", seed: int | None = None
    ) -> None:
        super().__init__(mode="parameters", update_every=1, sync=sync, jacobian=jacobian, seed=seed)
        self._warned_missing_parts = False
        # a held-out window's state before its step (method state, weights): restored if the step is skipped
        self._before_held_step: tuple[dict[str, Any], Tensor | None] | None = None

    def compute_direction(self, jacobian: Tensor, losses: Tensor) -> Direction:
        """The step's :class:`Direction` from the Jacobian ``[T, P]`` of the global batch (``[k, T, P]``: one per
        disjoint part, when :attr:`batch_parts` is ``k > 1``; float32) and the batch's losses ``[T]`` (averaged
        over ranks). Update the method's state here.

        On a sharded model (FSDP) with batch parts, ``jacobian`` is this rank's column shard ``[k, T, P_s]`` and
        the direction returned must be this shard's ``[P_s]``: a product over the columns (``J₀J₁ᵀ``) is then
        completed by ``self._gradients.column_reduce`` (the sum over the ranks; ``None`` when unsharded). A
        method without batch parts is refused on a sharded model (its whole Jacobian is never formed)."""
        raise NotImplementedError

    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:  # pragma: no cover - not used
        raise TypeError(f"{type(self).__name__} computes a direction, not weights: call compute_direction.")

    def backward(self, ctx: StepContext) -> None:
        gradients = self._gradients
        if ctx.is_window_start:
            gradients.reset()
        gradients.add(ctx, hold_out_last=self.holds_out_last_part and self.batch_parts > 1)
        # partial labels: a task is present in the window when one of its micro-batches labels it
        self._window_present = _window_presence(self._window_present, ctx.present, ctx.is_window_start)
        if not ctx.is_sync_step:
            return
        J = self._part_jacobians(ctx) if self.batch_parts > 1 else gradients.jacobian(ctx)
        if gradients.check_finite(ctx, J):
            # the held-out part's finiteness shows only in the backward (the GradScaler skips an overflow, the
            # module's non-finite check discards the window): the state then goes back to this
            self._before_held_step = (self.method_state(), self._weights) if gradients.held_out else None
            direction = self._direction(ctx, J, gradients.losses)
        else:  # AMP overflow: the GradScaler skips this step; the state stays as it was
            T = self.num_tasks
            direction = Direction(
                torch.full((J.shape[-1],), math.nan, device=J.device),
                nan_weights(T, ctx.losses.device),
                torch.ones(T, device=ctx.losses.device),
            )
        gradients.backward_direction(ctx, direction.shared, direction.heads, direction.held)
        self._clip_pending = True

    def on_optimizer_step(self, module: pl.LightningModule, skipped: bool) -> None:
        if skipped:
            self._restore_before_held_step()
        self._before_held_step = None
        super().on_optimizer_step(module, skipped)

    def on_accumulation_window_discarded(self, module: pl.LightningModule) -> None:
        self._restore_before_held_step()
        super().on_accumulation_window_discarded(module)

    def _restore_before_held_step(self) -> None:
        """Undo the step of a held-out window whose update was not applied (the state and the logged weights)."""
        if self._before_held_step is not None:
            state, weights = self._before_held_step
            self.load_method_state(state, None)
            self._weights = weights
        self._before_held_step = None

    def _part_jacobians(self, ctx: StepContext) -> Tensor:
        """The parts' Jacobians ``[k, T, P]``. With partial labels, a task labelled in some parts of the window but
        not in others has no gradient sample in those: its rows there are its gradient over all its labelled
        samples (the whole window's row), so that its labels still reach the shared update. For such a task the
        parts are then not independent samples; this is warned about once."""
        gradients = self._gradients
        J = gradients.part_jacobians(ctx)
        counts = gradients.part_label_counts
        if counts is None:
            return J
        missing = (counts <= 0) & (counts.sum(0) > 0)  # [k, T]: labelled in the window, not in this part
        if not bool(missing.any()):
            return J
        if not self._warned_missing_parts:
            self._warned_missing_parts = True
            tasks = [self.task_names[i] for i in missing.any(0).nonzero().flatten().tolist()]
            rank_zero_warn(
                f"{type(self).__name__}: task(s) {tasks} had no labelled sample in some of the {self.batch_parts} "
                f"parts of batch {ctx.batch_idx} (partial labels). Their rows in those parts are their gradient over "
                "all their labelled samples of the batch, so the independent-sample estimate does not hold for "
                "them in such steps. Larger batches or denser labels avoid it (warned once).",
                category=RuntimeWarning,
            )
        whole = gradients.part_mean(ctx)  # each task's rows weighted by its labelled counts per part
        return torch.where(missing.to(J.device)[..., None], whole.unsqueeze(0), J)

    def _direction(self, ctx: StepContext, J: Tensor, losses: Tensor) -> Direction:
        present, self._window_present = self._window_present, None
        if present is None or all(present):
            result = self.compute_direction(J, losses)
        else:
            result = self._present_direction(J, losses, [i for i, ok in enumerate(present) if ok])
        weights = result.weights.detach().to(device=ctx.losses.device, dtype=torch.float32)
        # each task's squared gradient norm (summed over the batch parts: zero when no part's loss reaches the
        # shared parameters), in one pass over J (the norm in J's dtype: 20× faster than in float64); on a
        # sharded model summed over the shards
        squared = torch.linalg.vector_norm(J, dim=-1).double().square()
        squared = squared if squared.dim() == 1 else squared.sum(0)
        reduce = self._gradients.column_reduce
        if reduce is not None:
            squared = reduce(squared)
        self._warn_unreached(squared.sqrt()[:, None], weights, present)
        if self.sync == "local" and ctx.world_size > 1:
            self._weights = reduce_mean(ctx.trainer, weights)
            self._average_method_state(ctx)
        else:
            self._weights = weights
        self._since_update = 0
        shared = None if result.shared is None else result.shared.detach()
        held = None if result.held is None else result.held.detach()
        return Direction(shared, weights, result.heads.detach().to(ctx.losses.device), held)

    def _present_direction(self, J: Tensor, losses: Tensor, present: list[int]) -> Direction:
        """:meth:`compute_direction` on the present tasks' rows (``J[..., present, :]``), losses and state only;
        the absent tasks' weights and head coefficients are 0 (their losses have no gradient)."""
        index = torch.tensor(present, device=J.device)
        sub_J = J.index_select(J.dim() - 2, index)
        sub_losses = losses[index.to(losses.device)]
        result = self._on_present_tasks(present, lambda: self.compute_direction(sub_J, sub_losses))
        held = None if result.held is None else self._scatter(result.held, index)
        return Direction(
            result.shared, self._scatter(result.weights, index), self._scatter(result.heads, index), held
        )

    def _scatter(self, values: Tensor, index: Tensor) -> Tensor:
        """``[len(index)]`` values of the present tasks as ``[T]``, 0 for the absent ones."""
        out = values.new_zeros(self.num_tasks)
        out[index.to(out.device)] = values
        return out


class SimplexStateDirection(GradientDirection):
    """Base of the direction methods whose only state is one point of the simplex ``[T]`` carried across steps
    (MoDo's ``λ``, SDMGrad's inner ``w``), named :attr:`simplex_key` in the checkpoint.

    Partial labels: a step with absent tasks moves the present tasks' entries on their own simplex (narrowed and
    rescaled to sum to 1), then writes them back scaled by the share of the full simplex they held, so the state
    still sums to 1 and the absent tasks' entries stay as they were (uniform ``1/T`` before the first step).
    """

    supports_absent_tasks = True
    #: the state's name in :meth:`method_state`
    simplex_key = "simplex"

    def __init__(self, *, sync: SyncMode = "exact", jacobian: JacobianMethod = "auto") -> None:
        super().__init__(sync=sync, jacobian=jacobian)
        self._simplex: Tensor | None = None

    def method_config(self) -> dict[str, Any]:
        """None: the state is a point of the simplex whatever the hyper-parameters (they change how it moves)."""
        return {}

    def method_state(self) -> dict[str, Any]:
        return {self.simplex_key: None if self._simplex is None else self._simplex.detach().cpu().clone()}

    def load_method_state(self, state: Mapping[str, Any], order: Sequence[int] | None = None) -> None:
        """Restore the state; ``order[i]`` is the saved index of task ``i`` (``None``: same order)."""
        value = state.get(self.simplex_key)
        if value is not None:
            value = value.detach().to(torch.float64)
            value = value.clone() if order is None else take_tasks(value, order).clone()
            if self.present_index is not None:  # partial labels: the present tasks' entries on their simplex
                value = on_present_simplex(value)
        self._simplex = value

    def method_task_dims(self) -> dict[str, tuple[int, ...]]:
        return {self.simplex_key: (0,)}

    def method_absent_fill(self) -> dict[str, float]:
        return {self.simplex_key: 1.0 / self.num_tasks}

    def merge_present_state(
        self, full: Mapping[str, Any], narrowed: Mapping[str, Any], present: list[int]
    ) -> dict[str, Any]:
        merged = super().merge_present_state(full, narrowed, present)
        new = narrowed.get(self.simplex_key)
        if isinstance(new, Tensor):
            old = full.get(self.simplex_key)
            before = old if isinstance(old, Tensor) else None
            merged[self.simplex_key] = merge_simplex(before, new, present, self.num_tasks)
        return merged
