"""The per-task gradients of one accumulation window: what every gradient strategy and diagnostic asks for.

Long because the window, the cross-rank reduction and the one combined backward must agree for every engine (full,
lean, sharded, batch parts): splitting them would spread one invariant over several files.

:class:`TaskGradients` owns the engine work that strategies must not repeat:

1. **per micro-batch** (:meth:`TaskGradients.add`): the task losses' gradients w.r.t. the target (the shared
   parameters, another parameter set such as GradNorm's layer, or the marked shared representation), by
   ``torch.autograd.grad`` (no DDP hook fires), unscaled under 16-bit AMP;
2. **over the window**: their sum over the micro-batches of an accumulation window, and the sum of the
   (rank-averaged) losses;
3. **over ranks** (``sync="exact"``): one all-reduce of the window's Jacobian ``[T, P]`` (or of the
   ``T × T`` representation Gramian), so every rank holds the statistic of the global batch;
4. **the one combined backward** (:meth:`TaskGradients.backward`) through Lightning, with the heads
   correction: ``heads="weighted"`` back-propagates ``Σ wᵢLᵢ``; ``heads="plain"`` gives the task-specific
   parameters the plain ``∇ΣLᵢ`` and only the shared part (or the representation) the combination ``Jᵀw``,
   by back-propagating ``ΣLᵢ + ⟨θ_shared, Jᵀ(w − 1)⟩`` (``⟨z, Σᵢ(wᵢ − 1)∇_z Lᵢ⟩`` in representation mode);
   explicit ``head_weights`` ``h`` give the heads ``Σ hᵢ∇Lᵢ`` the same way (IMTL: ``h = e^{s}``).

With ``jacobian="lean"`` (owners that only need the Gramian: ``gramian_only=True``; chosen by ``"auto"`` for a
large ``T·P``, see :func:`~lightning_mtl.gradients.lean.prefers_lean`) the window never forms ``J``: it keeps
the micro-batches' graphs (as it does anyway for the combined backward), and at the window's end
:mod:`~lightning_mtl.gradients.lean` computes ``G`` of the window's mean losses block by block (each block
all-reduced over ranks before its product with ``sync="exact"``: exact, since ``G`` is quadratic in ``J``);
the heads correction back-propagates ``Σᵢ(wᵢ − hᵢ)Lᵢ`` once more, to the shared parameters only (``Jᵀ(w − h)``
per micro-batch, without ``J``).

A strategy then only turns the statistic (:meth:`gramian` or :meth:`jacobian`) into weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_mtl.fsdp1 import fsdp1_units
from lightning_mtl.functional import gramian
from lightning_mtl.gradients.flat_sharded import FlatShards
from lightning_mtl.gradients.jacobian import JacobianEngine, JacobianMethod, unflatten
from lightning_mtl.gradients.lean import LeanGramian, combination_grads, prefers_lean
from lightning_mtl.gradients.sharded import (
    ParameterShards,
    auto_block_numel,
    check_fsdp_mesh,
    fsdp_sharded,
    shard_combination,
    sharded_gramian,
    sum_over_ranks,
)
from lightning_mtl.gradients.sources import (
    ParameterSource,
    check_trainable,
    grad_scale,
    marked_representation,
    shared_parameters_of,
)
from lightning_mtl.nonfinite import tensor_finite
from lightning_mtl.step import StepContext, reduce_mean

Target = Literal["parameters", "representation"]
SyncMode = Literal["exact", "local"]
Heads = Literal["weighted", "plain"]


class TaskGradients:
    """Per-task gradients over an accumulation window, reduced over ranks, and the one combined backward.

    Args:
        owner: the strategy or diagnostic's name, for messages.
        target: ``"parameters"`` (the Jacobian w.r.t. ``shared_parameters()``, or ``parameters``) or
            ``"representation"`` (the gradients w.r.t. the tensor marked by ``shared_representation(z)``).
        parameters: with ``target="parameters"``, a function ``module -> parameters`` replacing
            ``shared_parameters()`` (e.g. GradNorm's last shared layer); a frozen one is a clear error.
        sync: ``"exact"`` (reduce over ranks: the statistic of the global batch) or ``"local"`` (this rank's).
        jacobian: ``"batched"`` or ``"loop"`` (see :class:`JacobianEngine`), ``"lean"`` (only with
            ``gramian_only``: :meth:`gramian` without ever holding ``J``, :mod:`~lightning_mtl.gradients.lean`;
            :meth:`jacobian` is then an error) or ``"auto"`` (``"lean"`` when ``gramian_only`` and
            :func:`~lightning_mtl.gradients.lean.prefers_lean` holds for ``T`` and ``P``, decided once per
            ``(T, P)`` and identically on every rank; else batched with the loop fallback). Only
            ``target="parameters"`` is affected (the representation's gradients are small).
        gramian_only: the owner only ever asks for :meth:`gramian` (and the backward methods other than
            :meth:`backward_direction`), never for :meth:`jacobian` or :meth:`part_jacobians`.
        representation_fix: advice when no representation was marked (default: use ``mode='parameters'``).
    """

    def __init__(
        self,
        owner: str,
        *,
        target: Target = "parameters",
        parameters: ParameterSource | None = None,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
        gramian_only: bool = False,
        representation_fix: str | None = None,
    ) -> None:
        if target not in ("parameters", "representation"):
            raise ValueError(f"{owner} mode must be 'parameters' or 'representation', got {target!r}.")
        if sync not in ("exact", "local"):
            raise ValueError(f"{owner} sync must be 'exact' or 'local', got {sync!r}.")
        self.owner = owner
        self.target = target
        self.sync = sync
        self._source = parameters
        self._representation_fix = representation_fix
        if jacobian not in ("auto", "batched", "loop", "lean"):
            raise ValueError(
                f"{owner} jacobian must be 'auto', 'batched' or 'loop' (or 'lean' for a method that only needs "
                f"the Gramian), got {jacobian!r}."
            )
        if jacobian == "lean" and not gramian_only:
            raise ValueError(
                f"{owner} jacobian='lean' computes only the Gramian of the per-task gradients, but {owner} needs "
                "the Jacobian itself (its per-task gradients, e.g. needs='jacobian'). Use jacobian='auto', "
                "'batched' or 'loop'."
            )
        self.jacobian_method = jacobian
        self.gramian_only = gramian_only
        self._engine = JacobianEngine("auto" if jacobian == "lean" else jacobian, owner=owner)
        self._lean_engine = LeanGramian(self._engine, owner=owner)
        self._lean_choice: dict[tuple[int, int], bool] = {}
        self.reset()

    # ------------------------------------------------------------------ the window
    def reset(self) -> None:
        """Forget the current window (called at a window's start and after its backward)."""
        self._sum: Tensor | None = None  # Σ J_m [T, P], or Σ G_m [T, T] for the representation
        self._loss_sum: Tensor | None = None
        self._losses: list[Tensor] = []  # the micro-batches' attached losses, for the combined backward
        self._representations: list[tuple[Tensor, Tensor]] = []  # (z_m, its per-task gradients [T, numel])
        self._params: list[nn.Parameter] | None = None
        self._J: Tensor | None = None
        self._part_sum: Tensor | None = None  # Σ over micro-batches of the parts' Jacobians [k, T, P]
        # each part's share of each task's samples [k, T] in the window's first micro-batch (f⁽⁰⁾), and, where a
        # later micro-batch's shares f⁽ᵐ⁾ differ, Σ_m Σ_p (f⁽ᵐ⁾ − f⁽⁰⁾)ₚ J_p⁽ᵐ⁾ [T, P] (this rank's): the window's
        # Jacobian is then Σ_p f⁽⁰⁾ₚ J̄_p + (that sum)/count, exactly the mean of its micro-batches' Jacobians
        self._part_fractions: Tensor | None = None
        self._first_sizes: list[int] | None = None
        self._residual: Tensor | None = None
        # partial labels: the window's labelled counts per part [k, T]
        self._part_counts: Tensor | None = None
        self._parts_J: Tensor | None = None
        # the held-out last part of each micro-batch (hold_out_last): its attached losses [T], its share of the
        # micro-batch, its loss rows, its marked representation and the AMP scale (to form its Jacobian later)
        self._held: list[tuple[Tensor, float, list[Tensor] | None, Tensor | None, float | None]] = []
        self._lean = False  # this window uses the lean engine (decided at its first micro-batch)
        self._G: Tensor | None = None  # the lean window's Gramian
        # a sharded model (FSDP2: sharded.py, FSDP1: flat_sharded.py): _sum is this rank's shard J_s [T, P_s]
        self._shards: ParameterShards | FlatShards | None = None
        self.count = 0

    @property
    def sharded(self) -> bool:
        """Whether the current window's model is sharded (FSDP2 or FSDP1): :meth:`gramian` and the parts' shards
        (:meth:`part_jacobians`) are available, :meth:`jacobian` is not."""
        return self._shards is not None

    def parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """The parameters whose per-task gradients are taken (fixed for the duration of a window)."""
        if self._params is None or self.count == 0:
            if self._source is None:
                self._params = shared_parameters_of(module, self.owner)
            else:
                self._params = list(self._source(module))
        check_trainable(module, self._params, self.owner, "its parameter")
        return self._params

    def local(self, ctx: StepContext) -> tuple[Tensor | None, Tensor]:
        """This micro-batch's per-task gradients on this rank, unscaled: ``(None, [T, P])`` for parameters, or
        ``(z, [T, numel(z)])`` for the marked representation ``z``."""
        scale = grad_scale(ctx.trainer)
        if self.target == "parameters":
            params = self.parameters(ctx.module)
            rep = ctx.representation
            return None, self._engine(ctx.losses, params, scale, rows=ctx.loss_rows, through=rep).detach()
        z = marked_representation(ctx.module, self.owner, self._representation_fix)
        return z, self._engine(ctx.losses, [z], scale).detach()

    def uses_lean(self, ctx: StepContext) -> bool:
        """Whether the lean engine serves this step (``jacobian="lean"``, or ``"auto"`` and a large ``T·P``)."""
        if (
            self.target != "parameters"
            or not self.gramian_only
            or self.jacobian_method in ("batched", "loop")
        ):
            return False
        if self.jacobian_method == "lean":
            return True
        params = self.parameters(ctx.module)
        key = (int(ctx.losses.shape[0]), sum(p.numel() for p in params))
        if key not in self._lean_choice:
            size = torch.promote_types(ctx.losses.dtype, torch.float32).itemsize
            choice = prefers_lean(key[0], key[1], ctx.losses.device, size)
            if self.sync == "exact" and ctx.world_size > 1:  # one route on every rank (free memory differs)
                flag = torch.tensor(float(choice), device=ctx.losses.device)
                choice = bool(reduce_mean(ctx.trainer, flag) > 0)
            self._lean_choice[key] = choice
        return self._lean_choice[key]

    def add(self, ctx: StepContext, *, keep_graph: bool = True, hold_out_last: bool = False) -> None:
        """Take this micro-batch's per-task gradients into the window.

        ``keep_graph=False`` when the caller back-propagates the micro-batch itself (GradNorm's weights are
        known up front); otherwise the losses are kept for :meth:`backward` at the window's end.

        ``hold_out_last`` (batch parts, an owner whose direction uses the last part only as ``J_lastᵀc``: SDMGrad,
        MoDo with three samples): the last part's Jacobian is not formed; its losses are kept, and
        :meth:`backward_direction` gives the shared parameters ``J_lastᵀc`` by one vector-Jacobian product (see
        :attr:`held_out`). A sharded model never holds a part out. The Jacobian is formed after all, from the kept
        losses, where the window needs it: partial labels in any of its micro-batches, or a call to
        :meth:`part_mean` or :meth:`jacobian`.
        """
        if self.count == 0:
            self._shards = self._shards_of(ctx)
            self._lean = self._shards is None and self.uses_lean(ctx)
        if self._shards is not None and ctx.part_losses is not None:  # FSDP: each part's shard J_s
            self._add_parts(ctx)
        elif self._shards is not None:  # FSDP: this rank's shard of the rank-averaged J, by parameter blocks
            J_s = self._shard_jacobian(ctx, self._shards)
            self._sum = J_s.detach() if self._sum is None else self._sum + J_s.detach()
        elif self._lean:  # the work waits for the window's end (one backward of the window's losses)
            if not keep_graph or ctx.part_losses is not None:
                raise RuntimeError(
                    f"{self.owner}: jacobian='lean' needs the micro-batches' graphs until the window's end and "
                    "no batch parts; use jacobian='batched' or 'loop' here."
                )
            self._G = None
        elif ctx.part_losses is not None and self.target == "parameters":
            self._add_parts(ctx, hold_out_last)
        else:
            self._add_whole(ctx)
        losses = ctx.global_losses if self.sync == "exact" else ctx.losses.detach()
        self._loss_sum = losses.clone() if self._loss_sum is None else self._loss_sum + losses
        if keep_graph:
            self._losses.append(ctx.losses)
        self._J = None
        self._parts_J = None
        self.count += 1

    def _add_whole(self, ctx: StepContext) -> None:
        z, grads = self.local(ctx)
        if z is None:
            self._sum = grads if self._sum is None else self._sum + grads
        else:
            G = gramian(grads)
            self._sum = G if self._sum is None else self._sum + G
            self._representations.append((z, grads))

    def _add_parts(self, ctx: StepContext, hold_out_last: bool = False) -> None:
        """The per-task gradients of each of the batch's disjoint parts (``ctx.part_losses``); the whole batch's
        are their size-weighted mean (:meth:`part_mean`). On a sharded model, each part's shard ``J_s``. With
        ``hold_out_last`` (see :meth:`add`), all parts but the last."""
        assert ctx.part_losses is not None and ctx.part_sizes is not None
        if self._shards is not None:
            shards = self._shards
            parts = torch.stack([self._shard_jacobian(ctx, shards, L).detach() for L in ctx.part_losses])
        else:
            scale = grad_scale(ctx.trainer)
            params = self.parameters(ctx.module)
            losses = list(ctx.part_losses)
            rows = list(ctx.part_rows or [(None, None)] * len(losses))
            # partial labels replace a missing part's rows by the window's (every part's Jacobian is needed)
            hold = hold_out_last and len(losses) > 1 and ctx.part_counts is None
            hold = hold and (self.count == 0 or bool(self._held))  # the window's first micro-batch decides
            if hold:
                self._held.append((losses[-1], ctx.part_sizes[-1] / sum(ctx.part_sizes), *rows[-1], scale))
                losses, rows = losses[:-1], rows[:-1]
            elif self._held:  # partial labels after held-out micro-batches: form their last parts' Jacobians
                self._form_held(ctx)
            # [k, T, P]; through the parts' marked representations together where possible
            parts = self._engine.parts(
                losses, params, scale, rows=[r for r, _ in rows], throughs=[z for _, z in rows]
            ).detach()
        T = parts.shape[1]
        if ctx.part_counts is None:  # each part's share of the batch, the same for every task
            sizes = torch.tensor(ctx.part_sizes, dtype=parts.dtype, device=parts.device)
            shares = sizes[:, None].expand(-1, T)
        else:  # partial labels: each part's share of the task's labelled samples in this micro-batch
            shares = ctx.part_counts.to(device=parts.device, dtype=parts.dtype)
            # the window's labelled counts per part, for the tasks missing from a part (part_label_counts)
            self._part_counts = shares if self._part_counts is None else self._part_counts + shares
        total = shares.sum(0)
        fractions = shares / torch.where(total > 0, total, torch.ones_like(total))
        if self._part_fractions is None:
            self._part_fractions = fractions
            self._first_sizes = list(ctx.part_sizes) if ctx.part_counts is None else None
        elif ctx.part_counts is not None or self._first_sizes != list(ctx.part_sizes):
            # this micro-batch's parts weigh differently in its loss than the first's (unequal sizes at an
            # epoch's end, partial labels): the window's Jacobian needs the difference, for the formed parts
            delta = (fractions - self._part_fractions)[: parts.shape[0]]
            self._add_residual(torch.einsum("kt,ktp->tp", delta, parts))
        self._part_sum = parts if self._part_sum is None else self._part_sum + parts

    def _add_residual(self, term: Tensor) -> None:
        self._residual = term if self._residual is None else self._residual + term

    @property
    def held_out(self) -> bool:
        """Whether the window holds its last batch part out (:meth:`add`'s ``hold_out_last``): :meth:`part_jacobians`
        then returns the first ``k − 1`` parts' Jacobians, and :meth:`backward_direction` takes the last part's
        coefficients."""
        return bool(self._held)

    def _form_held(self, ctx: StepContext) -> None:
        """Form the held-out last parts' Jacobians from their kept losses (graphs retained) and append their window
        sum to the parts' sum: the window no longer holds a part out."""
        params = self.parameters(ctx.module)
        held, self._held = self._held, []
        first_share = held[0][1]  # the first micro-batch's: its part fractions are the window's f⁽⁰⁾
        last: Tensor | None = None
        for L, share, rows, z, scale in held:
            J = self._engine.parts([L], params, scale, rows=[rows], throughs=[z])[0].detach()
            last = J if last is None else last + J
            if share != first_share:  # as _add_parts does for the formed parts
                self._add_residual((share - first_share) * J)
        assert self._part_sum is not None and last is not None
        self._part_sum = torch.cat([self._part_sum, last.unsqueeze(0)])
        self._parts_J = None
        self._J = None

    def part_jacobians(self, ctx: StepContext) -> Tensor:
        """The Jacobians ``[k, T, P]`` of the ``k`` disjoint batch parts' mean losses over the window (of the
        union of the ranks' parts with ``sync="exact"``: see :mod:`lightning_mtl.batch_parts`), one reduction. On a
        sharded model, this rank's column shard ``[k, T, P_s]`` of them (the reduce-scatter already averaged).
        When the window holds its last part out (:attr:`held_out`), the first ``k − 1`` parts' ``[k − 1, T, P]``."""
        if self._part_sum is None:
            raise RuntimeError(
                f"{self.owner}: no batch parts were added (the strategy must set batch_parts > 1 and use "
                "target='parameters')."
            )
        if self._parts_J is None:
            parts = self._part_sum if self.count == 1 else self._part_sum / self.count
            sharded = self._shards is not None
            self._parts_J = reduce_mean(ctx.trainer, parts) if self._ranks(ctx) > 1 and not sharded else parts
        return self._parts_J

    def part_mean(self, ctx: StepContext) -> Tensor:
        """The parts' size-weighted mean ``[T, P]`` (``[T, P_s]`` on a sharded model): the window's Jacobian, the
        mean of its micro-batches' (with partial labels, each task's rows weighted by each micro-batch's labelled
        counts per part). A second reduction (``[T, P]``) only with ``sync="exact"`` under DDP in a window of several
        micro-batches (and, where the window held its last part out, the parts' reduction again with that part)."""
        assert self._part_fractions is not None, "no batch parts were added"
        if self._held:
            self._form_held(ctx)
        J = torch.einsum("kt,ktp->tp", self._part_fractions, self.part_jacobians(ctx))
        residual = self._residual
        if self.count > 1 and self._ranks(ctx) > 1 and self._shards is None:  # every rank joins the reduction
            residual = reduce_mean(ctx.trainer, torch.zeros_like(J) if residual is None else residual)
        return J if residual is None else J + residual / self.count

    @property
    def part_label_counts(self) -> Tensor | None:
        """With batch parts and partial labels: each part's labelled counts over the window (averaged over
        ranks) ``[k, T]``; ``None`` otherwise."""
        return self._part_counts

    @property
    def representations(self) -> list[tuple[Tensor, Tensor]]:
        """The window's ``(z_m, per-task gradients [T, numel(z_m)])`` pairs, this rank's (representation only)."""
        return self._representations

    @property
    def losses(self) -> Tensor:
        """The window's mean losses ``[T]`` (averaged over ranks with ``sync="exact"``), detached."""
        assert self._loss_sum is not None, "no micro-batch was added"
        return self._loss_sum / self.count

    def _ranks(self, ctx: StepContext) -> int:
        return ctx.world_size if self.sync == "exact" else 1

    def jacobian(self, ctx: StepContext) -> Tensor:
        """The Jacobian ``[T, P]`` of the window's mean losses (of the global batch with ``sync="exact"``)."""
        if self.target != "parameters":
            raise RuntimeError(f"{self.owner}: the Jacobian is only formed for target='parameters'.")
        if self._shards is not None:
            raise RuntimeError(
                f"{self.owner}: the model is sharded (FSDP): each rank holds only its shard of the Jacobian, "
                "never the whole T × P Jacobian. Only the Gramian-expressible methods (MGDA, UPGrad, PCGrad, ...) "
                "and the loss-based or representation-mode strategies train a sharded model."
            )
        if self._lean:
            raise RuntimeError(
                f"{self.owner}: the lean engine (jacobian='lean', or 'auto' for a large T·P) never forms the "
                "Jacobian, only its Gramian. Pass jacobian='batched' (or 'loop') to get the Jacobian."
            )
        if self._J is None and self._part_sum is not None:
            self._J = self.part_mean(ctx)
        if self._J is None:
            assert self._sum is not None, "no micro-batch was added"
            J = self._sum if self.count == 1 else self._sum / self.count
            self._J = reduce_mean(ctx.trainer, J) if self._ranks(ctx) > 1 else J
        return self._J

    def gramian(self, ctx: StepContext) -> Tensor:
        """The float64 Gramian ``[T, T]`` of the window's (global) per-task gradients.

        For the representation: the gradient of the global mean loss w.r.t. one micro-batch's representation
        on one rank is ``1/(R·k)`` times the local one, and different samples' blocks are orthogonal, so
        ``G = Σ G_local / (R·k)²``.
        """
        if self.target == "parameters" and self._shards is not None:
            assert self._sum is not None, "no micro-batch was added"
            return sharded_gramian(self._sum / self.count)
        if self.target == "parameters" and self._lean:
            return self._lean_gramian(ctx)
        if self.target == "parameters":
            return gramian(self.jacobian(ctx))
        assert self._sum is not None, "no micro-batch was added"
        G = self._sum / (self.count * self.count)
        ranks = self._ranks(ctx)
        return reduce_mean(ctx.trainer, G) / ranks if ranks > 1 else G

    def _lean_gramian(self, ctx: StepContext) -> Tensor:
        """The window's Gramian by the lean engine: of the micro-batches' mean losses (autograd sums their
        gradients), each parameter block reduced over ranks before its product with ``sync="exact"``."""
        if self._G is None:
            assert self._losses, "no micro-batch was added"
            losses = self._losses[0] if self.count == 1 else sum(self._losses) / self.count
            reduce = (lambda J: reduce_mean(ctx.trainer, J)) if self._ranks(ctx) > 1 else None
            params = self.parameters(ctx.module)
            self._G = self._lean_engine(losses, params, grad_scale(ctx.trainer), reduce)
        return self._G

    def check_finite(self, ctx: StepContext, statistic: Tensor) -> bool:
        """``True`` when ``statistic`` is finite; ``False`` on an AMP overflow (the GradScaler will skip the
        step); otherwise a ``FloatingPointError`` naming the owner and the losses."""
        finite = tensor_finite(statistic)
        # each rank holds a shard, or (sync="local") its own statistic: one answer for all, so that no rank goes on
        # to a collective (the weights' average over ranks) that another skipped
        if (self._shards is not None or self.sync == "local") and ctx.world_size > 1:
            finite = reduce_mean(ctx.trainer, finite.float()) == 1
        if bool(finite):
            return True
        if grad_scale(ctx.trainer) is not None:
            return False
        losses = dict(zip(ctx.task_names, self.losses.tolist()))
        raise FloatingPointError(
            f"{self.owner}: the per-task gradients are not finite (inf/NaN) although the losses are finite "
            f"({losses}): an operation of the model has a non-finite derivative (e.g. sqrt or log at 0), or the "
            "gradients overflow. Fix the operation, lower the learning rate or clip (gradient_clip_val)."
        )

    # ------------------------------------------------------------------ the combined backward
    def backward(
        self, ctx: StepContext, weights: Tensor, heads: Heads = "weighted", head_weights: Tensor | None = None
    ) -> None:
        """One backward of the window's losses through Lightning: the shared gradient is ``Jᵀw`` of the window
        (DDP averages it over ranks); the heads get ``wᵢ∇Lᵢ`` (``"weighted"``) or ``∇ΣLᵢ`` (``"plain"``).

        ``head_weights`` (``[T]``, overrides ``heads``) gives the heads ``Σᵢ hᵢ∇Lᵢ`` while the shared part
        still gets ``Jᵀw`` (``"plain"`` is ``h = 1``): one backward of ``Σ hᵢLᵢ + ⟨θ_shared, Jᵀ(w − h)⟩``
        (``⟨z, Σᵢ(wᵢ − hᵢ)∇_z Lᵢ⟩`` in representation mode)."""
        if head_weights is not None:
            self._backward_split(ctx, weights, head_weights)
            return
        if heads == "weighted":
            total = sum((weights.to(L) * L).sum() for L in self._losses)
        elif self.target == "parameters" and self._shards is not None:
            total = sum(L.sum() for L in self._losses) + self._shard_term(ctx, weights - 1)
        elif self.target == "parameters" and self._lean:
            total = sum(L.sum() for L in self._losses) + self._lean_term(ctx, weights - 1)
        elif self.target == "parameters":
            # ctx.backward divides by k; the window holds `count` micro-batches of mean Jacobian J
            correction = self._parameter_term(ctx, (weights.to(self.jacobian(ctx)) - 1) @ self.jacobian(ctx))
            total = sum(L.sum() for L in self._losses) + self.count * correction
        else:
            self.backward_representation(ctx, [weights.to(Z) @ Z for _, Z in self._representations])
            return
        self.reset()
        ctx.backward(total)

    def _backward_split(self, ctx: StepContext, weights: Tensor, head_weights: Tensor) -> None:
        """:meth:`backward` with explicit head weights ``h``: heads ``Σ hᵢ∇Lᵢ``, shared part ``Jᵀw``."""
        if self.target == "parameters" and self._shards is not None:
            total = sum((head_weights.to(L) * L).sum() for L in self._losses)
            total = total + self._shard_term(ctx, weights - head_weights.to(weights))
        elif self.target == "parameters" and self._lean:
            total = sum((head_weights.to(L) * L).sum() for L in self._losses)
            total = total + self._lean_term(ctx, weights - head_weights.to(weights))
        elif self.target == "parameters":
            J = self.jacobian(ctx)
            correction = self._parameter_term(ctx, (weights.to(J) - head_weights.to(J)) @ J)
            total = sum((head_weights.to(L) * L).sum() for L in self._losses) + self.count * correction
        else:
            total = sum((head_weights.to(L) * L).sum() for L in self._losses)
            for z, Z in self._representations:
                total = total + self._representation_term(z, (weights.to(Z) - head_weights.to(Z)) @ Z)
        self.reset()
        ctx.backward(total)

    def backward_direction(
        self, ctx: StepContext, direction: Tensor | None, head_weights: Tensor, held: Tensor | None = None
    ) -> None:
        """One backward of the window's losses in which the shared parameters receive ``direction`` (flat
        ``[P]``, identical on every rank with ``sync="exact"``; DDP averages it) and the task-specific ones
        ``Σ hᵢ∇Lᵢ``: the methods whose update is not ``Jᵀw`` of the step's Jacobian (MoCo's tracked gradients,
        DB-MTL's moving average, MoDo's and SDMGrad's independent samples). Back-propagates
        ``Σ hᵢLᵢ + ⟨θ_shared, d − Jᵀh⟩``. On a sharded model ``direction`` is this rank's shard ``[P_s]`` (built
        from :meth:`part_jacobians`' shards) and reaches the shard through FSDP's averaging.

        With ``held`` (``[T]``) the shared parameters receive ``d + J_lastᵀc``, ``c = held`` (``direction``
        ``None``: ``d = 0``), ``J_last`` the last part's Jacobian over the window and the ranks: from it where the
        window formed it; where the window holds the part out (:attr:`held_out`; ``held`` ``None`` then counts as
        ``c = 0``), without forming it: one vector-Jacobian product of ``Σ_m (c − f_m h)·L_last⁽ᵐ⁾`` per window
        (``f_m`` the part's share of micro-batch ``m``), which also cancels the part's share of ``Σ hᵢLᵢ``; DDP's
        average of the ranks' products is the product of the ranks' mean Jacobian."""
        heads = sum((head_weights.to(L) * L).sum() for L in self._losses)
        if held is not None and not self._held:  # the last part's Jacobian is formed: J_lastᵀc from it
            last = self.part_jacobians(ctx)[-1]
            extra = held.to(last) @ last
            direction = extra if direction is None else direction.to(extra) + extra
        if self._shards is not None:  # direction: this rank's shard [P_s] (batch parts: MoDo, SDMGrad)
            assert direction is not None
            J_s = self.part_mean(ctx)
            total = heads + self._shards.term((direction.to(J_s) - head_weights.to(J_s) @ J_s) * self.count)
        else:
            combined = self._combination(ctx, head_weights)
            shared = -combined if direction is None else direction.to(combined) - combined
            total = heads + self.count * self._parameter_term(ctx, shared)
            if self._held:  # held None: J_lastᵀ0 (the part's share of the heads' term is still cancelled)
                c = torch.zeros_like(head_weights) if held is None else held
                total = total + self._held_term(ctx, c, head_weights)
        self.reset()
        ctx.backward(total)

    def _held_term(self, ctx: StepContext, coefficients: Tensor, head_weights: Tensor) -> Tensor:
        """A scalar whose gradient is ``Σ_m J_lastᵀ(c − f_m h)`` on the window's parameters (this rank's held-out
        parts, one backward), zero elsewhere."""
        params = self.parameters(ctx.module)
        losses = torch.stack([L for L, *_ in self._held])  # [m, T]
        shares = torch.tensor([share for _, share, *_ in self._held], device=losses.device)
        c = coefficients.to(losses)[None, :] - shares.to(losses)[:, None] * head_weights.to(losses)[None, :]
        grads = combination_grads(losses, c, params, self._held[0][-1])
        return _dot(params, grads, ctx.losses)

    def _combination(self, ctx: StepContext, coefficients: Tensor) -> Tensor:
        """``cᵀJ`` ``[P]`` of the window's Jacobian; with batch parts straight from the parts' Jacobians (``J`` is
        their size-weighted mean: ``Σₖₜ cₜ fₖₜ Jₖₜ``, one pass, without forming ``J``; plus this rank's part of the
        change of the shares ``f`` within the window, which DDP averages with the backward). When the window holds
        its last part out, the sum over the other parts only."""
        if self._part_sum is None or self._J is not None:
            J = self.jacobian(ctx)
            return coefficients.to(J) @ J
        assert self._part_fractions is not None
        parts = self.part_jacobians(ctx)
        k, T, P = parts.shape
        fractions = self._part_fractions[:k]
        c = (fractions.to(parts) * coefficients.to(parts)[None, :]).reshape(k * T)
        combined = c @ parts.reshape(k * T, P)
        if self._residual is None:
            return combined
        # this rank's share of the fractions' change within the window; DDP averages it with the backward
        return combined + coefficients.to(parts) @ self._residual / self.count

    def backward_representation(self, ctx: StepContext, combined: Sequence[Tensor]) -> None:
        """One backward in which micro-batch ``m``'s representation receives ``combined[m]`` (flat, this rank's)
        instead of ``Σᵢ∇_z Lᵢ``, and everything downstream of it the plain ``∇ΣLᵢ`` (GradDrop, plain heads)."""
        total = sum(L.sum() for L in self._losses)
        for (z, Z), c in zip(self._representations, combined, strict=True):
            total = total + self._representation_term(z, c - Z.sum(0))
        self.reset()
        ctx.backward(total)

    def backward_reusing(
        self, ctx: StepContext, weights: Tensor, heads: Heads = "weighted", head_weights: Tensor | None = None
    ) -> None:
        """Back-propagate this micro-batch at once with weights computed earlier (``update_every > 1``): no
        window, no reduction; with ``heads="plain"`` (or ``head_weights``, see :meth:`backward`) this rank's
        per-task gradients split shared and heads."""
        losses = ctx.losses
        if head_weights is None and heads == "weighted":
            ctx.backward((weights.to(losses) * losses).sum())
            return
        shards = self._shards_of(ctx)
        if shards is not None:  # FSDP: this micro-batch's J_sᵀ(w − h) on every rank's shard
            h = torch.ones_like(weights) if head_weights is None else head_weights.to(weights)
            J_s = self._shard_jacobian(ctx, shards)
            term = shards.term(shard_combination(J_s, weights - h))
            ctx.backward((h.to(losses) * losses).sum() + term)
            return
        if self.uses_lean(ctx):  # this micro-batch's Jᵀ(w − h) by one plain backward, without J
            h = torch.ones_like(weights) if head_weights is None else head_weights.to(weights)
            grads_c = combination_grads(
                losses, weights - h, self.parameters(ctx.module), grad_scale(ctx.trainer)
            )
            ctx.backward((h.to(losses) * losses).sum() + _dot(self.parameters(ctx.module), grads_c, losses))
            return
        z, grads = self.local(ctx)
        if head_weights is None:
            c = (weights.to(grads) - 1) @ grads
            head_loss = losses.sum()
        else:
            c = (weights.to(grads) - head_weights.to(grads)) @ grads
            head_loss = (head_weights.to(losses) * losses).sum()
        term = self._parameter_term(ctx, c) if z is None else self._representation_term(z, c)
        ctx.backward(head_loss + term)

    def _parameter_term(self, ctx: StepContext, c: Tensor) -> Tensor:
        """A scalar whose gradient is ``c`` on the window's parameters and zero elsewhere."""
        params = self.parameters(ctx.module)
        return sum(
            ((p * g.to(p.dtype)).sum() for p, g in zip(params, unflatten(c, params), strict=True)),
            ctx.losses.new_zeros(()),
        )

    #: FSDP: the per-task gradients are taken and reduce-scattered by blocks of at most this many elements
    #: (``None``: :func:`~lightning_mtl.gradients.sharded.auto_block_numel`)
    shard_block_numel: int | None = None

    def _shard_jacobian(
        self, ctx: StepContext, shards: ParameterShards | FlatShards, losses: Tensor | None = None
    ) -> Tensor:
        """This micro-batch's ``J_s`` (of ``losses``, default ``ctx.losses``): this rank's shard of the
        rank-averaged per-task gradients."""
        losses = ctx.losses if losses is None else losses
        block = self.shard_block_numel
        if block is None:
            block = auto_block_numel(int(losses.shape[0]), shards.numel)
        return shards.jacobian(losses, self._engine, grad_scale(ctx.trainer), block)

    @property
    def column_reduce(self) -> Callable[[Tensor], Tensor] | None:
        """On a sharded model with several ranks, the sum over the ranks (all-reduce) that completes a product
        over the columns of the shards (``J_s J_s'ᵀ``, squared row norms); ``None`` otherwise (nothing to do)."""
        if self._shards is None or not (dist.is_available() and dist.is_initialized()):
            return None
        return sum_over_ranks if dist.get_world_size() > 1 else None

    def _shards_of(self, ctx: StepContext) -> ParameterShards | FlatShards | None:
        """The shared parameters' shards when the model is sharded (FSDP2 or FSDP1), ``None`` otherwise."""
        if self.target != "parameters":
            return None
        strategy = getattr(getattr(ctx, "trainer", None), "strategy", None)
        model = getattr(strategy, "model", None)  # Lightning's wrapper (an FSDP1 root) holds ctx.module
        units = fsdp1_units(ctx.module if model is None else model)
        sharded = bool(units) or fsdp_sharded(ctx.module)
        if sharded and self.sync != "exact":
            raise RuntimeError(
                f"{self.owner}: a sharded (FSDP) model needs sync='exact' (each rank holds only its shard of the "
                "per-task gradients)."
            )
        if units:
            return FlatShards.of(units, self.parameters(ctx.module), self.owner)
        if not sharded:
            return None
        check_fsdp_mesh(ctx.module, self.owner)
        return ParameterShards(self.parameters(ctx.module))

    def _shard_term(self, ctx: StepContext, coefficients: Tensor) -> Tensor:
        """FSDP: a scalar whose gradient, once FSDP has averaged it into the shards, is ``J_sᵀc`` on every
        rank's shard of the shared parameters, times the window's ``count`` (``ctx.backward`` divides by it)."""
        assert self._sum is not None and self._shards is not None
        J_s = self._sum / self.count
        return self._shards.term(shard_combination(J_s, coefficients.to(J_s)) * self.count)

    def _lean_term(self, ctx: StepContext, coefficients: Tensor) -> Tensor:
        """A scalar whose gradient is ``Σ_m J_mᵀc`` (this rank's micro-batches) on the window's parameters and
        zero elsewhere: one plain backward of ``Σ_m Σᵢ cᵢL_{m,i}`` to the shared parameters (lean engine)."""
        params = self.parameters(ctx.module)
        window = self._losses[0] if len(self._losses) == 1 else sum(self._losses)
        grads = combination_grads(window, coefficients, params, grad_scale(ctx.trainer))
        return _dot(params, grads, ctx.losses)

    @staticmethod
    def _representation_term(z: Tensor, c: Tensor) -> Tensor:
        """A scalar whose gradient w.r.t. ``z`` is ``c`` (flat)."""
        return (z.float() * c.view_as(z).float()).sum()


def _dot(params: Sequence[Tensor], grads: Sequence[Tensor], like: Tensor) -> Tensor:
    """``Σ_p ⟨p, g_p⟩`` with the ``g_p`` constant: a scalar whose gradient is ``g`` on ``params``."""
    return sum(
        ((p * g.detach().to(p.dtype)).sum() for p, g in zip(params, grads, strict=True)), like.new_zeros(())
    )


def nan_weights(T: int, device: torch.device) -> Tensor:
    """Weights that make the update non-finite, so that the GradScaler skips an overflowed step."""
    return torch.full((T,), math.nan, device=device)
