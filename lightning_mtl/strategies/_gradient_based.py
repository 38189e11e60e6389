"""Shared wiring of the gradient-based strategies: per-task gradients → weights → one combined backward.

Every step of a :class:`GradientWeighting` strategy goes through the same phases:

1. **Per-task gradients** (:mod:`lightning_mtl.gradients`), without any DDP all-reduce: the Jacobian ``J``
   of the task losses w.r.t. the shared parameters (``mode="parameters"``, one batched backward), or the
   Gramian of the gradients w.r.t. the shared representation (``mode="representation"``, MGDA-UB style:
   the backward stops at the representation, so its cost does not depend on the encoder). Under 16-bit AMP
   the backward runs on scaled losses and the result is unscaled before the method sees it.
2. **Accumulation**: over the micro-batches of an accumulation window the Jacobian (or the representation
   Gramian) is summed; the micro-batches' graphs are kept until the window's last micro-batch.
3. **Synchronisation** (``sync="exact"``, default): one all-reduce of the stacked Jacobian ``[T, P]`` (or of
   the ``T × T`` representation Gramian) gives every rank the Jacobian of the global batch, so the weights
   are computed identically everywhere (random methods draw from a generator seeded identically on every
   rank). ``sync="local"`` skips it: each rank computes weights from its own batch and DDP averages the
   resulting updates (one ``P``-sized all-reduce, as for plain training): an approximation of the
   single-process update; the logged weights and the method's state are then averaged over ranks.
4. **Weights** ``w`` from the method (:meth:`GradientWeighting.compute_weights`, pure math from
   :mod:`lightning_mtl.functional`), then **one backward** through Lightning (DDP averages it, the AMP
   scaler scales it, task-specific heads get their gradients in the same pass) whose shared-parameter
   gradient is ``J_globalᵀ w`` on every rank: 2 ranks × batch B give the update of 1 process × batch 2B.
   What the task-specific parameters (everything outside ``shared_parameters()``, or downstream of the
   marked representation) receive depends on :attr:`GradientWeighting.heads`: ``"weighted"`` back-propagates
   ``Σ wᵢLᵢ`` (heads get ``wᵢ∇Lᵢ``: MGDA, Nash-MTL, as their authors' code), ``"plain"`` gives the heads the
   plain ``∇ΣLᵢ`` and only the shared part the method's combination, as the reference implementations of
   the gradient-surgery methods do (PCGrad, GradVac, CAGrad, IMTL-G, Aligned-MTL, UPGrad, DualProj,
   FairGrad): it back-propagates ``ΣLᵢ + ⟨θ_shared, Jᵀ(w − 1)⟩`` (``⟨z, Σᵢ(wᵢ − 1)∇_z Lᵢ⟩`` in
   representation mode), whose gradient is ``Jᵀw`` on the shared part and ``∇ΣLᵢ`` on the rest.

``update_every=k`` recomputes the weights every ``k`` optimizer steps and reuses them in between. With
``heads="weighted"`` those steps take no per-task gradients at all (their cost is the cost of equal
weighting); with ``heads="plain"`` they still take this rank's per-task gradients (to split the shared and
the head gradients) but skip the synchronisation and the method's solver.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_mtl.gradients import (
    JacobianEngine,
    grad_scale,
    gramian,
    marked_representation,
    reduce_mean_,
    shared_parameters_of,
    unflatten,
)
from lightning_mtl.strategies.base import MTLStrategy, StepContext, global_seed

GradientMode = Literal["parameters", "representation"]
SyncMode = Literal["exact", "local"]
JacobianMethod = Literal["auto", "batched", "loop"]


def cosine_min(G: Tensor) -> Tensor:
    """Smallest pairwise cosine similarity between task gradients, from their Gramian (``[T, T]``)."""
    T = G.shape[0]
    d = G.diagonal().clamp_min(torch.finfo(G.dtype).tiny).sqrt()
    cos = G / (d[:, None] * d[None, :])
    off = ~torch.eye(T, dtype=torch.bool, device=G.device)
    return cos[off].min() if T > 1 else cos.new_ones(())


class GradientWeighting(MTLStrategy):
    """Base of the strategies whose update is ``Σ wᵢ∇Lᵢ`` with weights computed from per-task gradients.

    Subclasses implement :meth:`compute_weights` (a call into :mod:`lightning_mtl.functional`) and, when
    they carry state between steps, :meth:`method_state` / :meth:`load_method_state`; they set
    :attr:`heads` to ``"plain"`` when the task-specific parameters must keep their own gradient ``∇ΣLᵢ``
    (the method's combination then applies to the shared parameters, or upstream of the marked
    representation, only) instead of ``wᵢ∇Lᵢ`` (``"weighted"``, the default).

    Args:
        mode: ``"parameters"`` (Jacobian w.r.t. ``shared_parameters()``) or ``"representation"`` (gradients
            w.r.t. the tensor marked by ``self.shared_representation(z)`` in ``task_losses``; only for methods
            computed on the Gramian).
        update_every: recompute the weights every ``k`` optimizer steps and reuse them in between (as
            Nash-MTL-T); ``1`` (default) recomputes them every step.
        sync: ``"exact"`` (default; the DDP update equals the single-process update on the global batch) or
            ``"local"`` (weights per rank, results averaged; an approximation that saves the
            ``T × P`` all-reduce).
        jacobian: ``"auto"`` (one batched backward, per-task loop if the graph does not support ``vmap``),
            ``"batched"`` or ``"loop"``.
    """

    #: what :meth:`compute_weights` receives: the Gramian ``[T, T]`` or the Jacobian ``[T, P]``
    needs: Literal["gramian", "jacobian"] = "gramian"
    #: whether the method draws random numbers (from a generator seeded identically on every rank)
    random: bool = False
    #: gradient of the task-specific parameters: ``"weighted"`` (``wᵢ∇Lᵢ``, from one backward of ``Σ wᵢLᵢ``)
    #: or ``"plain"`` (``∇ΣLᵢ``: the method's combination applies to the shared part only)
    heads: Literal["weighted", "plain"] = "weighted"

    def __init__(
        self,
        *,
        mode: GradientMode = "parameters",
        update_every: int = 1,
        sync: SyncMode = "exact",
        jacobian: JacobianMethod = "auto",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if mode not in ("parameters", "representation"):
            raise ValueError(f"{name} mode must be 'parameters' or 'representation', got {mode!r}.")
        if mode == "representation" and self.needs != "gramian":
            raise ValueError(
                f"{name} does not support mode='representation': it needs the full Jacobian of the shared "
                "parameters, not only their Gramian. Use mode='parameters'."
            )
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"{name} update_every must be an int >= 1, got {update_every!r}.")
        if sync not in ("exact", "local"):
            raise ValueError(f"{name} sync must be 'exact' or 'local', got {sync!r}.")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{name} seed must be an int or None, got {seed!r}.")
        self.mode = mode
        self.update_every = update_every
        self.sync = sync
        self.seed = seed
        self._engine = JacobianEngine(jacobian, owner=name)
        self._weights: Tensor | None = None
        self._since_update = 0
        self._generator: torch.Generator | None = None
        self._metrics: dict[str, Tensor] = {}
        # accumulation window
        self._computing = True
        self._window_losses: list[Tensor] = []
        self._window_global: Tensor | None = None
        self._acc: Tensor | None = None
        self._window_J: Tensor | None = None
        self._window_reps: list[tuple[Tensor | None, Tensor]] = []

    # ------------------------------------------------------------------ subclass API
    def compute_weights(self, stat: Tensor, losses: Tensor) -> Tensor:
        """Weights ``[T]`` from the Gramian ``[T, T]`` (or Jacobian ``[T, P]`` when ``needs == "jacobian"``)
        of the global batch, and the batch's losses ``[T]`` (detached, averaged over ranks)."""
        raise NotImplementedError

    def method_state(self) -> dict[str, Any]:
        """State the method carries between steps (tensors and primitives, identical on every rank)."""
        return {}

    def load_method_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`method_state`."""

    @property
    def generator(self) -> torch.Generator:
        """CPU generator seeded with ``seed`` (default: the global seed), identical on every rank."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(global_seed(self.seed))
        return self._generator

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.mode == "parameters":
            shared_parameters_of(pl_module, type(self).__name__)  # fail before training if none declared
        if self.random:
            _ = self.generator

    def reset_state(self) -> None:
        super().reset_state()
        self._weights = None
        self._since_update = 0
        self._generator = None
        self._metrics = {}
        self._reset_window()
        self.load_method_state({})

    def _reset_window(self) -> None:
        self._window_losses = []
        self._window_global = None
        self._acc = None
        self._window_J = None
        self._window_reps = []

    # ------------------------------------------------------------------ the step
    def backward(self, ctx: StepContext) -> None:
        if ctx.is_window_start:
            self._reset_window()
            self._computing = self._weights is None or self._since_update >= self.update_every
        if not self._computing and self._weights is not None:
            w = self._weights.to(device=ctx.losses.device, dtype=ctx.losses.dtype)
            if self.heads == "weighted":
                ctx.backward((w * ctx.losses).sum())
            else:
                grads = self._task_gradients(ctx)
                ctx.backward(ctx.losses.sum() + self._shared_correction(ctx, w, grads, self._marked(ctx)))
            self._clip_pending = ctx.is_sync_step
            return
        grads = self._task_gradients(ctx)
        stat = grads if self.mode == "parameters" else gramian(grads)
        if self.heads == "plain" and self.mode == "representation":
            self._window_reps.append((self._marked(ctx), grads))
        self._acc = stat if self._acc is None else self._acc + stat
        global_losses = ctx.global_losses if self.sync == "exact" else ctx.losses.detach()
        self._window_global = (
            global_losses.clone() if self._window_global is None else self._window_global + global_losses
        )
        self._window_losses.append(ctx.losses)
        if not ctx.is_sync_step:
            return
        micro_batches = len(self._window_losses)
        weights = self._update(ctx, micro_batches)
        if self.heads == "weighted":
            total = sum((weights.to(L.dtype) * L).sum() for L in self._window_losses)
        else:
            total = sum(L.sum() for L in self._window_losses)
            if self.mode == "parameters":
                # the window's (rank-averaged) Jacobian; ctx.backward divides by k, hence the factor k
                assert self._window_J is not None
                total = total + ctx.accumulate_grad_batches * self._shared_correction(
                    ctx, weights, self._window_J, None
                )
            else:
                for z, Z in self._window_reps:
                    total = total + self._shared_correction(ctx, weights, Z, z)
        self._reset_window()
        ctx.backward(total)
        self._clip_pending = True

    def _marked(self, ctx: StepContext) -> Tensor | None:
        if self.mode == "parameters":
            return None
        return marked_representation(ctx.module, type(self).__name__)

    def _task_gradients(self, ctx: StepContext) -> Tensor:
        """This rank's per-task gradients, unscaled: the Jacobian ``[T, P]`` of the shared parameters, or the
        gradients ``[T, numel(z)]`` w.r.t. the marked representation."""
        name = type(self).__name__
        scale = grad_scale(ctx.trainer)
        if self.mode == "parameters":
            params = shared_parameters_of(ctx.module, name)
            return self._engine(ctx.losses, params, scale).detach()
        z = marked_representation(ctx.module, name)
        return self._engine(ctx.losses, [z], scale).detach()

    def _shared_correction(
        self, ctx: StepContext, weights: Tensor, grads: Tensor, z: Tensor | None
    ) -> Tensor:
        """Scalar whose gradient is ``Σᵢ(wᵢ − 1)gᵢ`` on the shared parameters (``z is None``, ``grads = J``)
        or on the representation ``z`` (``grads`` its per-task gradients), and zero elsewhere: added to
        ``ΣLᵢ`` it gives the shared part ``Σ wᵢgᵢ`` and the heads ``∇ΣLᵢ``."""
        c = (weights.to(device=grads.device, dtype=grads.dtype) - 1) @ grads
        if z is not None:
            return (z.float() * c.view_as(z).float()).sum()
        params = shared_parameters_of(ctx.module, type(self).__name__)
        return sum(
            ((p * g.to(p.dtype)).sum() for p, g in zip(params, unflatten(c, params), strict=True)),
            ctx.losses.new_zeros(()),
        )

    def _global_statistic(self, ctx: StepContext) -> Tensor:
        """The accumulated statistic of the window (and of every rank, with ``sync="exact"``)."""
        assert self._acc is not None
        k = ctx.accumulate_grad_batches
        ranks = ctx.world_size if self.sync == "exact" else 1
        if self.mode == "parameters":
            J = self._acc / k
            if ranks > 1:
                J = reduce_mean_(ctx.trainer, J)
            self._window_J = J
            return J if self.needs == "jacobian" else gramian(J)
        # the gradient of the global mean loss w.r.t. one rank's (micro-batch's) representation is 1/(R·k)
        # times the local one, and the blocks of different samples are orthogonal: G = Σ G_local / (R·k)².
        G = self._acc / (k * k)
        if ranks > 1:
            G = reduce_mean_(ctx.trainer, G) / ranks
        return G

    def _update(self, ctx: StepContext, micro_batches: int) -> Tensor:
        name = type(self).__name__
        stat = self._global_statistic(ctx)
        T = self.num_tasks
        if not bool(torch.isfinite(stat).all()):
            if grad_scale(ctx.trainer) is not None:
                # AMP overflow: NaN weights make the combined gradient non-finite, so the GradScaler skips this
                # step and lowers its scale; weights and state stay as they were (recomputed next step).
                return torch.full((T,), math.nan, device=ctx.losses.device)
            raise FloatingPointError(
                f"{name}: the per-task gradients are not finite (inf/NaN) although the losses are "
                f"{self._window_global.tolist() if self._window_global is not None else '?'}. Lower the "
                "learning rate or clip the gradients (gradient_clip_val)."
            )
        assert self._window_global is not None
        losses = self._window_global / micro_batches
        weights = (
            self.compute_weights(stat, losses).detach().to(device=ctx.losses.device, dtype=torch.float32)
        )
        if self.needs == "gramian":
            self._metrics["train/grad/cos_min"] = cosine_min(stat.detach().to(torch.float64)).float()
        recorded = weights
        if self.sync == "local" and ctx.world_size > 1:
            recorded = reduce_mean_(ctx.trainer, weights.clone())
            self._average_method_state(ctx)
        self._weights = recorded
        self._since_update = 0
        return weights

    def _average_method_state(self, ctx: StepContext) -> None:
        """``sync="local"``: average the floating-point tensors of the method's state over ranks."""
        state = dict(self.method_state())
        changed = False
        for key, value in state.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                device = ctx.losses.device
                state[key] = reduce_mean_(ctx.trainer, value.detach().to(device).clone()).to(value.device)
                changed = True
        if changed:
            self.load_method_state(state)

    def on_optimizer_step(self, module: pl.LightningModule, skipped: bool) -> None:
        self._since_update += 1
        self._clip_pending = False

    # ------------------------------------------------------------------ shared-gradient clipping (Nash, FairGrad)
    #: clip the total norm of the shared parameters' gradient to this value before each optimizer step
    max_norm: float | None = None
    _clip_pending = False

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Lightning calls this after the AMP scaler unscaled the gradients (and after DDP averaged them).
        if self.max_norm is None or not self._clip_pending:
            return
        self._clip_pending = False
        params = shared_parameters_of(pl_module, type(self).__name__)
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_norm)

    def on_accumulation_window_discarded(self, module: pl.LightningModule) -> None:
        self._reset_window()

    # ------------------------------------------------------------------ what gets logged / saved
    def weights_tensor(self) -> Tensor | None:
        return self._weights

    def extra_metrics(self) -> dict[str, Tensor]:
        return dict(self._metrics)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "weights": None if self._weights is None else self._weights.detach().cpu().clone(),
            "since_update": self._since_update,
            "method": dict(self.method_state()),
        }
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        weights = state_dict.get("weights")
        self._weights = None if weights is None else weights.clone()
        self._since_update = int(state_dict.get("since_update", 0))
        if "generator" in state_dict:
            self._generator = torch.Generator()
            self._generator.set_state(state_dict["generator"])
        self.load_method_state(state_dict.get("method", {}))
